//! Tensor autotune: the candidate tile, the rows per batched forward, the low-rank kernel, the
//! threads and the device of a population evaluation, found by measurement.
//!
//! The search: candidates under the memory budget are ranked analytically (a tile whose
//! activations fit the per-core L2 cache first, then batches that keep every core busy), the
//! timing noise of the default is measured, then successive halving with the candidates timed
//! interleaved (so drift hits all alike), then a local search around the leader. Every candidate
//! passes a correctness gate first: its fitness vector on the probe population must match the
//! default's. The default is kept unless the winner beats it with a bootstrap 95% interval of the
//! speedup above 1.
//!
//! Where a GPU opens (feature `cuda`), the whole evaluation on it is a candidate too, with both
//! low-rank kernels; each GPU setting runs once untimed first (its kernels compile on first
//! use). On 4 cores or more, so is the default batch with a tile that gives every worker four.
//!
//! Quick mode spends about a tenth of an exhaustive sweep: 5 candidates from the ranking (plus
//! the other low-rank kernel and one thread at the default), three noise samples that are also
//! the default's timings, screening samples of half the length (the gate's sample is the first
//! halving round; then one per round, two on a noisy machine), a neighbour of the leader paired
//! with it only when its one sample beats the leader, and full-length samples for the final
//! paired comparison that decides: the best setting other than the default against the default,
//! even when the default led the screening (4 pairs, two more at a time up to 10 while the
//! challenger looks at least 3% faster but its interval still holds 1).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::{Candidate, LowRankKernel, Mode, Record, SystemProfile, TensorDevice, TensorSettings};
use crate::error::{Error, Result};
use crate::prelude::*;
use crate::util::median;

/// The problem shape a record is for: parameters (names, shapes, perturbation kinds), dtype,
/// and the population and example counts rounded up to powers of two.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeKey {
    /// Hash of the parameters' names, shapes and perturbation kinds.
    pub shape_hash: String,
    /// A readable summary (`4 params, 2410 values, dense`).
    pub summary: String,
    /// Population size bucket.
    pub pop_bucket: usize,
    /// Examples bucket.
    pub rows_bucket: usize,
}

impl ShapeKey {
    /// The key of evaluating `pop` on `rows` examples.
    pub fn of(pop: &Population, rows: usize) -> Self {
        let sig = pop.shape_signature();
        let values: usize = pop.base().iter().map(|(_, t)| t.elem_count()).sum();
        let kinds: std::collections::BTreeSet<&str> = sig
            .split(',')
            .filter_map(|p| p.rsplit(':').next())
            .collect();
        Self {
            shape_hash: crate::util::fnv1a_hex(sig.as_bytes())[..12].to_string(),
            summary: format!(
                "{} params, {values} values, {}",
                pop.base().iter().count(),
                kinds.into_iter().collect::<Vec<_>>().join("+")
            ),
            pop_bucket: pop.size().next_power_of_two(),
            rows_bucket: rows.max(1).next_power_of_two(),
        }
    }

    /// The part shared by every population and row bucket of this shape.
    pub fn shape_part(&self) -> String {
        format!("tensor-{}-f32-", self.shape_hash)
    }

    /// (population bucket, rows bucket) of a key string.
    pub fn parse_buckets(key: &str) -> Option<(usize, usize)> {
        let rest = key.rsplit_once("-p")?.1;
        let (p, r) = rest.split_once("-r")?;
        Some((p.parse().ok()?, r.parse().ok()?))
    }
}

impl fmt::Display for ShapeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}p{}-r{}",
            self.shape_part(),
            self.pop_bucket,
            self.rows_bucket
        )
    }
}

/// A problem the tuner can time: one population evaluation under given settings.
pub trait Probe {
    /// The shape key.
    fn key(&self) -> ShapeKey;
    /// Candidate × example evaluations in one run.
    fn evals(&self) -> usize;
    /// Bytes one row (candidate × example) of a batched forward needs at its widest.
    fn bytes_per_row(&self) -> usize;
    /// Runs one evaluation under `settings`; the fitness vector.
    fn run(&self, settings: &TensorSettings) -> Result<Vec<f32>>;
    /// Whether a layer has low-rank noise (then the low-rank kernel is a knob too).
    fn low_rank(&self) -> bool {
        false
    }
    /// Candidates, and floats of a candidate's widest activation over all its examples (what a
    /// CPU tile holds per candidate), when known: on a machine with many cores the search then
    /// also times a tile small enough to give every worker several.
    fn tile_shape(&self) -> Option<(usize, usize)> {
        None
    }
    /// The command that reproduces the tuning.
    fn command(&self) -> String;
}

/// A built-in probe: an MLP population (dense or low-rank noise) on random examples with a
/// cross-entropy metric.
pub struct MlpProbe {
    sizes: Vec<usize>,
    rank: Option<usize>,
    net: Chain,
    pop: Population,
    examples: Examples,
    rt: tokio::runtime::Runtime,
}

