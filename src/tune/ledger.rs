//! The ledger: what every paid call cost, who made it, and — for LLM calls — what was sent.
//!
//! One SQLite file (WAL, shared by processes) holds
//! - one row per paid call (`hyperfunc_cost`): time, caller, endpoint, model, tune label, run,
//!   user tag, units and integer micro-dollars;
//! - rollups kept on write (`hyperfunc_cost_rollup`): per day × caller × endpoint × model ×
//!   label × run × user, calls, units and micro-dollars, changed only by atomic increments, so
//!   `hyperfunc cost report` reads a few thousand rows instead of millions of calls;
//! - one row per LLM call (`hyperfunc_llm_calls`): system prompt, prompt, answer, options, token
//!   classes ([`TokenUsage`]), latency, whether it came from our cache, the provider's prompt
//!   cache, or was cancelled, its quality when reported, and the [`Fragment`]s it was built from;
//! - observations from [`Hub::observe`](crate::observe::Hub::observe) guards
//!   (`hyperfunc_observations`), joined with the LLM calls by caller and model.
//!
//! Rows are queued and written in batches by a background thread; [`Ledger::flush`] waits for
//! them, and every report flushes first.
//!
//! # Examples
//! ```
//! use hyperfunc::tune::{CostDim, Ledger, Meter, MeterPrice};
//!
//! let ledger = Ledger::in_memory()?;
//! let unlocker = Meter::new(&ledger, "unlocker", MeterPrice::per_call_usd(0.0015)?);
//! for _ in 0..3 {
//!     unlocker.charge().label("fetch").user("acme").record()?;
//! }
//! let report = ledger.cost_report(&[CostDim::Caller, CostDim::Endpoint], None)?;
//! assert_eq!(report.total_micros, 4500);
//! assert_eq!(report.rows[0].calls, 3);
//! println!("{}", report.to_table());
//! # Ok::<(), hyperfunc::Error>(())
//! ```

// Without the LLM client only metered costs are recorded.
#![cfg_attr(not(feature = "llm"), allow(dead_code))]

use std::collections::BTreeMap;
use std::fmt;
use std::panic::Location;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;

use rusqlite::{params, Connection, TransactionBehavior};
use serde::Serialize;
use serde_json::Value as Json;

use super::cost::{
    check_usd, format_day, micros_to_usd, usd_to_micros, MeterPrice, Micros, PriceTable, TokenUsage,
};
use super::fragment::Fragment;
use super::lock;
use crate::error::{Error, Result};

