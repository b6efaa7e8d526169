//! The benchmark runner behind `hyperfunc bench`: the two standard ES tasks, defined bit for bit
//! so other libraries can run the identical task (see `shared/peer-benches/tasks.py`), and the
//! machine's matrix-multiply peak, so every throughput can be read as a fraction of it.
//!
//! Task A trains a linear classifier by OpenAI-ES (dense and rank-1 noise); Task B measures how
//! fast a population of MLP candidates turns into fitness values (materialized dense candidates and
//! the low-rank fast path). This module only measures; it changes nothing in the engine.

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::{Result, TensorContext};
use crate::function::{Activation, HyperFn};
use crate::param::ParamSpec;
use crate::population::{evaluate_population, Population};
use crate::system::Chain;
use crate::util::median;
use crate::{evaluate, metric, Es, Examples, Theta};

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The task generator: SplitMix64 outputs turned into standard normals by Box–Muller (f64, then
/// rounded to f32), exactly as `tasks.py` specifies.
///
/// # Examples
/// ```
/// let mut g = hyperfunc::bench::SplitMix64Normals::new(42);
/// let v = g.normals(4);
/// assert!((v[0] - 0.41471976).abs() < 1e-7);
/// ```
#[derive(Clone, Debug)]
pub struct SplitMix64Normals {
    seed: u64,
    k: u64,
}

impl SplitMix64Normals {
    /// A stream seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed, k: 0 }
    }

    fn next_u64(&mut self) -> u64 {
        self.k += 1;
        let mut z = self.seed.wrapping_add(self.k.wrapping_mul(GAMMA));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The next `m` normals (an odd count discards the last sine value, as in `tasks.py`).
    pub fn normals(&mut self, m: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(m + 1);
        for _ in 0..m.div_ceil(2) {
            let (o1, o2) = (self.next_u64(), self.next_u64());
            let u1 = ((o1 >> 11) as f64 + 1.0) * 2f64.powi(-53);
            let u2 = (o2 >> 11) as f64 * 2f64.powi(-53);
            let r = (-2.0 * u1.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            out.push((r * t.cos()) as f32);
            out.push((r * t.sin()) as f32);
        }
        out.truncate(m);
        out
    }
}

/// Task A's data: teacher, train and test sets (row-major), labels from the teacher in f64.
#[derive(Clone, Debug)]
pub struct TaskAData {
    /// Teacher weights `[10, 64]`.
    pub w_teacher: Vec<f32>,
    /// Training inputs `[1024, 64]`.
    pub x_train: Vec<f32>,
    /// Training labels.
    pub y_train: Vec<usize>,
    /// Test inputs `[1024, 64]`.
    pub x_test: Vec<f32>,
    /// Test labels.
    pub y_test: Vec<usize>,
}

const A_C: usize = 10;
const A_D: usize = 64;
const A_N: usize = 1024;

/// Generates Task A (seed 42).
pub fn task_a_data() -> TaskAData {
    let mut g = SplitMix64Normals::new(42);
    let w_teacher = g.normals(A_C * A_D);
    let x_train = g.normals(A_N * A_D);
    let x_test = g.normals(A_N * A_D);
    let labels = |x: &[f32]| -> Vec<usize> {
        x.chunks(A_D)
            .map(|row| {
                let logits = w_teacher.chunks(A_D).map(|w| {
                    row.iter()
                        .zip(w)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum::<f64>()
                });
                logits
                    .enumerate()
                    .fold((0, f64::NEG_INFINITY), |best, (c, v)| {
                        if v > best.1 {
                            (c, v)
                        } else {
                            best
                        }
                    })
                    .0
            })
            .collect()
    };
    let (y_train, y_test) = (labels(&x_train), labels(&x_test));
    TaskAData {
        w_teacher,
        x_train,
        y_train,
        x_test,
        y_test,
    }
}

/// Task B's data: θ0 (flat, 2410 values: W1, b1, W2, b2) and the inputs `[256, 64]`.
#[derive(Clone, Debug)]
pub struct TaskBData {
    /// Flat parameters `[W1 (32×64), b1 (32), W2 (10×32), b2 (10)]`.
    pub theta0: Vec<f32>,
    /// Inputs `[256, 64]`.
    pub x: Vec<f32>,
    /// Labels `n mod 10`.
    pub y: Vec<usize>,
}

/// Generates Task B (seed 7).
pub fn task_b_data() -> TaskBData {
    let mut g = SplitMix64Normals::new(7);
    let w1: Vec<f32> = g
        .normals(32 * 64)
        .iter()
        .map(|v| v * (1.0f32 / 8.0))
        .collect();
    let s2 = (1.0 / 32f64.sqrt()) as f32;
    let w2: Vec<f32> = g.normals(10 * 32).iter().map(|v| v * s2).collect();
    let x = g.normals(256 * 64);
    let mut theta0 = w1;
    theta0.extend(std::iter::repeat_n(0.0, 32));
    theta0.extend(w2);
    theta0.extend(std::iter::repeat_n(0.0, 10));
    TaskBData {
        theta0,
        x,
        y: (0..256).map(|n| n % 10).collect(),
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// A reduced run of a few seconds, for smoke tests.
    pub quick: bool,
    /// Rows per batched forward (candidate tiles of `max_batch_size / N` candidates).
    pub max_batch_size: usize,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            quick: false,
            max_batch_size: crate::es::DEFAULT_MAX_BATCH_SIZE,
        }
    }
}

/// The machine the figures were measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Logical cores available to this process.
    pub cores: usize,
    /// CPU model from `/proc/cpuinfo` (or `unknown`).
    pub cpu_model: String,
    /// Threads the matrix kernels use (`HYPERFUNC_THREADS` / `RAYON_NUM_THREADS`).
    pub threads: usize,
    /// Whether the CPU has AVX-512F (detected at run time).
    pub avx512: bool,
    /// The SIMD level of the fused kernels (`avx512`, `avx2` or `portable`; `HYPERFUNC_SIMD`
    /// caps it).
    pub simd: &'static str,
    /// hyperfunc version.
    pub version: &'static str,
}