impl fmt::Debug for MlpProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MlpProbe")
            .field("sizes", &self.sizes)
            .field("pop", &self.pop.size())
            .field("rows", &self.examples.len())
            .field("rank", &self.rank)
            .finish()
    }
}

impl MlpProbe {
    /// An MLP with layer `sizes` (tanh hidden layers), a population of `pop` and `rows` examples;
    /// `rank` selects low-rank noise of that rank.
    pub fn new(sizes: &[usize], pop: usize, rows: usize, rank: Option<usize>) -> Result<Self> {
        if sizes.len() < 2 || sizes.contains(&0) || pop == 0 || rows == 0 {
            return Err(Error::config(
                "autotune probe",
                "needs at least two non-zero layer sizes, a population and examples",
            ));
        }
        let mlp = HyperFn::mlp("mlp", sizes, Activation::Tanh, Activation::Identity);
        let mlp = match rank {
            Some(r) => mlp.noise_rank(r),
            None => mlp,
        };
        let net = Chain::new(vec![mlp]);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(17);
        let dev = candle_core::Device::Cpu;
        let x: Vec<f32> = (0..rows * sizes[0])
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let classes = sizes[sizes.len() - 1];
        let y: Vec<f32> = (0..rows).map(|i| (i % classes) as f32).collect();
        let x = candle_core::Tensor::from_vec(x, (rows, sizes[0]), &dev)
            .map_err(Error::tensor("autotune probe"))?;
        let y = candle_core::Tensor::from_vec(y, rows, &dev)
            .map_err(Error::tensor("autotune probe"))?;
        let examples = Examples::tensors(x, y)?;
        let es = Es::default().pop_size(pop).sigma(0.05).seed(5);
        let theta = es.start(&net)?.theta().clone();
        let pop = es.population(&net, &theta, 0)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| Error::config("autotune", format!("cannot start a runtime: {e}")))?;
        Ok(Self {
            sizes: sizes.to_vec(),
            rank,
            net,
            pop,
            examples,
            rt,
        })
    }
}

impl Probe for MlpProbe {
    fn key(&self) -> ShapeKey {
        ShapeKey::of(&self.pop, self.examples.len())
    }

    fn evals(&self) -> usize {
        self.pop.size() * self.examples.len()
    }

    fn bytes_per_row(&self) -> usize {
        // Input, the widest activation twice (in and out of a layer) and the output.
        let widest = self.sizes.iter().copied().max().unwrap_or(1);
        4 * (self.sizes[0] + 2 * widest + self.sizes[self.sizes.len() - 1])
    }

    fn low_rank(&self) -> bool {
        self.rank.is_some()
    }

    fn tile_shape(&self) -> Option<(usize, usize)> {
        // As the forward counts it: a first layer on the shared input holds only its output.
        let widest = self
            .sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| if i == 0 { w[1] } else { w[0].max(w[1]) })
            .max()?;
        Some((self.pop.size(), self.examples.len() * widest))
    }

    fn run(&self, s: &TensorSettings) -> Result<Vec<f32>> {
        let pop = self.pop.clone().with_kernel(s.kernel());
        let ce = crate::metric::cross_entropy();
        let out = self.rt.block_on(crate::population::evaluate_population(
            &self.net,
            &pop,
            &self.examples,
            &ce,
            s.max_batch_size,
        ));
        Ok(out?.fitness)
    }

    fn command(&self) -> String {
        let sizes: Vec<String> = self.sizes.iter().map(ToString::to_string).collect();
        format!(
            "hyperfunc autotune tensor --mlp {} --pop {} --rows {}{}",
            sizes.join(","),
            self.pop.size(),
            self.examples.len(),
            self.rank.map_or(String::new(), |r| format!(" --rank {r}"))
        )
    }
}

/// Settings of one tuning.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// How hard to search.
    pub mode: Mode,
    /// Wall-clock budget (the mode's when `None`); the best so far is kept when it runs out.
    pub budget: Option<std::time::Duration>,
    /// Largest batched forward, bytes (default: a quarter of the available memory, at least
    /// 256 MiB).
    pub memory_budget: Option<u64>,
    /// Shuffling seed of the interleaved timings.
    pub seed: u64,
    /// Largest relative fitness difference the correctness gate accepts.
    pub tolerance: f32,
    /// Shortest timing sample (evaluations are repeated until it has passed).
    pub min_sample: std::time::Duration,
    /// Where to report progress (the CLI draws a bar); `None`: silent.
    pub progress: Option<super::OnProgress>,
}

impl Options {
    /// The defaults of `mode`.
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            budget: None,
            memory_budget: None,
            seed: 1,
            tolerance: 1e-4,
            min_sample: std::time::Duration::from_millis(match mode {
                Mode::Quick => 40,
                Mode::Normal => 80,
                Mode::Full => 150,
            }),
            progress: None,
        }
    }
}

