//! Learnable parameters: shapes, initialisation, noise and bounds.
//!
//! A [`ParamSpec`] says what one learnable tensor looks like. The optimizer works on an unbounded
//! *raw* θ; a bounded parameter is decoded through a smooth transform before a body sees it, so ES
//! can move raw θ freely and the decoded value never leaves its range. [`LmParams`] is the
//! ready-made spec for the five sampling knobs of an LLM call.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result, TensorContext};
use crate::rng;

/// How a parameter's starting value is chosen.
#[derive(Debug, Clone)]
pub enum Init {
    /// `randn · sqrt(2 / sum(shape))`, from the run seed and the parameter name (the default).
    XavierLike,
    /// All zeros.
    Zeros,
    /// Every element equal to this value (in the decoded space of a bounded parameter).
    Constant(f32),
    /// These values, row-major (in the decoded space of a bounded parameter).
    Values(Vec<f32>),
}

/// The kind of ES perturbation a parameter gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Noise {
    /// Dense Gaussian noise, one normal per element.
    Dense,
    /// Low-rank noise `A·Bᵀ/√r` for a matrix `[out, in]` (`A: [out, r]`, `B: [in, r]`); the
    /// effective rank is `min(r, out, in)`. Built-in layers never form the product.
    LowRank(usize),
}

/// Per-element bounds `lo + (hi − lo)·sigmoid(raw)`, optionally saturated at `max ≤ hi`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    lo: Vec<f32>,
    hi: Vec<f32>,
    max: Vec<f32>,
}

impl Bounds {
    fn at(v: &[f32], i: usize) -> f32 {
        if v.len() == 1 {
            v[0]
        } else {
            v[i]
        }
    }

    /// Decodes one raw value.
    pub fn decode(&self, i: usize, raw: f32) -> f32 {
        let (lo, hi, max) = (
            Self::at(&self.lo, i),
            Self::at(&self.hi, i),
            Self::at(&self.max, i),
        );
        let s = 1.0 / (1.0 + (-raw).exp());
        (lo + (hi - lo) * s).min(max)
    }

    /// The raw value that decodes to `value` (which must lie inside the bounds).
    pub fn encode(&self, i: usize, value: f32) -> Result<f32> {
        let (lo, hi, max) = (
            Self::at(&self.lo, i),
            Self::at(&self.hi, i),
            Self::at(&self.max, i),
        );
        if !(value > lo && value < hi && value <= max) {
            return Err(Error::config(
                "init",
                format!("value {value} at element {i} lies outside its bounds ({lo}, {max}]"),
            ));
        }
        let s = (value - lo) / (hi - lo);
        Ok((s / (1.0 - s)).ln())
    }
}

/// The description of one learnable tensor.
///
/// # Examples
/// ```
/// use hyperfunc::{ParamSpec, Noise};
/// let w = ParamSpec::matrix(4, 2).noise_rank(2);
/// assert_eq!(w.shape(), &[4, 2]);
/// assert_eq!(w.noise(), Noise::LowRank(2));
/// let t = ParamSpec::scalar().bounded(0.0, 2.0).constant(0.7);
/// assert!(t.bounds().is_some());
/// ```
#[derive(Debug, Clone)]
pub struct ParamSpec {
    shape: Vec<usize>,
    init: Init,
    noise: Noise,
    bounds: Option<Bounds>,
}

impl ParamSpec {
    /// A parameter of any shape, Xavier-like initialisation, dense noise, unbounded.
    pub fn new(shape: &[usize]) -> Self {
        Self {
            shape: shape.to_vec(),
            init: Init::XavierLike,
            noise: Noise::Dense,
            bounds: None,
        }
    }

    /// A weight matrix `[out, in]`.
    pub fn matrix(out: usize, inp: usize) -> Self {
        Self::new(&[out, inp])
    }

    /// A vector `[n]`.
    pub fn vector(n: usize) -> Self {
        Self::new(&[n])
    }

    /// A single number, shape `[1]`.
    pub fn scalar() -> Self {
        Self::new(&[1])
    }

