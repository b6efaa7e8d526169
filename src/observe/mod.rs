//! Observation: one record per hyperfunction call, per-function summaries, ad-hoc observations.
//!
//! A [`Hub`] collects [`Record`]s. The engine writes one record per batched tensor forward (covering
//! the chunk's candidates × examples) and one per async call, with real start and end times, the
//! status and the call site; [`Hub::observe`] times any scope of user code. Aggregates (counts,
//! errors, latency percentiles) are kept for every call even when raw records are sampled or
//! capped. This module knows nothing about what is observed; exporters live beside it.

mod store;

pub use store::{GroupStats, TraceReport, TraceStore};

#[cfg(feature = "otlp")]
mod otlp;
#[cfg(feature = "otlp")]
pub use otlp::{OtlpConfig, OtlpExporter, OtlpProtocol, OtlpStats};

use std::collections::{BTreeMap, VecDeque};
use std::panic::Location;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::function::Json;

/// What a record stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// One `optimize` run.
    Run,
    /// One ES generation.
    Generation,
    /// A batched tensor forward over a chunk of candidates × examples.
    Tensor,
    /// One async call (one candidate, one example).
    Io,
    /// A scope timed by [`Hub::observe`].
    Observe,
    /// A scope opened by [`Hub::trace`].
    Session,
    /// One population evaluation (a generation's, or the final one of a run).
    Evaluation,
}

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// It returned a value.
    Ok,
    /// It failed.
    Error,
}

/// One observed call or scope.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    /// Unique within its hub, increasing in start order of creation.
    pub id: u64,
    /// The enclosing record (generation for a call, run for a generation, session…).
    pub parent: Option<u64>,
    /// The hyperfunction, or the observation's name.
    pub name: Arc<str>,
    /// What it stands for.
    pub kind: RecordKind,
    /// ES generation, when inside one.
    pub generation: Option<usize>,
    /// Candidates covered, `[start, end)`.
    pub candidates: Option<(usize, usize)>,
    /// Examples covered, `[start, end)`.
    pub examples: Option<(usize, usize)>,
    /// Start, nanoseconds since the Unix epoch (monotonic within a hub).
    pub start_unix_ns: u64,
    /// End, nanoseconds since the Unix epoch.
    pub end_unix_ns: u64,
    /// How it ended.
    pub status: Status,
    /// The error's kind (`timeout`, `io`, `tensor`…), when it failed.
    pub error_type: Option<String>,
    /// The error message, when it failed.
    pub error_message: Option<String>,
    /// `file:line` of the code that made the call.
    pub call_site: Option<String>,
    /// Extra attributes (`.note(key, value)`, GenAI fields…).
    pub attributes: Vec<(String, Json)>,
}

impl Record {
    /// A successful span record with no call site (runs, generations).
    pub(crate) fn span(
        id: u64,
        parent: Option<u64>,
        name: &str,
        kind: RecordKind,
        start: u64,
        end: u64,
    ) -> Self {
        Self {
            id,
            parent,
            name: Arc::from(name),
            kind,
            generation: None,
            candidates: None,
            examples: None,
            start_unix_ns: start,
            end_unix_ns: end,
            status: Status::Ok,
            error_type: None,
            error_message: None,
            call_site: None,
            attributes: Vec::new(),
        }
    }

    /// Duration in nanoseconds.
    pub fn duration_ns(&self) -> u64 {
        self.end_unix_ns.saturating_sub(self.start_unix_ns)
    }

    /// An attribute by key.
    pub fn attribute(&self, key: &str) -> Option<&Json> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

/// Per-function aggregates.
#[derive(Default, Debug)]
struct Agg {
    calls: u64,
    errors: u64,
    latencies_ns: Vec<u64>,
    input_tokens: u64,
    output_tokens: u64,
    cost: f64,
}

#[derive(Default)]
struct State {
    records: VecDeque<Record>,
    dropped: u64,
    aggs: BTreeMap<Arc<str>, Agg>,
    /// Usage per `gen_ai.request.model`.
    models: BTreeMap<String, ModelSummary>,
    sinks: Vec<Sink>,
    sessions: Vec<u64>,
}

#[derive(Debug)]
struct Inner {
    base: Instant,
    base_unix_ns: u64,
    next_id: AtomicU64,
    enabled: AtomicBool,
    sample_every: AtomicU64,
    seen: AtomicU64,
    capacity: usize,
    trace_id: u128,
    state: Mutex<State>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("records", &self.records.len())
            .field("dropped", &self.dropped)
            .field("sinks", &self.sinks.len())
            .finish_non_exhaustive()
    }
}