/// The candidate grid: tiles × batch sizes, the default first. The batches are the whole
/// evaluation and its halves, quarters, eighths and sixteenths, and fixed sizes from 16 Ki to
/// 1 Mi rows; two batches that cut the evaluation into as many chunks behave alike, so only the
/// first is kept (the default's when it is one of them).
fn grid(evals: usize) -> Vec<TensorSettings> {
    let d = TensorSettings::default();
    let mut out = vec![d];
    let chunks = |s: &TensorSettings| evals.div_ceil(s.max_batch_size.max(1));
    let batches = [
        evals,
        evals / 2,
        evals / 4,
        evals / 8,
        evals / 16,
        16_384,
        65_536,
        262_144,
        1_048_576,
    ];
    for tile_k in [16, 32, 64, 128, 256, 512, 1024] {
        for batch in batches {
            let s = TensorSettings {
                tile_floats: tile_k * 1024,
                max_batch_size: batch.max(1),
                ..d
            };
            let same =
                |o: &TensorSettings| o.tile_floats == s.tile_floats && chunks(o) == chunks(&s);
            if !out.iter().any(same) {
                out.push(s);
            }
        }
    }
    out
}

/// Analytic score: tiles near a quarter of L2 and batches that hold the whole evaluation or
/// split it into enough chunks for the cores rank first (lower is better).
fn analytic(s: &TensorSettings, evals: usize, l2: u64, cores: usize) -> f64 {
    let l2_floats = if l2 == 0 {
        256 * 1024
    } else {
        (l2 / 4) as usize
    };
    let tile = ((s.tile_floats as f64) / (l2_floats as f64 / 2.0))
        .log2()
        .abs();
    let chunks = evals.div_ceil(s.max_batch_size.max(1));
    let batch = if chunks == 1 {
        0.0
    } else if chunks < cores {
        1.0
    } else {
        0.5 + (chunks as f64).log2() * 0.1
    };
    tile + batch
}

/// The default batch with the largest tile of the grid (16 Ki to 1 Mi floats, powers of two)
/// that gives each of `cores` workers at least four tiles, on machines of 4 cores or more;
/// `None` where that is the default's tile or the probe's tile shape is unknown.
fn balanced(probe: &dyn Probe, cores: usize) -> Option<TensorSettings> {
    let (candidates, per_candidate) = probe.tile_shape()?;
    if cores < 4 {
        return None;
    }
    let per_tile = (candidates / (4 * cores)).max(1);
    let want = per_tile * per_candidate.max(1);
    let tile = (4..=10)
        .map(|k| 1024usize << k)
        .take_while(|t| *t <= want)
        .last()
        .unwrap_or(16 * 1024);
    let d = TensorSettings::default();
    (tile != d.tile_floats).then_some(TensorSettings {
        tile_floats: tile,
        ..d
    })
}

/// A quarter of the free memory of CUDA device 0 when this build can use one, bytes.
fn gpu_budget() -> Option<u64> {
    crate::gpu::probe(0)?;
    let dev = crate::gpu::cuda(0).ok()?;
    Some(crate::gpu::free_bytes(&dev)? / 4)
}

/// Why `s`, whose forward needs about `bytes`, does not fit: the CPU's `mem_budget` or the
/// GPU's `gpu_budget` (none: no GPU).
fn over_budget(
    s: &TensorSettings,
    bytes: u64,
    mem_budget: u64,
    gpu_budget: Option<u64>,
) -> Option<String> {
    match s.device {
        TensorDevice::Cpu => (bytes > mem_budget).then(|| {
            format!(
                "needs about {} MiB per forward, over the {} MiB budget",
                bytes >> 20,
                mem_budget >> 20
            )
        }),
        TensorDevice::Cuda(n) => match gpu_budget {
            None => Some(format!("CUDA device {n} is not there")),
            Some(cap) => (bytes > cap).then(|| {
                format!(
                    "needs about {} MiB per forward, over a quarter of CUDA {n}'s free memory \
                     ({} MiB)",
                    bytes >> 20,
                    cap >> 20
                )
            }),
        },
    }
}

fn fitness_matches(a: &[f32], b: &[f32], tol: f32) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("{} fitness values instead of {}", a.len(), b.len()));
    }
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let ok = (x.is_nan() && y.is_nan()) || (x - y).abs() <= tol * (1.0 + y.abs());
        if !ok {
            return Some(format!(
                "candidate {i}'s fitness is {x}, the default's {y}: wrong results"
            ));
        }
    }
    None
}