    /// Sets the initialisation.
    pub fn init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }

    /// Starts from zeros.
    pub fn zeros(self) -> Self {
        self.init(Init::Zeros)
    }

    /// Starts from a constant (decoded space).
    pub fn constant(self, v: f32) -> Self {
        self.init(Init::Constant(v))
    }

    /// Starts from explicit values, row-major (decoded space).
    pub fn values(self, v: Vec<f32>) -> Self {
        self.init(Init::Values(v))
    }

    /// Uses low-rank noise of rank `r` (matrices only).
    pub fn noise_rank(mut self, r: usize) -> Self {
        self.noise = Noise::LowRank(r);
        self
    }

    /// Uses dense Gaussian noise (the default).
    pub fn dense_noise(mut self) -> Self {
        self.noise = Noise::Dense;
        self
    }

    /// Keeps every element inside `(lo, hi)` through `lo + (hi − lo)·sigmoid(raw)`.
    pub fn bounded(self, lo: f32, hi: f32) -> Self {
        self.bounds_per_element(vec![lo], vec![hi], vec![hi])
    }

    /// Per-element bounds; each vector has one entry per element (or one for all). Values decode
    /// to `min(lo + (hi − lo)·sigmoid(raw), max)`: a `max` below `hi` lets a default sit exactly
    /// on the upper edge of the valid range (like `top_p = 1.0`).
    pub fn bounds_per_element(mut self, lo: Vec<f32>, hi: Vec<f32>, max: Vec<f32>) -> Self {
        self.bounds = Some(Bounds { lo, hi, max });
        self
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The noise kind.
    pub fn noise(&self) -> Noise {
        self.noise
    }

    /// The bounds, if any.
    pub fn bounds(&self) -> Option<&Bounds> {
        self.bounds.as_ref()
    }

    /// The effective rank of low-rank noise (`min(r, out, in)`), or `None` for dense noise.
    pub fn effective_rank(&self) -> Option<usize> {
        match self.noise {
            Noise::LowRank(r) if self.shape.len() == 2 => {
                Some(r.min(self.shape[0]).min(self.shape[1]))
            }
            _ => None,
        }
    }

    /// Checks the spec; `name` is used in the error.
    pub(crate) fn validate(&self, name: &str) -> Result<()> {
        if self.shape.is_empty() || self.shape.contains(&0) {
            return Err(Error::config(
                name,
                format!(
                    "parameter shape {:?} must have at least one dimension and no zero dimension",
                    self.shape
                ),
            ));
        }
        if let Noise::LowRank(r) = self.noise {
            if r == 0 {
                return Err(Error::config(name, "low-rank noise needs rank >= 1"));
            }
            if self.shape.len() != 2 {
                return Err(Error::config(
                    name,
                    format!(
                        "low-rank noise needs a matrix [out, in], shape is {:?}",
                        self.shape
                    ),
                ));
            }
        }
        if let Some(b) = &self.bounds {
            let n = self.numel();
            for (what, v) in [("lo", &b.lo), ("hi", &b.hi), ("max", &b.max)] {
                if v.len() != 1 && v.len() != n {
                    return Err(Error::config(
                        name,
                        format!("bounds `{what}` has {} entries; give 1 or {n}", v.len()),
                    ));
                }
            }
            for i in 0..n {
                let (lo, hi) = (Bounds::at(&b.lo, i), Bounds::at(&b.hi, i));
                if lo >= hi || !lo.is_finite() || !hi.is_finite() {
                    return Err(Error::config(
                        name,
                        format!("bounds need lo < hi, got ({lo}, {hi}) at element {i}"),
                    ));
                }
            }
        }
        if let Init::Values(v) = &self.init {
            if v.len() != self.numel() {
                return Err(Error::ShapeMismatch {
                    function: name.to_string(),
                    what: "initial values".into(),
                    expected: format!("{} values for shape {:?}", self.numel(), self.shape),
                    actual: vec![v.len()],
                });
            }
        }
        Ok(())
    }

    /// The initial raw θ for a parameter called `name` under run seed `seed`.
    pub(crate) fn initial_raw(&self, name: &str, seed: u64, device: &Device) -> Result<Tensor> {
        self.validate(name)?;
        let n = self.numel();
        let decoded: Vec<f32> = match &self.init {
            Init::XavierLike => {
                let scale = (2.0 / self.shape.iter().sum::<usize>() as f32).sqrt();
                let mut v = rng::normals(&[seed, 0x1A17, rng::name_hash(name)], n);
                v.iter_mut().for_each(|x| *x *= scale);
                // Xavier-like init is drawn in raw space directly.
                return Tensor::from_vec(v, self.shape.clone(), device).at(name);
            }
            Init::Zeros => vec![0.0; n],
            Init::Constant(c) => vec![*c; n],
            Init::Values(v) => v.clone(),
        };
        let raw = match &self.bounds {
            None => decoded,
            Some(b) => decoded
                .iter()
                .enumerate()
                .map(|(i, &v)| b.encode(i, v))
                .collect::<Result<Vec<_>>>()
                .map_err(|e| match e {
                    Error::InvalidConfig { reason, .. } => Error::config(name, reason),
                    other => other,
                })?,
        };
        Tensor::from_vec(raw, self.shape.clone(), device).at(name)
    }

    /// Decodes raw values of this parameter (row-major) into the bounded space.
    ///
    /// # Examples
    /// ```
    /// let spec = hyperfunc::ParamSpec::scalar().bounded(0.0, 2.0);
    /// assert_eq!(spec.decode_values(&[0.0])?, vec![1.0]);
    /// # Ok::<(), hyperfunc::Error>(())
    /// ```
    pub fn decode_values(&self, raw: &[f32]) -> Result<Vec<f32>> {
        if raw.len() != self.numel() {
            return Err(Error::ShapeMismatch {
                function: "ParamSpec::decode_values".into(),
                what: "raw values".into(),
                expected: format!("{} values for shape {:?}", self.numel(), self.shape),
                actual: vec![raw.len()],
            });
        }
        Ok(match &self.bounds {
            None => raw.to_vec(),
            Some(b) => raw
                .iter()
                .enumerate()
                .map(|(i, &r)| b.decode(i, r))
                .collect(),
        })
    }

    /// Decodes raw θ with a population axis, `[P, ..shape]`, into the bounded space.
    pub(crate) fn decode(&self, raw: &Tensor, name: &str) -> Result<Tensor> {
        let Some(b) = &self.bounds else {
            return Ok(raw.clone());
        };
        let n = self.numel();
        let expand = |v: &[f32]| -> Vec<f32> { (0..n).map(|i| Bounds::at(v, i)).collect() };
        let dev = raw.device();
        let lo = Tensor::from_vec(expand(&b.lo), self.shape.clone(), dev).at(name)?;
        let span: Vec<f32> = expand(&b.hi)
            .iter()
            .zip(expand(&b.lo))
            .map(|(h, l)| h - l)
            .collect();
        let span = Tensor::from_vec(span, self.shape.clone(), dev).at(name)?;
        let max = Tensor::from_vec(expand(&b.max), self.shape.clone(), dev).at(name)?;
        let s = sigmoid(raw).at(name)?;
        s.broadcast_mul(&span)
            .and_then(|t| t.broadcast_add(&lo))
            .and_then(|t| t.broadcast_minimum(&max))
            .at(name)
    }
}