/// Messages written per transaction at most.
const BATCH: usize = 4096;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS hyperfunc_cost (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    day INTEGER NOT NULL,
    kind TEXT NOT NULL,
    caller TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    label TEXT NOT NULL,
    run TEXT NOT NULL,
    user TEXT NOT NULL,
    units REAL NOT NULL,
    micros INTEGER NOT NULL,
    estimated INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS hyperfunc_cost_ts ON hyperfunc_cost (ts);
CREATE TABLE IF NOT EXISTS hyperfunc_cost_rollup (
    day INTEGER NOT NULL,
    caller TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    label TEXT NOT NULL,
    run TEXT NOT NULL,
    user TEXT NOT NULL,
    calls INTEGER NOT NULL,
    units REAL NOT NULL,
    micros INTEGER NOT NULL,
    PRIMARY KEY (day, caller, endpoint, model, label, run, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hyperfunc_llm_calls (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    caller TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    label TEXT NOT NULL,
    run TEXT NOT NULL,
    user TEXT NOT NULL,
    system TEXT NOT NULL,
    prompt TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    response TEXT NOT NULL,
    options TEXT NOT NULL,
    input INTEGER NOT NULL,
    cache_read INTEGER NOT NULL,
    cache_write INTEGER NOT NULL,
    output INTEGER NOT NULL,
    reasoning INTEGER NOT NULL,
    micros INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    source TEXT NOT NULL,
    ok INTEGER NOT NULL,
    error TEXT,
    quality REAL
);
CREATE INDEX IF NOT EXISTS hyperfunc_llm_calls_ts ON hyperfunc_llm_calls (ts);
CREATE INDEX IF NOT EXISTS hyperfunc_llm_calls_prompt ON hyperfunc_llm_calls (prompt_hash);
CREATE TABLE IF NOT EXISTS hyperfunc_fragments (
    hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    text TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    stable INTEGER NOT NULL,
    declared INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hyperfunc_call_fragments (
    call INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    role TEXT NOT NULL,
    hash TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (call, pos)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS hyperfunc_call_fragments_hash ON hyperfunc_call_fragments (hash);
CREATE TABLE IF NOT EXISTS hyperfunc_observations (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    name TEXT NOT NULL,
    caller TEXT NOT NULL,
    model TEXT NOT NULL,
    label TEXT NOT NULL,
    ok INTEGER NOT NULL,
    attributes TEXT NOT NULL
);
";

/// Who made a paid call and what for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Attribution {
    /// The call site (`file:line`, or `file:function:line` from Python).
    pub caller: String,
    /// The tune label or hyperfunction.
    pub label: String,
    /// The optimisation run.
    pub run: String,
    /// A user or customer tag.
    pub user: String,
}

#[derive(Debug)]
pub(crate) struct CostRow {
    pub id: i64,
    pub ts: f64,
    pub kind: &'static str,
    pub who: Attribution,
    pub endpoint: String,
    pub model: String,
    pub units: f64,
    pub micros: Micros,
    pub estimated: bool,
}

/// One LLM call as the client hands it to the ledger.
#[derive(Debug)]
pub(crate) struct LlmRow {
    pub cost: CostRow,
    pub system: String,
    pub prompt: String,
    pub response: String,
    pub options: String,
    pub usage: TokenUsage,
    pub latency_ms: f64,
    pub source: &'static str,
    pub error: Option<String>,
    /// (role, fragment) in the order sent.
    pub fragments: Vec<(&'static str, Fragment)>,
    /// The client's configured price (used when the table has no price for the model).
    pub client_price: Option<super::cost::ModelPrice>,
}

#[derive(Debug)]
struct ObsRow {
    ts: f64,
    name: String,
    caller: String,
    model: String,
    label: String,
    ok: bool,
    attributes: String,
}

enum Msg {
    Cost(CostRow),
    Llm(Box<LlmRow>),
    Declare(Vec<Fragment>),
    Observation(ObsRow),
    Flush(mpsc::SyncSender<std::result::Result<(), String>>),
}

struct Inner {
    path: String,
    conn: Arc<Mutex<Connection>>,
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    prices: RwLock<PriceTable>,
    instance: u32,
    counter: AtomicU32,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let tx = lock(&self.tx).take();
        drop(tx);
        if let Some(h) = lock(&self.writer).take() {
            let _ = h.join();
        }
    }
}

/// A cheap-to-clone handle on a ledger file.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn store_err(path: &str) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| super::store::store_err(path, e)
}

impl Ledger {
    /// Opens (or creates) the ledger at `path` (`:memory:` for a private in-memory one).
    ///
    /// A file that is not a SQLite database gives [`Error::TuneStore`] and is left untouched.
    pub fn open(path: impl AsRef<Path>) -> Result<Ledger> {
        let path = path.as_ref().to_string_lossy().into_owned();
        let conn = super::store::open_shared(&path, SCHEMA)?;
        let conn = Arc::new(Mutex::new(conn));
        let (tx, rx) = mpsc::channel();
        let writer = {
            let conn = conn.clone();
            let wpath = path.clone();
            std::thread::Builder::new()
                .name("hyperfunc-ledger".into())
                .spawn(move || write_loop(&conn, &wpath, &rx))
                .map_err(|e| Error::TuneStore {
                    path: path.clone(),
                    reason: format!("cannot start the writer thread: {e}"),
                })?
        };
        let instance = (rand::random::<u32>() >> 1).max(1);
        Ok(Ledger {
            inner: Arc::new(Inner {
                path,
                conn,
                tx: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
                prices: RwLock::new(PriceTable::new()),
                instance,
                counter: AtomicU32::new(0),
            }),
        })
    }

    /// A private in-memory ledger.
    pub fn in_memory() -> Result<Ledger> {
        Ledger::open(":memory:")
    }

    /// The file.
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// Prices LLM calls from `table` from now on (a model the table does not price is costed
    /// with the client's own configured price).
    pub fn set_prices(&self, table: PriceTable) {
        *self.inner.prices.write().unwrap_or_else(|p| p.into_inner()) = table;
    }

    /// The current price table.
    pub fn prices(&self) -> PriceTable {
        self.inner
            .prices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn next_id(&self) -> i64 {
        let c = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        (i64::from(self.inner.instance) << 32) | i64::from(c)
    }

    fn send(&self, msg: Msg) -> Result<()> {
        match lock(&self.inner.tx).as_ref() {
            Some(tx) if tx.send(msg).is_ok() => Ok(()),
            _ => Err(Error::TuneStore {
                path: self.inner.path.clone(),
                reason: "the ledger's writer thread has stopped".into(),
            }),
        }
    }

    /// Waits until everything recorded so far is written.
    pub fn flush(&self) -> Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Msg::Flush(tx))?;
        match rx.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(Error::TuneStore {
                path: self.inner.path.clone(),
                reason,
            }),
            Err(_) => Err(Error::TuneStore {
                path: self.inner.path.clone(),
                reason: "the ledger's writer thread has stopped".into(),
            }),
        }
    }

    /// The connection, after a flush (for reports).
    pub(crate) fn reader(&self) -> Result<MutexGuard<'_, Connection>> {
        self.flush()?;
        Ok(lock(&self.inner.conn))
    }

    pub(crate) fn err(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        store_err(&self.inner.path)
    }

    pub(crate) fn record_cost(&self, row: CostRow) -> Result<()> {
        self.send(Msg::Cost(row))
    }

    /// Queues one LLM call; its cost comes from the price table at the call's time, else from
    /// the client's price.
    pub(crate) fn record_llm(&self, mut row: LlmRow) -> Result<i64> {
        let id = row.cost.id;
        let priced = self
            .inner
            .prices
            .read()
            .ok()
            .and_then(|t| t.cost(&row.cost.model, row.cost.ts.floor() as i64, &row.usage));
        row.cost.micros = match (row.source, priced) {
            ("cache", _) => 0,
            (_, Some(m)) => m,
            (_, None) => row.client_price.map_or(0, |p| p.cost(&row.usage)),
        };
        row.cost.units = row.usage.total() as f64;
        self.send(Msg::Llm(Box::new(row)))?;
        Ok(id)
    }

    /// Declares fragments the code may send, so the report can list those never sent.
    pub fn declare(&self, fragments: &[&Fragment]) -> Result<()> {
        self.send(Msg::Declare(
            fragments.iter().map(|f| (*f).clone()).collect(),
        ))
    }

    /// Records the quality (a finite number, typically in [0, 1]) of a stored LLM call, for
    /// `hyperfunc llm compare`.
    pub fn quality(&self, call: i64, quality: f64) -> Result<()> {
        if !quality.is_finite() {
            return Err(Error::TuneValue {
                what: "quality",
                expected: "a finite number",
                value: quality,
            });
        }
        let conn = self.reader()?;
        let n = conn
            .execute(
                "UPDATE hyperfunc_llm_calls SET quality = ?1 WHERE id = ?2",
                params![quality, call],
            )
            .map_err(self.err())?;
        if n == 0 {
            return Err(Error::TuneCall {
                call_id: call as u64,
                reason: "no LLM call with this id in the ledger".into(),
            });
        }
        Ok(())
    }

    /// Sends every `observe(name)` record of `hub` (from now on) to this ledger, so
    /// `hyperfunc llm report` can join them with the LLM calls by caller and model. The model is
    /// read from the `model` or `gen_ai.request.model` attribute, the label from `label`.
    pub fn attach(&self, hub: &crate::observe::Hub) {
        let ledger = self.clone();
        hub.add_sink(Arc::new(move |r: &crate::observe::Record| {
            if r.kind != crate::observe::RecordKind::Observe {
                return;
            }
            let attr = |k: &str| {
                r.attribute(k)
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            };
            let model = attr("model")
                .or_else(|| attr("gen_ai.request.model"))
                .unwrap_or_default();
            let attributes: BTreeMap<&str, &Json> =
                r.attributes.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let _ = ledger.send(Msg::Observation(ObsRow {
                ts: r.start_unix_ns as f64 / 1e9,
                name: r.name.to_string(),
                caller: r.call_site.clone().unwrap_or_default(),
                model,
                label: attr("label").unwrap_or_default(),
                ok: r.status == crate::observe::Status::Ok,
                attributes: serde_json::to_string(&attributes).unwrap_or_default(),
            }));
        }));
    }

    /// Cost per group of `by` (empty: one total row) from the rollups, for days from `since`
    /// (Unix seconds, rounded down to the day) on; biggest first.
    pub fn cost_report(&self, by: &[CostDim], since: Option<i64>) -> Result<CostReport> {
        let since_day = since.map_or(i64::MIN, |s| s.div_euclid(86_400));
        let sql = group_sql(by, "SUM(calls)", "hyperfunc_cost_rollup", "day");
        self.query_report(by, since, &sql, since_day)
    }

    /// Cost per group of `by` over the per-call rows from Unix second `since` on: any grouping
    /// at any time resolution, slower than [`Ledger::cost_report`] on large ledgers.
    pub fn cost_by_calls(&self, by: &[CostDim], since: Option<i64>) -> Result<CostReport> {
        let sql = group_sql(by, "COUNT(*)", "hyperfunc_cost", "ts");
        self.query_report(by, since, &sql, since.unwrap_or(i64::MIN))
    }

    fn query_report(
        &self,
        by: &[CostDim],
        since: Option<i64>,
        sql: &str,
        bound: i64,
    ) -> Result<CostReport> {
        let conn = self.reader()?;
        let mut st = conn.prepare_cached(sql).map_err(self.err())?;
        let n = by.len().max(1);
        let rows = st
            .query_map([bound], |r| {
                let mut key = Vec::with_capacity(n);
                for i in 0..n {
                    key.push(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Integer(d) => format_day(d),
                        v => v.as_str().unwrap_or_default().to_string(),
                    });
                }
                Ok(CostLine {
                    key: if by.is_empty() { Vec::new() } else { key },
                    calls: r.get::<_, Option<i64>>(n)?.unwrap_or(0) as u64,
                    units: r.get::<_, Option<f64>>(n + 1)?.unwrap_or(0.0),
                    micros: r.get::<_, Option<i64>>(n + 2)?.unwrap_or(0),
                })
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        let rows: Vec<CostLine> = rows.into_iter().filter(|r| r.calls > 0).collect();
        Ok(CostReport {
            by: by.iter().map(|d| d.name().to_string()).collect(),
            since,
            total_calls: rows.iter().map(|r| r.calls).sum(),
            total_micros: rows.iter().map(|r| r.micros).sum(),
            rows,
        })
    }

    /// Re-prices the stored LLM calls from Unix second `since` on with `table` (calls of a
    /// model it does not price keep their cost) and rebuilds the affected rollups, in one
    /// transaction. Returns (calls re-priced, micro-dollars before, after).
    pub fn reprice(&self, table: &PriceTable, since: Option<i64>) -> Result<(u64, Micros, Micros)> {
        let mut conn = self.reader()?;
        let err = store_err(&self.inner.path);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let since = since.unwrap_or(i64::MIN);
        let rows: Vec<(i64, f64, String, TokenUsage, Micros, String)> = {
            let mut st = tx
                .prepare(
                    "SELECT id, ts, model, input, cache_read, cache_write, output, reasoning, \
                     micros, source FROM hyperfunc_llm_calls WHERE ts >= ?1",
                )
                .map_err(&err)?;
            let v = st
                .query_map([since], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        usage_at(r, 3)?,
                        r.get(8)?,
                        r.get(9)?,
                    ))
                })
                .map_err(&err)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(&err)?;
            v
        };
        let (mut n, mut before, mut after) = (0u64, 0i64, 0i64);
        let mut min_day = i64::MAX;
        for (id, ts, model, usage, old, source) in rows {
            let Some(new) = table.cost(&model, ts.floor() as i64, &usage) else {
                continue;
            };
            let new = if source == "cache" { 0 } else { new };
            n += 1;
            before += old;
            after += new;
            if new != old {
                min_day = min_day.min(ts.div_euclid(86_400.0) as i64);
                tx.execute(
                    "UPDATE hyperfunc_llm_calls SET micros = ?1 WHERE id = ?2",
                    params![new, id],
                )
                .map_err(&err)?;
                tx.execute(
                    "UPDATE hyperfunc_cost SET micros = ?1 WHERE id = ?2",
                    params![new, id],
                )
                .map_err(&err)?;
            }
        }
        if min_day != i64::MAX {
            tx.execute(
                "DELETE FROM hyperfunc_cost_rollup WHERE day >= ?1",
                [min_day],
            )
            .map_err(&err)?;
            tx.execute(
                "INSERT INTO hyperfunc_cost_rollup \
                 SELECT day, caller, endpoint, model, label, run, user, COUNT(*), SUM(units), \
                 SUM(micros) FROM hyperfunc_cost WHERE day >= ?1 \
                 GROUP BY day, caller, endpoint, model, label, run, user",
                [min_day],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        Ok((n, before, after))
    }

    /// Stored LLM calls from Unix second `since` on, oldest first.
    pub fn llm_calls(&self, since: Option<i64>) -> Result<Vec<LlmCall>> {
        let conn = self.reader()?;
        let mut st = conn
            .prepare_cached(
                "SELECT id, ts, caller, endpoint, model, label, run, user, system, prompt, \
                 prompt_hash, response, input, cache_read, cache_write, output, reasoning, \
                 micros, latency_ms, source, ok, error, quality FROM hyperfunc_llm_calls \
                 WHERE ts >= ?1 ORDER BY ts, id",
            )
            .map_err(self.err())?;
        let calls = st
            .query_map([since.unwrap_or(i64::MIN)], |r| {
                Ok(LlmCall {
                    id: r.get(0)?,
                    ts: r.get(1)?,
                    who: Attribution {
                        caller: r.get(2)?,
                        label: r.get(5)?,
                        run: r.get(6)?,
                        user: r.get(7)?,
                    },
                    endpoint: r.get(3)?,
                    model: r.get(4)?,
                    system: r.get(8)?,
                    prompt: r.get(9)?,
                    prompt_hash: r.get(10)?,
                    response: r.get(11)?,
                    usage: usage_at(r, 12)?,
                    micros: r.get(17)?,
                    latency_ms: r.get(18)?,
                    source: r.get(19)?,
                    ok: r.get::<_, i64>(20)? != 0,
                    error: r.get(21)?,
                    quality: r.get(22)?,
                })
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        Ok(calls)
    }
}

/// The token classes stored in five columns from `first` on (input, cache_read, cache_write,
/// output, reasoning).
fn usage_at(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<TokenUsage> {
    let n = |i: usize| r.get::<_, i64>(first + i).map(|v| v as u64);
    Ok(TokenUsage {
        input: n(0)?,
        cache_read: n(1)?,
        cache_write: n(2)?,
        output: n(3)?,
        reasoning: n(4)?,
    })
}

/// One stored LLM call.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LlmCall {
    /// Its id (also the id of its cost row).
    pub id: i64,
    /// Start, Unix seconds.
    pub ts: f64,
    /// Who made it.
    pub who: Attribution,
    /// The endpoint.
    pub endpoint: String,
    /// The model requested.
    pub model: String,
    /// The system messages, joined.
    pub system: String,
    /// The other messages, joined.
    pub prompt: String,
    /// Hash of model-independent prompt content (system + prompt), to find several models'
    /// answers to the same prompt.
    pub prompt_hash: String,
    /// The answer's text (empty when it failed).
    pub response: String,
    /// Token classes.
    pub usage: TokenUsage,
    /// Micro-dollars.
    pub micros: Micros,
    /// Milliseconds.
    pub latency_ms: f64,
    /// `provider`, `cache` (our response cache) or `cancelled` (dropped by a race).
    pub source: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// The error type, when it failed.
    pub error: Option<String>,
    /// The quality reported through [`Ledger::quality`].
    pub quality: Option<f64>,
}

/// A dimension of a cost report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum CostDim {
    /// The call site.
    Caller,
    /// The paid endpoint.
    Endpoint,
    /// The model (empty for non-LLM endpoints unless given).
    Model,
    /// The tune label or hyperfunction.
    Label,
    /// The optimisation run.
    Run,
    /// The user tag.
    User,
    /// The UTC day.
    Day,
}

impl CostDim {
    /// Every dimension.
    pub const ALL: [CostDim; 7] = [
        CostDim::Caller,
        CostDim::Endpoint,
        CostDim::Model,
        CostDim::Label,
        CostDim::Run,
        CostDim::User,
        CostDim::Day,
    ];

    /// Its name (`caller`, `endpoint`…), also its column in the ledger's tables.
    pub fn name(self) -> &'static str {
        match self {
            CostDim::Caller => "caller",
            CostDim::Endpoint => "endpoint",
            CostDim::Model => "model",
            CostDim::Label => "label",
            CostDim::Run => "run",
            CostDim::User => "user",
            CostDim::Day => "day",
        }
    }

    /// The dimension called `name`.
    pub fn parse(name: &str) -> Result<CostDim> {
        CostDim::ALL
            .into_iter()
            .find(|d| d.name() == name.trim())
            .ok_or_else(|| {
                Error::config(
                    "by",
                    format!(
                        "unknown dimension `{name}`; use one of caller, endpoint, model, label, \
                         run, user, day"
                    ),
                )
            })
    }
}