/// Tunes `probe`'s settings; the default is always a candidate and wins ties.
pub fn tune(probe: &dyn Probe, opts: &Options) -> Result<Record> {
    let started = Instant::now();
    let budget = opts.budget.unwrap_or_else(|| opts.mode.budget());
    let profile = SystemProfile::detect();
    let evals = probe.evals();
    let mem_budget = opts
        .memory_budget
        .unwrap_or_else(|| (profile.ram_available_bytes / 4).max(256 << 20));
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(opts.seed);
    let default = TensorSettings::default();
    let quick = opts.mode == Mode::Quick;
    // Quick mode screens with half-length samples and one sample per candidate per round;
    // its decision (the final paired comparison) takes full-length samples.
    let screen_len = if quick {
        opts.min_sample / 2
    } else {
        opts.min_sample
    };
    let time = |s: &TensorSettings| sample(probe, s, screen_len);
    let bytes = |s: &TensorSettings| (s.max_batch_size.min(evals) * probe.bytes_per_row()) as u64;
    let budget_ms = budget.as_millis() as u64;
    let say = |phase: &str| {
        if let Some(p) = &opts.progress {
            let used = (started.elapsed().as_millis() as u64).min(budget_ms);
            p.report(phase, used, budget_ms, "ms");
        }
    };
    // Reference fitness and timing noise of the default (quick: 3 samples, which also count as
    // the default's timings; otherwise a warm-up run and 5 samples).
    say("noise of the default");
    let (first_rate, reference) = time(&default)?;
    let mut base = Vec::new();
    if quick {
        base.push(first_rate);
    }
    for _ in 0..if quick { 2 } else { 5 } {
        base.push(time(&default)?.0);
    }
    let m = median(&base);
    let mad = median(&base.iter().map(|x| (x - m).abs()).collect::<Vec<_>>());
    let noise_cv = 1.4826 * mad / m.max(1e-9);
    // Repetitions per round; a noisy machine gets more (and a lower confidence below). Quick
    // mode takes fewer and leans on the final paired comparison.
    let reps = match (opts.mode, noise_cv > 0.05) {
        (Mode::Quick, true) => 2,
        (Mode::Quick, false) => 1,
        (_, true) => 5,
        (_, false) => 3,
    };

    // A GPU's budget: a quarter of what is free on it now.
    let gpu_budget = gpu_budget();
    let too_big = |s: &TensorSettings| over_budget(s, bytes(s), mem_budget, gpu_budget);
    // Candidates: the grid within the memory budget, ranked analytically.
    let mut candidates: BTreeMap<TensorSettings, Candidate> = BTreeMap::new();
    let mut pool = Vec::new();
    for s in grid(evals) {
        match too_big(&s) {
            Some(why) => {
                candidates.insert(s, excluded(s, why));
            }
            None => pool.push(s),
        }
    }
    pool.sort_by(|a, b| {
        analytic(a, evals, profile.l2_bytes, profile.cores).total_cmp(&analytic(
            b,
            evals,
            profile.l2_bytes,
            profile.cores,
        ))
    });
    let mut live: Vec<TensorSettings> = vec![default];
    for s in pool {
        if live.len() >= opts.mode.candidates() {
            break;
        }
        if s != default {
            live.push(s);
        }
    }
    // With low-rank noise the kernel is a knob: the other kernel at the default and at the
    // analytic leader.
    if probe.low_rank() {
        let twins: Vec<TensorSettings> = live
            .iter()
            .take(2)
            .map(|s| TensorSettings {
                low_rank: LowRankKernel::Materialize,
                ..*s
            })
            .collect();
        live.extend(twins);
    }
    // Threads are a knob too: one thread at the default and (but in quick mode) at the
    // analytic leader.
    if profile.cores > 1 {
        let twins: Vec<TensorSettings> = live
            .iter()
            .take(if quick { 1 } else { 2 })
            .map(|s| TensorSettings { threads: 1, ..*s })
            .collect();
        live.extend(twins);
    }
    // The device is a knob where a GPU opens: the whole evaluation there in one forward (halved
    // until it fits the GPU's budget), with the other low-rank kernel too.
    if gpu_budget.is_some() {
        let mut s = TensorSettings {
            device: TensorDevice::Cuda(0),
            max_batch_size: evals,
            ..default
        };
        while s.max_batch_size > 1 && too_big(&s).is_some() {
            s.max_batch_size /= 2;
        }
        match too_big(&s) {
            Some(why) => {
                candidates.insert(s, excluded(s, why));
            }
            None => {
                live.push(s);
                if probe.low_rank() {
                    live.push(TensorSettings {
                        low_rank: LowRankKernel::Materialize,
                        ..s
                    });
                }
            }
        }
    }
    // On a machine with many cores, a tile that holds a worker's whole share leaves the workers
    // nothing to even out among themselves: the default batch with the largest tile that gives
    // each worker four tiles is a candidate too (on a 16-core host the exhaustive sweep's best
    // tile was that one on 3 keys of 8 where the analytic ranking left it out).
    if let Some(s) = balanced(probe, profile.cores) {
        if !live.contains(&s) && too_big(&s).is_none() {
            live.push(s);
        }
    }
    warm_up(probe, &live);
    // Correctness gate.
    let (mut checked, mut rejected) = (0, 0);
    let mut times: BTreeMap<TensorSettings, Vec<f64>> = BTreeMap::new();
    if quick {
        times.insert(default, base.clone());
    }
    let gate = live.len();
    live.retain(|s| {
        checked += 1;
        say(&format!("correctness gate {checked}/{gate}"));
        if quick && *s == default {
            return true; // timed above; its fitness is the reference
        }
        let (rate, f) = match time(s) {
            Ok(x) => x,
            Err(e) => {
                rejected += 1;
                candidates.insert(*s, excluded(*s, format!("failed: {e}")));
                return false;
            }
        };
        if let Some(why) = fitness_matches(&f, &reference, opts.tolerance) {
            rejected += 1;
            candidates.insert(*s, excluded(*s, why));
            return *s == default;
        }
        times.entry(*s).or_default().push(rate);
        true
    });
    let over = || started.elapsed() >= budget;
    let mut stop_reason = "converged".to_string();
    // Successive halving, interleaved. In quick mode the gate's samples are the first round.
    let mut round = 0;
    while live.len() > 2 {
        if over() {
            stop_reason = "budget".into();
            break;
        }
        say(&format!("successive halving: {} candidates", live.len()));
        let samples = if quick && round == 0 { 0 } else { reps };
        round += 1;
        for _ in 0..samples {
            live.shuffle(&mut rng);
            for s in &live {
                let (rate, _) = time(s)?;
                times.entry(*s).or_default().push(rate);
            }
        }
        live.sort_by(|a, b| median(&times[b]).total_cmp(&median(&times[a])));
        let before = live.len();
        let keep = before.div_ceil(2).max(2);
        live.truncate(keep);
        if !live.contains(&default) {
            live.push(default);
        }
        // Two leaders and the default put back: halving no longer shrinks the field (this
        // used to loop until the budget ran out).
        if live.len() >= before {
            break;
        }
    }
    // Local search around the leader: halve and double each knob.
    let leader = live
        .iter()
        .copied()
        .max_by(|a, b| median(&times[a]).total_cmp(&median(&times[b])))
        .unwrap_or(default);
    if !over() {
        say("local search around the leader");
        let mut near = Vec::new();
        let flip = TensorSettings {
            low_rank: match leader.low_rank {
                LowRankKernel::SharedGemm => LowRankKernel::Materialize,
                LowRankKernel::Materialize => LowRankKernel::SharedGemm,
            },
            ..leader
        };
        if probe.low_rank() && !times.contains_key(&flip) && !candidates.contains_key(&flip) {
            near.push(flip);
        }
        let other_threads = TensorSettings {
            threads: if leader.threads == 0 { 1 } else { 0 },
            ..leader
        };
        let on_cpu = leader.device == TensorDevice::Cpu;
        if on_cpu
            && profile.cores > 1
            && !times.contains_key(&other_threads)
            && !candidates.contains_key(&other_threads)
        {
            near.push(other_threads);
        }
        // On a GPU only the batch is a knob.
        let steps: &[(usize, usize)] = if on_cpu { &[(2, 1), (1, 2)] } else { &[(1, 2)] };
        for &(t, b) in steps {
            let up = TensorSettings {
                tile_floats: leader.tile_floats * t,
                max_batch_size: leader.max_batch_size * b,
                ..leader
            };
            let down = TensorSettings {
                tile_floats: (leader.tile_floats / t).max(1024),
                max_batch_size: (leader.max_batch_size / b).max(1),
                ..leader
            };
            for s in [up, down] {
                if s != leader
                    && !times.contains_key(&s)
                    && !candidates.contains_key(&s)
                    && too_big(&s).is_none()
                {
                    near.push(s);
                }
            }
        }
        for s in near {
            if over() {
                stop_reason = "budget".into();
                break;
            }
            checked += 1;
            let (rate, f) = time(&s)?;
            if let Some(why) = fitness_matches(&f, &reference, opts.tolerance) {
                rejected += 1;
                candidates.insert(s, excluded(s, why));
                continue;
            }
            times.entry(s).or_default().push(rate);
            // Quick mode pairs a neighbour with the leader only when its one sample beats the
            // leader's median.
            if quick && rate <= median(&times[&leader]) {
                continue;
            }
            let mut pair = [s, leader];
            for _ in 0..reps {
                pair.shuffle(&mut rng);
                for p in pair {
                    let (rate, _) = time(&p)?;
                    times.entry(p).or_default().push(rate);
                }
            }
        }
    }
    // The final's challenger is the best setting other than the default, even when the default
    // leads the screening: short screening samples can put a faster setting behind it, and the
    // default is then kept only once the paired comparison has not shown the challenger faster.
    let leader = times
        .iter()
        .filter(|(s, v)| **s != default && v.len() > 1)
        .max_by(|a, b| median(a.1).total_cmp(&median(b.1)))
        .map_or(default, |(s, _)| *s);
    // Final: the challenger against the default, interleaved, paired.
    say("final: the leader against the default");
    let (lead_t, def_t) = if leader != default {
        let pairs = if quick { 4 } else { (2 * reps).max(6) };
        let (mut lead_t, mut def_t) =
            paired(probe, leader, default, pairs, opts.min_sample, &mut rng)?;
        // Quick mode adds pairs, two at a time up to 10, while the leader looks faster by 3% or
        // more but its interval still holds 1: the samples go where the decision is open.
        while quick && lead_t.len() < 10 && !over() {
            let speedup = median(&lead_t) / median(&def_t).max(1e-9);
            if speedup < 1.03 || bootstrap_ratio(&lead_t, &def_t, &mut rng).0 > 1.0 {
                break;
            }
            let (a, b) = paired(probe, leader, default, 2, opts.min_sample, &mut rng)?;
            lead_t.extend(a);
            def_t.extend(b);
        }
        (lead_t, def_t)
    } else {
        let d = times.get(&default).cloned().unwrap_or_default();
        (d.clone(), d)
    };
    let speedup = median(&lead_t) / median(&def_t).max(1e-9);
    let ci = bootstrap_ratio(&lead_t, &def_t, &mut rng);
    let chosen = if leader != default && ci.0 > 1.0 {
        leader
    } else {
        default
    };
    for (s, v) in &times {
        candidates.insert(
            *s,
            Candidate {
                settings: *s,
                evals_per_sec: median(v),
                runs: v.len(),
                pct_of_best: 0.0,
                excluded: None,
            },
        );
    }
    let mut list: Vec<Candidate> = candidates.into_values().collect();
    let best = list
        .iter()
        .filter(|c| c.excluded.is_none())
        .map(|c| c.evals_per_sec)
        .fold(0.0, f64::max);
    for c in &mut list {
        c.pct_of_best = 100.0 * c.evals_per_sec / best.max(1e-9);
    }
    list.sort_by(|a, b| {
        a.excluded
            .is_some()
            .cmp(&b.excluded.is_some())
            .then(b.evals_per_sec.total_cmp(&a.evals_per_sec))
    });
    let ranked: Vec<&Candidate> = list.iter().filter(|c| c.excluded.is_none()).collect();
    let runner_up = ranked
        .iter()
        .find(|c| c.settings != chosen)
        .map(|c| (c.settings, c.evals_per_sec));
    let chosen_rate = if chosen == default {
        median(&def_t)
    } else {
        median(&lead_t)
    };
    let margin = runner_up.map_or(0.0, |(_, r)| chosen_rate / r.max(1e-9) - 1.0);
    let mut factors = BTreeMap::new();
    factors.insert("noise".to_string(), (1.0 - noise_cv / 0.2).clamp(0.05, 1.0));
    factors.insert(
        "complete".to_string(),
        if stop_reason == "budget" { 0.8 } else { 1.0 },
    );
    factors.insert(
        "interval".to_string(),
        if chosen == default {
            1.0
        } else {
            (1.0 - (ci.1 - ci.0) / speedup.max(1e-9)).clamp(0.3, 1.0)
        },
    );
    let confidence = factors.values().product::<f64>();
    say("done");
    Ok(Record {
        key: probe.key().to_string(),
        fingerprint: profile.fingerprint(),
        settings: chosen,
        evals_per_sec: chosen_rate,
        default_evals_per_sec: median(&def_t),
        speedup: if chosen == default { 1.0 } else { speedup },
        speedup_ci: ci,
        runner_up,
        margin,
        noise_cv,
        correctness: (checked - rejected, checked),
        candidates: list,
        stop_reason,
        confidence,
        confidence_factors: factors,
        created_at: crate::util::now_s() as i64,
        seconds: started.elapsed().as_secs_f64(),
        stale: false,
        command: probe.command(),
    })
}

