//! The SQLite trace store: records of a hub persisted under a run name, and the report that
//! `hyperfunc report` prints (latency percentiles and error rates per function, per call site and
//! per model).

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection};
use serde::Serialize;

use super::{Hub, Status};
use crate::error::{Error, Result};

/// A SQLite file of trace records.
///
/// # Examples
/// ```
/// use hyperfunc::observe::{Hub, TraceStore};
/// let hub = Hub::new();
/// drop(hub.observe("parse"));
/// let store = TraceStore::open_in_memory()?;
/// assert_eq!(store.save("run-1", &hub)?, 1);
/// let report = store.report(Some("run-1"))?;
/// assert_eq!(report.functions[0].calls, 1);
/// # Ok::<(), hyperfunc::Error>(())
/// ```
pub struct TraceStore {
    conn: Connection,
    path: String,
}

/// Latency and errors of one group (a function, a call site or a model).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GroupStats {
    /// The function name, call site or model.
    pub key: String,
    /// Calls.
    pub calls: u64,
    /// Failed calls.
    pub errors: u64,
    /// `errors / calls`.
    pub error_rate: f64,
    /// Total latency, ms.
    pub total_ms: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Sum of the records' `cost` attributes (USD), when they carry one.
    pub cost: f64,
}

/// What `hyperfunc report` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TraceReport {
    /// Runs covered.
    pub runs: Vec<String>,
    /// Per function (calls and observations).
    pub functions: Vec<GroupStats>,
    /// Per call site.
    pub call_sites: Vec<GroupStats>,
    /// Per model (`gen_ai.request.model` or `model` attribute), for records that name one.
    pub models: Vec<GroupStats>,
}

impl TraceReport {
    /// Markdown tables.
    pub fn to_markdown(&self) -> String {
        let mut s = format!("runs: {}\n", self.runs.join(", "));
        for (title, rows) in [
            ("function", &self.functions),
            ("call site", &self.call_sites),
            ("model", &self.models),
        ] {
            if rows.is_empty() {
                continue;
            }
            s.push_str(&format!(
                "\n| {title} | calls | errors | error rate | total ms | p50 ms | p95 ms | p99 ms | cost |\n\
                 | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
            ));
            for g in rows {
                s.push_str(&format!(
                    "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.4} |\n",
                    g.key,
                    g.calls,
                    g.errors,
                    g.error_rate,
                    g.total_ms,
                    g.p50_ms,
                    g.p95_ms,
                    g.p99_ms,
                    g.cost
                ));
            }
        }
        s
    }
}