/// Something that receives every record a hub keeps or aggregates (an exporter's queue).
pub(crate) type Sink = Arc<dyn Fn(&Record) + Send + Sync>;

/// Collects records; cheap to clone (shared).
///
/// # Examples
/// ```
/// use hyperfunc::observe::Hub;
/// let hub = Hub::new();
/// {
///     let mut obs = hub.observe("strip_fences");
///     obs.note("model", "gpt-4o-mini");
/// }
/// let s = hub.summary();
/// assert_eq!(s.functions[0].name, "strip_fences");
/// assert_eq!(s.functions[0].calls, 1);
/// ```
#[derive(Clone, Debug)]
pub struct Hub(Arc<Inner>);

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A poisoned lock only means a panic elsewhere; the records stay valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// A hub keeping up to 100 000 raw records (oldest dropped first, and counted).
    pub fn new() -> Self {
        Self::with_capacity(100_000)
    }

    /// A hub keeping up to `capacity` raw records.
    pub fn with_capacity(capacity: usize) -> Self {
        let base_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self(Arc::new(Inner {
            base: Instant::now(),
            base_unix_ns,
            next_id: AtomicU64::new(1),
            enabled: AtomicBool::new(true),
            sample_every: AtomicU64::new(1),
            seen: AtomicU64::new(0),
            capacity,
            trace_id: rand::random::<u128>().max(1),
            state: Mutex::new(State::default()),
        }))
    }

    /// The OpenTelemetry trace id of this hub's records (one hub, one trace), 32 hex digits.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.0.trace_id)
    }

    #[cfg(feature = "otlp")]
    pub(crate) fn trace_id_u128(&self) -> u128 {
        self.0.trace_id
    }

    /// Hands every record pushed from now on (sampled out or not) to `sink`.
    pub(crate) fn add_sink(&self, sink: Sink) {
        lock(&self.0.state).sinks.push(sink);
    }

    /// Turns recording on or off (aggregates included).
    pub fn set_enabled(&self, on: bool) {
        self.0.enabled.store(on, Ordering::Relaxed);
    }

    /// Whether recording is on.
    pub fn enabled(&self) -> bool {
        self.0.enabled.load(Ordering::Relaxed)
    }

    /// Keeps about `rate` (in (0, 1]) of the raw records; aggregates still count every call.
    pub fn sample(&self, rate: f64) -> Result<()> {
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(Error::config(
                "sample",
                format!("rate must lie in (0, 1], got {rate}"),
            ));
        }
        self.0
            .sample_every
            .store((1.0 / rate).round().max(1.0) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Nanoseconds since the Unix epoch, now (monotonic within this hub).
    pub fn now_ns(&self) -> u64 {
        self.0.base_unix_ns + self.0.base.elapsed().as_nanos() as u64
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.0.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The innermost open [`Hub::trace`] session, if any.
    pub(crate) fn session(&self) -> Option<u64> {
        lock(&self.0.state).sessions.last().copied()
    }

    /// Adds a finished record.
    pub fn push(&self, record: Record) {
        if !self.enabled() {
            return;
        }
        let every = self.0.sample_every.load(Ordering::Relaxed);
        let keep = every <= 1
            || self
                .0
                .seen
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(every)
            || record.status == Status::Error;
        let mut guard = lock(&self.0.state);
        let s = &mut *guard;
        let agg = s.aggs.entry(record.name.clone()).or_default();
        agg.calls += 1;
        agg.errors += u64::from(record.status == Status::Error);
        agg.latencies_ns.push(record.duration_ns());
        if !record.attributes.is_empty() {
            let num = |k: &str| record.attribute(k).and_then(Json::as_f64).unwrap_or(0.0);
            let (inp, out, cost) = (
                num("gen_ai.usage.input_tokens") as u64,
                num("gen_ai.usage.output_tokens") as u64,
                num("cost"),
            );
            agg.input_tokens += inp;
            agg.output_tokens += out;
            agg.cost += cost;
            if let Some(m) = record
                .attribute("gen_ai.request.model")
                .and_then(Json::as_str)
            {
                let e = s
                    .models
                    .entry(m.to_string())
                    .or_insert_with(|| ModelSummary {
                        model: m.to_string(),
                        ..ModelSummary::default()
                    });
                e.calls += 1;
                e.errors += u64::from(record.status == Status::Error);
                e.input_tokens += inp;
                e.output_tokens += out;
                e.cost += cost;
                e.cache_hits +=
                    u64::from(record.attribute("hyperfunc.cache_hit") == Some(&Json::Bool(true)));
            }
        }
        for sink in &s.sinks {
            sink(&record);
        }
        if keep {
            if s.records.len() >= self.0.capacity {
                s.records.pop_front();
                s.dropped += 1;
            }
            s.records.push_back(record);
        }
    }

    /// The raw records kept, oldest first.
    pub fn records(&self) -> Vec<Record> {
        lock(&self.0.state).records.iter().cloned().collect()
    }

    /// Raw records dropped because the hub was full.
    pub fn dropped(&self) -> u64 {
        lock(&self.0.state).dropped
    }

    /// Forgets every record and aggregate.
    pub fn clear(&self) {
        let mut s = lock(&self.0.state);
        let sinks = std::mem::take(&mut s.sinks);
        *s = State {
            sinks,
            ..State::default()
        };
    }

    /// Starts timing a scope of user code; the record is written when the guard drops.
    #[track_caller]
    pub fn observe(&self, name: &str) -> Observation {
        Observation {
            hub: self.clone(),
            id: self.next_id(),
            parent: self.session(),
            name: Arc::from(name),
            kind: RecordKind::Observe,
            start: self.now_ns(),
            site: Location::caller(),
            attributes: Vec::new(),
            failed: None,
        }
    }

    /// Opens a session: records made while it is open (by this hub) get it as parent.
    #[track_caller]
    pub fn trace(&self, session: &str) -> Observation {
        let mut obs = self.observe(session);
        obs.kind = RecordKind::Session;
        lock(&self.0.state).sessions.push(obs.id);
        obs
    }

    /// Per-function aggregates over every call seen.
    pub fn summary(&self) -> Summary {
        let s = lock(&self.0.state);
        let functions: Vec<FunctionSummary> = s
            .aggs
            .iter()
            .map(|(name, a)| {
                let mut l = a.latencies_ns.clone();
                l.sort_unstable();
                let pct = |q: f64| -> f64 {
                    if l.is_empty() {
                        return 0.0;
                    }
                    let i = ((l.len() - 1) as f64 * q).round() as usize;
                    l[i] as f64 / 1e6
                };
                let total: u64 = l.iter().sum();
                FunctionSummary {
                    name: name.to_string(),
                    calls: a.calls,
                    errors: a.errors,
                    error_rate: if a.calls == 0 {
                        0.0
                    } else {
                        a.errors as f64 / a.calls as f64
                    },
                    total_ms: total as f64 / 1e6,
                    mean_ms: if l.is_empty() {
                        0.0
                    } else {
                        total as f64 / 1e6 / l.len() as f64
                    },
                    min_ms: l.first().map_or(0.0, |&v| v as f64 / 1e6),
                    max_ms: l.last().map_or(0.0, |&v| v as f64 / 1e6),
                    p50_ms: pct(0.5),
                    p95_ms: pct(0.95),
                    p99_ms: pct(0.99),
                    input_tokens: a.input_tokens,
                    output_tokens: a.output_tokens,
                    cost: a.cost,
                }
            })
            .collect();
        let models: Vec<ModelSummary> = s.models.values().cloned().collect();
        Summary {
            total_cost: functions.iter().map(|f| f.cost).sum(),
            functions,
            models,
            dropped: s.dropped,
        }
    }

    /// Counts the kept records called `name` by the value of attribute `key` (or by call site
    /// when `key` is `"call_site"`): "which callers/models needed stripping".
    pub fn count_by(&self, name: &str, key: &str) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in lock(&self.0.state)
            .records
            .iter()
            .filter(|r| &*r.name == name)
        {
            let k = if key == "call_site" {
                r.call_site.clone().unwrap_or_default()
            } else {
                match r.attribute(key) {
                    Some(Json::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => String::new(),
                }
            };
            *out.entry(k).or_insert(0) += 1;
        }
        out
    }

    /// All kept records as a JSON array.
    pub fn to_json(&self) -> Json {
        serde_json::to_value(self.records()).unwrap_or(Json::Null)
    }

    /// Writes the kept records to `path`, one JSON object per line.
    pub fn write_jsonl(&self, path: impl AsRef<Path>) -> Result<()> {
        use std::io::Write;
        let path = path.as_ref();
        let err = |source| Error::File {
            path: path.display().to_string(),
            source,
        };
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(err)?);
        for r in self.records() {
            let line = serde_json::to_string(&r).map_err(|e| err(std::io::Error::other(e)))?;
            writeln!(f, "{line}").map_err(err)?;
        }
        f.flush().map_err(err)
    }
}