/// One timing sample of `s`: evaluations per second over runs repeated for at least
/// `min_sample` (so short evaluations are not timed at the clock's resolution), and the first
/// run's fitness.
/// The exhaustive sweep the quick search is judged against: every setting of the grid (with the
/// other low-rank kernel too when the probe has low-rank noise, and each on one thread too when
/// the machine has several cores) within the memory budget, timed
/// in `rounds` interleaved rounds (shuffled each round, so drift hits all alike), plus `extra`
/// settings; each setting with its median evaluations per second, best first.
pub fn exhaustive(
    probe: &dyn Probe,
    opts: &Options,
    rounds: usize,
    extra: &[TensorSettings],
) -> Result<Vec<(TensorSettings, f64)>> {
    let evals = probe.evals();
    let profile = SystemProfile::detect();
    let mem_budget = opts
        .memory_budget
        .unwrap_or_else(|| (profile.ram_available_bytes / 4).max(256 << 20));
    let gpu_budget = gpu_budget();
    let fits = |s: &TensorSettings| {
        let bytes = (s.max_batch_size.min(evals) * probe.bytes_per_row()) as u64;
        over_budget(s, bytes, mem_budget, gpu_budget).is_none()
    };
    let mut all: Vec<TensorSettings> = grid(evals).into_iter().filter(fits).collect();
    if probe.low_rank() {
        let twins: Vec<TensorSettings> = all
            .iter()
            .map(|s| TensorSettings {
                low_rank: LowRankKernel::Materialize,
                ..*s
            })
            .collect();
        all.extend(twins);
    }
    if profile.cores > 1 {
        let twins: Vec<TensorSettings> = all
            .iter()
            .map(|s| TensorSettings { threads: 1, ..*s })
            .collect();
        all.extend(twins);
    }
    // On a GPU: every batch of the default tile on all threads (the tile and threads do not
    // apply there), each low-rank kernel.
    if gpu_budget.is_some() {
        let tile = TensorSettings::default().tile_floats;
        let on_gpu: Vec<TensorSettings> = grid(evals)
            .into_iter()
            .filter(|s| s.tile_floats == tile)
            .flat_map(|s| {
                let twin = probe.low_rank().then_some(LowRankKernel::Materialize);
                [Some(LowRankKernel::SharedGemm), twin]
                    .into_iter()
                    .flatten()
                    .map(move |low_rank| TensorSettings {
                        device: TensorDevice::Cuda(0),
                        low_rank,
                        ..s
                    })
            })
            .filter(fits)
            .collect();
        all.extend(on_gpu);
    }
    for s in extra {
        if !all.contains(s) {
            all.push(*s);
        }
    }
    warm_up(probe, &all);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(opts.seed);
    let mut times: BTreeMap<TensorSettings, Vec<f64>> = BTreeMap::new();
    for _ in 0..rounds.max(1) {
        all.shuffle(&mut rng);
        for s in &all {
            times
                .entry(*s)
                .or_default()
                .push(sample(probe, s, opts.min_sample)?.0);
        }
    }
    let mut out: Vec<(TensorSettings, f64)> =
        times.into_iter().map(|(s, v)| (s, median(&v))).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(out)
}

