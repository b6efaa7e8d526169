//! Evolution strategies: the OpenAI-ES family with antithetic sampling, seeded dense or low-rank
//! noise, fitness shaping, Adam/SGD updates, schedules and early stopping.
//!
//! [`Es`] holds the settings (validated once, before the first generation) and runs the loop:
//! draw noise → evaluate the population (batched, see `population`) → shape fitness → estimate the
//! gradient `1/(P·σ) Σ u_i ε_i` → update θ. It knows nothing about what the system computes.

mod noise;
mod schedule;
mod shaping;
mod shard;
mod update;

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

pub use schedule::Schedule;
pub use shaping::Shaping;
pub use update::Update;

use crate::data::Examples;
use crate::error::{Error, Result, TensorContext};
use crate::metric::Metric;
use crate::observe::{Hub, Record, RecordKind, Trace};
use crate::population::{evaluate_with, Population};
use crate::system::HyperSystem;
use crate::theta::{Registry, Theta};

/// Rows (candidates × examples) per batched forward unless configured otherwise.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 1 << 18;

/// Whether the metric is to be maximised or minimised. There is no implicit default in the
/// maths: [`Es`] starts at `Maximize` and says so in its docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Direction {
    /// Higher metric values are better.
    #[default]
    Maximize,
    /// Lower metric values are better (losses).
    Minimize,
}

impl Direction {
    /// Whether `a` is strictly better than `b` (non-finite values are never better).
    pub fn better(self, a: f32, b: f32) -> bool {
        a.is_finite()
            && (!b.is_finite()
                || match self {
                    Direction::Maximize => a > b,
                    Direction::Minimize => a < b,
                })
    }
}

/// Why an optimisation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum StopReason {
    /// All generations ran.
    Generations,
    /// The best fitness reached the target.
    Target,
    /// The best fitness did not improve for `patience` generations.
    Patience,
    /// A control command stopped it (`stop`, or `stop --now`, which discards the generation in
    /// flight); see `Report::stop_detail` and [`crate::runs`].
    Command,
    /// The run's LLM budget ([`Es::max_cost_usd`], [`Es::max_tokens`]) was spent at a
    /// generation boundary; see `Report::stop_detail`.
    Budget,
    /// A [`StopSignal`] was raised (a spent client budget, the user…); see
    /// `Report::stop_detail`.
    /// A generation it interrupted with failed candidates is discarded; the final θ is not
    /// re-evaluated.
    Signal,
}

/// A flag that stops an optimisation cleanly between generations: raised by an
/// [`LlmClient`](crate::llm::LlmClient) whose budget is spent, or by anyone holding a clone.
///
/// # Examples
/// ```
/// use hyperfunc::StopSignal;
/// let s = StopSignal::new();
/// assert!(!s.is_raised());
/// s.clone().raise("operator asked");
/// assert_eq!(s.reason().as_deref(), Some("operator asked"));
/// ```
#[derive(Clone, Debug, Default)]
pub struct StopSignal(Arc<StopInner>);

#[derive(Debug, Default)]
struct StopInner {
    raised: std::sync::atomic::AtomicBool,
    reason: std::sync::Mutex<Option<String>>,
}

