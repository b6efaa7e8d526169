//! Populations of candidate θ's and their batched evaluation.
//!
//! A [`Population`] is a base θ plus, per parameter, how each candidate differs from it: dense
//! perturbations, low-rank factors (never multiplied out unless a body needs the full matrix), or
//! explicit candidate values. Evaluation runs the system once per chunk of candidates × examples,
//! bounded by `max_batch_size` rows, and scores each candidate with the metric. This module knows
//! nothing of how perturbations are drawn (that is `es`).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Tensor;

use crate::data::{Examples, Value};
use crate::error::{Error, Result, TensorContext};
use crate::metric::Metric;
use crate::observe::{Hub, Record, RecordKind, Status, Trace};
use crate::system::{Cx, HyperSystem, Scope};
use crate::theta::{Registry, Theta};

/// How every candidate of a population differs from the base, for one parameter.
#[derive(Clone, Debug)]
pub(crate) enum Perturbation {
    /// Additive perturbation per candidate, `[P, ..shape]` (σ and sign folded in).
    Dense(Tensor),
    /// Antithetic pairs of additive perturbations, `[P/2, ..shape]` (σ folded in): candidate
    /// `2k` is `θ + e_k`, candidate `2k + 1` is `θ − e_k`. Kept unmirrored so that a layer on a
    /// shared input computes `X·e_kᵀ` once per pair.
    Mirrored(Tensor),
    /// `θ_p = W + a_p·b_pᵀ` with `a: [P, out, r]` (σ/√r and sign folded in) and `b: [P, in, r]`.
    LowRank { a: Tensor, b: Tensor },
    /// The candidates' raw values, `[P, ..shape]`.
    Explicit(Tensor),
}

/// One parameter as seen by one chunk of candidates (raw values).
#[derive(Clone, Debug)]
pub(crate) enum ParamChunk {
    /// The same tensor for every candidate, `[..shape]`.
    Shared(Tensor),
    /// One tensor per candidate, `[pc, ..shape]`.
    PerCandidate(Tensor),
    /// `base + a_p·b_pᵀ`, `a: [pc, out, r]`, `b: [pc, in, r]`.
    LowRank { base: Tensor, a: Tensor, b: Tensor },
    /// Antithetic pairs: candidate `2k` is `base + e_k`, candidate `2k + 1` is `base − e_k`,
    /// `e: [pc/2, ..shape]` (`pc` is even).
    Mirrored { base: Tensor, e: Tensor },
}

impl ParamChunk {
    /// Candidates `[c0, c0 + n)` of this chunk.
    pub fn narrow(&self, c0: usize, n: usize) -> candle_core::Result<ParamChunk> {
        Ok(match self {
            ParamChunk::Shared(t) => ParamChunk::Shared(t.clone()),
            ParamChunk::PerCandidate(t) => ParamChunk::PerCandidate(t.narrow(0, c0, n)?),
            ParamChunk::LowRank { base, a, b } => ParamChunk::LowRank {
                base: base.clone(),
                a: a.narrow(0, c0, n)?,
                b: b.narrow(0, c0, n)?,
            },
            ParamChunk::Mirrored { base, e } if c0.is_multiple_of(2) && n.is_multiple_of(2) => {
                ParamChunk::Mirrored {
                    base: base.clone(),
                    e: e.narrow(0, c0 / 2, n / 2)?,
                }
            }
            // A range that splits a pair: its candidates' values.
            ParamChunk::Mirrored { base, e } => ParamChunk::PerCandidate(
                crate::kernels::unmirror(e, base, c0, n, "population")
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
            ),
        })
    }

    /// The raw values per candidate, `[pc, ..shape]` (forms the product for low-rank noise).
    pub fn materialize(&self, pc: usize) -> candle_core::Result<Tensor> {
        match self {
            ParamChunk::Shared(t) => {
                let mut dims = vec![pc];
                dims.extend_from_slice(t.dims());
                t.unsqueeze(0)?.broadcast_as(dims)?.contiguous()
            }
            ParamChunk::PerCandidate(t) => Ok(t.clone()),
            ParamChunk::LowRank { base, a, b } => {
                a.matmul(&b.transpose(1, 2)?)?.broadcast_add(base)
            }
            ParamChunk::Mirrored { base, e } => {
                crate::kernels::unmirror(e, base, 0, 2 * e.dim(0)?, "population")
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            }
        }
    }
}