/// One Task A configuration.
#[derive(Clone, Debug, Serialize)]
pub struct TaskARun {
    /// `dense` or `rank1`.
    pub noise: &'static str,
    /// Median milliseconds per generation over the runs.
    pub ms_per_gen: f64,
    /// Milliseconds per generation of each run (noise seeds 1, 2, 3).
    pub ms_per_gen_runs: Vec<f64>,
    /// Train accuracy of the final mean W (first run).
    pub train_acc: f32,
    /// Test accuracy of the final mean W (first run).
    pub test_acc: f32,
    /// Train cross-entropy of the final mean W (first run).
    pub train_ce: f32,
    /// Generations per run.
    pub generations: usize,
}

/// One Task B measurement.
#[derive(Clone, Debug, Serialize)]
pub struct TaskBRow {
    /// `dense` (materialized candidates) or `low_rank` (rank-1 fast path).
    pub variant: &'static str,
    /// Population size.
    pub pop: usize,
    /// Median candidate-example evaluations per second.
    pub evals_per_sec: f64,
    /// Achieved GFLOP/s at 2·(64·32 + 32·10) flops per evaluation.
    pub gflops: f64,
    /// `gflops / peak_gflops`.
    pub frac_of_peak: f64,
}

/// The cost of observation.
#[derive(Clone, Debug, Serialize)]
pub struct ObserveCost {
    /// Nanoseconds per `Hub::observe` scope (record creation, timing, storage).
    pub ns_per_record: f64,
    /// Task B dense evaluation at P = 256 with recording on, relative to off (1.0 = no cost).
    pub eval_time_ratio: f64,
}

/// GridWorld episodes of a population of MLP policies (the GAME runner).
#[derive(Clone, Debug, Serialize)]
pub struct GridWorldBench {
    /// Candidate policies (MLP 6-16-4).
    pub pop: usize,
    /// Episodes per candidate (5×5 grid, at most 20 steps).
    pub episodes: usize,
    /// Median candidate-episodes per second.
    pub episodes_per_sec: f64,
    /// Median environment steps per second (all cells).
    pub steps_per_sec: f64,
}

/// The cost of a tuned call and the bandit's regret.
#[derive(Clone, Debug, Serialize)]
pub struct TuneBench {
    /// Timed calls (after a warm-up).
    pub calls: usize,
    /// Median nanoseconds per tuned call with 5 choices under Thompson sampling, reward
    /// included (decision, closure, record, reward; the probability estimate and the SQLite
    /// write happen off the call's path).
    pub ns_per_call_p50: f64,
    /// 99th percentile of the same.
    pub ns_per_call_p99: f64,
    /// Regret against the best fixed choice in the 5-arm simulations.
    pub regret: crate::tune::sim::RegretReport,
    /// Two tuners (two connections, as two processes would have) updating one file.
    pub shared_store: SharedStoreBench,
    /// The cost ledger: writes, `cost report` from the rollups, an ad-hoc group-by.
    pub ledger: LedgerBench,
}