/// Runs each GPU setting among `settings` once, untimed: a GPU's first run loads and
/// JIT-compiles its kernels, seconds on a fresh machine (20 s for the first evaluation on an
/// H200), which would otherwise sink that setting's first sample. A failure here is not
/// reported: the setting's first timed run fails the same way and is excluded with the reason.
fn warm_up(probe: &dyn Probe, settings: &[TensorSettings]) {
    for s in settings.iter().filter(|s| s.device != TensorDevice::Cpu) {
        let _ = probe.run(s);
    }
}

fn sample(
    probe: &dyn Probe,
    s: &TensorSettings,
    min_sample: std::time::Duration,
) -> Result<(f64, Vec<f32>)> {
    let t = Instant::now();
    let f = probe.run(s)?;
    let mut runs = 1usize;
    while t.elapsed() < min_sample {
        probe.run(s)?;
        runs += 1;
    }
    let rate = (runs * probe.evals()) as f64 / t.elapsed().as_secs_f64().max(1e-9);
    Ok((rate, f))
}

/// The speed of `a` relative to `b` (median of `n` samples each, timed interleaved): the
/// autotune bench re-times a sweep's winner against another setting this way, because a
/// winner's own sweep samples are biased upwards by having been picked as the best.
pub(crate) fn head_to_head(
    probe: &dyn Probe,
    a: TensorSettings,
    b: TensorSettings,
    n: usize,
    min_sample: std::time::Duration,
    seed: u64,
) -> Result<f64> {
    if a == b {
        return Ok(1.0);
    }
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let (ta, tb) = paired(probe, a, b, n, min_sample, &mut rng)?;
    Ok(median(&ta) / median(&tb).max(1e-12))
}

