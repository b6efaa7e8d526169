//! hyperfunc measures its machine and configures itself.
//!
//! [`SystemProfile::detect`] reads the machine (cores, CPU model, ISA, memory, load, GPU).
//! [`tensor::tune`] times the settings a tensor population evaluation depends on — the
//! candidate tile that must fit in cache and the rows per batched forward — on a [`tensor::Probe`]
//! of the user's problem shape, and keeps a winner only when it beats the default with a
//! bootstrap 95% interval above 1. Results are [`Record`]s saved per shape key: one JSON file per
//! key in the cache directory (atomic write) and, for a project to check in,
//! `hyperfunc.autotune.json`. [`crate::Es::optimize`] looks them up (explicit settings, then the
//! project file, then the cache, then the nearest population size of the same shape, then the
//! defaults) and drops a record that runs 20% slower than it promised.
//!
//! # Examples
//! ```no_run
//! use hyperfunc::autotune::{tensor, Mode, Store};
//!
//! let probe = tensor::MlpProbe::new(&[64, 32, 10], 256, 256, None)?;
//! let record = tensor::tune(&probe, &tensor::Options::new(Mode::Quick))?;
//! println!("{}", record.to_markdown());
//! Store::default_location().save(&record, false)?;
//! # Ok::<(), hyperfunc::Error>(())
//! ```

pub mod bench;
#[cfg(feature = "llm")]
pub mod endpoint;
pub mod tensor;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a tuning stands: its phase and how much of its budget is used.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// What it is doing (`correctness gate`, `concurrency 4`…; `done` at the end).
    pub phase: String,
    /// Budget used: milliseconds for tensors, requests for endpoints.
    pub done: u64,
    /// The whole budget, in the same unit.
    pub total: u64,
    /// `ms` or `requests`.
    pub unit: &'static str,
}

/// Receives a tuning's [`Progress`] as it goes; [`OnProgress::terminal`] draws a bar.
///
/// # Examples
/// ```
/// use std::sync::{Arc, Mutex};
/// use hyperfunc::autotune::{OnProgress, Progress};
///
/// let seen = Arc::new(Mutex::new(Vec::<String>::new()));
/// let s = seen.clone();
/// let on = OnProgress::new(move |p: &Progress| s.lock().unwrap().push(p.phase.clone()));
/// on.report("noise", 10, 1000, "ms");
/// assert_eq!(seen.lock().unwrap().as_slice(), ["noise"]);
/// ```
#[derive(Clone)]
pub struct OnProgress(Arc<dyn Fn(&Progress) + Send + Sync>);

impl OnProgress {
    /// Calls `f` with every update.
    pub fn new(f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// A progress bar on stderr (nothing when stderr is not a terminal): the phase and what is
    /// left of the budget; cleared at `done`.
    pub fn terminal() -> Self {
        use std::io::IsTerminal;
        let bar = if std::io::stderr().is_terminal() {
            indicatif::ProgressBar::new(0)
        } else {
            indicatif::ProgressBar::hidden()
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template("autotune {bar:30} {msg}") {
            bar.set_style(style);
        }
        Self::new(move |p| {
            if p.phase == "done" {
                bar.finish_and_clear();
                return;
            }
            bar.set_length(p.total);
            bar.set_position(p.done.min(p.total));
            let left = p.total.saturating_sub(p.done);
            let left = if p.unit == "ms" {
                format!("{:.1} s left", left as f64 / 1e3)
            } else {
                format!("{left} {} left", p.unit)
            };
            bar.set_message(format!("{}  ({left})", p.phase));
        })
    }

    /// Sends one update.
    pub fn report(&self, phase: &str, done: u64, total: u64, unit: &'static str) {
        (self.0)(&Progress {
            phase: phase.to_string(),
            done,
            total,
            unit,
        });
    }
}

impl std::fmt::Debug for OnProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnProgress(..)")
    }
}

