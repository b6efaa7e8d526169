//! Metrics: one number per candidate from its predictions on all examples.
//!
//! A metric only computes a value; whether higher or lower is better is the optimizer's
//! explicit `maximize`/`minimize` setting. Built-in tensor metrics work on the whole chunk at once
//! (`preds: [P, N, ..]` or shared `[N, ..]`, `targets: [N, ..]`).

use candle_core::{Tensor, D};
use futures::future::BoxFuture;
use rayon::prelude::*;

use crate::data::Value;
use crate::error::{Error, Result, TensorContext};
use crate::function::Json;

/// What [`Metric::score_async`] sees: the inputs, predictions and targets of `pop` candidates.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// The examples' inputs (shared by all candidates).
    pub inputs: &'a Value,
    /// The predictions of all `pop` candidates on all examples.
    pub preds: &'a Value,
    /// The examples' targets.
    pub targets: &'a Value,
    /// Number of candidates.
    pub pop: usize,
}

/// Scores the predictions of `pop` candidates.
///
/// A metric that must wait on I/O (an LLM judge) overrides [`Metric::score_async`], which the
/// engine awaits on its own runtime: nothing ever blocks a runtime thread, and nothing is
/// silently scored 0 for want of an event loop.
pub trait Metric: Send + Sync {
    /// One value per candidate; `preds` covers all examples of the `pop` candidates.
    fn score(&self, preds: &Value, targets: &Value, pop: usize) -> Result<Vec<f32>>;

    /// The async form the engine calls; by default it is [`Metric::score`].
    fn score_async<'a>(&'a self, batch: Batch<'a>) -> BoxFuture<'a, Result<Vec<f32>>> {
        Box::pin(async move { self.score(batch.preds, batch.targets, batch.pop) })
    }
}

/// One candidate's prediction shape, checked against the targets' shape.
fn aligned<'a>(name: &str, preds: &'a Value, targets: &Value) -> Result<&'a [usize]> {
    let (p, y) = (preds.as_tensor()?, targets.as_tensor()?);
    let per = if preds.is_batched() {
        &p.dims()[1..]
    } else {
        p.dims()
    };
    if per != y.dims() {
        return Err(Error::ShapeMismatch {
            function: name.to_string(),
            what: "predictions".into(),
            expected: format!("{:?} per candidate (the targets' shape)", y.dims()),
            actual: p.dims().to_vec(),
        });
    }
    Ok(per)
}

/// Predictions as `[P, N·k]` and targets as `[1, N·k]`, checking that they line up.
fn flat_pair(name: &str, preds: &Value, targets: &Value, pop: usize) -> Result<(Tensor, Tensor)> {
    aligned(name, preds, targets)?;
    let p = preds.as_tensor()?;
    let y = targets.as_tensor()?;
    let k = y.elem_count();
    let p = if preds.is_batched() {
        p.reshape((pop, k))
    } else {
        p.reshape((1, k))
            .and_then(|p| p.broadcast_as((pop, k))?.contiguous())
    }
    .at(name)?;
    let y = y.reshape((1, k)).at(name)?;
    Ok((p, y))
}

fn per_candidate(name: &str, t: Tensor) -> Result<Vec<f32>> {
    t.mean(D::Minus1).and_then(|m| m.to_vec1::<f32>()).at(name)
}

/// Binary cross-entropy of probabilities against 0/1 targets (lower is better).
#[derive(Debug, Clone, Copy, Default)]
pub struct Bce;

impl Metric for Bce {
    fn score(&self, preds: &Value, targets: &Value, pop: usize) -> Result<Vec<f32>> {
        let eps = 1e-7;
        let bce = |p: f32, y: f32| {
            let p = p.clamp(eps as f32, 1.0 - eps as f32);
            -(p.ln() * y + (1.0 - p).ln() * (1.0 - y))
        };
        if let Some(v) = elementwise_cpu("bce", preds, targets, pop, bce)? {
            return Ok(v);
        }
        let (p, y) = flat_pair("bce", preds, targets, pop)?;
        let l = p
            .clamp(eps, 1.0 - eps)
            .and_then(|p| {
                let a = p.log()?.broadcast_mul(&y)?;
                let b = p
                    .affine(-1.0, 1.0)?
                    .log()?
                    .broadcast_mul(&y.affine(-1.0, 1.0)?)?;
                (a + b)?.neg()
            })
            .at("bce")?;
        per_candidate("bce", l)
    }
}

/// Mean squared error (lower is better).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mse;

impl Metric for Mse {
    fn score(&self, preds: &Value, targets: &Value, pop: usize) -> Result<Vec<f32>> {
        if let Some(v) = elementwise_cpu("mse", preds, targets, pop, |a, b| (a - b) * (a - b))? {
            return Ok(v);
        }
        let (p, y) = flat_pair("mse", preds, targets, pop)?;
        per_candidate("mse", p.broadcast_sub(&y).and_then(|d| d.sqr()).at("mse")?)
    }
}

