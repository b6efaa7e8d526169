//! Tuned calls: choices (models, prompts, strategies) learned by bandits, with every call
//! recorded.
//!
//! A [`Tuner`] owns a SQLite store and the policy settings. `tuner.tune("label")` captures the
//! call site, [`TuneCall::choices`] names the options, and [`TuneCall::run`] picks one with the
//! [`Policy`], runs the closure with it, records latency, error, caller, the decision
//! probability (for off-policy evaluation from the log) and returns an [`Outcome`] through which
//! the caller reports the reward and the cost — now or later by [`CallId`].
//!
//! Statistics are kept per (label, context, choice): calls, errors, cost, and reward sums
//! (n, Σr, Σr²; with rewards in {0, 1}, successes = Σr and failures = n − Σr). A context that
//! is new starts from what the label's other contexts learned, shrunk to a few pseudo-rewards
//! ([`Tuner::prior_strength`]). A per-choice change test ([`ChangeDetection`]) resets only the
//! choice whose quality shifted; nothing decays. A failed call counts as reward 0.
//!
//! Decisions use statistics in memory, updated at once; call rows and statistic increments are
//! buffered and written in batches by a background thread (when [`Tuner::batch_size`] rows
//! wait), by [`Tuner::flush`], and when the last handle is dropped. Each flush reads back the
//! statistics of the groups in use, so several processes on one file learn from each other.
//!
//! This module knows nothing of the ES engine or the LLM client.
//!
//! # Examples
//! ```
//! use hyperfunc::tune::{Policy, Tuner};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let tuner = Tuner::in_memory()?.seed(7);
//! for _ in 0..200 {
//!     let (answer, outcome) = tuner
//!         .tune("classify")
//!         .choices(["small-model", "large-model"])
//!         .context("badge-type")
//!         .run(|choice| async move {
//!             // Call the model named by `choice` here.
//!             Ok::<_, hyperfunc::Error>(choice.name() == "large-model")
//!         })
//!         .await?;
//!     outcome.reward(if answer { 1.0 } else { 0.0 })?;
//!     outcome.cost(0.001)?;
//! }
//! let report = tuner.report(Some("classify"))?;
//! assert_eq!(report.groups[0].winner.as_deref(), Some("large-model"));
//! println!("{}", report.to_table());
//! # Ok::<(), hyperfunc::Error>(())
//! # }).unwrap();
//! ```

mod analysis;
#[cfg(feature = "plot")]
pub mod chart;
mod cost;
mod fragment;
#[cfg(feature = "llm")]
pub mod judge;
mod ledger;
mod policy;
#[cfg(feature = "llm")]
mod race;
mod report;
pub mod sim;
mod stats;
pub(crate) mod store;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::panic::Location;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};

pub use analysis::{
    CacheBreaker, CacheCandidate, Comparison, Delta, FragmentUse, LlmReport, LlmReportOptions,
    ObservationRate, Operation, UnexpectedFragment, Window,
};
pub use cost::{
    format_day, micros_to_usd, parse_since, parse_span, parse_time, usd_to_micros, MeterPrice,
    Micros, ModelPrice, PriceEntry, PriceTable, TokenUsage,
};
pub use fragment::{Fragment, Prompt};
pub use ledger::{Attribution, Charge, CostDim, CostLine, CostReport, Ledger, LlmCall, Meter};
#[cfg(feature = "llm")]
pub(crate) use ledger::{CostRow, LlmRow};
pub use policy::{Objective, Policy, RewardKind};
#[cfg(feature = "llm")]
pub use race::{RaceOptions, TunedRace};
pub use report::{CallRecord, ChoiceReport, GroupReport, TuneReport};
pub use stats::ChangeDetection;

use crate::error::{Error, Result};
use policy::ArmView;
use stats::{ArmStats, Life, PageHinkley, Pending, RewardSums};
use store::{Batch, Field, Row, Store};

/// Monte-Carlo draws that estimate a Thompson decision's probability (default).
const DEFAULT_DRAWS: usize = 200;
/// Rows buffered before the background thread writes them (default).
const DEFAULT_BATCH: usize = 256;
/// Open calls kept in memory after a flush; older ones are looked up in the store.
const OPEN_CALLS_KEPT: usize = 65_536;

/// The id of one tuned call, for reporting its reward or cost later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CallId(pub u64);

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The choice a policy picked, handed to the closure of [`TuneCall::run`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    name: Arc<str>,
    index: usize,
}