impl StopSignal {
    /// A signal that is not raised.
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises it; the first reason given is kept.
    pub fn raise(&self, reason: impl Into<String>) {
        let mut r = self.0.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason.into());
        }
        self.0
            .raised
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether it was raised.
    pub fn is_raised(&self) -> bool {
        self.0.raised.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Why it was raised.
    pub fn reason(&self) -> Option<String> {
        self.0
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Lowers it again (for reuse in a new run).
    pub fn reset(&self) {
        *self.0.reason.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.0
            .raised
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Statistics of one generation.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GenerationStats {
    /// Generation index (from 0).
    pub generation: usize,
    /// Best candidate fitness (NaN if every candidate failed).
    pub best: f32,
    /// Mean of the finite fitness values.
    pub mean: f32,
    /// Standard deviation of the finite fitness values.
    pub std: f32,
    /// σ used.
    pub sigma: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Candidates that failed or gave a non-finite fitness.
    pub failed: usize,
    /// Candidate evaluations per second in this generation (evaluation only).
    pub evals_per_sec: f64,
    /// Wall time since the start of the run, in seconds.
    pub seconds: f64,
}

/// The best candidate seen.
#[derive(Clone, Debug)]
pub struct Best {
    /// Its raw θ.
    pub theta: Theta,
    /// Its fitness.
    pub fitness: f32,
    /// The generation it was found in.
    pub generation: usize,
}

/// What [`Es::optimize`] returns.
#[derive(Clone, Debug)]
pub struct Report {
    /// The final θ (the distribution mean).
    pub theta: Theta,
    /// The metric of the final θ on the training examples (NaN after [`StopReason::Signal`]).
    pub final_fitness: f32,
    /// The best candidate seen during the run.
    pub best: Option<Best>,
    /// One entry per generation.
    pub history: Vec<GenerationStats>,
    /// Why the run stopped.
    pub stop: StopReason,
    /// The reason of the [`StopSignal`] that stopped it, for [`StopReason::Signal`].
    pub stop_detail: Option<String>,
    /// Total wall time in seconds.
    pub seconds: f64,
    /// The records of the run: one per call, per generation and for the run.
    pub trace: Hub,
    /// The autotuned settings the run used (`key: settings`), or why it dropped them; `None`
    /// when none applied.
    pub autotune: Option<String>,
    /// The run in the [`Es::store`], if any.
    pub run: Option<crate::runs::RunId>,
}

/// OpenAI-ES with EGGROLL-style low-rank noise where a parameter asks for it.
///
/// Defaults: population 64 (antithetic), σ 0.1, lr 0.05, 100 generations, seed 0, **maximize**,
/// centered ranks, Adam, no weight decay, constant schedules, `max_batch_size` 262 144 rows.
///
/// # Examples
/// ```
/// use hyperfunc::prelude::*;
/// use candle_core::{Device, Tensor};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// // Learn y = 2x with one linear layer.
/// let net = Chain::new(vec![HyperFn::linear("f", 1, 1, Activation::Identity)]);
/// let x = Tensor::new(&[[0f32], [1.], [2.]], &Device::Cpu)?;
/// let y = Tensor::new(&[[0f32], [2.], [4.]], &Device::Cpu)?;
/// let data = Examples::tensors(x, y)?;
/// let report = Es::default().pop_size(32).sigma(0.1).lr(0.1).generations(150).seed(1)
///     .minimize().progress(false)
///     .optimize(&net, &data, &metric::mse()).await?;
/// assert!(report.final_fitness < 0.01);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct Es {
    pop_size: usize,
    sigma: f64,
    lr: f64,
    generations: usize,
    seed: u64,
    direction: Direction,
    shaping: Shaping,
    update: Update,
    weight_decay: f64,
    sigma_schedule: Schedule,
    lr_schedule: Schedule,
    patience: Option<usize>,
    target: Option<f32>,
    antithetic: bool,
    max_batch_size: usize,
    examples_per_eval: Option<usize>,
    max_cost_usd: Option<f64>,
    max_tokens: Option<u64>,
    autotune: bool,
    max_failure_rate: f64,
    progress: bool,
    device: Device,
    init: Option<Theta>,
    hub: Option<Hub>,
    stops: Vec<StopSignal>,
    #[cfg(feature = "llm")]
    llm_clients: Vec<crate::llm::LlmClient>,
    store: Option<crate::runs::RunStore>,
    run: Option<crate::runs::RunId>,
    run_name: Option<String>,
    run_task: Option<String>,
    checkpoints: crate::runs::Checkpoints,
    replay: Option<crate::runs::RunId>,
    /// A live `lr` / `sigma` overrides its schedule until cleared.
    lr_fixed: bool,
    sigma_fixed: bool,
}

impl Default for Es {
    fn default() -> Self {
        Self {
            pop_size: 64,
            sigma: 0.1,
            lr: 0.05,
            generations: 100,
            seed: 0,
            direction: Direction::Maximize,
            shaping: Shaping::CenteredRanks,
            update: Update::default(),
            weight_decay: 0.0,
            sigma_schedule: Schedule::Constant,
            lr_schedule: Schedule::Constant,
            patience: None,
            target: None,
            antithetic: true,
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            examples_per_eval: None,
            max_cost_usd: None,
            max_tokens: None,
            autotune: true,
            max_failure_rate: 1.0,
            progress: true,
            device: Device::Cpu,
            init: None,
            hub: None,
            stops: Vec::new(),
            #[cfg(feature = "llm")]
            llm_clients: Vec::new(),
            store: None,
            run: None,
            run_name: None,
            run_task: None,
            checkpoints: crate::runs::Checkpoints::default(),
            replay: None,
            lr_fixed: false,
            sigma_fixed: false,
        }
    }
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, v: $ty) -> Self {
            self.$name = v;
            self
        }
    };
}

impl Es {
    setter!(/// Candidates per generation (even with antithetic sampling).
        pop_size: usize);
    setter!(/// Noise scale σ (> 0).
        sigma: f64);
    setter!(/// Learning rate.
        lr: f64);
    setter!(/// Number of generations.
        generations: usize);
    setter!(/// Run seed: noise and initialisation are drawn from it.
        seed: u64);
    setter!(/// Optimisation direction.
        direction: Direction);
    setter!(/// Fitness shaping.
        shaping: Shaping);
    setter!(/// Update rule ([`Update::Compat`] reproduces the Python library).
        update: Update);
    setter!(/// Decoupled weight decay (per unit of learning rate).
        weight_decay: f64);
    setter!(/// Schedule of σ.
        sigma_schedule: Schedule);
    setter!(/// Schedule of the learning rate.
        lr_schedule: Schedule);
    setter!(/// Antithetic (mirrored) sampling; on by default. With dense noise the built-in
        /// layers then compute a pair `W ± E_k` on a shared input as `X·Wᵀ ± X·E_kᵀ`, half the
        /// first layer's matrix work; chunks keep pairs whole, so a candidate's fitness does
        /// not depend on `max_batch_size`.
        antithetic: bool);
    setter!(/// Most candidate × example rows per batched forward (setting it turns the autotuned
        /// value off). With antithetic pairs a chunk holds at least one whole pair, even when
        /// that means fewer examples per forward.
        max_batch_size: usize);
    setter!(/// Use autotuned tensor settings saved by `hyperfunc autotune` for this problem's
        /// shape on this machine (on by default; `HYPERFUNC_AUTOTUNE=0` also turns it off).
        autotune: bool);
    setter!(/// Fraction of failed candidates above which a generation aborts the run (1.0: only when all fail).
        max_failure_rate: f64);
    setter!(/// Shows a progress bar when stderr is a terminal (on by default).
        progress: bool);
    setter!(/// Device of θ and of all tensors the engine creates.
        device: Device);

    /// Maximise the metric.
    pub fn maximize(self) -> Self {
        self.direction(Direction::Maximize)
    }

    /// Minimise the metric.
    pub fn minimize(self) -> Self {
        self.direction(Direction::Minimize)
    }

    /// Evaluates each generation on `n` examples only: a fresh subset per generation, drawn from
    /// the seed and the generation (so a run is still reproducible). The final fitness uses all
    /// of them. For costly evaluations (LLM calls); noisier gradient estimates.
    pub fn examples_per_eval(mut self, n: usize) -> Self {
        self.examples_per_eval = Some(n);
        self
    }