/// `1 / (1 + exp(−x))`, elementwise.
pub(crate) fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// The sampling knobs of an LLM call, decoded from an unbounded θ ∈ ℝ⁵.
///
/// The defaults are the starting point of optimisation: ES starts from temperature 0.7, top_p 1.0,
/// no penalties and a quarter of the model's token limit, and the transforms keep every knob in its
/// valid range (temperature in (0, 2), top_p in (0, 1], penalties in (−2, 2), max_tokens_frac in
/// (0, 1)).
///
/// # Examples
/// ```
/// use hyperfunc::LmParams;
/// let p = LmParams::default();
/// assert_eq!(p.temperature, 0.7);
/// assert_eq!(LmParams::spec().numel(), 5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LmParams {
    /// Sampling temperature, in (0, 2).
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: f32,
    /// Presence penalty, in (−2, 2).
    pub presence_penalty: f32,
    /// Frequency penalty, in (−2, 2).
    pub frequency_penalty: f32,
    /// Fraction of the model's maximum output tokens to allow, in (0, 1).
    pub max_tokens_frac: f32,
}

impl Default for LmParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_tokens_frac: 0.25,
        }
    }
}

impl LmParams {
    /// The [`ParamSpec`] of the five knobs, starting at the defaults.
    pub fn spec() -> ParamSpec {
        Self::default().spec_at()
    }