/// One group of a cost report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostLine {
    /// The group's values, one per dimension (days as `YYYY-MM-DD`).
    pub key: Vec<String>,
    /// Calls.
    pub calls: u64,
    /// Units (tokens for LLM calls, the meter's unit otherwise).
    pub units: f64,
    /// Micro-dollars.
    pub micros: Micros,
}

/// Who spends what where.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostReport {
    /// The dimensions grouped by.
    pub by: Vec<String>,
    /// The first second covered.
    pub since: Option<i64>,
    /// Groups, biggest spend first.
    pub rows: Vec<CostLine>,
    /// Calls in all groups.
    pub total_calls: u64,
    /// Micro-dollars in all groups.
    pub total_micros: Micros,
}

impl CostReport {
    /// A Markdown table with dollars, share and calls per group.
    pub fn to_table(&self) -> String {
        let dims: Vec<&str> = if self.by.is_empty() {
            vec!["all"]
        } else {
            self.by.iter().map(String::as_str).collect()
        };
        let mut s = format!("| {} | calls | USD | share |\n", dims.join(" | "));
        s.push_str(&format!(
            "|{}---:|---:|---:|\n",
            dims.iter().map(|_| "---|").collect::<String>()
        ));
        for r in &self.rows {
            let key = if r.key.is_empty() {
                "all".to_string()
            } else {
                r.key
                    .iter()
                    .map(|k| if k.is_empty() { "-" } else { k.as_str() })
                    .collect::<Vec<_>>()
                    .join(" | ")
            };
            let share = if self.total_micros > 0 {
                100.0 * r.micros as f64 / self.total_micros as f64
            } else {
                0.0
            };
            s.push_str(&format!(
                "| {key} | {} | {:.6} | {share:.1}% |\n",
                r.calls,
                micros_to_usd(r.micros)
            ));
        }
        s.push_str(&format!(
            "\ntotal: {} calls, ${:.6}\n",
            self.total_calls,
            micros_to_usd(self.total_micros)
        ));
        s
    }