/// The CPU kernel of the elementwise metrics ([`Mse`], [`Bce`], [`Accuracy`]): the mean of
/// `f(prediction, target)` over each candidate's values, in one pass over its predictions where
/// they lie, in parallel over candidates, with no copy of the predictions. Predictions `[N, K]`
/// per candidate are read row-major or, as the tiled layers leave them, class-major (`[K, N]`);
/// either way a row's values are summed in `f32` in the order of its outputs and the rows' sums
/// in `f64` in row order, so a candidate gets the same bits however it was laid out. `None`
/// where the tensors are not `f32` on the CPU or the predictions are not `[N]` or `[N, K]` per
/// candidate.
fn elementwise_cpu(
    name: &str,
    preds: &Value,
    targets: &Value,
    pop: usize,
    f: impl Fn(f32, f32) -> f32 + Sync + Copy,
) -> Result<Option<Vec<f32>>> {
    let per = aligned(name, preds, targets)?;
    let (z, y) = (preds.as_tensor()?, targets.as_tensor()?);
    let on_cpu = crate::kernels::on_cpu_f32;
    if !on_cpu(z) || !on_cpu(y) {
        return Ok(None);
    }
    let (n, k) = match *per {
        [n] => (n, 1),
        [n, k] => (n, k),
        _ => return Ok(None),
    };
    let count = (n * k).max(1) as f64;
    crate::kernels::with_slice(y, name, |ys| {
        // Class-major predictions read the targets class-major too (both down whole rows),
        // transposed once, when the first such block needs them.
        let yt = std::sync::OnceLock::new();
        let yt = || -> &[f32] {
            if k == 1 {
                ys
            } else {
                yt.get_or_init(|| crate::kernels::transposed(ys, n, k))
            }
        };
        per_block(
            name,
            preds,
            (n * k, pop),
            |block| (row_sums(block, ys, k, f) / count) as f32,
            |block| (row_sums_cm(block, yt(), n, k, f) / count) as f32,
        )
    })?
    .map(Some)
}

/// One value per candidate from its block of `len` predictions, candidates in parallel. `f_cm`
/// reads a block class-major, in place, when the predictions are laid out so (the transposed
/// view of `[P, C, N]` that the tiled layers return); `f` reads a row-major block, and the one
/// block of unbatched predictions is scored once for all `pop` candidates.
fn per_block(
    name: &str,
    preds: &Value,
    (len, pop): (usize, usize),
    f: impl Fn(&[f32]) -> f32 + Sync,
    f_cm: impl Fn(&[f32]) -> f32 + Sync,
) -> Result<Vec<f32>> {
    let z = preds.as_tensor()?;
    if preds.is_batched() {
        let cm = crate::kernels::with_class_major(z, name, |zs| {
            zs.par_chunks(len.max(1)).map(&f_cm).collect()
        })?;
        if let Some(v) = cm {
            return Ok(v);
        }
    }
    crate::kernels::with_slice(z, name, |zs| {
        if preds.is_batched() {
            zs.par_chunks(len.max(1)).map(&f).collect()
        } else {
            vec![f(zs); pop]
        }
    })
}

/// Σ of `f` over row-major `[N, K]` predictions and targets: each row in `f32`, rows in `f64`.
#[inline(always)]
fn row_sums(z: &[f32], y: &[f32], k: usize, f: impl Fn(f32, f32) -> f32) -> f64 {
    z.chunks_exact(k.max(1))
        .zip(y.chunks_exact(k.max(1)))
        .map(|(zr, yr)| zr.iter().zip(yr).fold(0.0f32, |s, (&a, &b)| s + f(a, b)))
        .fold(0.0f64, |t, s| t + f64::from(s))
}

/// [`row_sums`] of class-major predictions and targets (`[K, N]`): the same sums in the same
/// order, 64 rows at a time.
#[inline(always)]
fn row_sums_cm(zt: &[f32], yt: &[f32], n: usize, k: usize, f: impl Fn(f32, f32) -> f32) -> f64 {
    const ROWS: usize = 64;
    let mut total = 0.0f64;
    let mut s = [0.0f32; ROWS];
    for r0 in (0..n).step_by(ROWS) {
        let nr = ROWS.min(n - r0);
        let s = &mut s[..nr];
        s.fill(0.0);
        for j in 0..k {
            let (zr, yr) = (&zt[j * n + r0..][..nr], &yt[j * n + r0..][..nr]);
            for ((acc, &a), &b) in s.iter_mut().zip(zr).zip(yr) {
                *acc += f(a, b);
            }
        }
        total = s.iter().fold(total, |t, &v| t + f64::from(v));
    }
    total
}