/// A timed scope; written to its hub when dropped.
#[derive(Debug)]
pub struct Observation {
    hub: Hub,
    id: u64,
    parent: Option<u64>,
    name: Arc<str>,
    kind: RecordKind,
    start: u64,
    site: &'static Location<'static>,
    attributes: Vec<(String, Json)>,
    failed: Option<String>,
}

impl Observation {
    /// Adds an attribute.
    pub fn note(&mut self, key: &str, value: impl Into<Json>) -> &mut Self {
        self.attributes.push((key.to_string(), value.into()));
        self
    }

    /// Marks the scope as failed with a message.
    pub fn fail(&mut self, message: impl Into<String>) -> &mut Self {
        self.failed = Some(message.into());
        self
    }

    /// The record id this observation will have.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Observation {
    fn drop(&mut self) {
        if self.kind == RecordKind::Session {
            let mut s = lock(&self.hub.0.state);
            if let Some(pos) = s.sessions.iter().rposition(|&i| i == self.id) {
                s.sessions.remove(pos);
            }
        }
        let failed = self.failed.take();
        self.hub.push(Record {
            id: self.id,
            parent: self.parent,
            name: self.name.clone(),
            kind: self.kind,
            generation: None,
            candidates: None,
            examples: None,
            start_unix_ns: self.start,
            end_unix_ns: self.hub.now_ns(),
            status: if failed.is_some() {
                Status::Error
            } else {
                Status::Ok
            },
            error_type: failed.as_ref().map(|_| "observed".to_string()),
            error_message: failed,
            call_site: Some(format!("{}:{}", self.site.file(), self.site.line())),
            attributes: std::mem::take(&mut self.attributes),
        });
    }
}