impl Choice {
    /// The choice's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its position in the call's [`TuneCall::choices`].
    pub fn index(&self) -> usize {
        self.index
    }
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl AsRef<str> for Choice {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

#[derive(Clone, Debug)]
struct Config {
    policy: Policy,
    objective: Objective,
    kind: RewardKind,
    change: Option<ChangeDetection>,
    prior_strength: f64,
    draws: usize,
    batch: usize,
}

struct Arm {
    name: Arc<str>,
    /// What the store held at the last sync plus everything since: what decisions use.
    stats: ArmStats,
    /// Not yet written.
    pending: Pending,
    /// Pseudo-rewards from the label's other contexts.
    prior: RewardSums,
    detector: PageHinkley,
}

impl Arm {
    fn push(&mut self, p: &Pending) {
        self.stats.apply(p);
        self.pending.then(p);
    }

    fn view(&self) -> ArmView {
        let mut post = self.stats.current();
        post.add(&self.prior);
        ArmView {
            post,
            mean_cost: self.stats.life.mean_cost(),
        }
    }
}

/// A fast hash for the in-memory maps (call ids, call sites, labels and choice names written in
/// code): a multiply-rotate over 8-byte words.
#[derive(Default, Clone, Copy)]
struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

struct Group {
    label: Arc<str>,
    context: Arc<str>,
    arms: Vec<Arm>,
    index: FastMap<Arc<str>, usize>,
    priors: HashMap<String, RewardSums>,
    /// The arm positions of the last list of choices (distinct names, checked once).
    last: Vec<usize>,
}

impl Group {
    fn new(label: &str, context: &str) -> Group {
        Group {
            label: label.into(),
            context: context.into(),
            arms: Vec::new(),
            index: FastMap::default(),
            priors: HashMap::new(),
            last: Vec::new(),
        }
    }

    /// Whether `choices` is the last list of choices, in order.
    fn is_last<S: AsRef<str>>(&self, choices: &[S]) -> bool {
        self.last.len() == choices.len()
            && self
                .last
                .iter()
                .zip(choices)
                .all(|(&i, c)| *self.arms[i].name == *c.as_ref())
    }

    fn arm(&mut self, name: &str) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let i = self.arms.len();
        let name: Arc<str> = name.into();
        self.arms.push(Arm {
            name: name.clone(),
            stats: ArmStats::default(),
            pending: Pending::default(),
            prior: self.priors.get(&*name).copied().unwrap_or_default(),
            detector: PageHinkley::default(),
        });
        self.index.insert(name, i);
        i
    }
}

struct OpenCall {
    /// Position in `State::groups`.
    group: usize,
    arm: usize,
    /// Position among all rows ever buffered; in the buffer while ≥ `State::flushed`.
    seq: u64,
    rewarded: bool,
    costed: bool,
}

struct State {
    cfg: Config,
    rng: Xoshiro256PlusPlus,
    /// Every (label, context) in use; never removed, so positions stay valid.
    groups: Vec<Group>,
    /// label → context → position in `groups`.
    group_index: FastMap<Arc<str>, FastMap<Arc<str>, usize>>,
    /// `file:line` of each call site seen, by the address of its `Location`.
    callers: FastMap<usize, Arc<str>>,
    rows: Vec<Row>,
    updates: Vec<(u64, Field, f64)>,
    open: FastMap<u64, OpenCall>,
    /// Rows handed to the store so far.
    flushed: u64,
    instance: u32,
    counter: u32,
    flush_requested: bool,
    flush_error: Option<String>,
}

struct Shared {
    store: Mutex<Store>,
    state: Mutex<State>,
    path: String,
}

struct Inner {
    shared: Arc<Shared>,
    wake: Option<mpsc::Sender<()>>,
    worker: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Stop the writer, then write what is left; errors can only be seen through `flush`.
        self.wake = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        let _ = self.shared.flush();
    }
}

/// Locks a mutex; a panic elsewhere cannot leave the state half-updated in a way that matters
/// more than losing the tuner, so the poison is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Owns the tune store and the policy settings; cheap to clone (the clones share both).
///
/// See the [module docs](self) for an example.
#[derive(Clone)]
pub struct Tuner {
    inner: Arc<Inner>,
}

impl fmt::Debug for Tuner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tuner")
            .field("path", &self.inner.shared.path)
            .finish_non_exhaustive()
    }
}