    /// Bars (label, dollars) for [`crate::tune::chart`], biggest first, at most `top`.
    pub fn bars(&self, top: usize) -> Vec<(String, f64)> {
        self.rows
            .iter()
            .take(top)
            .map(|r| {
                let k = r
                    .key
                    .iter()
                    .map(|k| if k.is_empty() { "-" } else { k.as_str() })
                    .collect::<Vec<_>>()
                    .join(" / ");
                (
                    if k.is_empty() { "all".into() } else { k },
                    micros_to_usd(r.micros),
                )
            })
            .collect()
    }
}

/// A paid endpoint that is not an LLM (a scraping API, speech to text, a search API): every
/// [`Meter::charge`] records one call's cost against its caller, label, run and user.
#[derive(Clone, Debug)]
pub struct Meter {
    ledger: Ledger,
    endpoint: Arc<str>,
    price: MeterPrice,
}

impl Meter {
    /// A meter for `endpoint` priced by `price`.
    pub fn new(ledger: &Ledger, endpoint: &str, price: MeterPrice) -> Self {
        Self {
            ledger: ledger.clone(),
            endpoint: Arc::from(endpoint),
            price,
        }
    }

    /// Starts the record of one call; the caller is where this is called.
    #[track_caller]
    pub fn charge(&self) -> Charge<'_> {
        Charge {
            meter: self,
            site: Location::caller(),
            caller: None,
            who: Attribution::default(),
            model: String::new(),
            units: None,
            usd: None,
        }
    }
}