    /// The run's LLM dollar budget: the dollars the clients given to [`Es::llm_client`] spent
    /// for this run (across resumes, as the generation rows count them). Checked at every
    /// generation boundary: the run stops with [`StopReason::Budget`] at the first one where it
    /// is spent, so the last generation may overshoot it by its own cost; for a limit checked
    /// before every request, give the client a [`Budget`](crate::llm::Budget). A live setting
    /// (`hyperfunc runs set RUN max_cost_usd=5`).
    ///
    /// # Examples
    /// ```
    /// use hyperfunc::Es;
    /// let es = Es::default().max_cost_usd(2.5).max_tokens(1_000_000);
    /// assert_eq!(es.run_config().max_cost_usd, Some(2.5));
    /// ```
    pub fn max_cost_usd(mut self, usd: f64) -> Self {
        self.max_cost_usd = Some(usd);
        self
    }

    /// The run's LLM token budget (input + output tokens of the clients given to
    /// [`Es::llm_client`], across resumes), checked like [`Es::max_cost_usd`].
    pub fn max_tokens(mut self, tokens: u64) -> Self {
        self.max_tokens = Some(tokens);
        self
    }

    /// Stops when the best fitness has not improved for `n` generations.
    pub fn patience(mut self, n: usize) -> Self {
        self.patience = Some(n);
        self
    }

    /// Stops when a candidate reaches `value` (≥ when maximising, ≤ when minimising).
    pub fn target(mut self, value: f32) -> Self {
        self.target = Some(value);
        self
    }

    /// SGD with momentum instead of Adam.
    pub fn sgd(self, momentum: f64) -> Self {
        self.update(Update::Sgd { momentum })
    }

    /// The Python hyperfunc library's update rule (z-scored rewards, `θ += lr·√P·mean(r ε)`).
    pub fn compat(self) -> Self {
        self.update(Update::Compat).shaping(Shaping::ZScore)
    }

    /// Records the run (run → generation → call records) into `hub` instead of a fresh one.
    pub fn hub(mut self, hub: Hub) -> Self {
        self.hub = Some(hub);
        self
    }

    /// Stops the run cleanly when `signal` is raised (checked before and after every
    /// generation; a generation that saw the signal is discarded). May be given several times.
    pub fn stop_on(mut self, signal: StopSignal) -> Self {
        self.stops.push(signal);
        self
    }

    /// Follows an LLM client the system calls: the run stops cleanly when its budget is spent
    /// (as [`Es::stop_on`] with its [`stop_signal`](crate::llm::LlmClient::stop_signal)), and
    /// with a run store each generation row carries the tokens and dollars spent so far
    /// (`hyperfunc runs plot --x usd`), with an alert once 90% of a budget is spent. May be
    /// given several times.
    #[cfg(feature = "llm")]
    pub fn llm_client(mut self, client: &crate::llm::LlmClient) -> Self {
        self.stops.push(client.stop_signal());
        self.llm_clients.push(client.clone());
        self
    }

    /// The clients given to [`Es::llm_client`].
    #[cfg(feature = "llm")]
    pub(crate) fn llm_clients(&self) -> &[crate::llm::LlmClient] {
        &self.llm_clients
    }

    /// Tokens and dollars the clients given to [`Es::llm_client`] have counted so far.
    pub(crate) fn llm_usage(&self) -> (u64, f64) {
        #[cfg(feature = "llm")]
        {
            crate::llm::usage_of(&self.llm_clients)
        }
        #[cfg(not(feature = "llm"))]
        {
            (0, 0.0)
        }
    }

    fn follows_llm_clients(&self) -> bool {
        #[cfg(feature = "llm")]
        {
            !self.llm_clients.is_empty()
        }
        #[cfg(not(feature = "llm"))]
        {
            false
        }
    }

    /// Why the run's budget is spent, given the run's `(tokens, dollars)` so far.
    pub(crate) fn budget_spent(&self, (tokens, usd): (u64, f64)) -> Option<String> {
        if let Some(max) = self.max_cost_usd.filter(|&m| usd >= m) {
            return Some(format!(
                "the run's LLM budget is spent: ${usd:.4} of ${max:.4} (max_cost_usd)"
            ));
        }
        let max = self.max_tokens.filter(|&m| tokens >= m)?;
        Some(format!(
            "the run's LLM budget is spent: {tokens} of {max} tokens (max_tokens)"
        ))
    }

    /// The run's budgets, `(tokens, dollars)`.
    #[cfg(feature = "llm")]
    pub(crate) fn budgets(&self) -> (Option<u64>, Option<f64>) {
        (self.max_tokens, self.max_cost_usd)
    }

    fn raised(&self) -> Option<String> {
        self.stops
            .iter()
            .find(|s| s.is_raised())
            .map(|s| s.reason().unwrap_or_default())
    }

    /// Starts from this θ instead of the specs' initialisation.
    pub fn init(mut self, theta: Theta) -> Self {
        self.init = Some(theta);
        self
    }

    /// Records every `optimize` as a run in `store` (generation rows, events, checkpoints) and
    /// takes live commands from it; see [`crate::runs`].
    pub fn store(mut self, store: crate::runs::RunStore) -> Self {
        self.store = Some(store);
        self
    }

    /// Continues run `id` of the [`Es::store`]: from its last checkpoint (after a crash, at
    /// most the generations since it are redone, bit-identically on CPU), or from generation 0
    /// when it has none. The settings must be the ones the run started with.
    pub fn run(mut self, id: crate::runs::RunId) -> Self {
        self.run = Some(id);
        self
    }