impl PartialEq for OnProgress {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// What the machine is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SystemProfile {
    /// Logical cores available to this process.
    pub cores: usize,
    /// Threads the kernels use.
    pub threads: usize,
    /// CPU model.
    pub cpu_model: String,
    /// Instruction-set extensions that matter here (`avx2`, `fma`, `avx512f`, `neon`).
    pub isa: Vec<String>,
    /// Memory, bytes (0 when unknown).
    pub ram_total_bytes: u64,
    /// Memory available now, bytes (0 when unknown).
    pub ram_available_bytes: u64,
    /// 1, 5 and 15 minute load averages (zeros when unknown).
    pub load_avg: [f64; 3],
    /// Per-core L2 cache, bytes (0 when unknown).
    pub l2_bytes: u64,
    /// A GPU candle can use, if any.
    pub gpu: Option<String>,
    /// Versions: hyperfunc and the kernels it was built with.
    pub versions: BTreeMap<String, String>,
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

fn cache_size(text: &str) -> u64 {
    let t = text.trim();
    let (num, mult) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1024),
        Some('M') => (&t[..t.len() - 1], 1024 * 1024),
        _ => (t, 1),
    };
    num.parse::<u64>().map_or(0, |n| n * mult)
}

impl SystemProfile {
    /// Reads the machine.
    pub fn detect() -> Self {
        let m = crate::bench::machine();
        let mut isa = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            for (name, on) in [
                ("avx2", std::arch::is_x86_feature_detected!("avx2")),
                ("fma", std::arch::is_x86_feature_detected!("fma")),
                ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ] {
                if on {
                    isa.push(name.to_string());
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        isa.push("neon".to_string());
        let load_avg = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .map(|s| {
                let v: Vec<f64> = s
                    .split_whitespace()
                    .take(3)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                [
                    v.first().copied().unwrap_or(0.0),
                    v.get(1).copied().unwrap_or(0.0),
                    v.get(2).copied().unwrap_or(0.0),
                ]
            })
            .unwrap_or([0.0; 3]);
        let l2_bytes = (0..4)
            .find_map(|i| {
                let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
                let level = std::fs::read_to_string(format!("{dir}/level")).ok()?;
                (level.trim() == "2")
                    .then(|| std::fs::read_to_string(format!("{dir}/size")).ok())
                    .flatten()
                    .map(|s| cache_size(&s))
            })
            .unwrap_or(0);
        let gpu = if let Some(g) = crate::gpu::probe(0) {
            Some(format!("cuda:0 {} ({} GiB)", g.name, g.total_bytes >> 30))
        } else if candle_core::utils::metal_is_available() {
            Some("metal:0".to_string())
        } else {
            None
        };
        let mut versions = BTreeMap::new();
        versions.insert("hyperfunc".into(), env!("CARGO_PKG_VERSION").into());
        versions.insert("simd".into(), m.simd.into());
        Self {
            cores: m.cores,
            threads: m.threads,
            cpu_model: m.cpu_model,
            isa,
            ram_total_bytes: meminfo("MemTotal:"),
            ram_available_bytes: meminfo("MemAvailable:"),
            load_avg,
            l2_bytes,
            gpu,
            versions,
        }
    }

    /// What a saved setting depends on: CPU model, cores, threads, ISA, GPU, version (16 hex
    /// digits). Load and free memory are left out.
    pub fn fingerprint(&self) -> String {
        let text = format!(
            "{}|{}|{}|{}|{:?}|{:?}",
            self.cpu_model,
            self.cores,
            self.threads,
            self.isa.join(","),
            self.gpu,
            self.versions
        );
        crate::util::fnv1a_hex(text.as_bytes())
    }

    /// A short Markdown panel.
    pub fn to_markdown(&self) -> String {
        format!(
            "| system | |\n|---|---|\n| CPU | {} |\n| cores / threads | {} / {} |\n| ISA | {} |\n\
             | RAM | {:.1} GiB ({:.1} GiB available) |\n| L2 per core | {} KiB |\n\
             | load (1/5/15 min) | {:.2} / {:.2} / {:.2} |\n| GPU | {} |\n| fingerprint | {} |\n",
            self.cpu_model,
            self.cores,
            self.threads,
            if self.isa.is_empty() {
                "-".to_string()
            } else {
                self.isa.join(", ")
            },
            self.ram_total_bytes as f64 / (1u64 << 30) as f64,
            self.ram_available_bytes as f64 / (1u64 << 30) as f64,
            self.l2_bytes / 1024,
            self.load_avg[0],
            self.load_avg[1],
            self.load_avg[2],
            self.gpu.as_deref().unwrap_or("none"),
            self.fingerprint()
        )
    }
}

/// This machine's [`SystemProfile::fingerprint`], read once per process.
pub(crate) fn machine_fingerprint() -> &'static str {
    static FP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FP.get_or_init(|| SystemProfile::detect().fingerprint())
}

/// The autotuned settings one `Es::optimize` uses: its batch size, and the kernel its
/// populations carry (nothing process-wide changes).
#[derive(Default)]
pub(crate) struct InUse {
    record: Option<Record>,
    store: Option<Store>,
    note: Option<String>,
}

impl InUse {
    /// The record for evaluating `pop` on `rows` examples on this machine, applied; nothing
    /// when there is none or `HYPERFUNC_AUTOTUNE` is `0` or `off`.
    pub(crate) fn look_up(pop: &crate::Population, rows: usize) -> Self {
        if std::env::var("HYPERFUNC_AUTOTUNE").is_ok_and(|v| v == "0" || v == "off") {
            return Self::default();
        }
        let key = tensor::ShapeKey::of(pop, rows);
        let store = Store::default_location();
        let Some(record) = store.lookup(&key, machine_fingerprint()) else {
            return Self::default();
        };
        // The fingerprint names the GPU, so a record for one is found only where it is; a
        // checked-in file edited by hand could still ask for a GPU this process cannot open.
        if let TensorDevice::Cuda(n) = record.settings.device {
            if crate::gpu::probe(n).is_none() {
                return Self {
                    note: Some(format!(
                        "{key}: the record {} evaluates on CUDA {n}, which this process cannot \
                         open; the defaults instead",
                        record.key
                    )),
                    ..Self::default()
                };
            }
        }
        tracing::info!(key = %key, settings = %record.settings, "using autotuned settings");
        Self {
            note: Some(format!(
                "{key}: {} (tuned for {})",
                record.settings, record.key
            )),
            record: Some(record),
            store: Some(store),
        }
    }