/// Two writers on one tune store file.
#[derive(Clone, Debug, Serialize)]
pub struct SharedStoreBench {
    /// Writers (each its own `Tuner` and SQLite connection on the same file).
    pub writers: usize,
    /// Tuned calls with a reward per writer.
    pub updates_per_writer: usize,
    /// Calls missing from the file afterwards (must be 0).
    pub lost: u64,
    /// Updates per second, all writers together, until both flushed.
    pub updates_per_sec: f64,
}

/// The cost ledger on a temporary file.
#[derive(Clone, Debug, Serialize)]
pub struct LedgerBench {
    /// Metered calls stored.
    pub calls: usize,
    /// Calls recorded and written per second (queued on the caller, written in batches).
    pub records_per_sec: f64,
    /// Median ms of `cost_report` by caller over all calls (from the rollups).
    pub report_ms: f64,
    /// Median ms of an ad-hoc group-by (caller × endpoint) over the per-call rows.
    pub adhoc_ms: f64,
}

/// Autotune: what a cache hit costs `optimize`.
#[derive(Clone, Debug, Serialize)]
pub struct AutotuneBench {
    /// Median ms of the lookup `optimize` does on a hit (the machine's fingerprint is read once
    /// per process; this is the record read).
    pub hit_ms: f64,
    /// The same on a miss (an empty cache directory).
    pub miss_ms: f64,
}

/// Times the record lookup on a hit and a miss (a record saved in a temporary directory).
fn autotune_bench() -> Result<AutotuneBench> {
    use crate::autotune::{machine_fingerprint, tensor, Mode, Store};
    let dir = std::env::temp_dir().join(format!("hyperfunc-bench-autotune-{}", std::process::id()));
    let store = Store::at(&dir);
    let probe = tensor::MlpProbe::new(&[16, 8, 4], 32, 32, None)?;
    let mut opts = tensor::Options::new(Mode::Quick);
    opts.budget = Some(std::time::Duration::from_millis(300));
    opts.min_sample = std::time::Duration::from_millis(1);
    let record = tensor::tune(&probe, &opts)?;
    let key = tensor::Probe::key(&probe);
    let time = |store: &Store| {
        let mut v = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            std::hint::black_box(store.lookup(&key, machine_fingerprint()));
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        median(&v)
    };
    let miss_ms = time(&store);
    store.save(&record, true)?;
    let hit_ms = time(&store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(AutotuneBench { hit_ms, miss_ms })
}

/// The whole report, as `hyperfunc bench --json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Where it ran.
    pub machine: Machine,
    /// fp32 GFLOP/s of a large square matmul through candle's CPU backend.
    pub peak_gflops: f64,
    /// Task A, dense and rank-1 noise.
    pub task_a: Vec<TaskARun>,
    /// Task B rows.
    pub task_b: Vec<TaskBRow>,
    /// Observation overhead.
    pub observe: ObserveCost,
    /// The GAME runner on GridWorld.
    pub gridworld: GridWorldBench,
    /// The SQLite memory: batched inserts and retrieval latency by store size.
    pub memory: crate::memory::MemoryBench,
    /// Tuned calls: overhead and regret.
    pub tune: TuneBench,
    /// Autotune lookups.
    pub autotune: AutotuneBench,
    /// The run store: rows, checkpoints, control, diff.
    pub runs: crate::runs::bench::RunsBench,
    /// Whether this was a `--quick` run.
    pub quick: bool,
    /// Total seconds.
    pub seconds: f64,
}

/// Flops per Task B evaluation.
pub const TASK_B_FLOPS: f64 = 2.0 * (64.0 * 32.0 + 32.0 * 10.0);

/// Detects the machine.
pub fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    #[cfg(target_arch = "x86_64")]
    let simd = match crate::kernels::simd_level() {
        crate::kernels::Simd::Avx512 => "avx512",
        crate::kernels::Simd::Avx2 => "avx2",
        crate::kernels::Simd::Portable => "portable",
    };
    #[cfg(not(target_arch = "x86_64"))]
    let simd = "portable";
    Machine {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        threads: candle_core::utils::get_num_threads(),
        avx512,
        simd,
        version: env!("CARGO_PKG_VERSION"),
    }
}