    /// The [`ParamSpec`] of the five knobs, starting at these values.
    pub fn spec_at(&self) -> ParamSpec {
        let d = self;
        ParamSpec::vector(5)
            .bounds_per_element(
                vec![0.0, 0.0, -2.0, -2.0, 0.0],
                vec![2.0, 1.25, 2.0, 2.0, 1.0],
                vec![2.0, 1.0, 2.0, 2.0, 1.0],
            )
            .values(vec![
                d.temperature,
                d.top_p,
                d.presence_penalty,
                d.frequency_penalty,
                d.max_tokens_frac,
            ])
            .dense_noise()
    }

    /// Builds the knobs from five decoded values (as an async body receives them).
    pub fn from_slice(v: &[f32]) -> Result<Self> {
        match v {
            [temperature, top_p, presence_penalty, frequency_penalty, max_tokens_frac] => {
                Ok(Self {
                    temperature: *temperature,
                    top_p: *top_p,
                    presence_penalty: *presence_penalty,
                    frequency_penalty: *frequency_penalty,
                    max_tokens_frac: *max_tokens_frac,
                })
            }
            _ => Err(Error::ShapeMismatch {
                function: "LmParams".into(),
                what: "decoded θ".into(),
                expected: "5 values".into(),
                actual: vec![v.len()],
            }),
        }
    }

    /// The token limit for a model whose maximum output is `model_max` tokens (at least 1).
    pub fn max_tokens(&self, model_max: u32) -> u32 {
        ((self.max_tokens_frac * model_max as f32).round() as u32).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lm_params_start_at_defaults_and_stay_in_range() {
        let spec = LmParams::spec();
        let raw = spec.initial_raw("lm", 0, &Device::Cpu).unwrap();
        let dec = spec.decode(&raw.unsqueeze(0).unwrap(), "lm").unwrap();
        let v = dec.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let p = LmParams::from_slice(&v).unwrap();
        let d = LmParams::default();
        assert!((p.temperature - d.temperature).abs() < 1e-5);
        assert!((p.top_p - 1.0).abs() < 1e-6);
        assert!(p.presence_penalty.abs() < 1e-5 && p.frequency_penalty.abs() < 1e-5);
        assert!((p.max_tokens_frac - 0.25).abs() < 1e-5);
        // Extreme raw values stay inside the valid ranges.
        for x in [-50.0f32, 50.0] {
            let raw = Tensor::from_vec(vec![x; 5], (1, 5), &Device::Cpu).unwrap();
            let v = spec
                .decode(&raw, "lm")
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let p = LmParams::from_slice(&v).unwrap();
            assert!((0.0..=2.0).contains(&p.temperature));
            assert!((0.0..=1.0).contains(&p.top_p));
            assert!((-2.0..=2.0).contains(&p.presence_penalty));
            assert!((0.0..=1.0).contains(&p.max_tokens_frac));
        }
    }

    #[test]
    fn bad_specs_are_rejected() {
        assert!(ParamSpec::new(&[0, 3]).validate("w").is_err());
        assert!(ParamSpec::vector(3).noise_rank(2).validate("w").is_err());
        assert!(ParamSpec::vector(2)
            .values(vec![1.0])
            .validate("w")
            .is_err());
        let e = ParamSpec::scalar()
            .bounded(0.0, 1.0)
            .constant(3.0)
            .initial_raw("t", 0, &Device::Cpu);
        assert!(matches!(e, Err(Error::InvalidConfig { .. })));
    }

    #[test]
    fn effective_rank_is_capped() {
        assert_eq!(
            ParamSpec::matrix(1, 4).noise_rank(8).effective_rank(),
            Some(1)
        );
        assert_eq!(
            ParamSpec::matrix(6, 4).noise_rank(2).effective_rank(),
            Some(2)
        );
        assert_eq!(ParamSpec::matrix(6, 4).effective_rank(), None);
    }
}