impl Tuner {
    /// Opens (or creates) the store at `path`, or a private in-memory store for `":memory:"`.
    ///
    /// Files use SQLite's WAL journal, so other processes can use the same file at once. A
    /// file that is not a SQLite database gives [`Error::TuneStore`] and is left untouched.
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<Tuner> {
        let path = path.as_ref().display().to_string();
        let store = Store::open(&path)?;
        let entropy = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (u64::from(std::process::id()) << 32);
        // Distinct per process and per tuner: call ids are (instance << 32) | counter.
        static OPENED: AtomicU64 = AtomicU64::new(0);
        let instance_seed = crate::rng::key(&[entropy, OPENED.fetch_add(1, Ordering::Relaxed)]);
        let state = State {
            cfg: Config {
                policy: Policy::Thompson,
                objective: Objective::Quality,
                kind: RewardKind::Auto,
                change: Some(ChangeDetection::default()),
                prior_strength: 5.0,
                draws: DEFAULT_DRAWS,
                batch: DEFAULT_BATCH,
            },
            rng: Xoshiro256PlusPlus::seed_from_u64(instance_seed),
            groups: Vec::new(),
            group_index: FastMap::default(),
            callers: FastMap::default(),
            rows: Vec::new(),
            updates: Vec::new(),
            open: FastMap::default(),
            flushed: 0,
            instance: (instance_seed >> 32) as u32,
            counter: 0,
            flush_requested: false,
            flush_error: None,
        };
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            state: Mutex::new(state),
            path,
        });
        let (tx, rx) = mpsc::channel::<()>();
        let bg = shared.clone();
        let worker = std::thread::Builder::new()
            .name("hyperfunc-tune-writer".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    if let Err(e) = bg.flush() {
                        lock(&bg.state).flush_error = Some(e.to_string());
                    }
                }
            })
            .map_err(|e| Error::TuneStore {
                path: shared.path.clone(),
                reason: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Tuner {
            inner: Arc::new(Inner {
                shared,
                wake: Some(tx),
                worker: Some(worker),
            }),
        })
    }

    /// A private in-memory store (lost on drop).
    pub fn in_memory() -> Result<Tuner> {
        Tuner::open(":memory:")
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.shared.state)
    }

    /// Seeds the policies' random numbers, for reproducible decisions.
    pub fn seed(self, seed: u64) -> Self {
        self.state().rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        self
    }

    /// The default policy of calls that set none ([`Policy::Thompson`] unless set).
    pub fn policy(self, policy: Policy) -> Self {
        self.state().cfg.policy = policy;
        self
    }

    /// The default objective of calls that set none, also used for a report's winner.
    pub fn objective(self, objective: Objective) -> Self {
        self.state().cfg.objective = objective;
        self
    }

    /// The reward model of Thompson sampling ([`RewardKind::Auto`] unless set).
    pub fn reward_kind(self, kind: RewardKind) -> Self {
        self.state().cfg.kind = kind;
        self
    }

    /// The per-choice change test; `None` switches it off (on by default).
    pub fn change_detection(self, change: Option<ChangeDetection>) -> Self {
        self.state().cfg.change = change;
        self
    }

    /// How many pseudo-rewards per choice a new context takes from the label's other contexts
    /// (default 5; 0 switches pooling off). Must be finite and not negative.
    pub fn prior_strength(self, pseudo_rewards: f64) -> Result<Self> {
        if !(pseudo_rewards.is_finite() && pseudo_rewards >= 0.0) {
            return Err(Error::TuneConfig {
                label: String::new(),
                reason: format!(
                    "prior strength must be finite and not negative, got {pseudo_rewards}"
                ),
            });
        }
        self.state().cfg.prior_strength = pseudo_rewards;
        Ok(self)
    }

    /// Monte-Carlo draws that estimate the probability of a Thompson decision (default 200;
    /// 0 stores no probability and makes a decision cheaper).
    ///
    /// The estimate counts the decision itself as one draw, `(wins + 1) / (draws + 1)`, so it
    /// is never 0 for the choice made. UCB1 is deterministic (probability 1), ε-greedy's is
    /// exact, a fixed choice's is 1.
    pub fn probability_draws(self, draws: usize) -> Self {
        self.state().cfg.draws = draws;
        self
    }

    /// Rows buffered before the background writer flushes them (default 256, at least 1).
    pub fn batch_size(self, rows: usize) -> Self {
        self.state().cfg.batch = rows.max(1);
        self
    }

    /// Starts a tuned call named `label`, recording the caller's file and line.
    #[track_caller]
    pub fn tune(&self, label: &str) -> TuneCall {
        TuneCall {
            tuner: self.clone(),
            label: label.to_string(),
            context: String::new(),
            choices: None,
            policy: None,
            objective: None,
            caller: Location::caller(),
            site: None,
        }
    }

    /// Writes buffered rows and statistics now and reads back what other processes wrote.
    ///
    /// Also reports an error that a background write met since the last flush.
    pub fn flush(&self) -> Result<()> {
        self.inner.shared.flush()?;
        match self.state().flush_error.take() {
            Some(reason) => Err(Error::TuneStore {
                path: self.inner.shared.path.clone(),
                reason: format!("a background write failed (its rows were kept): {reason}"),
            }),
            None => Ok(()),
        }
    }

    /// Reports the reward of a call by id (see [`Outcome::reward`]).
    pub fn reward(&self, call: CallId, reward: f64) -> Result<()> {
        if !reward.is_finite() {
            return Err(Error::TuneValue {
                what: "reward",
                expected: "a finite number",
                value: reward,
            });
        }
        self.report_value(call.0, Field::Reward, reward)
    }

    /// Reports the cost of a call in dollars by id (see [`Outcome::cost`]).
    pub fn cost(&self, call: CallId, usd: f64) -> Result<()> {
        if !(usd.is_finite() && usd >= 0.0) {
            return Err(Error::TuneValue {
                what: "cost",
                expected: "a finite number of dollars ≥ 0",
                value: usd,
            });
        }
        self.report_value(call.0, Field::Cost, usd)
    }

    fn report_value(&self, id: u64, field: Field, v: f64) -> Result<()> {
        {
            let mut st = self.state();
            if st.open.contains_key(&id) {
                return st.apply_value(id, field, v);
            }
        }
        // Not in memory: the call was written (perhaps by another process) or never existed.
        self.flush()?;
        let meta = {
            let store = lock(&self.inner.shared.store);
            let meta = store.call_meta(id)?.ok_or_else(|| Error::TuneCall {
                call_id: id,
                reason: "no such call in this store".into(),
            })?;
            let already = match field {
                Field::Reward if meta.failed => Some("failed; a failed call counts as reward 0"),
                Field::Reward if meta.has_reward => Some("already has a reward"),
                Field::Cost if meta.has_cost => Some("already has a cost"),
                _ => None,
            };
            if let Some(reason) = already {
                return Err(Error::TuneCall {
                    call_id: id,
                    reason: reason.into(),
                });
            }
            if !store.set_once(id, field, v)? {
                return Err(Error::TuneCall {
                    call_id: id,
                    reason: "another writer reported it first".into(),
                });
            }
            meta
        };
        let gid = self.inner.shared.ensure_group(&meta.label, &meta.context)?;
        let mut st = self.state();
        let change = st.cfg.change;
        let g = &mut st.groups[gid];
        let i = g.arm(&meta.choice);
        apply_stat(&mut g.arms[i], field, v, change.as_ref());
        Ok(())
    }

    /// Per label and context, each choice's calls, success rate, mean reward with a 95%
    /// interval, cost and the current winner (all labels for `None`). Flushes first.
    pub fn report(&self, label: Option<&str>) -> Result<TuneReport> {
        self.flush()?;
        let objective = self.state().cfg.objective;
        let rows = lock(&self.inner.shared.store).arms(label)?;
        Ok(report::build(rows, objective))
    }

    /// Every recorded call of a label (all labels for `None`), oldest first, for off-policy
    /// evaluation and audits. Flushes first.
    pub fn calls(&self, label: Option<&str>) -> Result<Vec<CallRecord>> {
        self.flush()?;
        let rows = lock(&self.inner.shared.store).calls(label)?;
        Ok(rows.into_iter().map(CallRecord::from).collect())
    }

    fn request_flush(&self) {
        if let Some(tx) = &self.inner.wake {
            let _ = tx.send(());
        }
    }
}