    /// The name of a new run (default `es`).
    pub fn run_name(mut self, name: impl Into<String>) -> Self {
        self.run_name = Some(name.into());
        self
    }

    /// The built-in task a new run trains (what `hyperfunc runs replay` rebuilds).
    pub fn run_task(mut self, task: impl Into<String>) -> Self {
        self.run_task = Some(task.into());
        self
    }

    /// When checkpoints are written and kept (default: adaptive, the last 3 and the best).
    pub fn checkpoints(mut self, policy: crate::runs::Checkpoints) -> Self {
        self.checkpoints = policy;
        self
    }

    /// Re-runs stored run `id` from generation 0 with its starting settings and its applied
    /// commands at the boundaries they were applied at, up to its last checkpoint; writes
    /// nothing. Compare `report.theta` with [`RunStore::theta`](crate::runs::RunStore::theta).
    pub fn replay(mut self, id: crate::runs::RunId) -> Self {
        self.replay = Some(id);
        self
    }

    /// The settings a run stores and live commands change.
    pub fn run_config(&self) -> crate::runs::RunConfig {
        crate::runs::RunConfig {
            pop_size: self.pop_size,
            sigma: self.sigma,
            lr: self.lr,
            generations: self.generations,
            seed: self.seed,
            direction: self.direction,
            shaping: self.shaping,
            update: self.update,
            weight_decay: self.weight_decay,
            sigma_schedule: self.sigma_schedule,
            lr_schedule: self.lr_schedule,
            patience: self.patience,
            target: self.target,
            antithetic: self.antithetic,
            max_batch_size: self.max_batch_size,
            max_failure_rate: self.max_failure_rate,
            examples_per_eval: self.examples_per_eval,
            max_cost_usd: self.max_cost_usd,
            max_tokens: self.max_tokens,
        }
    }

    /// These settings replaced by `c`'s (device, hooks and store stay).
    pub fn with_run_config(mut self, c: &crate::runs::RunConfig) -> Self {
        self.pop_size = c.pop_size;
        self.sigma = c.sigma;
        self.lr = c.lr;
        self.generations = c.generations;
        self.seed = c.seed;
        self.direction = c.direction;
        self.shaping = c.shaping;
        self.update = c.update;
        self.weight_decay = c.weight_decay;
        self.sigma_schedule = c.sigma_schedule;
        self.lr_schedule = c.lr_schedule;
        self.patience = c.patience;
        self.target = c.target;
        self.antithetic = c.antithetic;
        self.max_batch_size = c.max_batch_size;
        self.max_failure_rate = c.max_failure_rate;
        self.examples_per_eval = c.examples_per_eval;
        self.max_cost_usd = c.max_cost_usd;
        self.max_tokens = c.max_tokens;
        self
    }

    pub(crate) fn checkpoint_policy(&self) -> crate::runs::Checkpoints {
        self.checkpoints
    }

    fn sigma_at(&self, g: usize) -> f64 {
        if self.sigma_fixed {
            self.sigma
        } else {
            self.sigma_schedule.at(self.sigma, g, self.generations)
        }
    }

    fn lr_at(&self, g: usize) -> f64 {
        if self.lr_fixed {
            self.lr
        } else {
            self.lr_schedule.at(self.lr, g, self.generations)
        }
    }

    /// Checks every setting; called by [`Es::optimize`] before any work.
    pub fn validate(&self) -> Result<()> {
        if !(self.sigma.is_finite() && self.sigma > 0.0) {
            return Err(Error::InvalidSigma { sigma: self.sigma });
        }
        if self.pop_size == 0 {
            return Err(Error::config(
                "pop_size",
                "must be at least 1 (2 with antithetic sampling)",
            ));
        }
        if self.antithetic && self.pop_size % 2 == 1 {
            return Err(Error::OddPopulation {
                pop_size: self.pop_size,
                suggest: self.pop_size + 1,
            });
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::config(
                "lr",
                format!("must be positive and finite, got {}", self.lr),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::config(
                "weight_decay",
                format!("must be >= 0, got {}", self.weight_decay),
            ));
        }
        if !(0.0..=1.0).contains(&self.max_failure_rate) {
            return Err(Error::config("max_failure_rate", "must lie in [0, 1]"));
        }
        if self.max_batch_size == 0 {
            return Err(Error::config("max_batch_size", "must be at least 1"));
        }
        if self.examples_per_eval == Some(0) {
            return Err(Error::config(
                "examples_per_eval",
                "must be at least 1 (leave it unset to evaluate on every example)",
            ));
        }
        if let Some(usd) = self.max_cost_usd.filter(|u| !u.is_finite() || *u < 0.0) {
            return Err(Error::config(
                "max_cost_usd",
                format!("must be a finite amount >= 0, got {usd}"),
            ));
        }
        if self.update == Update::Compat && self.shaping != Shaping::ZScore {
            return Err(Error::config(
                "shaping",
                "the compat update uses z-score shaping; call .compat()",
            ));
        }
        self.update.validate()?;
        self.sigma_schedule.validate("sigma_schedule")?;
        self.lr_schedule.validate("lr_schedule")
    }

    /// Starts a run: θ initialised from the specs (or [`Es::init`]), generation 0. Drive it with
    /// [`EsRun::ask`] / [`EsRun::tell`], or let [`Es::optimize`] do it.
    pub fn start<S: HyperSystem + ?Sized>(&self, sys: &S) -> Result<EsRun> {
        self.validate()?;
        let reg = Arc::new(Registry::of(sys)?);
        let theta = match &self.init {
            Some(t) => t.clone(),
            None => Theta::from_registry(&reg, self.seed, &self.device)?,
        };
        theta.check(&reg)?;
        Ok(EsRun {
            es: self.clone(),
            reg,
            theta,
            generation: 0,
            state: update::UpdateState::default(),
            pending: None,
            kernel: crate::layers::Kernel::default(),
        })
    }