/// `n` samples each of `a` and `b`, interleaved in random order so drift hits both alike.
fn paired(
    probe: &dyn Probe,
    a: TensorSettings,
    b: TensorSettings,
    n: usize,
    min_sample: std::time::Duration,
    rng: &mut Xoshiro256PlusPlus,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut ta, mut tb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let mut pair = [(a, &mut ta), (b, &mut tb)];
        if rng.random_bool(0.5) {
            pair.reverse();
        }
        for (s, out) in pair {
            out.push(sample(probe, &s, min_sample)?.0);
        }
    }
    Ok((ta, tb))
}

fn excluded(s: TensorSettings, why: String) -> Candidate {
    Candidate {
        settings: s,
        evals_per_sec: 0.0,
        runs: 0,
        pct_of_best: 0.0,
        excluded: Some(why),
    }
}

/// Bootstrap 95% interval of median(a) / median(b), resampling each.
fn bootstrap_ratio(a: &[f64], b: &[f64], rng: &mut Xoshiro256PlusPlus) -> (f64, f64) {
    if a.is_empty() || b.is_empty() {
        return (1.0, 1.0);
    }
    let mut r = Vec::with_capacity(1000);
    let mut sa = vec![0.0; a.len()];
    let mut sb = vec![0.0; b.len()];
    for _ in 0..1000 {
        for x in sa.iter_mut() {
            *x = a[rng.random_range(0..a.len())];
        }
        for x in sb.iter_mut() {
            *x = b[rng.random_range(0..b.len())];
        }
        r.push(median(&sa) / median(&sb).max(1e-12));
    }
    r.sort_by(f64::total_cmp);
    (r[25], r[974])
}