fn apply_stat(arm: &mut Arm, field: Field, v: f64, change: Option<&ChangeDetection>) {
    match field {
        Field::Reward => {
            arm.push(&Pending::of_reward(v));
            if let Some(cfg) = change {
                if arm.detector.update(v, cfg) {
                    arm.push(&Pending::of_reset());
                }
            }
        }
        Field::Cost => arm.push(&Pending::of_life(Life {
            cost_n: 1,
            cost_sum: v,
            ..Life::default()
        })),
    }
}

impl State {
    /// The position of a (label, context) in `groups`, if loaded.
    fn find(&self, label: &str, context: &str) -> Option<usize> {
        self.group_index.get(label)?.get(context).copied()
    }

    /// `file:line` of a call site, formatted once.
    fn caller(&mut self, loc: &'static Location<'static>) -> Arc<str> {
        let key = loc as *const Location<'static> as usize;
        self.callers
            .entry(key)
            .or_insert_with(|| format!("{}:{}", loc.file(), loc.line()).into())
            .clone()
    }

    fn apply_value(&mut self, id: u64, field: Field, v: f64) -> Result<()> {
        let change = self.cfg.change;
        let Some(call) = self.open.get_mut(&id) else {
            return Err(Error::TuneCall {
                call_id: id,
                reason: "no such call".into(),
            });
        };
        let done = match field {
            Field::Reward => &mut call.rewarded,
            Field::Cost => &mut call.costed,
        };
        if *done {
            return Err(Error::TuneCall {
                call_id: id,
                reason: match field {
                    Field::Reward => "already has a reward (a failed call counts as reward 0)",
                    Field::Cost => "already has a cost",
                }
                .into(),
            });
        }
        *done = true;
        let (seq, group, arm) = (call.seq, call.group, call.arm);
        apply_stat(&mut self.groups[group].arms[arm], field, v, change.as_ref());
        let buffered = seq
            .checked_sub(self.flushed)
            .and_then(|i| self.rows.get_mut(i as usize));
        match (buffered, field) {
            (Some(row), Field::Reward) => row.reward = Some(v),
            (Some(row), Field::Cost) => row.cost = Some(v),
            (None, _) => self.updates.push((id, field, v)),
        }
        Ok(())
    }
}