/// P candidate θ's, represented without copying what they share.
#[derive(Clone, Debug)]
pub struct Population {
    base: Theta,
    size: usize,
    perturb: BTreeMap<String, Perturbation>,
    kernel: crate::layers::Kernel,
}

impl Population {
    /// The same candidates, evaluated with another CPU kernel (speed only).
    pub(crate) fn with_kernel(mut self, kernel: crate::layers::Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// The CPU kernel this population is evaluated with.
    pub(crate) fn kernel(&self) -> crate::layers::Kernel {
        self.kernel
    }

    /// The same candidates with their tensors copied to `device` (the kernel kept).
    pub(crate) fn to_device(&self, device: &candle_core::Device) -> candle_core::Result<Self> {
        let perturb = self
            .perturb
            .iter()
            .map(|(k, p)| {
                let p = match p {
                    Perturbation::Dense(t) => Perturbation::Dense(t.to_device(device)?),
                    Perturbation::Mirrored(t) => Perturbation::Mirrored(t.to_device(device)?),
                    Perturbation::LowRank { a, b } => Perturbation::LowRank {
                        a: a.to_device(device)?,
                        b: b.to_device(device)?,
                    },
                    Perturbation::Explicit(t) => Perturbation::Explicit(t.to_device(device)?),
                };
                Ok((k.clone(), p))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            base: self.base.to_device(device)?,
            size: self.size,
            perturb,
            kernel: self.kernel,
        })
    }

    /// A population of one: the given θ.
    pub fn center(theta: Theta) -> Self {
        Self {
            base: theta,
            size: 1,
            perturb: BTreeMap::new(),
            kernel: crate::layers::Kernel::default(),
        }
    }

    /// A population made of explicit candidate θ maps (all with the same parameter names).
    pub fn from_thetas(thetas: &[Theta]) -> Result<Self> {
        let first = thetas
            .first()
            .ok_or_else(|| Error::config("population", "needs at least one candidate θ"))?;
        if let Some(i) = thetas.iter().position(|t| t.prompts().ne(first.prompts())) {
            return Err(Error::config(
                "population",
                format!(
                    "candidate {i} has other prompts than candidate 0; one population shares \
                     its prompts (evaluate prompt variants as separate populations)"
                ),
            ));
        }
        let mut perturb = BTreeMap::new();
        for (name, _) in first.iter() {
            let ts = thetas
                .iter()
                .map(|t| {
                    t.get(name).cloned().ok_or_else(|| Error::MissingParameter {
                        name: name.to_string(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let stacked = Tensor::stack(&ts, 0).map_err(|_| Error::ShapeMismatch {
                function: name.to_string(),
                what: "candidate θ".into(),
                expected: format!("{:?} in every candidate", ts[0].dims()),
                actual: ts
                    .iter()
                    .find(|t| t.dims() != ts[0].dims())
                    .map(|t| t.dims().to_vec())
                    .unwrap_or_default(),
            })?;
            perturb.insert(name.to_string(), Perturbation::Explicit(stacked));
        }
        Ok(Self {
            base: first.clone(),
            size: thetas.len(),
            perturb,
            kernel: crate::layers::Kernel::default(),
        })
    }

    pub(crate) fn perturbed(
        base: Theta,
        size: usize,
        perturb: BTreeMap<String, Perturbation>,
    ) -> Self {
        Self {
            base,
            size,
            perturb,
            kernel: crate::layers::Kernel::default(),
        }
    }

    /// The parameters' names, shapes and perturbation kinds (`s` shared, `d` dense, `rN`
    /// rank N), for autotune shape keys.
    pub(crate) fn shape_signature(&self) -> String {
        let mut parts = Vec::new();
        for (name, t) in self.base.iter() {
            let dims: Vec<String> = t.dims().iter().map(ToString::to_string).collect();
            let kind = match self.perturb.get(name) {
                None => "s".to_string(),
                Some(Perturbation::LowRank { a, .. }) => {
                    format!("r{}", a.dims().last().copied().unwrap_or(0))
                }
                Some(_) => "d".to_string(),
            };
            parts.push(format!("{name}:{}:{kind}", dims.join("x")));
        }
        parts.join(",")
    }

    /// Whether some parameter holds antithetic pairs computed together (see
    /// [`Perturbation::Mirrored`]).
    pub(crate) fn mirrored(&self) -> bool {
        self.perturb
            .values()
            .any(|p| matches!(p, Perturbation::Mirrored(_)))
    }

    /// Number of candidates.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The base θ the candidates are perturbations of.
    pub fn base(&self) -> &Theta {
        &self.base
    }

    /// Parameter `name` for candidates `[p0, p0+pc)`.
    pub(crate) fn chunk(&self, name: &str, p0: usize, pc: usize) -> Result<ParamChunk> {
        let base = self.base.get(name).ok_or_else(|| Error::MissingParameter {
            name: name.to_string(),
        })?;
        Ok(match self.perturb.get(name) {
            None => ParamChunk::Shared(base.clone()),
            Some(Perturbation::Explicit(t)) => {
                ParamChunk::PerCandidate(t.narrow(0, p0, pc).at(name)?)
            }
            Some(Perturbation::Dense(e)) => {
                let e = e.narrow(0, p0, pc).at(name)?;
                ParamChunk::PerCandidate(if crate::kernels::on_cpu_f32(&e) {
                    crate::kernels::add_rows(&e, base, name)?
                } else {
                    e.broadcast_add(base).at(name)?
                })
            }
            Some(Perturbation::Mirrored(e)) if p0.is_multiple_of(2) && pc.is_multiple_of(2) => {
                ParamChunk::Mirrored {
                    base: base.clone(),
                    e: e.narrow(0, p0 / 2, pc / 2).at(name)?,
                }
            }
            Some(Perturbation::Mirrored(e)) => {
                ParamChunk::PerCandidate(crate::kernels::unmirror(e, base, p0, pc, name)?)
            }
            Some(Perturbation::LowRank { a, b }) => ParamChunk::LowRank {
                base: base.clone(),
                a: a.narrow(0, p0, pc).at(name)?,
                b: b.narrow(0, p0, pc).at(name)?,
            },
        })
    }

    /// Candidates `[start, start + len)` as a population of their own (views, no copy).
    pub(crate) fn select(&self, start: usize, len: usize) -> Result<Population> {
        if len == 0 || start + len > self.size {
            return Err(Error::config(
                "population",
                format!(
                    "candidates {start}..{} are not a non-empty range of 0..{}",
                    start + len,
                    self.size
                ),
            ));
        }
        let perturb = self
            .perturb
            .iter()
            .map(|(name, p)| {
                let p = match p {
                    Perturbation::Dense(e) => {
                        Perturbation::Dense(e.narrow(0, start, len).at(name)?)
                    }
                    Perturbation::Explicit(t) => {
                        Perturbation::Explicit(t.narrow(0, start, len).at(name)?)
                    }
                    Perturbation::Mirrored(e)
                        if start.is_multiple_of(2) && len.is_multiple_of(2) =>
                    {
                        Perturbation::Mirrored(e.narrow(0, start / 2, len / 2).at(name)?)
                    }
                    // A range that splits a pair: its perturbations, one per candidate.
                    Perturbation::Mirrored(e) => {
                        Perturbation::Dense(crate::kernels::mirrored_range(e, start, len).at(name)?)
                    }
                    Perturbation::LowRank { a, b } => Perturbation::LowRank {
                        a: a.narrow(0, start, len).at(name)?,
                        b: b.narrow(0, start, len).at(name)?,
                    },
                };
                Ok((name.clone(), p))
            })
            .collect::<Result<_>>()?;
        Ok(Population {
            base: self.base.clone(),
            size: len,
            perturb,
            kernel: self.kernel,
        })
    }

    /// The raw θ of candidate `i`, materialized.
    pub fn candidate(&self, i: usize) -> Result<Theta> {
        if i >= self.size {
            return Err(Error::config(
                "candidate",
                format!(
                    "index {i} is out of range for a population of {}",
                    self.size
                ),
            ));
        }
        let mut theta = self.base.prompts_only();
        for (name, _) in self.base.iter() {
            let t = self
                .chunk(name, i, 1)?
                .materialize(1)
                .and_then(|t| t.squeeze(0))
                .at(name)?;
            theta.insert(name, t);
        }
        Ok(theta)
    }
}

/// What one population evaluation produced.
#[derive(Debug)]
pub struct PopulationEval {
    /// One fitness per candidate (NaN for a candidate that failed).
    pub fitness: Vec<f32>,
    /// Batched tensor forwards run (one per tensor stage per chunk).
    pub forwards: usize,
    /// Chunks the population × examples grid was split into.
    pub chunks: usize,
    /// Candidates whose async calls failed.
    pub failed: usize,
    /// The first failure, if any candidate failed (the same typed error a single call returns).
    pub first_error: Option<Error>,
}

/// Candidates per chunk and examples per chunk for `max_batch_size` rows per forward. With
/// `pairs` (antithetic pairs computed together, see [`Perturbation::Mirrored`]) a chunk holds
/// whole pairs: an even number of candidates, at least two, so that a candidate's fitness does
/// not depend on how the population is cut.
pub(crate) fn plan(pop: usize, n: usize, max_batch_size: usize, pairs: bool) -> (usize, usize) {
    let max = max_batch_size.max(1);
    let (pc, nc) = if n >= max {
        (1, max)
    } else {
        ((max / n).clamp(1, pop.max(1)), n)
    };
    match pc {
        _ if !pairs || pop < 2 || pc % 2 == 0 => (pc, nc),
        1 => (2, (max / 2).clamp(1, n)),
        _ => (pc - 1, nc),
    }
}

/// Evaluates every candidate of `pop` on `examples`; returns one metric value per candidate.
///
/// Tensor stages run as one batched forward per chunk of at most `max_batch_size`
/// candidate × example rows; async stages run concurrently.
pub async fn evaluate_population<S: HyperSystem>(
    sys: &S,
    pop: &Population,
    examples: &Examples,
    metric: &dyn Metric,
    max_batch_size: usize,
) -> Result<PopulationEval> {
    evaluate_checked(sys, pop, examples, metric, max_batch_size, Trace::default()).await
}

/// [`evaluate_population`], recording every call into `hub`.
pub async fn evaluate_population_observed<S: HyperSystem>(
    sys: &S,
    pop: &Population,
    examples: &Examples,
    metric: &dyn Metric,
    max_batch_size: usize,
    hub: &Hub,
) -> Result<PopulationEval> {
    let trace = Trace {
        hub: Some(hub.clone()),
        parent: hub.session(),
        generation: None,
    };
    evaluate_checked(sys, pop, examples, metric, max_batch_size, trace).await
}

async fn evaluate_checked<S: HyperSystem>(
    sys: &S,
    pop: &Population,
    examples: &Examples,
    metric: &dyn Metric,
    max_batch_size: usize,
    trace: Trace,
) -> Result<PopulationEval> {
    let reg = Arc::new(Registry::of(sys)?);
    pop.base.check(&reg)?;
    evaluate_with(
        &reg,
        sys,
        Arc::new(pop.clone()),
        examples,
        metric,
        max_batch_size,
        trace,
    )
    .await
}

/// Evaluates one θ on `examples` (examples run concurrently); returns the metric value.
pub async fn evaluate<S: HyperSystem>(
    sys: &S,
    theta: &Theta,
    examples: &Examples,
    metric: &dyn Metric,
) -> Result<f32> {
    let pop = Population::center(theta.clone());
    let out = evaluate_population(sys, &pop, examples, metric, usize::MAX).await?;
    // A failed call of the only candidate is returned as the call's own typed error.
    match (out.fitness[0].is_nan(), out.first_error) {
        (true, Some(e)) => Err(e),
        _ => Ok(out.fitness[0]),
    }
}

pub(crate) async fn evaluate_with<S: HyperSystem + ?Sized>(
    reg: &Arc<Registry>,
    sys: &S,
    pop: Arc<Population>,
    examples: &Examples,
    metric: &dyn Metric,
    max_batch_size: usize,
    trace: Trace,
) -> Result<PopulationEval> {
    let Some(hub) = trace.hub.clone().filter(Hub::enabled) else {
        return evaluate_inner(reg, sys, pop, examples, metric, max_batch_size, trace).await;
    };
    // One `evaluate` span between the generation (or run) and its calls.
    let (id, start, p, n) = (hub.next_id(), hub.now_ns(), pop.size(), examples.len());
    let child = Trace {
        hub: Some(hub.clone()),
        parent: Some(id),
        generation: trace.generation,
    };
    let out = evaluate_inner(reg, sys, pop, examples, metric, max_batch_size, child).await;
    let mut rec = Record::span(
        id,
        trace.parent,
        "evaluate",
        RecordKind::Evaluation,
        start,
        hub.now_ns(),
    );
    rec.generation = trace.generation;
    rec.candidates = Some((0, p));
    rec.examples = Some((0, n));
    match &out {
        Ok(ev) => rec.attributes = vec![("hyperfunc.failed".into(), ev.failed.into())],
        Err(e) => {
            rec.status = Status::Error;
            rec.error_type = Some(crate::observe::error_type(e));
            rec.error_message = Some(e.to_string());
        }
    }
    hub.push(rec);
    out
}

async fn evaluate_inner<S: HyperSystem + ?Sized>(
    reg: &Arc<Registry>,
    sys: &S,
    pop: Arc<Population>,
    examples: &Examples,
    metric: &dyn Metric,
    max_batch_size: usize,
    trace: Trace,
) -> Result<PopulationEval> {
    let (p, n) = (pop.size(), examples.len());
    if n == 0 {
        return Err(Error::EmptyExamples);
    }
    // A kernel that evaluates on a GPU: the candidates and the examples go there for this
    // evaluation; θ, the noise and the update stay where they live.
    let moved;
    let (pop, examples) = match pop.kernel().cuda {
        Some(ordinal) => {
            let dev = crate::gpu::cuda(ordinal)?;
            let at = "evaluation device";
            moved = examples.to_device(&dev).at(at)?;
            (Arc::new(pop.to_device(&dev).at(at)?), &moved)
        }
        None => (pop, examples),
    };
    let (pc, nc) = plan(p, n, max_batch_size, pop.mirrored());
    let scope = Arc::new(Scope::traced(trace));
    let mut out = PopulationEval {
        fitness: Vec::with_capacity(p),
        forwards: 0,
        chunks: 0,
        failed: 0,
        first_error: None,
    };
    let mut signature: Option<String> = None;
    for p0 in (0..p).step_by(pc) {
        let pcur = pc.min(p - p0);
        let mut parts = Vec::new();
        let mut failed = vec![false; pcur];
        for n0 in (0..n).step_by(nc) {
            let ncur = nc.min(n - n0);
            let cx = Cx::new(
                reg.clone(),
                pop.clone(),
                scope.clone(),
                (p0, pcur),
                (n0, ncur),
            );
            let input = examples.inputs.slice_examples(n0, ncur)?;
            let value = sys.run(&cx, input).await?;
            let report = cx.finish();
            match &signature {
                None => signature = Some(report.signature),
                Some(first) if *first != report.signature => {
                    return Err(Error::ControlFlowDivergence {
                        chunk: out.chunks,
                        first: first.clone(),
                        other: report.signature,
                    })
                }
                Some(_) => {}
            }
            out.forwards += report.forwards;
            out.chunks += 1;
            for (f, g) in failed.iter_mut().zip(report.failed) {
                *f |= g;
            }
            if out.first_error.is_none() {
                out.first_error = report.first_error;
            }
            parts.push(value);
        }
        let preds = Value::concat_examples(parts, pcur)?;
        let scores = metric
            .score_async(crate::metric::Batch {
                inputs: &examples.inputs,
                preds: &preds,
                targets: &examples.targets,
                pop: pcur,
            })
            .await?;
        if scores.len() != pcur {
            return Err(Error::ShapeMismatch {
                function: "metric".into(),
                what: "scores".into(),
                expected: format!("{pcur} values (one per candidate)"),
                actual: vec![scores.len()],
            });
        }
        for (s, f) in scores.into_iter().zip(&failed) {
            out.failed += usize::from(*f);
            out.fitness.push(if *f { f32::NAN } else { s });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{plan, ParamChunk, Perturbation, Population};
    use crate::theta::Theta;
    use candle_core::{Device, Tensor};

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// A mirrored perturbation stays whole where every range keeps pairs whole, and is formed
    /// into the candidates' values where one splits a pair: the same values either way.
    #[test]
    fn mirrored_pairs_form_the_same_candidates_however_they_are_cut() {
        let dev = Device::Cpu;
        let (k, row) = (5usize, 6usize);
        let e: Vec<f32> = (0..k * row).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..row).map(|i| i as f32 - 2.5).collect();
        let et = Tensor::from_vec(e.clone(), (k, 2, 3), &dev).unwrap();
        let base = Tensor::from_vec(w.clone(), (2, 3), &dev).unwrap();
        let theta = Theta::from_tensors([("w".to_string(), base)]);
        let mut perturb = std::collections::BTreeMap::new();
        perturb.insert("w".to_string(), Perturbation::Mirrored(et));
        let pop = Population::perturbed(theta, 2 * k, perturb);
        assert!(pop.mirrored());
        // Candidate 2j is w + e_j, candidate 2j + 1 is w − e_j.
        let expect = |c: usize| -> Vec<f32> {
            let s = if c.is_multiple_of(2) { 1.0 } else { -1.0 };
            (0..row).map(|i| w[i] + s * e[(c / 2) * row + i]).collect()
        };
        for c in 0..2 * k {
            assert_eq!(
                values(pop.candidate(c).unwrap().get("w").unwrap()),
                expect(c)
            );
        }
        for (p0, pc) in [(0, 10), (2, 4), (1, 4), (3, 3), (9, 1), (0, 1)] {
            let chunk = pop.chunk("w", p0, pc).unwrap();
            let whole = p0 % 2 == 0 && pc % 2 == 0;
            assert_eq!(
                matches!(chunk, ParamChunk::Mirrored { .. }),
                whole,
                "{p0}+{pc}"
            );
            let got = values(&chunk.materialize(pc).unwrap());
            let want: Vec<f32> = (p0..p0 + pc).flat_map(expect).collect();
            assert_eq!(got, want, "chunk {p0}+{pc}");
            // Tiles of a chunk, whole pairs or not.
            if pc >= 3 {
                let t = chunk.narrow(1, 2).unwrap();
                assert_eq!(
                    values(&t.materialize(2).unwrap()),
                    want[row..3 * row].to_vec()
                );
            }
            let sel = pop.select(p0, pc).unwrap();
            assert_eq!(sel.mirrored(), whole);
            for c in 0..pc {
                assert_eq!(
                    values(sel.candidate(c).unwrap().get("w").unwrap()),
                    expect(p0 + c)
                );
            }
        }
    }

    #[test]
    fn plan_bounds_rows_and_covers_everything() {
        assert_eq!(plan(64, 4, 1 << 20, false), (64, 4));
        assert_eq!(plan(64, 4, 32, false), (8, 4));
        assert_eq!(plan(64, 100, 32, false), (1, 32));
        assert_eq!(plan(3, 4, 0, false), (1, 1));
        // Whole antithetic pairs: an even count, two at the least (fewer examples then).
        assert_eq!(plan(64, 4, 12, true), (2, 4));
        assert_eq!(plan(64, 4, 7, true), (2, 3));
        assert_eq!(plan(64, 100, 32, true), (2, 16));
        assert_eq!(plan(64, 4, 1 << 20, true), (64, 4));
        assert_eq!(plan(1, 4, 1, true), (1, 1));
    }
}