    /// The batch size the record sets.
    pub(crate) fn max_batch_size(&self) -> Option<usize> {
        self.record.as_ref().map(|r| r.settings.max_batch_size)
    }

    /// After a timed generation: a record 20% slower than it promised is marked stale and
    /// dropped (true: fall back to the defaults).
    pub(crate) fn check(&mut self, evals: usize, eval_s: f64) -> bool {
        let Some(r) = &self.record else {
            return false;
        };
        let rate = evals as f64 / eval_s.max(1e-9);
        if rate >= 0.8 * r.evals_per_sec {
            return false;
        }
        let why = format!(
            "{}: autotuned settings ran at {:.0} evals/s, {:.0}% below the {:.0} recorded; \
             marked stale, back to the defaults",
            r.key,
            rate,
            100.0 * (1.0 - rate / r.evals_per_sec),
            r.evals_per_sec
        );
        eprintln!("warning: {why}");
        if let Some(store) = &self.store {
            let _ = store.mark_stale(&r.key, &r.fingerprint);
        }
        self.release();
        self.note = Some(why);
        true
    }

    /// What the run used, or why it dropped it, for the report.
    pub(crate) fn take_note(&mut self) -> Option<String> {
        self.note.take()
    }

    /// The kernel the record sets (the default when there is none or it was dropped).
    pub(crate) fn kernel(&self) -> crate::layers::Kernel {
        self.record
            .as_ref()
            .map(|r| r.settings.kernel())
            .unwrap_or_default()
    }