impl Shared {
    /// Loads a (label, context) group from the store, with its prior from the other contexts;
    /// returns its position in `State::groups`.
    fn ensure_group(&self, label: &str, context: &str) -> Result<usize> {
        if let Some(g) = lock(&self.state).find(label, context) {
            return Ok(g);
        }
        let store = lock(&self.store);
        let rows = store.load_label(label)?;
        let mut st = lock(&self.state);
        if let Some(g) = st.find(label, context) {
            return Ok(g);
        }
        let mut pooled: HashMap<String, RewardSums> = HashMap::new();
        for (ctx, choice, stats) in &rows {
            if ctx != context && st.find(label, ctx).is_none() {
                pooled
                    .entry(choice.clone())
                    .or_default()
                    .add(&stats.current());
            }
        }
        for g in &st.groups {
            if &*g.label == label && &*g.context != context {
                for a in &g.arms {
                    pooled
                        .entry(a.name.to_string())
                        .or_default()
                        .add(&a.stats.current());
                }
            }
        }
        let strength = st.cfg.prior_strength;
        let mut group = Group {
            priors: pooled
                .into_iter()
                .filter(|(_, s)| s.n > 0.0 && strength > 0.0)
                .map(|(c, s)| {
                    let k = (strength / s.n).min(1.0);
                    (c, s.scaled(k))
                })
                .collect(),
            ..Group::new(label, context)
        };
        for (ctx, choice, stats) in rows {
            if ctx == context {
                let i = group.arm(&choice);
                group.arms[i].stats = stats;
            }
        }
        let gid = st.groups.len();
        let (l, c) = (group.label.clone(), group.context.clone());
        st.groups.push(group);
        st.group_index.entry(l).or_default().insert(c, gid);
        Ok(gid)
    }