/// Aggregates of one function.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FunctionSummary {
    /// Function or observation name.
    pub name: String,
    /// Calls seen.
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// `errors / calls`.
    pub error_rate: f64,
    /// Total latency, ms.
    pub total_ms: f64,
    /// Mean latency, ms.
    pub mean_ms: f64,
    /// Fastest call, ms.
    pub min_ms: f64,
    /// Slowest call, ms.
    pub max_ms: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Prompt tokens (`gen_ai.usage.input_tokens` of its records).
    pub input_tokens: u64,
    /// Completion tokens (`gen_ai.usage.output_tokens`).
    pub output_tokens: u64,
    /// Dollars (`cost` attributes).
    pub cost: f64,
}

/// Per-function aggregates of a hub.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// One entry per function, by name.
    pub functions: Vec<FunctionSummary>,
    /// One entry per LLM model (`gen_ai.request.model`), by name.
    pub models: Vec<ModelSummary>,
    /// Dollars over every function.
    pub total_cost: f64,
    /// Raw records dropped because the hub was full.
    pub dropped: u64,
}

/// LLM usage of one model, from its calls' GenAI attributes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ModelSummary {
    /// `gen_ai.request.model`.
    pub model: String,
    /// Calls.
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Calls served from the response cache.
    pub cache_hits: u64,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Dollars.
    pub cost: f64,
}