/// One metered call being recorded ([`Meter::charge`]).
#[derive(Debug)]
#[must_use = "a charge is recorded by `.record()`"]
pub struct Charge<'a> {
    meter: &'a Meter,
    site: &'static Location<'static>,
    caller: Option<String>,
    who: Attribution,
    model: String,
    units: Option<f64>,
    usd: Option<f64>,
}

impl Charge<'_> {
    /// The tune label or operation.
    pub fn label(mut self, label: &str) -> Self {
        self.who.label = label.into();
        self
    }

    /// The optimisation run.
    pub fn run(mut self, run: &str) -> Self {
        self.who.run = run.into();
        self
    }

    /// The user or customer tag.
    pub fn user(mut self, user: &str) -> Self {
        self.who.user = user.into();
        self
    }

    /// A model or product name within the endpoint.
    pub fn model(mut self, model: &str) -> Self {
        self.model = model.into();
        self
    }

    /// Records `site` as the caller instead of the Rust location (for bindings).
    pub fn call_site(mut self, site: &str) -> Self {
        self.caller = Some(site.into());
        self
    }

    /// Units used (pages, minutes…; required for a per-unit price, default 1).
    pub fn units(mut self, units: f64) -> Self {
        self.units = Some(units);
        self
    }

    /// The price the response reported, dollars (for [`MeterPrice::FromResponse`]).
    pub fn usd(mut self, usd: f64) -> Self {
        self.usd = Some(usd);
        self
    }

    /// Checks and queues the record; returns the micro-dollars charged.
    pub fn record(self) -> Result<Micros> {
        let m = self.meter;
        let what = format!("meter `{}`", m.endpoint);
        let units = self.units.unwrap_or(1.0);
        if !units.is_finite() || units < 0.0 {
            return Err(Error::Price {
                what,
                reason: format!("units must be finite and not negative, got {units}"),
            });
        }
        let micros = match (&m.price, self.usd) {
            (MeterPrice::FromResponse, Some(usd)) => {
                check_usd(&what, usd)?;
                usd_to_micros(usd)
            }
            (MeterPrice::FromResponse, None) => {
                return Err(Error::Price {
                    what,
                    reason: "this meter reads the price from the response: call .usd(dollars)"
                        .into(),
                })
            }
            (_, Some(_)) => {
                return Err(Error::Price {
                    what,
                    reason: "this meter has a fixed price; .usd() is for MeterPrice::FromResponse"
                        .into(),
                })
            }
            (MeterPrice::PerCall(p), None) => *p,
            (MeterPrice::PerUnit { pico_per_unit, .. }, None) => {
                ((units * *pico_per_unit as f64) / 1e6).round() as Micros
            }
        };
        let mut who = self.who;
        who.caller = self
            .caller
            .unwrap_or_else(|| format!("{}:{}", self.site.file(), self.site.line()));
        m.ledger.record_cost(CostRow {
            id: m.ledger.next_id(),
            ts: crate::util::now_s(),
            kind: "meter",
            who,
            endpoint: m.endpoint.to_string(),
            model: self.model,
            units,
            micros,
            estimated: false,
        })?;
        Ok(micros)
    }
}