/// fp32 GFLOP/s of an `n × n` matmul through candle (median of 5 after a warm-up).
pub fn peak_gflops(n: usize) -> Result<f64> {
    let dev = Device::Cpu;
    let mut g = SplitMix64Normals::new(1);
    let a = Tensor::from_vec(g.normals(n * n), (n, n), &dev).at("peak")?;
    let b = Tensor::from_vec(g.normals(n * n), (n, n), &dev).at("peak")?;
    a.matmul(&b).at("peak")?;
    let mut rates = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let mut reps = 0;
        while reps < 2 || t.elapsed().as_secs_f64() < 0.2 {
            a.matmul(&b).at("peak")?;
            reps += 1;
        }
        rates.push(2.0 * (n as f64).powi(3) * reps as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    Ok(median(&rates))
}

fn labels_tensor(y: &[usize], dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(
        y.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        y.len(),
        dev,
    )
    .at("labels")
}

/// Runs Task A with dense (`rank = None`) or low-rank noise.
pub async fn task_a(data: &TaskAData, rank: Option<usize>, cfg: &BenchConfig) -> Result<TaskARun> {
    let dev = Device::Cpu;
    let spec = ParamSpec::matrix(A_C, A_D).zeros();
    let spec = match rank {
        Some(r) => spec.noise_rank(r),
        None => spec,
    };
    let student = HyperFn::linear_no_bias("student", A_D, A_C, Activation::Identity)
        .with_param("student.weight", spec);
    let net = Chain::new(vec![student]);
    let x = Tensor::from_vec(data.x_train.clone(), (A_N, A_D), &dev).at("task_a")?;
    let train = Examples::tensors(x, labels_tensor(&data.y_train, &dev)?)?;
    let xt = Tensor::from_vec(data.x_test.clone(), (A_N, A_D), &dev).at("task_a")?;
    let test = Examples::tensors(xt, labels_tensor(&data.y_test, &dev)?)?;
    let generations = if cfg.quick { 10 } else { 100 };
    let seeds: &[u64] = if cfg.quick { &[1] } else { &[1, 2, 3] };
    let mut runs = Vec::new();
    let mut first = None;
    for &seed in seeds {
        let es = Es::default()
            .pop_size(256)
            .sigma(0.05)
            .lr(0.05)
            .generations(generations)
            .seed(seed)
            .minimize()
            .max_batch_size(cfg.max_batch_size)
            .progress(false);
        let t = Instant::now();
        let report = es.optimize(&net, &train, &metric::cross_entropy()).await?;
        runs.push(t.elapsed().as_secs_f64() * 1e3 / generations as f64);
        first.get_or_insert(report.theta);
    }
    let theta = first.unwrap_or_default();
    Ok(TaskARun {
        noise: if rank.is_some() { "rank1" } else { "dense" },
        ms_per_gen: median(&runs),
        ms_per_gen_runs: runs,
        train_acc: evaluate(&net, &theta, &train, &metric::class_accuracy()).await?,
        test_acc: evaluate(&net, &theta, &test, &metric::class_accuracy()).await?,
        train_ce: evaluate(&net, &theta, &train, &metric::cross_entropy()).await?,
        generations,
    })
}

/// The Task B network and θ0.
pub fn task_b_system(data: &TaskBData, low_rank: bool) -> Result<(Chain, Theta, Examples)> {
    let dev = Device::Cpu;
    let mlp = HyperFn::mlp("mlp", &[64, 32, 10], Activation::Tanh, Activation::Identity);
    let mlp = if low_rank { mlp.noise_rank(1) } else { mlp };
    let t = &data.theta0;
    let part = |a: usize, b: usize, shape: &[usize]| {
        Tensor::from_vec(t[a..b].to_vec(), shape.to_vec(), &dev).at("task_b")
    };
    let theta = Theta::from_tensors([
        ("mlp.0.weight".to_string(), part(0, 2048, &[32, 64])?),
        ("mlp.0.bias".to_string(), part(2048, 2080, &[32])?),
        ("mlp.1.weight".to_string(), part(2080, 2400, &[10, 32])?),
        ("mlp.1.bias".to_string(), part(2400, 2410, &[10])?),
    ]);
    let x = Tensor::from_vec(data.x.clone(), (256, 64), &dev).at("task_b")?;
    let examples = Examples::tensors(x, labels_tensor(&data.y, &dev)?)?;
    Ok((Chain::new(vec![mlp]), theta, examples))
}

/// The Task B population of `pop` candidates: materialized dense, or rank-1 factors.
pub fn task_b_population(
    net: &Chain,
    theta: &Theta,
    pop: usize,
    low_rank: bool,
) -> Result<Population> {
    let es = Es::default().pop_size(pop).sigma(0.05).seed(11);
    let sampled = es.population(net, theta, 0)?;
    if low_rank {
        return Ok(sampled);
    }
    let thetas = (0..pop)
        .map(|i| sampled.candidate(i))
        .collect::<Result<Vec<_>>>()?;
    Population::from_thetas(&thetas)
}

/// Candidate-example evaluations per second for one Task B configuration (median of `reps`
/// blocks of at least `min_secs` each, after a warm-up).
pub async fn task_b(
    data: &TaskBData,
    pop: usize,
    low_rank: bool,
    min_secs: f64,
    reps: usize,
    max_batch_size: usize,
) -> Result<f64> {
    let (net, theta, examples) = task_b_system(data, low_rank)?;
    let population = task_b_population(&net, &theta, pop, low_rank)?;
    let ce = metric::cross_entropy();
    evaluate_population(&net, &population, &examples, &ce, max_batch_size).await?;
    let mut rates = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let mut n = 0usize;
        while n == 0 || t.elapsed().as_secs_f64() < min_secs {
            evaluate_population(&net, &population, &examples, &ce, max_batch_size).await?;
            n += 1;
        }
        rates.push((n * pop * 256) as f64 / t.elapsed().as_secs_f64());
    }
    Ok(median(&rates))
}