    /// Optimises the system's θ on `examples` against `metric`. With a [`Es::store`] the run is
    /// recorded, resumable and controllable (see [`crate::runs`]).
    pub async fn optimize<S: HyperSystem>(
        &self,
        sys: &S,
        examples: &Examples,
        metric: &dyn Metric,
    ) -> Result<Report> {
        if examples.is_empty() {
            return Err(Error::EmptyExamples);
        }
        let budgeted = self.max_cost_usd.is_some() || self.max_tokens.is_some();
        // A replay spends nothing: it stops where the stored run's last checkpoint is.
        if budgeted && !self.follows_llm_clients() && self.replay.is_none() {
            return Err(Error::config(
                "max_cost_usd",
                "a run budget counts the LLM clients given to Es::llm_client, and none was given: add .llm_client(&client) for each client the system calls",
            ));
        }
        let mut run = self.start(sys)?;
        let (mut rec, restored) = match (&self.store, self.replay) {
            (Some(store), Some(id)) => {
                (Some(crate::runs::Recorder::replay(store, self, id)?), None)
            }
            (None, Some(_)) => {
                return Err(Error::config(
                    "replay",
                    "replaying a run needs its store: call .store(RunStore::open(dir)?)",
                ))
            }
            (Some(store), None) => {
                let (r, restored) = crate::runs::Recorder::open(
                    store,
                    self,
                    self.run,
                    self.run_name.as_deref().unwrap_or("es"),
                    self.run_task.as_deref(),
                    &mut run,
                )?;
                (Some(r), Some(restored))
            }
            (None, None) if self.run.is_some() => {
                return Err(Error::config(
                    "run",
                    "continuing a run needs its store: call .store(RunStore::open(dir)?)",
                ))
            }
            (None, None) => (None, None),
        };
        if let Some(r) = rec.as_mut() {
            r.start_usage();
        }
        let result = self
            .drive(sys, examples, metric, &mut run, rec.as_mut(), restored)
            .await;
        match (result, rec.as_mut()) {
            (Err(e), Some(r)) => {
                r.failed(run.generation, &e);
                Err(e)
            }
            (result, _) => result,
        }
    }

