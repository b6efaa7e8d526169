//! Update rules that turn a gradient estimate into a step on θ: Adam, SGD with momentum, and the
//! `compat` rule of the Python hyperfunc library.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::error::{Result, TensorContext};

/// The optimizer that applies the ES gradient estimate.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Update {
    /// Adam (the default): `β₁ = 0.9, β₂ = 0.999, ε = 1e-8`.
    Adam {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Denominator guard.
        eps: f64,
    },
    /// Plain SGD with heavy-ball momentum (0 for none).
    Sgd {
        /// Momentum coefficient in [0, 1).
        momentum: f64,
    },
    /// The Python hyperfunc library's rule, for users migrating from it: z-scored rewards and
    /// `θ += lr·√P·mean_i(r_i ε_i)`. Forces z-score shaping.
    Compat,
}

impl Default for Update {
    fn default() -> Self {
        Update::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl Update {
    pub(crate) fn validate(&self) -> crate::Result<()> {
        let bad = |r: &str| Err(crate::Error::config("update", r.to_string()));
        match *self {
            Update::Adam { beta1, beta2, eps } => {
                if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) || eps <= 0.0 {
                    return bad("Adam needs beta1, beta2 in [0, 1) and eps > 0");
                }
            }
            Update::Sgd { momentum } => {
                if !(0.0..1.0).contains(&momentum) {
                    return bad("SGD momentum must lie in [0, 1)");
                }
            }
            Update::Compat => {}
        }
        Ok(())
    }
}

/// Moment estimates, one entry per parameter.
#[derive(Clone, Debug, Default)]
pub(crate) struct UpdateState {
    t: i32,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl UpdateState {
    /// A state from a checkpoint's parts.
    pub fn from_parts(t: i32, m: BTreeMap<String, Tensor>, v: BTreeMap<String, Tensor>) -> Self {
        Self { t, m, v }
    }

    /// Its step count and moments (tensors are shared, not copied).
    pub fn parts(&self) -> (i32, BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
        (self.t, self.m.clone(), self.v.clone())
    }

    /// Starts a new step (Adam's bias correction counts steps).
    pub fn begin(&mut self) {
        self.t += 1;
    }

    /// The new θ of parameter `name` after an ascent step along `grad`.
    pub fn step(
        &mut self,
        rule: Update,
        name: &str,
        theta: &Tensor,
        grad: &Tensor,
        lr: f64,
        weight_decay: f64,
    ) -> Result<Tensor> {
        let delta = match rule {
            Update::Adam { beta1, beta2, eps } => {
                let m = match self.m.get(name) {
                    Some(m) => ema(m, grad, beta1).at(name)?,
                    None => (grad * (1.0 - beta1)).at(name)?,
                };
                let g2 = grad.sqr().at(name)?;
                let v = match self.v.get(name) {
                    Some(v) => ema(v, &g2, beta2).at(name)?,
                    None => (g2 * (1.0 - beta2)).at(name)?,
                };
                let mhat = 1.0 / (1.0 - beta1.powi(self.t));
                let vhat = 1.0 / (1.0 - beta2.powi(self.t));
                let d = (&m * (lr * mhat))
                    .and_then(|num| num.broadcast_div(&((&v * vhat)?.sqrt()? + eps)?))
                    .at(name)?;
                self.m.insert(name.to_string(), m);
                self.v.insert(name.to_string(), v);
                d
            }
            Update::Sgd { momentum } => {
                let v = match self.m.get(name) {
                    Some(v) if momentum > 0.0 => (v * momentum).and_then(|v| v + grad).at(name)?,
                    _ => grad.clone(),
                };
                self.m.insert(name.to_string(), v.clone());
                (v * lr).at(name)?
            }
            Update::Compat => (grad * lr).at(name)?,
        };
        let decayed = if weight_decay > 0.0 {
            (theta * (1.0 - lr * weight_decay)).at(name)?
        } else {
            theta.clone()
        };
        (decayed + delta).at(name)
    }
}

/// `decay·acc + (1 − decay)·x`.
fn ema(acc: &Tensor, x: &Tensor, decay: f64) -> candle_core::Result<Tensor> {
    (acc * decay)? + (x * (1.0 - decay))?
}