/// Measures the observation overhead.
pub async fn observe_cost(data: &TaskBData, min_secs: f64) -> Result<ObserveCost> {
    let hub = crate::observe::Hub::new();
    let n = 200_000;
    let t = Instant::now();
    for _ in 0..n {
        drop(hub.observe("bench"));
    }
    let ns_per_record = t.elapsed().as_secs_f64() * 1e9 / n as f64;
    let (net, theta, examples) = task_b_system(data, false)?;
    let population = task_b_population(&net, &theta, 256, false)?;
    let ce = metric::cross_entropy();
    let rows = crate::es::DEFAULT_MAX_BATCH_SIZE;
    let hub = crate::observe::Hub::new();
    let mut ratios = Vec::new();
    for _ in 0..3 {
        let time = |observed: bool| {
            let (net, population, examples, ce, hub) = (&net, &population, &examples, &ce, &hub);
            async move {
                let t = Instant::now();
                let mut k = 0;
                while k == 0 || t.elapsed().as_secs_f64() < min_secs {
                    if observed {
                        crate::population::evaluate_population_observed(
                            net, population, examples, ce, rows, hub,
                        )
                        .await?;
                    } else {
                        evaluate_population(net, population, examples, ce, rows).await?;
                    }
                    k += 1;
                }
                Ok::<f64, crate::Error>(t.elapsed().as_secs_f64() / k as f64)
            }
        };
        let off = time(false).await?;
        let on = time(true).await?;
        ratios.push(on / off);
    }
    Ok(ObserveCost {
        ns_per_record,
        eval_time_ratio: median(&ratios),
    })
}

/// GridWorld episodes per second for `pop` random MLP policies × `episodes` episodes.
pub async fn gridworld(pop: usize, episodes: usize, reps: usize) -> Result<GridWorldBench> {
    use crate::agents::{self, Game, GridWorld};
    let policy = GridWorld::mlp_policy(16);
    let game = Game::new(policy, |_| Ok(GridWorld::new(5)));
    let data = agents::episodes(0..episodes as u64, 20)?;
    let es = Es::default().pop_size(pop).seed(11);
    let theta = es.start(&game)?.theta().clone();
    let population = es.population(&game, &theta, 0)?;
    let steps = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = steps.clone();
    let metric = agents::episode_metric(move |r| {
        counted.fetch_add(r.steps, std::sync::atomic::Ordering::Relaxed);
        r.total_reward
    });
    let (mut eps, mut sps) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        steps.store(0, std::sync::atomic::Ordering::Relaxed);
        let t = Instant::now();
        evaluate_population(
            &game,
            &population,
            &data,
            &metric,
            crate::es::DEFAULT_MAX_BATCH_SIZE,
        )
        .await?;
        let secs = t.elapsed().as_secs_f64().max(1e-9);
        eps.push((pop * episodes) as f64 / secs);
        sps.push(steps.load(std::sync::atomic::Ordering::Relaxed) as f64 / secs);
    }
    Ok(GridWorldBench {
        pop,
        episodes,
        episodes_per_sec: median(&eps),
        steps_per_sec: median(&sps),
    })
}

/// The memory benchmark on a temporary SQLite file: 10 k and 100 k entries (2 k when quick).
fn memory_bench(quick: bool) -> Result<crate::memory::MemoryBench> {
    let (path, cleanup) = temp_db("memory");
    let (sizes, queries): (&[usize], usize) = if quick {
        (&[2_000], 50)
    } else {
        (&[10_000, 100_000], 300)
    };
    // `memory::bench` runs its own runtime, which cannot start on a runtime thread.
    let out = std::thread::scope(|s| {
        s.spawn(|| crate::memory::bench(&path, sizes, queries))
            .join()
            .unwrap_or_else(|_| {
                Err(crate::Error::config(
                    "bench",
                    "the memory benchmark panicked",
                ))
            })
    });
    cleanup();
    out
}