    fn flush(&self) -> Result<()> {
        let mut store = lock(&self.store);
        let batch = {
            let mut st = lock(&self.state);
            st.flush_requested = false;
            let mut b = Batch::default();
            for g in &mut st.groups {
                for a in &mut g.arms {
                    if !a.pending.is_empty() {
                        b.arms.push((
                            g.label.to_string(),
                            g.context.to_string(),
                            a.name.to_string(),
                            std::mem::take(&mut a.pending),
                        ));
                    }
                }
                b.sync.push((g.label.to_string(), g.context.to_string()));
            }
            b.rows = std::mem::take(&mut st.rows);
            st.flushed += b.rows.len() as u64;
            b.updates = std::mem::take(&mut st.updates);
            b
        };
        if batch.arms.is_empty() && batch.rows.is_empty() && batch.updates.is_empty() {
            return Ok(());
        }
        match store.write(&batch) {
            Ok(synced) => {
                let mut st = lock(&self.state);
                for (label, context, choice, stats) in synced {
                    if let Some(gid) = st.find(&label, &context) {
                        let g = &mut st.groups[gid];
                        if let Some(&i) = g.index.get(&*choice) {
                            let a = &mut g.arms[i];
                            a.stats = stats;
                            a.stats.apply(&a.pending);
                        }
                    }
                }
                if st.open.len() > OPEN_CALLS_KEPT {
                    let flushed = st.flushed;
                    st.open.retain(|_, c| c.seq >= flushed);
                }
                Ok(())
            }
            Err(e) => {
                // Keep everything for the next flush, in order.
                let mut st = lock(&self.state);
                for (label, context, choice, p) in batch.arms {
                    if let Some(gid) = st.find(&label, &context) {
                        let g = &mut st.groups[gid];
                        if let Some(&i) = g.index.get(&*choice) {
                            let a = &mut g.arms[i];
                            let mut merged = p;
                            merged.then(&a.pending);
                            a.pending = merged;
                        }
                    }
                }
                st.flushed -= batch.rows.len() as u64;
                let mut rows = batch.rows;
                rows.append(&mut st.rows);
                st.rows = rows;
                let mut updates = batch.updates;
                updates.append(&mut st.updates);
                st.updates = updates;
                Err(e)
            }
        }
    }
}

/// A tuned call being set up; [`TuneCall::run`] runs it.
#[must_use = "a tuned call does nothing until `run` is awaited"]
pub struct TuneCall {
    tuner: Tuner,
    label: String,
    context: String,
    choices: Option<Vec<String>>,
    policy: Option<Policy>,
    objective: Option<Objective>,
    caller: &'static Location<'static>,
    /// A call site given explicitly (bindings: the caller in the host language).
    site: Option<Arc<str>>,
}

impl fmt::Debug for TuneCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TuneCall")
            .field("label", &self.label)
            .field("context", &self.context)
            .field("choices", &self.choices)
            .field("policy", &self.policy)
            .field("caller", &self.caller)
            .finish()
    }
}

/// One decision, before the closure runs.
pub(crate) struct Decision {
    group: usize,
    arm: usize,
    choice: Choice,
    probability: policy::Prob,
    policy: Cow<'static, str>,
}

impl TuneCall {
    /// The named options the policy picks from. Without it the call has one choice,
    /// `default`, and is only recorded. Names must be distinct and the list not empty.
    pub fn choices<I, S>(mut self, choices: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.choices = Some(choices.into_iter().map(Into::into).collect());
        self
    }

    /// The context label (e.g. the kind of request): statistics are kept per context.
    pub fn context(mut self, context: impl Into<String>) -> Self {
        self.context = context.into();
        self
    }

    /// The policy of this call (the tuner's default otherwise).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The objective of this call (the tuner's default otherwise).
    pub fn objective(mut self, objective: Objective) -> Self {
        self.objective = Some(objective);
        self
    }

    /// The call site that `Tuner::tune` captured.
    pub fn caller(&self) -> &'static Location<'static> {
        self.caller
    }

    /// Records `site` as the call site instead of the Rust location `Tuner::tune` captured — for
    /// bindings whose caller lives in another language (Python passes `file:function:line`).
    pub fn call_site(mut self, site: impl Into<Arc<str>>) -> Self {
        self.site = Some(site.into());
        self
    }

    fn config_error(&self, reason: String) -> Error {
        Error::TuneConfig {
            label: self.label.clone(),
            reason,
        }
    }

    fn decide(&self) -> Result<Decision> {
        let mut one = None;
        self.decide_with(1, |d| one = Some(d))?;
        one.ok_or_else(|| self.config_error("no choice could be made".into()))
    }

    /// Up to `k` different choices, in the policy's order of preference: each next one is
    /// picked by the policy among those left (its probability is conditional on that).
    #[cfg_attr(not(feature = "llm"), allow(dead_code))]
    pub(crate) fn decide_k(&self, k: usize) -> Result<Vec<Decision>> {
        let mut v = Vec::with_capacity(k);
        self.decide_with(k, |d| v.push(d))?;
        Ok(v)
    }