/// `SELECT dims, calls, units, micros FROM table WHERE time >= ?1 GROUP BY dims`, biggest
/// spend first.
fn group_sql(by: &[CostDim], calls: &str, table: &str, time: &str) -> String {
    // A dimension's name is its column in both the rollups and the per-call rows.
    let cols: Vec<&str> = by.iter().map(|d| d.name()).collect();
    let (select, group) = if cols.is_empty() {
        ("''".to_string(), String::new())
    } else {
        (cols.join(", "), format!("GROUP BY {}", cols.join(", ")))
    };
    format!(
        "SELECT {select}, {calls}, SUM(units), SUM(micros) FROM {table} WHERE {time} >= ?1 \
         {group} ORDER BY {} DESC",
        by.len().max(1) + 3
    )
}

fn write_loop(conn: &Mutex<Connection>, path: &str, rx: &mpsc::Receiver<Msg>) {
    let mut last_error: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut flushes = Vec::new();
        let mut work = Vec::with_capacity(batch.len());
        for m in batch {
            match m {
                Msg::Flush(tx) => flushes.push(tx),
                other => work.push(other),
            }
        }
        if !work.is_empty() {
            let mut c = lock(conn);
            if let Err(e) = write_batch(&mut c, &work) {
                last_error = Some(format!("writing {} records failed: {e}", work.len()));
                tracing::warn!(path, error = %e, "ledger write failed");
            }
        }
        for f in flushes {
            let _ = f.send(match last_error.take() {
                Some(e) => Err(e),
                None => Ok(()),
            });
        }
    }
}