    fn release(&mut self) {
        self.record = None;
    }
}

/// How long and how hard to search.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// About 20 s per shape: the analytic top candidates, one halving, a short local search.
    Quick,
    /// About a minute per shape.
    Normal,
    /// Every candidate, several minutes per shape.
    Full,
}

impl Mode {
    /// The wall-clock budget of one shape key.
    pub fn budget(self) -> Duration {
        match self {
            Mode::Quick => Duration::from_secs(20),
            Mode::Normal => Duration::from_secs(60),
            Mode::Full => Duration::from_secs(300),
        }
    }

    /// Candidates timed after the analytic ranking (`usize::MAX`: all).
    pub fn candidates(self) -> usize {
        match self {
            Mode::Quick => 5,
            Mode::Normal => 16,
            Mode::Full => usize::MAX,
        }
    }
}

/// How a layer with low-rank noise computes its candidates' outputs.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum LowRankKernel {
    /// One GEMM with the shared weights plus a rank-r correction per candidate (the fast path).
    #[default]
    SharedGemm,
    /// Each candidate's weights formed in the tile, then dense per-candidate GEMMs (faster when
    /// the rank is close to the layer's width).
    Materialize,
}

/// Where a population is evaluated.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum TensorDevice {
    /// On the CPU, where θ lives (the tile and thread knobs apply).
    #[default]
    Cpu,
    /// On CUDA device N: the candidates and examples are copied there per evaluation and the
    /// fitness comes back (the tile and thread knobs do not apply).
    Cuda(usize),
}

/// The settings a tensor population evaluation depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TensorSettings {
    /// Floats of activations one worker keeps per candidate tile (`HYPERFUNC_TILE_FLOATS`).
    pub tile_floats: usize,
    /// Candidate × example rows per batched forward (`Es::max_batch_size`).
    pub max_batch_size: usize,
    /// The kernel of layers with low-rank noise (no effect on dense noise).
    #[serde(default)]
    pub low_rank: LowRankKernel,
    /// Worker threads for the tiles of a forward (0: the process's pool, all cores unless
    /// `HYPERFUNC_THREADS` says otherwise). Fewer can win on tiny evaluations, where waking
    /// workers costs more than they save.
    #[serde(default)]
    pub threads: usize,
    /// Where the evaluation runs (records from before this knob read as the CPU).
    #[serde(default)]
    pub device: TensorDevice,
}

impl Default for TensorSettings {
    fn default() -> Self {
        Self {
            tile_floats: crate::layers::DEFAULT_TILE_FLOATS,
            max_batch_size: crate::es::DEFAULT_MAX_BATCH_SIZE,
            low_rank: LowRankKernel::SharedGemm,
            threads: 0,
            device: TensorDevice::Cpu,
        }
    }
}

impl TensorSettings {
    /// The CPU kernel these settings describe (it travels with a population).
    pub(crate) fn kernel(&self) -> crate::layers::Kernel {
        crate::layers::Kernel {
            tile_floats: Some(self.tile_floats),
            materialize_low_rank: self.low_rank == LowRankKernel::Materialize,
            threads: (self.threads > 0).then_some(self.threads),
            cuda: match self.device {
                TensorDevice::Cpu => None,
                TensorDevice::Cuda(n) => Some(n),
            },
        }
    }
}