    fn decide_with(&self, k: usize, mut push: impl FnMut(Decision)) -> Result<()> {
        const DEFAULT: [&str; 1] = ["default"];
        let choices: &[String] = match &self.choices {
            Some(c) if c.is_empty() => {
                return Err(self.config_error("the list of choices is empty".into()))
            }
            Some(c) => c,
            None => &[],
        };
        let shared = &self.tuner.inner.shared;
        let mut st = lock(&shared.state);
        // The same list as last time for this group: its names are distinct and its arms known.
        let known = st.find(&self.label, &self.context).filter(|&g| {
            let g = &st.groups[g];
            if choices.is_empty() {
                g.is_last(&DEFAULT)
            } else {
                g.is_last(choices)
            }
        });
        let gid = match known {
            Some(g) => g,
            None => {
                drop(st);
                for (i, c) in choices.iter().enumerate() {
                    if choices[..i].contains(c) {
                        return Err(self.config_error(format!("choice `{c}` is listed twice")));
                    }
                }
                let gid = shared.ensure_group(&self.label, &self.context)?;
                st = lock(&shared.state);
                let g = &mut st.groups[gid];
                g.last = if choices.is_empty() {
                    DEFAULT.iter().map(|c| g.arm(c)).collect()
                } else {
                    choices.iter().map(|c| g.arm(c)).collect()
                };
                gid
            }
        };
        let policy = self.policy.clone().unwrap_or_else(|| st.cfg.policy.clone());
        let objective = self.objective.unwrap_or(st.cfg.objective);
        match policy {
            Policy::EpsilonGreedy(e) if !(0.0..=1.0).contains(&e) => {
                return Err(self.config_error(format!("ε must be in [0, 1], got {e}")))
            }
            _ => {}
        }
        match objective {
            Objective::QualityMinusCost { lambda_per_usd: x }
            | Objective::BestQualityWithCostCap { max_mean_usd: x }
                if !(x.is_finite() && x >= 0.0) =>
            {
                return Err(self.config_error(format!(
                    "the objective's parameter must be finite and not negative, got {x}"
                )))
            }
            _ => {}
        }
        let st = &mut *st;
        let group = &st.groups[gid];
        let arms = &group.last;
        let pos = if let Policy::Fixed(name) = &policy {
            Some(
                arms.iter()
                    .position(|&i| *group.arms[i].name == *name.as_str())
                    .ok_or_else(|| Error::TuneUnknownChoice {
                        label: self.label.clone(),
                        choice: name.clone(),
                        choices: arms
                            .iter()
                            .map(|&i| group.arms[i].name.to_string())
                            .collect(),
                    })?,
            )
        } else {
            None
        };
        let binary = match st.cfg.kind {
            RewardKind::Binary => true,
            RewardKind::Continuous => false,
            RewardKind::Auto => group
                .arms
                .iter()
                .all(|a| a.stats.total.nonbinary <= 0.0 && a.prior.nonbinary <= 0.0),
        };
        let draws = st.cfg.draws;
        // The policy's pick among `views`; after a frozen choice, the others in listed order.
        let pick = |views: Vec<ArmView>, rng: &mut Xoshiro256PlusPlus| match policy {
            Policy::Fixed(_) => (0, policy::Prob::Known(None)),
            _ => policy::select_deferred(&policy, &objective, binary, views, draws, rng),
        };
        let first = match pos {
            Some(pos) => (pos, policy::Prob::Known(Some(1.0))),
            None => pick(
                arms.iter().map(|&i| group.arms[i].view()).collect(),
                &mut st.rng,
            ),
        };
        // Further picks (races) among the choices left; the hot path (k = 1) skips this.
        let mut rest: Vec<(usize, policy::Prob)> = Vec::new();
        if k > 1 {
            let mut left: Vec<usize> = (0..arms.len()).filter(|&p| p != first.0).collect();
            while 1 + rest.len() < k && !left.is_empty() {
                let group = &st.groups[gid];
                let views = left
                    .iter()
                    .map(|&p| group.arms[group.last[p]].view())
                    .collect();
                let (i, prob) = pick(views, &mut st.rng);
                rest.push((left.remove(i), prob));
            }
        }
        let g = &st.groups[gid];
        for (pos, probability) in std::iter::once(first).chain(rest) {
            let arm = g.last[pos];
            push(Decision {
                group: gid,
                arm,
                choice: Choice {
                    name: g.arms[arm].name.clone(),
                    index: pos,
                },
                probability,
                policy: policy.short_name(),
            });
        }
        Ok(())
    }