/// Overhead per tuned call (5 choices, Thompson) and the regret simulations (10 000 calls × 100
/// seeds; 1 000 × 2 when quick).
pub async fn tune_bench(quick: bool) -> Result<TuneBench> {
    use crate::tune::{sim, Tuner};
    const NAMES: [&str; 5] = ["arm0", "arm1", "arm2", "arm3", "arm4"];
    let tuner = Tuner::in_memory()?.seed(5);
    let calls = if quick { 2_000 } else { 20_000 };
    let mut ns = Vec::with_capacity(calls);
    for i in 0..calls + 1_000 {
        let t = Instant::now();
        let (pick, outcome) = tuner
            .tune("bench")
            .choices(NAMES)
            .run(|c| async move { Ok::<_, crate::Error>(c.index()) })
            .await?;
        outcome.reward(if pick == 4 { 1.0 } else { 0.0 })?;
        if i >= 1_000 {
            ns.push(t.elapsed().as_nanos() as f64);
        }
    }
    tuner.flush()?;
    ns.sort_by(f64::total_cmp);
    let p99 = ns[((ns.len() as f64 * 0.99) as usize).min(ns.len() - 1)];
    let (sim_calls, seeds) = if quick { (1_000, 2) } else { (10_000, 100) };
    let regret = tokio::task::spawn_blocking(move || sim::regret_simulation(sim_calls, seeds))
        .await
        .map_err(|e| {
            crate::Error::config("bench", format!("the regret simulation panicked: {e}"))
        })??;
    let shared_store = tokio::task::spawn_blocking(move || shared_store_bench(quick))
        .await
        .map_err(|e| {
            crate::Error::config("bench", format!("the store benchmark panicked: {e}"))
        })??;
    let ledger = tokio::task::spawn_blocking(move || ledger_bench(quick))
        .await
        .map_err(|e| {
            crate::Error::config("bench", format!("the ledger benchmark panicked: {e}"))
        })??;
    Ok(TuneBench {
        calls,
        ns_per_call_p50: median(&ns),
        ns_per_call_p99: p99,
        regret,
        shared_store,
        ledger,
    })
}

/// A SQLite path in the temp dir, and what removes it with its WAL files (run once already).
fn temp_db(name: &str) -> (std::path::PathBuf, impl Fn()) {
    let path = std::env::temp_dir().join(format!(
        "hyperfunc-bench-{name}-{}.sqlite",
        std::process::id()
    ));
    let p = path.clone();
    let cleanup = move || {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
        }
    };
    cleanup();
    (path, cleanup)
}

/// Two tuners on one file, 10 000 rewarded calls each (2 000 when quick).
fn shared_store_bench(quick: bool) -> Result<SharedStoreBench> {
    use crate::tune::Tuner;
    let (path, cleanup) = temp_db("tune-shared");
    let n = if quick { 2_000 } else { 10_000 };
    drop(Tuner::open(&path)?);
    let t = Instant::now();
    let out: Result<()> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u64)
            .map(|w| {
                let path = &path;
                s.spawn(move || -> Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .map_err(|e| crate::Error::config("bench", e.to_string()))?;
                    let tuner = Tuner::open(path)?.seed(w).batch_size(512);
                    rt.block_on(async {
                        for _ in 0..n {
                            let (_, o) = tuner
                                .tune("shared")
                                .choices(["a", "b", "c"])
                                .run(|c| async move { Ok::<_, crate::Error>(c.index()) })
                                .await?;
                            o.reward(1.0)?;
                        }
                        Ok::<(), crate::Error>(())
                    })?;
                    tuner.flush()
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| crate::Error::config("bench", "a writer panicked"))??;
        }
        Ok(())
    });
    out?;
    let secs = t.elapsed().as_secs_f64();
    let report = Tuner::open(&path)?.report(Some("shared"))?;
    let stored: u64 = report
        .groups
        .iter()
        .flat_map(|g| &g.choices)
        .map(|c| c.calls)
        .sum();
    cleanup();
    Ok(SharedStoreBench {
        writers: 2,
        updates_per_writer: n,
        lost: (2 * n as u64).saturating_sub(stored),
        updates_per_sec: (2 * n) as f64 / secs.max(1e-9),
    })
}