impl std::fmt::Display for TensorSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.device {
            TensorDevice::Cpu => write!(
                f,
                "tile {} Ki floats, {} rows per batch",
                self.tile_floats / 1024,
                self.max_batch_size
            )?,
            TensorDevice::Cuda(n) => write!(f, "CUDA {n}, {} rows per batch", self.max_batch_size)?,
        }
        if self.low_rank == LowRankKernel::Materialize {
            write!(f, ", low-rank weights materialized")?;
        }
        if self.threads > 0 {
            write!(
                f,
                ", {} thread{}",
                self.threads,
                if self.threads == 1 { "" } else { "s" }
            )?;
        }
        Ok(())
    }
}

/// One timed candidate setting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The setting.
    pub settings: TensorSettings,
    /// Median candidate × example evaluations per second (0 when excluded before timing).
    pub evals_per_sec: f64,
    /// Timed runs.
    pub runs: usize,
    /// Share of the best candidate's throughput.
    pub pct_of_best: f64,
    /// Why it was excluded (memory budget, wrong fitness), if it was.
    pub excluded: Option<String>,
}

/// The saved result of tuning one shape key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The problem shape (parameter shapes, population and row buckets, dtype).
    pub key: String,
    /// The machine's fingerprint when tuned.
    pub fingerprint: String,
    /// The settings to use.
    pub settings: TensorSettings,
    /// Their median throughput, candidate × example evaluations per second.
    pub evals_per_sec: f64,
    /// The default settings' median throughput, timed interleaved with the winner.
    pub default_evals_per_sec: f64,
    /// Winner / default, median.
    pub speedup: f64,
    /// Bootstrap 95% interval of the speedup.
    pub speedup_ci: (f64, f64),
    /// The second-best setting and its throughput.
    pub runner_up: Option<(TensorSettings, f64)>,
    /// Leader / runner-up − 1.
    pub margin: f64,
    /// Coefficient of variation of repeated timings of the default before tuning.
    pub noise_cv: f64,
    /// Candidates that passed the correctness gate / were checked.
    pub correctness: (usize, usize),
    /// Every candidate, best first, excluded ones last with the reason.
    pub candidates: Vec<Candidate>,
    /// Why the search stopped (`converged`, `budget`).
    pub stop_reason: String,
    /// Confidence in [0, 1]: the product of its factors.
    pub confidence: f64,
    /// The factors (noise, margin, completeness, interval).
    pub confidence_factors: BTreeMap<String, f64>,
    /// Unix seconds when tuned.
    pub created_at: i64,
    /// Seconds the search took.
    pub seconds: f64,
    /// Set when a later run found it 20% slower than promised.
    #[serde(default)]
    pub stale: bool,
    /// The command that reproduces it.
    pub command: String,
}

impl Record {
    /// A Markdown report: the chosen settings, confidence, and the candidates.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "## {}\n\nchosen: **{}** — {:.3} M evals/s, {:.2}× the default (95% CI {:.2}–{:.2}), \
             confidence {:.2} ({}), stopped: {}, {:.1} s\n\n",
            self.key,
            self.settings,
            self.evals_per_sec / 1e6,
            self.speedup,
            self.speedup_ci.0,
            self.speedup_ci.1,
            self.confidence,
            self.confidence_factors
                .iter()
                .map(|(k, v)| format!("{k} {v:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.stop_reason,
            self.seconds
        );
        s.push_str("| device | tile Ki floats | threads | rows/batch | low-rank kernel | M evals/s | % of best | runs | excluded |\n|---|---:|---:|---:|---|---:|---:|---:|---|\n");
        for c in &self.candidates {
            let (device, tile, threads) = match c.settings.device {
                TensorDevice::Cpu => (
                    "cpu".to_string(),
                    (c.settings.tile_floats / 1024).to_string(),
                    match c.settings.threads {
                        0 => "all".to_string(),
                        n => n.to_string(),
                    },
                ),
                TensorDevice::Cuda(n) => (format!("cuda:{n}"), "-".into(), "-".into()),
            };
            s.push_str(&format!(
                "| {device} | {tile} | {threads} | {} | {} | {:.3} | {:.1}% | {} | {} |\n",
                c.settings.max_batch_size,
                match c.settings.low_rank {
                    LowRankKernel::SharedGemm => "shared GEMM",
                    LowRankKernel::Materialize => "materialize",
                },
                c.evals_per_sec / 1e6,
                c.pct_of_best,
                c.runs,
                c.excluded.as_deref().unwrap_or("")
            ));
        }
        s.push_str(&format!("\nreproduce: `{}`\n", self.command));
        s
    }
}