    /// Picks a choice, runs `f` with it and records the call; returns `f`'s value and the
    /// [`Outcome`] through which the reward and cost are reported.
    ///
    /// The error type only needs `From<hyperfunc::Error>` (for a bad setup or store) and
    /// `Display` (the message is recorded); `f`'s error is returned unchanged and counts as
    /// reward 0. A future dropped before `f` finishes records nothing.
    ///
    /// The first call of a (label, context) in a process reads the store synchronously.
    pub async fn run<T, E, F, Fut>(self, f: F) -> std::result::Result<(T, Outcome), E>
    where
        F: FnOnce(Choice) -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: From<Error> + fmt::Display,
    {
        let d = self.decide().map_err(E::from)?;
        let started_at = crate::util::now_s();
        let t0 = Instant::now();
        let result = f(d.choice.clone()).await;
        let latency_s = t0.elapsed().as_secs_f64();
        let error = result.as_ref().err().map(|e| clip(&e.to_string()));
        let outcome = self.record(d, started_at, latency_s, error);
        let value = result?;
        Ok((value, outcome))
    }

    /// Records one decided call (its row, its counts, a failure's reward 0).
    pub(crate) fn record(
        &self,
        d: Decision,
        started_at: f64,
        latency_s: f64,
        error: Option<String>,
    ) -> Outcome {
        let failed = error.is_some();
        let (id, wake) = {
            let mut st = self.tuner.state();
            let caller = match &self.site {
                Some(site) => site.clone(),
                None => st.caller(self.caller),
            };
            let id = (u64::from(st.instance) << 32) | u64::from(st.counter);
            st.counter = st.counter.wrapping_add(1);
            let seq = st.flushed + st.rows.len() as u64;
            let g = &st.groups[d.group];
            let (label, context) = (g.label.clone(), g.context.clone());
            st.rows.push(Row {
                id,
                label,
                context,
                choice: d.choice.name.clone(),
                policy: d.policy,
                probability: d.probability.clone(),
                caller,
                started_at,
                latency_s,
                error,
                reward: None,
                cost: None,
            });
            let change = st.cfg.change;
            let arm = &mut st.groups[d.group].arms[d.arm];
            arm.push(&Pending::of_life(Life {
                calls: 1,
                errors: u64::from(failed),
                ..Life::default()
            }));
            if failed {
                apply_stat(arm, Field::Reward, 0.0, change.as_ref());
            }
            st.open.insert(
                id,
                OpenCall {
                    group: d.group,
                    arm: d.arm,
                    seq,
                    rewarded: failed,
                    costed: false,
                },
            );
            let wake = st.rows.len() >= st.cfg.batch && !st.flush_requested;
            if wake {
                st.flush_requested = true;
            }
            (id, wake)
        };
        if wake {
            self.tuner.request_flush();
        }
        Outcome {
            tuner: self.tuner.clone(),
            id: CallId(id),
            choice: d.choice,
            probability: d.probability,
            caller: self.caller,
            latency_s,
        }
    }
}

/// The record of a finished tuned call: report its reward and cost here.
#[derive(Clone, Debug)]
pub struct Outcome {
    tuner: Tuner,
    id: CallId,
    choice: Choice,
    probability: policy::Prob,
    caller: &'static Location<'static>,
    latency_s: f64,
}

impl Outcome {
    /// Reports the call's reward (once). Rewards in {0, 1} use a Beta posterior under
    /// [`RewardKind::Auto`]; any other finite value switches the label to a continuous model.
    pub fn reward(&self, reward: f64) -> Result<()> {
        self.tuner.reward(self.id, reward)
    }

    /// Reports the call's cost in dollars (once; finite, not negative).
    pub fn cost(&self, usd: f64) -> Result<()> {
        self.tuner.cost(self.id, usd)
    }

    /// The call's id, for [`Tuner::reward`] and [`Tuner::cost`] later.
    pub fn id(&self) -> CallId {
        self.id
    }

    /// The choice that was used.
    pub fn choice(&self) -> &Choice {
        &self.choice
    }

    /// The probability the policy had of this decision (`None` when not estimated).
    pub fn probability(&self) -> Option<f64> {
        self.probability.value()
    }

    /// Where `Tuner::tune` was called.
    pub fn caller(&self) -> &'static Location<'static> {
        self.caller
    }

    /// How long the closure ran, seconds.
    pub fn latency_s(&self) -> f64 {
        self.latency_s
    }
}

/// The first 500 characters of an error message.
fn clip(s: &str) -> String {
    match s.char_indices().nth(500) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}