/// Fraction of outputs on the right side of `threshold` for 0/1 targets (higher is better).
#[derive(Debug, Clone, Copy)]
pub struct Accuracy {
    /// Decision threshold on the predicted probability.
    pub threshold: f32,
}

impl Default for Accuracy {
    fn default() -> Self {
        Self { threshold: 0.5 }
    }
}

impl Metric for Accuracy {
    fn score(&self, preds: &Value, targets: &Value, pop: usize) -> Result<Vec<f32>> {
        let t = self.threshold;
        let hit = move |p: f32, y: f32| f32::from(u8::from((p >= t) == (y >= 0.5)));
        if let Some(v) = elementwise_cpu("accuracy", preds, targets, pop, hit)? {
            return Ok(v);
        }
        let (p, y) = flat_pair("accuracy", preds, targets, pop)?;
        let hit = p
            .ge(f64::from(self.threshold))
            .and_then(|b| b.to_dtype(candle_core::DType::F32))
            .and_then(|b| b.broadcast_eq(&y.ge(0.5)?.to_dtype(candle_core::DType::F32)?))
            .and_then(|b| b.to_dtype(candle_core::DType::F32))
            .at("accuracy")?;
        per_candidate("accuracy", hit)
    }
}

/// Checks logits `[P, N, C]` (or shared `[N, C]`) against labels `[N]` (or `[N, 1]`); returns
/// `(N, C)` and the labels as class indices.
fn class_labels(name: &str, preds: &Value, targets: &Value) -> Result<(usize, usize, Vec<usize>)> {
    let z = preds.as_tensor()?;
    let y = targets.as_tensor()?;
    let per = if preds.is_batched() {
        &z.dims()[1..]
    } else {
        z.dims()
    };
    let n = y.dims().first().copied().unwrap_or(0);
    if per.len() != 2 || per[0] != n || y.elem_count() != n {
        return Err(Error::ShapeMismatch {
            function: name.to_string(),
            what: "logits".into(),
            expected: format!("[N={n}, C] per candidate with class labels [N] (or [N, 1])"),
            actual: z.dims().to_vec(),
        });
    }
    let c = per[1];
    let raw = y.flatten_all().and_then(|t| t.to_vec1::<f32>()).at(name)?;
    let labels = raw
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            if l < 0.0 || l as usize >= c || l.fract() != 0.0 {
                Err(Error::ShapeMismatch {
                    function: name.to_string(),
                    what: format!("class label of example {i}"),
                    expected: format!("an integer in [0, {c})"),
                    actual: vec![],
                })
            } else {
                Ok(l as usize)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((n, c, labels))
}

/// A class metric's CPU kernel on one candidate's logits: `(logits, c, labels)`.
type ClassKernel = fn(&[f32], usize, &[usize]) -> f32;

/// The CPU kernel of a class metric: one value per candidate, candidates in parallel. `f` reads
/// row-major logits `[N, C]`, `f_cm` class-major ones `[C, N]` (what the tiled layers return),
/// which are read in place.
fn class_metric_cpu(
    name: &str,
    preds: &Value,
    targets: &Value,
    pop: usize,
    (f, f_cm): (ClassKernel, ClassKernel),
) -> Result<Option<Vec<f32>>> {
    let z = preds.as_tensor()?;
    if !crate::kernels::on_cpu_f32(z) {
        return Ok(None);
    }
    let (n, c, labels) = class_labels(name, preds, targets)?;
    per_block(
        name,
        preds,
        (n * c, pop),
        |block| f(block, c, &labels),
        |block| f_cm(block, c, &labels),
    )
    .map(Some)
}

/// Logits as `[P, N, C]` and labels one-hot `[N, C]` (the device-agnostic path).
fn logits_and_onehot(
    name: &str,
    preds: &Value,
    targets: &Value,
    pop: usize,
) -> Result<(Tensor, Tensor)> {
    let z = preds.as_tensor()?;
    let (n, c, labels) = class_labels(name, preds, targets)?;
    let mut onehot = vec![0f32; n * c];
    for (i, &k) in labels.iter().enumerate() {
        onehot[i * c + k] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (n, c), z.device()).at(name)?;
    let z = if preds.is_batched() {
        z.clone()
    } else {
        z.unsqueeze(0)
            .and_then(|t| t.broadcast_as((pop, n, c)))
            .at(name)?
    };
    Ok((z, onehot))
}

/// Mean softmax cross-entropy of logits `[.., N, C]` against class labels `[N]` (lower is better).
#[derive(Debug, Clone, Copy, Default)]
pub struct CrossEntropy;

impl Metric for CrossEntropy {
    fn score(&self, preds: &Value, targets: &Value, pop: usize) -> Result<Vec<f32>> {
        if let Some(v) = class_metric_cpu(
            "cross_entropy",
            preds,
            targets,
            pop,
            (
                crate::kernels::cross_entropy,
                crate::kernels::cross_entropy_cm,
            ),
        )? {
            return Ok(v);
        }
        let (z, onehot) = logits_and_onehot("cross_entropy", preds, targets, pop)?;
        let ce = (|| {
            let max = z.max_keepdim(D::Minus1)?;
            let shifted = z.broadcast_sub(&max)?;
            let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
            let picked = shifted.broadcast_mul(&onehot)?.sum_keepdim(D::Minus1)?;
            (lse - picked)?.squeeze(D::Minus1)
        })()
        .at("cross_entropy")?;
        per_candidate("cross_entropy", ce)
    }
}

/// Fraction of examples whose largest logit is the labelled class (higher is better).
#[derive(Debug, Clone, Copy, Default)]
pub struct ClassAccuracy;

impl Metric for ClassAccuracy {
    fn score(&self, preds: &Value, targets: &Value, pop: usize) -> Result<Vec<f32>> {
        if let Some(v) = class_metric_cpu(
            "class_accuracy",
            preds,
            targets,
            pop,
            (
                crate::kernels::class_accuracy,
                crate::kernels::class_accuracy_cm,
            ),
        )? {
            return Ok(v);
        }
        let (z, onehot) = logits_and_onehot("class_accuracy", preds, targets, pop)?;
        let hit = (|| {
            let max = z.max_keepdim(D::Minus1)?;
            let picked = z.broadcast_mul(&onehot)?.sum_keepdim(D::Minus1)?;
            picked
                .ge(&max)?
                .to_dtype(candle_core::DType::F32)?
                .squeeze(D::Minus1)
        })()
        .at("class_accuracy")?;
        per_candidate("class_accuracy", hit)
    }
}

/// A metric from a closure over one candidate's predictions `[N, ..]` and the targets.
pub struct FnMetric<F>(pub F);

impl<F> Metric for FnMetric<F>
where
    F: Fn(&Tensor, &Tensor) -> candle_core::Result<f32> + Send + Sync,
{
    fn score(&self, preds: &Value, targets: &Value, pop: usize) -> Result<Vec<f32>> {
        let p = preds.as_tensor()?;
        let y = targets.as_tensor()?;
        (0..pop)
            .map(|i| {
                let pi = if preds.is_batched() {
                    p.get(i).at("metric")?
                } else {
                    p.clone()
                };
                (self.0)(&pi, y).at("metric")
            })
            .collect()
    }
}

/// A metric from a closure over one JSON prediction and its target, averaged over examples.
pub struct JsonMetric<F>(pub F);

impl<F> Metric for JsonMetric<F>
where
    F: Fn(&Json, &Json) -> f32 + Send + Sync,
{
    fn score(&self, preds: &Value, targets: &Value, pop: usize) -> Result<Vec<f32>> {
        let p = preds.as_json()?;
        let y = targets.as_json()?;
        let n = y.len();
        let expected = if preds.is_batched() { pop * n } else { n };
        if p.len() != expected {
            return Err(Error::ShapeMismatch {
                function: "metric".into(),
                what: "predictions".into(),
                expected: format!("{expected} items"),
                actual: vec![p.len()],
            });
        }
        Ok((0..pop)
            .map(|c| {
                let row = if preds.is_batched() {
                    &p[c * n..(c + 1) * n]
                } else {
                    p
                };
                row.iter().zip(y).map(|(a, b)| (self.0)(a, b)).sum::<f32>() / n as f32
            })
            .collect())
    }
}

/// Binary cross-entropy.
pub fn bce() -> Bce {
    Bce
}

/// Mean squared error.
pub fn mse() -> Mse {
    Mse
}

/// Accuracy at threshold 0.5.
pub fn accuracy() -> Accuracy {
    Accuracy::default()
}

/// Softmax cross-entropy against class labels.
pub fn cross_entropy() -> CrossEntropy {
    CrossEntropy
}

/// Top-1 accuracy against class labels.
pub fn class_accuracy() -> ClassAccuracy {
    ClassAccuracy
}

/// A per-candidate tensor metric from a closure.
pub fn from_fn<F>(f: F) -> FnMetric<F>
where
    F: Fn(&Tensor, &Tensor) -> candle_core::Result<f32> + Send + Sync,
{
    FnMetric(f)
}

/// A per-example JSON metric from a closure, averaged.
pub fn per_example<F>(f: F) -> JsonMetric<F>
where
    F: Fn(&Json, &Json) -> f32 + Send + Sync,
{
    JsonMetric(f)
}