/// Where records live: a directory of one JSON file per key, plus an optional project file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Store {
    /// The cache directory.
    pub dir: PathBuf,
    /// The project file checked in beside the code (`hyperfunc.autotune.json`).
    pub project_file: Option<PathBuf>,
}

/// Below this confidence a record is saved only when forced.
pub const MIN_CONFIDENCE: f64 = 0.5;

fn safe_name(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Store {
    /// `HYPERFUNC_AUTOTUNE_DIR`, else `$XDG_CACHE_HOME/hyperfunc/autotune`, else
    /// `~/.cache/hyperfunc/autotune`; the project file `hyperfunc.autotune.json` in the current
    /// directory (`HYPERFUNC_AUTOTUNE_FILE` overrides).
    pub fn default_location() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let dir = var("HYPERFUNC_AUTOTUNE_DIR")
            .map(PathBuf::from)
            .or_else(|| var("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("hyperfunc/autotune")))
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/hyperfunc/autotune")))
            .unwrap_or_else(|| std::env::temp_dir().join("hyperfunc-autotune"));
        let project_file = var("HYPERFUNC_AUTOTUNE_FILE")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from("hyperfunc.autotune.json")));
        Self { dir, project_file }
    }

    /// A store in `dir` without a project file.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            project_file: None,
        }
    }

    fn path(&self, key: &str, fingerprint: &str) -> PathBuf {
        self.dir.join(format!(
            "{}-{}.json",
            safe_name(key),
            safe_name(fingerprint)
        ))
    }

    /// Saves `record` (atomically: a temporary file, fsynced, renamed). A record below
    /// [`MIN_CONFIDENCE`] is refused unless `force`.
    pub fn save(&self, record: &Record, force: bool) -> Result<PathBuf> {
        if record.confidence < MIN_CONFIDENCE && !force {
            return Err(Error::config(
                "autotune",
                format!(
                    "confidence {:.2} is below {MIN_CONFIDENCE} (noise {:.1}%); the machine is \
                     too busy to trust this result — rerun when it is quieter, or save anyway \
                     with --force",
                    record.confidence,
                    100.0 * record.noise_cv
                ),
            ));
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::File {
            path: self.dir.display().to_string(),
            source: e,
        })?;
        let path = self.path(&record.key, &record.fingerprint);
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(record).unwrap_or_default(),
        )?;
        Ok(path)
    }

    /// Adds or replaces `record` in the project file (atomically).
    pub fn save_project(&self, record: &Record) -> Result<PathBuf> {
        let Some(file) = &self.project_file else {
            return Err(Error::config("autotune", "this store has no project file"));
        };
        let mut all = read_project(file).unwrap_or_default();
        all.retain(|r| !(r.key == record.key && r.fingerprint == record.fingerprint));
        all.push(record.clone());
        write_atomic(file, &serde_json::to_vec_pretty(&all).unwrap_or_default())?;
        Ok(file.clone())
    }

    /// Every record in the cache directory (unreadable files are skipped with a warning).
    pub fn list(&self) -> Vec<Record> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<Record> = dir
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.path().extension().is_some_and(|x| x == "json")
                    && e.file_name().to_string_lossy().starts_with("tensor-")
            })
            .filter_map(|e| read_record(&e.path()))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// The record for `key` on this machine: the project file, then the cache; a stale, corrupt
    /// or other-machine record is a miss.
    pub fn get(&self, key: &str, fingerprint: &str) -> Option<Record> {
        if let Some(file) = &self.project_file {
            if let Some(r) = read_project(file).and_then(|all| {
                all.into_iter()
                    .find(|r| r.key == key && r.fingerprint == fingerprint && !r.stale)
            }) {
                return Some(r);
            }
        }
        read_record(&self.path(key, fingerprint))
            .filter(|r| r.key == key && r.fingerprint == fingerprint && !r.stale)
    }

    /// [`Store::get`], else the record of the same shape with the nearest population bucket.
    pub fn lookup(&self, key: &tensor::ShapeKey, fingerprint: &str) -> Option<Record> {
        if let Some(r) = self.get(&key.to_string(), fingerprint) {
            return Some(r);
        }
        let prefix = key.shape_part();
        self.list()
            .into_iter()
            .filter(|r| r.fingerprint == fingerprint && !r.stale && r.key.starts_with(&prefix))
            .filter_map(|r| {
                let other = tensor::ShapeKey::parse_buckets(&r.key)?;
                let d = (other.0 as f64 / key.pop_bucket as f64).ln().abs()
                    + (other.1 as f64 / key.rows_bucket as f64).ln().abs();
                Some((d, r))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, r)| r)
    }

    /// Saves an endpoint record (atomically).
    #[cfg(feature = "llm")]
    pub fn save_endpoint(&self, record: &endpoint::EndpointRecord) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::File {
            path: self.dir.display().to_string(),
            source: e,
        })?;
        let path = self.dir.join(format!("{}.json", safe_name(&record.key)));
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(record).unwrap_or_default(),
        )?;
        Ok(path)
    }

    /// The endpoint record for `base_url` and `model`, if one was saved (a corrupt file is a
    /// warning and a miss).
    #[cfg(feature = "llm")]
    pub fn get_endpoint(&self, base_url: &str, model: &str) -> Option<endpoint::EndpointRecord> {
        let dir = std::fs::read_dir(&self.dir).ok()?;
        dir.filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("endpoint-"))
            .filter_map(|e| {
                let bytes = std::fs::read(e.path()).ok()?;
                match serde_json::from_slice::<endpoint::EndpointRecord>(&bytes) {
                    Ok(r) => Some(r),
                    Err(err) => {
                        eprintln!(
                            "warning: ignoring the unreadable autotune record {} ({err})",
                            e.path().display()
                        );
                        None
                    }
                }
            })
            .find(|r| r.base_url == base_url.trim_end_matches('/') && r.model == model)
    }

    /// Marks the cached record stale (a later run found it slower than it promised).
    pub fn mark_stale(&self, key: &str, fingerprint: &str) -> Result<()> {
        let path = self.path(key, fingerprint);
        if let Some(mut r) = read_record(&path) {
            r.stale = true;
            write_atomic(&path, &serde_json::to_vec_pretty(&r).unwrap_or_default())?;
        }
        Ok(())
    }

    /// Removes the cached records whose key starts with `prefix` (all when empty); returns how
    /// many.
    pub fn clear(&self, prefix: &str) -> Result<usize> {
        let mut n = 0;
        for r in self.list() {
            if r.key.starts_with(prefix) {
                let p = self.path(&r.key, &r.fingerprint);
                std::fs::remove_file(&p).map_err(|e| Error::File {
                    path: p.display().to_string(),
                    source: e,
                })?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Reads a record; a corrupt or truncated file is a warning and a miss.
fn read_record(path: &Path) -> Option<Record> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice::<Record>(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable autotune record");
            eprintln!(
                "warning: ignoring the unreadable autotune record {} ({e})",
                path.display()
            );
            None
        }
    }
}

fn read_project(path: &Path) -> Option<Vec<Record>> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice::<Vec<Record>>(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!(
                "warning: ignoring the unreadable autotune file {} ({e})",
                path.display()
            );
            None
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let err = |e| Error::File {
        path: path.display().to_string(),
        source: e,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)
}