impl Summary {
    /// A Markdown table.
    pub fn to_markdown(&self) -> String {
        let mut s = String::from(
            "| function | calls | errors | error rate | total ms | mean ms | min ms | max ms | p50 ms | p95 ms | p99 ms | in tok | out tok | cost $ |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for f in &self.functions {
            s.push_str(&format!(
                "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {:.6} |\n",
                f.name, f.calls, f.errors, f.error_rate, f.total_ms, f.mean_ms, f.min_ms, f.max_ms, f.p50_ms, f.p95_ms, f.p99_ms,
                f.input_tokens, f.output_tokens, f.cost
            ));
        }
        if !self.models.is_empty() {
            s.push_str(
                "\n| model | calls | errors | cache hits | in tok | out tok | cost $ |\n\
                 | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
            );
            for m in &self.models {
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {:.6} |\n",
                    m.model,
                    m.calls,
                    m.errors,
                    m.cache_hits,
                    m.input_tokens,
                    m.output_tokens,
                    m.cost
                ));
            }
            s.push_str(&format!("\ntotal cost: ${:.6}\n", self.total_cost));
        }
        s
    }
}

/// Where the engine's records of one evaluation go: the hub, the parent record, the generation.
#[derive(Clone, Debug, Default)]
pub(crate) struct Trace {
    pub hub: Option<Hub>,
    pub parent: Option<u64>,
    pub generation: Option<usize>,
}

impl Trace {
    /// Records one engine call that ran from `start` (hub time) until now.
    #[allow(clippy::too_many_arguments)]
    pub fn call(
        &self,
        name: &Arc<str>,
        kind: RecordKind,
        start: u64,
        candidates: (usize, usize),
        examples: Option<(usize, usize)>,
        site: &'static Location<'static>,
        error: Option<&Error>,
        attributes: Vec<(String, Json)>,
    ) {
        let Some(hub) = &self.hub else { return };
        if !hub.enabled() {
            return;
        }
        hub.push(Record {
            id: hub.next_id(),
            parent: self.parent,
            name: name.clone(),
            kind,
            generation: self.generation,
            candidates: Some(candidates),
            examples,
            start_unix_ns: start,
            end_unix_ns: hub.now_ns(),
            status: if error.is_some() {
                Status::Error
            } else {
                Status::Ok
            },
            error_type: error.map(error_type),
            error_message: error.map(ToString::to_string),
            call_site: Some(format!("{}:{}", site.file(), site.line())),
            attributes,
        });
    }

    /// Hub time now (0 without a hub).
    pub fn now(&self) -> u64 {
        self.hub.as_ref().map_or(0, Hub::now_ns)
    }
}

/// A short machine-readable kind for an error (OpenTelemetry `error.type`).
pub(crate) fn error_type(e: &Error) -> String {
    match e {
        Error::ShapeMismatch { .. } => "shape_mismatch",
        Error::Io { .. } => "io",
        Error::Parse { .. } => "parse",
        Error::Timeout { .. } => "timeout",
        Error::BudgetExhausted { .. } => "budget_exhausted",
        Error::Tensor { .. } => "tensor",
        Error::WrongValueKind { .. } => "wrong_value_kind",
        Error::UndeclaredFunction { .. } => "undeclared_function",
        _ => "error",
    }
    .to_string()
}

tokio::task_local! {
    /// Attributes an async body adds to the record of the call it is running in.
    static CALL_NOTES: std::cell::RefCell<Vec<(String, Json)>>;
}

/// Adds an attribute to the record of the hyperfunction call this code runs in (an async body,
/// e.g. GenAI fields from an LLM response). Outside a call it does nothing.
///
/// # Examples
/// ```
/// use hyperfunc::{HyperFn, IoError, Json};
/// let f = HyperFn::io("lookup", None, |x: Json, _| async move {
///     hyperfunc::observe::note_call("lookup.hit", true);
///     Ok::<Json, IoError>(x)
/// });
/// # let _ = f;
/// ```
pub fn note_call(key: &str, value: impl Into<Json>) {
    let _ = CALL_NOTES.try_with(|n| n.borrow_mut().push((key.to_string(), value.into())));
}

/// Runs `f` with a fresh attribute list for [`note_call`], returning what it noted.
pub(crate) async fn with_call_notes<F: std::future::Future>(
    f: F,
) -> (F::Output, Vec<(String, Json)>) {
    CALL_NOTES
        .scope(std::cell::RefCell::new(Vec::new()), async move {
            let out = f.await;
            (out, CALL_NOTES.with(|n| n.take()))
        })
        .await
}