    async fn drive<S: HyperSystem>(
        &self,
        sys: &S,
        examples: &Examples,
        metric: &dyn Metric,
        run: &mut EsRun,
        mut rec: Option<&mut crate::runs::Recorder>,
        restored: Option<crate::runs::Restored>,
    ) -> Result<Report> {
        let hub = self.hub.clone().unwrap_or_default();
        let (run_id, run_start, run_parent) = (hub.next_id(), hub.now_ns(), hub.session());
        let start = Instant::now();
        let bar = self.progress_bar();
        let (mut history, mut best, mut since_improved) = match restored {
            Some(r) => (r.history, r.best, r.since_improved),
            None => (Vec::with_capacity(self.generations), None, 0),
        };
        bar.set_position(run.generation as u64);
        let seconds_offset = rec.as_ref().map_or(0.0, |r| r.seconds_offset);
        let mut stop = StopReason::Generations;
        let mut stop_detail = None;
        // Autotuned settings apply unless the batch size was set or θ lives off the CPU; the
        // kernel travels with each generation's population. They are looked up at
        // this process's first generation (a resumed run looks them up as a fresh one does).
        let mut tuned = crate::autotune::InUse::default();
        let first = run.generation;
        let mut max_batch_size = run.es.max_batch_size;
        // The run's LLM spending: what earlier sessions of a resumed run spent, plus what the
        // clients counted since this one started.
        let usage_base = self.llm_usage();
        let usage_offset = rec.as_ref().map_or((0, 0.0), |r| r.usage_offset());
        let mut yielded = Instant::now();

        loop {
            // A generation of in-memory work completes without ever returning `Pending`, so a
            // run would hold its runtime worker for good: the worker would poll no timer and
            // no socket (another task's `sleep` would never end on a one-worker runtime). Hand
            // the worker back at a boundary, at most once a millisecond.
            if yielded.elapsed() >= Duration::from_millis(1) {
                tokio::task::yield_now().await;
                yielded = Instant::now();
            }
            if let Some(why) = self.raised() {
                (stop, stop_detail) = (StopReason::Signal, Some(why));
                break;
            }
            if let Some(r) = rec.as_deref_mut() {
                if let crate::runs::Flow::Stop(why) = r.boundary(run).await? {
                    (stop, stop_detail) = (StopReason::Command, Some(why));
                    break;
                }
                if run.es.max_batch_size != self.max_batch_size || tuned.max_batch_size().is_none()
                {
                    max_batch_size = run.es.max_batch_size;
                }
            }
            let g = run.generation;
            if g >= run.es.generations {
                break;
            }
            let spent = crate::runs::run_spending(usage_offset, usage_base, self.llm_usage());
            if let Some(why) = run.es.budget_spent(spent).filter(|_| self.replay.is_none()) {
                (stop, stop_detail) = (StopReason::Budget, Some(why));
                break;
            }
            let p = run.es.pop_size;
            let examples_g = run.es.examples_of(examples, g)?;
            let examples_g = &*examples_g;
            let mut pop = run.ask_shared()?;
            if g == first
                && self.autotune
                && self.max_batch_size == DEFAULT_MAX_BATCH_SIZE
                && matches!(self.device, Device::Cpu)
            {
                tuned = crate::autotune::InUse::look_up(&pop, examples_g.len());
                max_batch_size = tuned.max_batch_size().unwrap_or(max_batch_size);
                run.set_kernel(tuned.kernel());
                pop = run.ask_shared()?;
            }
            let (gen_id, gen_start) = (hub.next_id(), hub.now_ns());
            let trace = Trace {
                hub: Some(hub.clone()),
                parent: Some(gen_id),
                generation: Some(g),
            };
            let t0 = Instant::now();
            let evaluation = evaluate_with(
                &run.reg,
                sys,
                pop.clone(),
                examples_g,
                metric,
                max_batch_size,
                trace,
            );
            let watcher = match rec.as_deref_mut() {
                Some(r) => r.take_watcher()?,
                None => None,
            };
            let eval = match watcher {
                Some(mut w) => {
                    let e = tokio::select! {
                        e = evaluation => e,
                        why = w.stop_now(g) => {
                            (stop, stop_detail) = (StopReason::Command, Some(why));
                            break;
                        }
                    };
                    if let Some(r) = rec.as_deref_mut() {
                        r.put_watcher(w);
                    }
                    e?
                }
                None => evaluation.await?,
            };
            let eval_s = t0.elapsed().as_secs_f64();
            if g == first + 2 && tuned.check(p * examples_g.len(), eval_s) {
                max_batch_size = self.max_batch_size;
                run.set_kernel(tuned.kernel());
            }
            if let Some(why) = self.raised() {
                // Calls refused for a spent budget fail: a generation with failures is not
                // learned from. A complete one is kept and the loop stops before the next.
                if eval.fitness.iter().any(|f| !f.is_finite()) {
                    (stop, stop_detail) = (StopReason::Signal, Some(why));
                    break;
                }
            }

            let direction = run.es.direction;
            // Best candidate of this generation (finite values only).
            let mut gen_best: Option<(usize, f32)> = None;
            for (i, &f) in eval.fitness.iter().enumerate() {
                if f.is_finite() && gen_best.is_none_or(|(_, b)| direction.better(f, b)) {
                    gen_best = Some((i, f));
                }
            }
            let told = run.tell(&eval.fitness)?;
            match gen_best {
                Some((i, f)) if best.as_ref().is_none_or(|b| direction.better(f, b.fitness)) => {
                    best = Some(Best {
                        theta: pop.candidate(i)?,
                        fitness: f,
                        generation: g,
                    });
                    since_improved = 0;
                }
                _ => since_improved += 1,
            }

            let finite: Vec<f64> = eval
                .fitness
                .iter()
                .filter(|f| f.is_finite())
                .map(|&f| f64::from(f))
                .collect();
            let mean = finite.iter().sum::<f64>() / finite.len().max(1) as f64;
            let std = (finite.iter().map(|f| (f - mean).powi(2)).sum::<f64>()
                / finite.len().max(1) as f64)
                .sqrt();
            let stats = GenerationStats {
                generation: g,
                best: gen_best.map_or(f32::NAN, |(_, f)| f),
                mean: mean as f32,
                std: std as f32,
                sigma: told.sigma,
                lr: told.lr,
                failed: told.failed,
                evals_per_sec: p as f64 / eval_s.max(1e-12),
                seconds: start.elapsed().as_secs_f64(),
            };
            let mut rec_span = Record::span(
                gen_id,
                Some(run_id),
                "es.generation",
                RecordKind::Generation,
                gen_start,
                hub.now_ns(),
            );
            rec_span.generation = Some(g);
            rec_span.attributes = vec![
                ("es.best".into(), f64::from(stats.best).into()),
                ("es.mean".into(), f64::from(stats.mean).into()),
                ("es.sigma".into(), stats.sigma.into()),
                ("es.failed".into(), stats.failed.into()),
            ];
            hub.push(rec_span);
            bar.set_message(format!("best {:.5} mean {:.5}", stats.best, stats.mean));
            bar.inc(1);
            if let Some(r) = rec.as_deref_mut() {
                r.generation(run, &stats, &best, since_improved, t0.elapsed())?;
            }
            history.push(GenerationStats {
                seconds: stats.seconds + seconds_offset,
                ..stats
            });

            if let (Some(t), Some(b)) = (run.es.target, &best) {
                if b.fitness == t || direction.better(b.fitness, t) {
                    stop = StopReason::Target;
                    break;
                }
            }
            if run.es.patience.is_some_and(|n| since_improved >= n) {
                stop = StopReason::Patience;
                break;
            }
        }
        bar.finish_and_clear();
        if let Some(r) = rec.as_deref_mut() {
            r.finish(run, stop, stop_detail.as_deref())?;
        }

        let theta = run.theta.clone();
        let final_fitness = if matches!(
            stop,
            StopReason::Signal | StopReason::Command | StopReason::Budget
        ) {
            f32::NAN
        } else {
            let center = Arc::new(Population::center(theta.clone()));
            let trace = Trace {
                hub: Some(hub.clone()),
                parent: Some(run_id),
                generation: None,
            };
            let fin = evaluate_with(
                &run.reg,
                sys,
                center,
                examples,
                metric,
                run.es.max_batch_size,
                trace,
            )
            .await?;
            fin.fitness[0]
        };
        let mut rec_span = Record::span(
            run_id,
            run_parent,
            "es.optimize",
            RecordKind::Run,
            run_start,
            hub.now_ns(),
        );
        rec_span.attributes = vec![
            ("es.pop_size".into(), run.es.pop_size.into()),
            ("es.generations".into(), history.len().into()),
            ("es.seed".into(), self.seed.into()),
        ];
        hub.push(rec_span);
        let autotune = tuned.take_note();
        Ok(Report {
            theta,
            final_fitness,
            best,
            history,
            stop,
            stop_detail,
            seconds: start.elapsed().as_secs_f64() + seconds_offset,
            trace: hub,
            autotune,
            run: rec.as_deref().filter(|r| !r.is_replay()).map(|r| r.run),
        })
    }