/// 1 000 000 metered calls (20 000 when quick) over 50 callers, 5 endpoints, 20 labels and
/// 100 users; then `cost report` by caller and an ad-hoc group-by over the raw rows.
fn ledger_bench(quick: bool) -> Result<LedgerBench> {
    use crate::tune::{CostDim, Ledger, Meter, MeterPrice};
    let (path, cleanup) = temp_db("ledger");
    let calls = if quick { 20_000 } else { 1_000_000 };
    let ledger = Ledger::open(&path)?;
    let meters: Vec<Meter> = (0..5)
        .map(|e| {
            MeterPrice::per_call_usd(0.0001 * (e + 1) as f64)
                .map(|p| Meter::new(&ledger, &format!("endpoint-{e}"), p))
        })
        .collect::<Result<_>>()?;
    let callers: Vec<String> = (0..50)
        .map(|c| format!("src/caller_{c}.rs:{}", 10 + c))
        .collect();
    let labels: Vec<String> = (0..20).map(|l| format!("label-{l}")).collect();
    let users: Vec<String> = (0..100).map(|u| format!("user-{u}")).collect();
    let t = Instant::now();
    for i in 0..calls {
        meters[i % 5]
            .charge()
            .call_site(&callers[(i * 7) % 50])
            .label(&labels[(i * 3) % 20])
            .user(&users[(i * 13) % 100])
            .record()?;
    }
    ledger.flush()?;
    let records_per_sec = calls as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let mut report = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let r = ledger.cost_report(&[CostDim::Caller], None)?;
        report.push(t.elapsed().as_secs_f64() * 1e3);
        if r.total_calls != calls as u64 {
            return Err(crate::Error::config(
                "bench",
                format!("the ledger lost calls: {} of {calls}", r.total_calls),
            ));
        }
    }
    let mut adhoc = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        ledger.cost_by_calls(&[CostDim::Caller, CostDim::Endpoint], None)?;
        adhoc.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(meters);
    drop(ledger);
    cleanup();
    Ok(LedgerBench {
        calls,
        records_per_sec,
        report_ms: median(&report),
        adhoc_ms: median(&adhoc),
    })
}