fn db_err(path: &str) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| Error::File {
        path: path.to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS records (
    run TEXT NOT NULL, id INTEGER NOT NULL, parent INTEGER, name TEXT NOT NULL, kind TEXT NOT NULL,
    generation INTEGER, cand_start INTEGER, cand_end INTEGER, ex_start INTEGER, ex_end INTEGER,
    start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL, status TEXT NOT NULL, error_type TEXT,
    error_message TEXT, call_site TEXT, attributes TEXT NOT NULL,
    PRIMARY KEY (run, id));";

impl TraceStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().display().to_string();
        let conn = Connection::open(&path).map_err(db_err(&path))?;
        Self::init(conn, path)
    }

    /// A store in memory (tests, notebooks).
    pub fn open_in_memory() -> Result<Self> {
        let conn = Connection::open_in_memory().map_err(db_err(":memory:"))?;
        Self::init(conn, ":memory:".into())
    }

    fn init(conn: Connection, path: String) -> Result<Self> {
        conn.execute_batch(SCHEMA).map_err(db_err(&path))?;
        Ok(Self { conn, path })
    }

    /// Saves the hub's kept records under `run` (replacing records of the same run and id);
    /// returns how many were written. One transaction: all or nothing.
    pub fn save(&self, run: &str, hub: &Hub) -> Result<usize> {
        let err = db_err(&self.path);
        let records = hub.records();
        let tx = self.conn.unchecked_transaction().map_err(&err)?;
        {
            let mut stmt = tx
                .prepare(
                    "INSERT OR REPLACE INTO records VALUES
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
                )
                .map_err(&err)?;
            for r in &records {
                let kind = serde_json::to_value(r.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from));
                let attrs = serde_json::to_string(&r.attributes).unwrap_or_else(|_| "[]".into());
                let i64_of = |v: Option<usize>| v.map(|v| v as i64);
                stmt.execute(params![
                    run,
                    r.id as i64,
                    r.parent.map(|p| p as i64),
                    &*r.name,
                    kind.unwrap_or_default(),
                    i64_of(r.generation),
                    i64_of(r.candidates.map(|c| c.0)),
                    i64_of(r.candidates.map(|c| c.1)),
                    i64_of(r.examples.map(|c| c.0)),
                    i64_of(r.examples.map(|c| c.1)),
                    r.start_unix_ns as i64,
                    r.end_unix_ns as i64,
                    if r.status == Status::Ok {
                        "ok"
                    } else {
                        "error"
                    },
                    r.error_type,
                    r.error_message,
                    r.call_site,
                    attrs,
                ])
                .map_err(&err)?;
            }
        }
        tx.commit().map_err(&err)?;
        Ok(records.len())
    }

    /// Run names in the store, oldest first.
    pub fn runs(&self) -> Result<Vec<String>> {
        let err = db_err(&self.path);
        let mut stmt = self
            .conn
            .prepare("SELECT run FROM records GROUP BY run ORDER BY MIN(start_ns)")
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(&err)?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(&err)
    }

    /// Aggregates over one run (or all runs) of the call and observation records.
    pub fn report(&self, run: Option<&str>) -> Result<TraceReport> {
        let err = db_err(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT name, call_site, status, end_ns - start_ns, attributes FROM records
                 WHERE kind IN ('tensor', 'io', 'observe') AND (?1 IS NULL OR run = ?1)",
            )
            .map_err(&err)?;
        type Row = (String, Option<String>, String, i64, String);
        let rows = stmt
            .query_map(params![run], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .map_err(&err)?
            .collect::<std::result::Result<Vec<Row>, _>>()
            .map_err(&err)?;
        let mut by_fn: BTreeMap<String, Acc> = BTreeMap::new();
        let mut by_site: BTreeMap<String, Acc> = BTreeMap::new();
        let mut by_model: BTreeMap<String, Acc> = BTreeMap::new();
        for (name, site, status, dur, attrs) in rows {
            let attrs: Vec<(String, serde_json::Value)> =
                serde_json::from_str(&attrs).unwrap_or_default();
            let get = |k: &str| attrs.iter().find(|(a, _)| a == k).map(|(_, v)| v);
            let cost = get("cost")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(0.0);
            let failed = status == "error";
            by_fn.entry(name).or_default().add(dur, failed, cost);
            by_site
                .entry(site.unwrap_or_default())
                .or_default()
                .add(dur, failed, cost);
            if let Some(m) = get("gen_ai.request.model")
                .or_else(|| get("model"))
                .and_then(|v| v.as_str())
            {
                by_model
                    .entry(m.to_string())
                    .or_default()
                    .add(dur, failed, cost);
            }
        }
        let runs = match run {
            Some(r) => vec![r.to_string()],
            None => self.runs()?,
        };
        Ok(TraceReport {
            runs,
            functions: finish(by_fn),
            call_sites: finish(by_site),
            models: finish(by_model),
        })
    }
}

#[derive(Default)]
struct Acc {
    durations: Vec<i64>,
    errors: u64,
    cost: f64,
}

impl Acc {
    fn add(&mut self, dur_ns: i64, failed: bool, cost: f64) {
        self.durations.push(dur_ns.max(0));
        self.errors += u64::from(failed);
        self.cost += cost;
    }
}

fn finish(groups: BTreeMap<String, Acc>) -> Vec<GroupStats> {
    groups
        .into_iter()
        .map(|(key, mut a)| {
            a.durations.sort_unstable();
            let n = a.durations.len();
            let pct = |q: f64| {
                if n == 0 {
                    0.0
                } else {
                    a.durations[((n - 1) as f64 * q).round() as usize] as f64 / 1e6
                }
            };
            GroupStats {
                key,
                calls: n as u64,
                errors: a.errors,
                error_rate: if n == 0 {
                    0.0
                } else {
                    a.errors as f64 / n as f64
                },
                total_ms: a.durations.iter().sum::<i64>() as f64 / 1e6,
                p50_ms: pct(0.5),
                p95_ms: pct(0.95),
                p99_ms: pct(0.99),
                cost: a.cost,
            }
        })
        .collect()
}