fn write_batch(conn: &mut Connection, work: &[Msg]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut cost = tx.prepare_cached(
            "INSERT OR REPLACE INTO hyperfunc_cost (id, ts, day, kind, caller, endpoint, model, \
             label, run, user, units, micros, estimated) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?;
        let mut rollup = tx.prepare_cached(
            "INSERT INTO hyperfunc_cost_rollup VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8, ?9) \
             ON CONFLICT DO UPDATE SET calls = calls + 1, units = units + excluded.units, \
             micros = micros + excluded.micros",
        )?;
        let mut llm = tx.prepare_cached(
            "INSERT OR REPLACE INTO hyperfunc_llm_calls (id, ts, caller, endpoint, model, label, \
             run, user, system, prompt, prompt_hash, response, options, input, cache_read, \
             cache_write, output, reasoning, micros, latency_ms, source, ok, error) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
             ?19, ?20, ?21, ?22, ?23)",
        )?;
        let mut frag = tx.prepare_cached(
            "INSERT INTO hyperfunc_fragments (hash, name, text, tokens, stable, declared) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO UPDATE SET \
             declared = MAX(declared, excluded.declared)",
        )?;
        let mut call_frag = tx.prepare_cached(
            "INSERT OR REPLACE INTO hyperfunc_call_fragments (call, pos, role, hash, name) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut obs = tx.prepare_cached(
            "INSERT INTO hyperfunc_observations (ts, name, caller, model, label, ok, attributes) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut put_cost = |c: &CostRow| -> rusqlite::Result<()> {
            let day = c.ts.div_euclid(86_400.0) as i64;
            cost.execute(params![
                c.id,
                c.ts,
                day,
                c.kind,
                c.who.caller,
                c.endpoint,
                c.model,
                c.who.label,
                c.who.run,
                c.who.user,
                c.units,
                c.micros,
                c.estimated
            ])?;
            rollup.execute(params![
                day,
                c.who.caller,
                c.endpoint,
                c.model,
                c.who.label,
                c.who.run,
                c.who.user,
                c.units,
                c.micros
            ])?;
            Ok(())
        };
        let mut put_fragment = |f: &Fragment, declared: bool| -> rusqlite::Result<()> {
            frag.execute(params![
                f.hash(),
                f.name(),
                f.text(),
                f.tokens_estimate() as i64,
                f.is_stable(),
                declared
            ])?;
            Ok(())
        };
        for m in work {
            match m {
                Msg::Cost(c) => put_cost(c)?,
                Msg::Llm(r) => {
                    put_cost(&r.cost)?;
                    let c = &r.cost;
                    let hash =
                        crate::util::fnv1a_hex(format!("{}\u{0}{}", r.system, r.prompt).as_bytes());
                    let u = &r.usage;
                    llm.execute(params![
                        c.id,
                        c.ts,
                        c.who.caller,
                        c.endpoint,
                        c.model,
                        c.who.label,
                        c.who.run,
                        c.who.user,
                        r.system,
                        r.prompt,
                        hash,
                        r.response,
                        r.options,
                        u.input as i64,
                        u.cache_read as i64,
                        u.cache_write as i64,
                        u.output as i64,
                        u.reasoning as i64,
                        c.micros,
                        r.latency_ms,
                        r.source,
                        r.error.is_none(),
                        r.error
                    ])?;
                    for (pos, (role, f)) in r.fragments.iter().enumerate() {
                        put_fragment(f, false)?;
                        call_frag.execute(params![c.id, pos as i64, role, f.hash(), f.name()])?;
                    }
                }
                Msg::Declare(fs) => {
                    for f in fs {
                        put_fragment(f, true)?;
                    }
                }
                Msg::Observation(o) => {
                    obs.execute(params![
                        o.ts,
                        o.name,
                        o.caller,
                        o.model,
                        o.label,
                        o.ok,
                        o.attributes
                    ])?;
                }
                Msg::Flush(_) => {}
            }
        }
    }
    tx.commit()
}