/// Runs everything.
pub async fn run(cfg: &BenchConfig) -> Result<BenchReport> {
    let start = Instant::now();
    let peak = peak_gflops(if cfg.quick { 512 } else { 1024 })?;
    let a = task_a_data();
    let task_a = vec![
        task_a(&a, None, cfg).await?,
        task_a(&a, Some(1), cfg).await?,
    ];
    let b = task_b_data();
    let (min_secs, reps) = if cfg.quick { (0.05, 1) } else { (1.0, 3) };
    let mut task_b_rows = Vec::new();
    for low_rank in [false, true] {
        for pop in [64, 256, 1024] {
            let rate = task_b(&b, pop, low_rank, min_secs, reps, cfg.max_batch_size).await?;
            let gflops = rate * TASK_B_FLOPS / 1e9;
            task_b_rows.push(TaskBRow {
                variant: if low_rank { "low_rank" } else { "dense" },
                pop,
                evals_per_sec: rate,
                gflops,
                frac_of_peak: gflops / peak,
            });
        }
    }
    let observe = observe_cost(&b, min_secs).await?;
    let gridworld = gridworld(256, 16, if cfg.quick { 1 } else { 5 }).await?;
    let memory = memory_bench(cfg.quick)?;
    let tune = tune_bench(cfg.quick).await?;
    let autotune = tokio::task::spawn_blocking(autotune_bench)
        .await
        .map_err(|e| {
            crate::Error::config("bench", format!("the autotune benchmark panicked: {e}"))
        })??;
    let runs = crate::runs::bench::bench(cfg.quick).await?;
    Ok(BenchReport {
        machine: machine(),
        peak_gflops: peak,
        task_a,
        task_b: task_b_rows,
        observe,
        gridworld,
        memory,
        tune,
        autotune,
        runs,
        quick: cfg.quick,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// A human-readable table of a report.
pub fn render(r: &BenchReport) -> String {
    let mut s = String::new();
    let m = &r.machine;
    s.push_str(&format!(
        "machine: {} ({} cores, {} threads, avx512: {}, fused kernels: {})\npeak fp32 matmul: {:.1} GFLOP/s\n\n",
        m.cpu_model, m.cores, m.threads, m.avx512, m.simd, r.peak_gflops
    ));
    s.push_str("Task A  linear classifier by ES (pop 256, 100 gens)\n");
    s.push_str("  noise   ms/gen   train acc  test acc  train CE\n");
    for a in &r.task_a {
        s.push_str(&format!(
            "  {:<6} {:>7.2}   {:>9.3}  {:>8.3}  {:>8.4}\n",
            a.noise, a.ms_per_gen, a.train_acc, a.test_acc, a.train_ce
        ));
    }
    s.push_str("\nTask B  population evaluation, MLP 64-32-10 on 256 rows\n");
    s.push_str("  variant     P     M evals/s   GFLOP/s  of peak\n");
    for b in &r.task_b {
        s.push_str(&format!(
            "  {:<9} {:>5}  {:>10.2}  {:>8.1}  {:>6.1}%\n",
            b.variant,
            b.pop,
            b.evals_per_sec / 1e6,
            b.gflops,
            100.0 * b.frac_of_peak
        ));
    }
    s.push_str(&format!(
        "\nobservation: {:.0} ns per record; evaluation with recording on takes {:.3}x the time\n",
        r.observe.ns_per_record, r.observe.eval_time_ratio
    ));
    let g = &r.gridworld;
    s.push_str(&format!(
        "\nGridWorld (GAME runner): {} MLP policies × {} episodes: {:.0} episodes/s, {:.0} steps/s\n",
        g.pop, g.episodes, g.episodes_per_sec, g.steps_per_sec
    ));
    s.push_str("\nMemory (SQLite file, WAL; add_many batches, BM25 + importance + recency)\n");
    s.push_str("  entries   inserts/s   p50 ms   p95 ms\n");
    for m in &r.memory.sizes {
        s.push_str(&format!(
            "  {:>7}  {:>10.0}  {:>7.3}  {:>7.3}\n",
            m.entries, m.inserts_per_s, m.p50_ms, m.p95_ms
        ));
    }
    let t = &r.tune;
    s.push_str(&format!(
        "\nTuned call (5 choices, Thompson, reward included): p50 {:.0} ns, p99 {:.0} ns\n",
        t.ns_per_call_p50, t.ns_per_call_p99
    ));
    s.push_str(&format!(
        "Two tuners on one file: {} × {} updates, {} lost, {:.0} updates/s\n",
        t.shared_store.writers,
        t.shared_store.updates_per_writer,
        t.shared_store.lost,
        t.shared_store.updates_per_sec
    ));
    s.push_str(&format!(
        "Cost ledger: {} calls at {:.0} records/s; cost report {:.1} ms, ad-hoc group-by {:.1} ms\n",
        t.ledger.calls, t.ledger.records_per_sec, t.ledger.report_ms, t.ledger.adhoc_ms
    ));
    s.push_str(&format!(
        "Regret vs the best fixed choice ({} calls, mean of {} seeds):\n",
        t.regret.calls, t.regret.seeds
    ));
    for sc in &t.regret.scenarios {
        let row: Vec<String> = sc
            .policies
            .iter()
            .map(|p| format!("{} {:.1}", p.policy, p.mean_regret))
            .collect();
        s.push_str(&format!("  {:<9} {}\n", sc.scenario, row.join(", ")));
    }
    s.push_str(&format!(
        "\nAutotune lookup in optimize: hit {:.2} ms, miss {:.2} ms\n",
        r.autotune.hit_ms, r.autotune.miss_ms
    ));
    let u = &r.runs;
    s.push_str(&format!(
        "\nRun store: row {:.3} ms alone, {:.1} µs batched; checkpoint {:.2} ms ({} bytes, state {}) = {:.1}% of a {:.2} ms Task A generation\n\
         control poll {:.1} µs ({:.3}% of a generation at most); set → applied {:.1} ms; runs diff on 2 × 10 000 generations {:.1} ms\n\
         web page: row → live stream {}\n",
        u.row_commit_ms, u.row_batched_us, u.checkpoint_ms, u.checkpoint_bytes, u.state_bytes,
        100.0 * u.checkpoint_share, u.generation_ms, u.poll_us, 100.0 * u.control_share,
        u.command_latency_ms, u.diff_ms,
        u.ui_stream_ms.map_or("(not built: cargo feature `ui`)".into(), |ms| format!("{ms:.0} ms (poll 200 ms; rows flushed at least every 250 ms)"))
    ));
    s.push_str(&format!(
        "\n{:.1} s{}\n",
        r.seconds,
        if r.quick { " (quick)" } else { "" }
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_matches_the_reference_check_values() {
        let v = SplitMix64Normals::new(42).normals(4);
        let want = [0.414_719_76f32, 0.652_681_2, -0.891_886_2, 1.326_833_6];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{v:?}");
        }
    }

    #[test]
    fn task_a_class_counts_match_the_reference() {
        let a = task_a_data();
        let mut counts = [0usize; 10];
        a.y_train.iter().for_each(|&y| counts[y] += 1);
        assert_eq!(counts, [96, 105, 103, 60, 73, 86, 127, 120, 131, 123]);
    }

    #[test]
    fn task_b_theta0_has_2410_values() {
        let b = task_b_data();
        assert_eq!(b.theta0.len(), 2410);
        assert_eq!(b.x.len(), 256 * 64);
    }
}