impl MlpProbe {
    /// The probe a record's `command` describes (`hyperfunc autotune tensor --mlp … --pop …
    /// --rows … [--rank …]`), or `None` for a record of another probe.
    pub fn from_command(command: &str) -> Option<Result<Self>> {
        let words: Vec<&str> = command.split_whitespace().collect();
        let arg = |name: &str| {
            words
                .iter()
                .position(|w| *w == name)
                .and_then(|i| words.get(i + 1).copied())
        };
        let sizes: Vec<usize> = arg("--mlp")?
            .split(',')
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        let pop = arg("--pop")?.parse().ok()?;
        let rows = arg("--rows")?.parse().ok()?;
        let rank = match arg("--rank") {
            Some(r) => Some(r.parse().ok()?),
            None => None,
        };
        Some(Self::new(&sizes, pop, rows, rank))
    }
}

/// A saved record timed again against the default.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Verification {
    /// The record's key.
    pub key: String,
    /// Its settings.
    pub settings: TensorSettings,
    /// Throughput it recorded.
    pub recorded_evals_per_sec: f64,
    /// Its settings' throughput now (median).
    pub evals_per_sec: f64,
    /// The default's throughput now (median, interleaved).
    pub default_evals_per_sec: f64,
    /// Whether it ran 20% or more below what it recorded.
    pub stale: bool,
}

/// Times `record`'s settings and the default on `probe`, interleaved, `reps` samples each.
pub fn verify(
    probe: &dyn Probe,
    record: &Record,
    reps: usize,
    min_sample: std::time::Duration,
) -> Result<Verification> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(0);
    let default = TensorSettings::default();
    warm_up(probe, &[record.settings]);
    let (a, b) = paired(
        probe,
        record.settings,
        default,
        reps.max(1),
        min_sample,
        &mut rng,
    )?;
    let now = median(&a);
    Ok(Verification {
        key: record.key.clone(),
        settings: record.settings,
        recorded_evals_per_sec: record.evals_per_sec,
        evals_per_sec: now,
        default_evals_per_sec: median(&b),
        stale: now < 0.8 * record.evals_per_sec,
    })
}

#[cfg(test)]
mod tests {
    use super::{balanced, MlpProbe, Probe, TensorSettings};

    /// On a wide machine the balanced tile gives every worker four tiles; on a narrow one, or
    /// where it is the default's tile, there is none.
    #[test]
    fn the_balanced_tile_gives_each_worker_four_tiles_on_wide_machines() {
        let tile = |sizes: &[usize], pop, rows, cores| {
            let probe = MlpProbe::new(sizes, pop, rows, None).unwrap();
            balanced(&probe, cores).map(|s| s.tile_floats / 1024)
        };
        // 64-64-10 on 64 rows: 4 096 floats a candidate; 256 candidates over 16 workers.
        assert_eq!(tile(&[64, 64, 10], 256, 64, 16), Some(16));
        assert_eq!(tile(&[64, 64, 10], 1024, 32, 16), Some(32));
        // The first layer holds only its output: 784-32-10 is 32 floats a row.
        let p = MlpProbe::new(&[784, 32, 10], 8, 4, None).unwrap();
        assert_eq!(p.tile_shape(), Some((8, 4 * 32)));
        // Never below the grid's smallest tile; none on 2 cores; none when it is the default's.
        assert_eq!(tile(&[16, 16, 4], 64, 64, 16), Some(16));
        assert_eq!(tile(&[64, 64, 10], 256, 64, 2), None);
        let default_k = TensorSettings::default().tile_floats / 1024;
        let pop = 4 * 8 * default_k * 1024 / (64 * 64);
        assert_eq!(tile(&[64, 64, 10], pop, 64, 8), None);
    }
}