    /// The candidates of generation `generation` around `theta`, exactly as [`Es::optimize`]
    /// draws them (σ from the schedule). Rebuilt from the seed alone: a remote worker needs
    /// nothing else.
    pub fn population<S: HyperSystem>(
        &self,
        sys: &S,
        theta: &Theta,
        generation: usize,
    ) -> Result<Population> {
        self.validate()?;
        let reg = Registry::of(sys)?;
        theta.check(&reg)?;
        let (pop, _) = self.sample(&reg, theta, generation)?;
        Ok(pop)
    }

    fn pairs(&self) -> usize {
        if self.antithetic {
            self.pop_size / 2
        } else {
            self.pop_size
        }
    }

    fn sample(
        &self,
        reg: &Registry,
        theta: &Theta,
        generation: usize,
    ) -> Result<(Population, Draws)> {
        let key = noise::NoiseKey {
            seed: self.seed,
            generation: generation as u64,
        };
        let draws = noise::draw(reg, key, self.pairs(), &self.device)?;
        let sigma = self.sigma_at(generation);
        Ok((
            noise::population(theta, &draws, sigma, self.antithetic)?,
            draws,
        ))
    }

    fn progress_bar(&self) -> ProgressBar {
        if !self.progress || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(self.generations as u64);
        if let Ok(style) =
            ProgressStyle::with_template("{bar:30} {pos}/{len} gen  {per_sec}  eta {eta}  {msg}")
        {
            bar.set_style(style);
        }
        bar
    }
}

/// The ES gradient estimate `1/(P·σ) Σ u_i ε_i` at `theta`, with the run's noise for generation
/// `generation` — exposed for checking the estimator (tests, notebooks).
#[doc(hidden)]
pub async fn gradient_estimate<S: HyperSystem>(
    es: &Es,
    sys: &S,
    theta: &Theta,
    examples: &Examples,
    metric: &dyn Metric,
    generation: usize,
) -> Result<Theta> {
    es.validate()?;
    let reg = Arc::new(Registry::of(sys)?);
    theta.check(&reg)?;
    let (pop, draws) = es.sample(&reg, theta, generation)?;
    let eval = evaluate_with(
        &reg,
        sys,
        Arc::new(pop),
        examples,
        metric,
        es.max_batch_size,
        Trace::default(),
    )
    .await?;
    let (u, _) = shaping::utilities(&eval.fitness, es.direction, es.shaping);
    let mut g = Theta::default();
    for (name, sum) in noise_sums(&reg, &draws, &u, es.antithetic, &es.device)? {
        let t = (sum / (es.pop_size as f64 * es.sigma)).at(&name)?;
        g.insert(name, t);
    }
    Ok(g)
}

type Draws = std::collections::BTreeMap<String, noise::GenNoise>;

/// What [`EsRun::tell`] reports about the generation it closed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Told {
    /// σ the generation used.
    pub sigma: f64,
    /// Learning rate of the update.
    pub lr: f64,
    /// Candidates with a non-finite fitness (ranked worst).
    pub failed: usize,
}

struct Pending {
    pop: Arc<Population>,
    draws: Draws,
    sigma: f64,
    lr: f64,
}

/// A run of [`Es`] driven step by step: [`EsRun::ask`] gives the generation's candidates,
/// [`EsRun::tell`] takes their fitness and updates θ. The strategy is pure and synchronous: where
/// and how the candidates are evaluated (batched here, on remote workers, by hand) is the caller's
/// business.
///
/// # Examples
/// ```
/// use hyperfunc::prelude::*;
/// let net = Chain::new(vec![HyperFn::linear("f", 1, 1, Activation::Identity)]);
/// let mut run = Es::default().pop_size(8).start(&net)?;
/// let pop = run.ask()?;
/// let fitness: Vec<f32> = (0..pop.size()).map(|i| i as f32).collect();
/// run.tell(&fitness)?;
/// assert_eq!(run.generation(), 1);
/// # Ok::<(), hyperfunc::Error>(())
/// ```
pub struct EsRun {
    es: Es,
    reg: Arc<Registry>,
    theta: Theta,
    generation: usize,
    state: update::UpdateState,
    pending: Option<Pending>,
    /// How the CPU kernels run this run's populations (autotuned, or the defaults).
    kernel: crate::layers::Kernel,
}

impl EsRun {
    pub(crate) fn device(&self) -> &Device {
        &self.es.device
    }

    /// The settings it runs with now (live values applied).
    #[cfg(feature = "llm")]
    pub(crate) fn settings(&self) -> &Es {
        &self.es
    }

    /// Candidates per generation now (a live command may change it).
    pub fn pop_size(&self) -> usize {
        self.es.pop_size
    }

    /// Puts a checkpoint's state in place.
    pub(crate) fn restore(
        &mut self,
        theta: Theta,
        m: std::collections::BTreeMap<String, Tensor>,
        v: std::collections::BTreeMap<String, Tensor>,
        steps: i32,
        generation: usize,
    ) {
        self.theta = theta;
        self.state = update::UpdateState::from_parts(steps, m, v);
        self.generation = generation;
        self.pending = None;
    }

    /// The optimiser's step count and moments.
    pub(crate) fn moments(
        &self,
    ) -> (
        i32,
        std::collections::BTreeMap<String, Tensor>,
        std::collections::BTreeMap<String, Tensor>,
    ) {
        self.state.parts()
    }

    /// Applies live values over the run's starting settings (all or nothing).
    pub(crate) fn set_live(
        &mut self,
        original: &crate::runs::RunConfig,
        live: &serde_json::Map<String, serde_json::Value>,
    ) -> std::result::Result<(), String> {
        let c = original.with_live(live)?;
        let mut es = self.es.clone().with_run_config(&c);
        es.lr_fixed = live.contains_key("lr");
        es.sigma_fixed = live.contains_key("sigma");
        self.es = es;
        self.pending = None;
        Ok(())
    }

    /// The current mean θ.
    pub fn theta(&self) -> &Theta {
        &self.theta
    }

    /// Generations completed so far.
    pub fn generation(&self) -> usize {
        self.generation
    }

    /// Replaces the prompt of hyperfunction `function` in the mean θ (prompt learning between
    /// generations). A generation asked for but not yet told is drawn again around the new θ
    /// (the same noise: it depends only on the seed and the generation).
    pub fn set_prompt(&mut self, function: &str, text: &str) {
        self.theta.set_prompt(function, text);
        self.pending = None;
    }

    /// The candidates of the current generation (drawn once; asking again returns the same).
    pub fn ask(&mut self) -> Result<Population> {
        Ok(self.ask_shared()?.as_ref().clone())
    }

    /// Sets the CPU kernel the run's populations carry (speed only), the pending one too.
    pub(crate) fn set_kernel(&mut self, kernel: crate::layers::Kernel) {
        self.kernel = kernel;
        if let Some(p) = &mut self.pending {
            if p.pop.kernel() != kernel {
                p.pop = Arc::new((*p.pop).clone().with_kernel(kernel));
            }
        }
    }

    fn ask_shared(&mut self) -> Result<Arc<Population>> {
        if let Some(p) = &self.pending {
            return Ok(p.pop.clone());
        }
        let g = self.generation;
        let (pop, draws) = self.es.sample(&self.reg, &self.theta, g)?;
        let pop = Arc::new(pop.with_kernel(self.kernel));
        self.pending = Some(Pending {
            pop: pop.clone(),
            draws,
            sigma: self.es.sigma_at(g),
            lr: self.es.lr_at(g),
        });
        Ok(pop)
    }

    /// Takes one fitness per candidate of the last [`EsRun::ask`] and updates θ.
    pub fn tell(&mut self, fitness: &[f32]) -> Result<Told> {
        let es = &self.es;
        let p = es.pop_size;
        if fitness.len() != p {
            return Err(Error::ShapeMismatch {
                function: "EsRun::tell".into(),
                what: "fitness".into(),
                expected: format!("{p} values (one per candidate)"),
                actual: vec![fitness.len()],
            });
        }
        let pending = self.pending.take().ok_or_else(|| {
            Error::config(
                "tell",
                "call ask() before tell(): there is no generation to close",
            )
        })?;
        let (u, failed) = shaping::utilities(fitness, es.direction, es.shaping);
        if failed == p || failed as f64 > es.max_failure_rate * p as f64 {
            self.pending = Some(pending);
            return Err(Error::TooManyFailures {
                generation: self.generation,
                failed,
                pop_size: p,
                allowed: es.max_failure_rate,
            });
        }
        // gradient = Σ w_k ε_k / (P σ); compat step = lr·√P·(Σ w_k ε_k)/P.
        let scale = match es.update {
            Update::Compat => (p as f64).sqrt() / p as f64,
            _ => 1.0 / (p as f64 * pending.sigma),
        };
        self.state.begin();
        let mut next = self.theta.prompts_only();
        for (name, sum) in noise_sums(&self.reg, &pending.draws, &u, es.antithetic, &es.device)? {
            let t = self
                .theta
                .get(&name)
                .ok_or_else(|| Error::MissingParameter { name: name.clone() })?;
            let grad = (sum * scale).at(&name)?;
            next.insert(
                &name,
                self.state
                    .step(es.update, &name, t, &grad, pending.lr, es.weight_decay)?,
            );
        }
        self.theta = next;
        self.generation += 1;
        Ok(Told {
            sigma: pending.sigma,
            lr: pending.lr,
            failed,
        })
    }
}

impl Es {
    /// The examples generation `g` is evaluated on: all of them, or the seeded subset of
    /// `examples_per_eval`.
    fn examples_of<'a>(
        &self,
        examples: &'a Examples,
        g: usize,
    ) -> Result<std::borrow::Cow<'a, Examples>> {
        Ok(match self.examples_per_eval {
            Some(k) if k < examples.len() => std::borrow::Cow::Owned(
                examples.select(&subsample(examples.len(), k, self.seed, g))?,
            ),
            _ => std::borrow::Cow::Borrowed(examples),
        })
    }
}

/// `k` of `n` example indices for generation `g` (partial Fisher–Yates from the seed), sorted.
fn subsample(n: usize, k: usize, seed: u64, g: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let u = crate::rng::uniform(&[seed, g as u64, i as u64, 0x5eb5_a3c1]);
        let j = i + ((u * (n - i) as f64) as usize).min(n - i - 1);
        idx.swap(i, j);
    }
    let mut picked = idx[..k].to_vec();
    picked.sort_unstable();
    picked
}

/// `Σ_k w_k ε_k` per parameter, with `w_k = u₊ − u₋` for mirrored pairs and `u_k` otherwise.
fn noise_sums(
    reg: &Registry,
    draws: &Draws,
    u: &[f32],
    antithetic: bool,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    let w: Vec<f32> = if antithetic {
        u.chunks(2).map(|c| c[0] - c[1]).collect()
    } else {
        u.to_vec()
    };
    let w = Tensor::from_vec(w.clone(), w.len(), device).at("es")?;
    reg.params
        .iter()
        .map(|(name, spec)| {
            let noise = draws
                .get(name)
                .ok_or_else(|| Error::MissingParameter { name: name.clone() })?;
            let sum = noise::weighted_sum(noise, &w, spec.shape()).at(name)?;
            Ok((name.clone(), sum))
        })
        .collect()
}
