//! Runs: a persistent run store, resume after a crash, and live control of a running
//! optimisation.
//!
//! A [`RunStore`] is a directory: `runs.sqlite` (WAL) holds every run's starting
//! configuration, seed, version and machine fingerprint, one row of statistics per generation,
//! an append-only event log and the control commands; `run-<id>/` holds its checkpoints (θ and
//! the optimiser's moments as safetensors, written atomically). Noise is never stored: it is
//! regenerated from the seed.
//!
//! Give [`Es::store`](crate::Es::store) a store and every `optimize` is a run; give it
//! [`Es::run`](crate::Es::run) with an id and it resumes that run from its last checkpoint —
//! after a `kill -9` at any moment the resumed trajectory is bit-identical to an uninterrupted
//! one (CPU, same seed and threads).
//!
//! A running optimisation takes commands from a [`Control`] (Rust, Python, the CLI
//! `hyperfunc runs set RUN lr=0.05`, or a `control.json` dropped into `run-<id>/`): set a live
//! setting ([`schema::SETTINGS`]), clear it, pause, resume, stop at the boundary, stop now,
//! snapshot — each checked when written (the writer gets the error at once) and again when
//! applied, all-or-nothing, at the next generation boundary (or at `at_gen`), and logged:
//! `gen 37: lr 0.1 → 0.05 (cmd 7 from cli)`. The effective configuration at any generation is
//! the fold of the log, and [`Es::replay`](crate::Es::replay) reproduces θ bit for bit.
//!
//! # Examples
//! ```
//! use hyperfunc::prelude::*;
//! use hyperfunc::runs::RunStore;
//! use candle_core::{Device, Tensor};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let dir = std::env::temp_dir().join(format!("hf-doc-runs-{}", std::process::id()));
//! let store = RunStore::open(&dir)?;
//! let net = Chain::new(vec![HyperFn::linear("f", 1, 1, Activation::Identity)]);
//! let x = Tensor::new(&[[0f32], [1.], [2.]], &Device::Cpu)?;
//! let data = Examples::tensors(x.clone(), (x * 2.0)?)?;
//! let es = Es::default().pop_size(16).generations(20).minimize().progress(false)
//!     .store(store.clone());
//! let run = store.create("doubling", &es)?;
//! // A command written before (or while) the run goes: applied at generation 10.
//! store.control(run).at_gen(10).set("lr", 0.02)?;
//! let report = es.run(run).optimize(&net, &data, &metric::mse()).await?;
//! assert_eq!(report.run, Some(run));
//! assert_eq!(store.generations(run)?.len(), 20);
//! assert_eq!(store.effective_config(run, 15)?.lr, 0.02);
//! assert!(store.events(run)?.iter().any(|e| e.message.contains("lr 0.05 → 0.02")));
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

#[cfg(feature = "llm")]
pub mod ask;
pub mod bench;
pub(crate) mod checkpoint;
mod experiment;
mod record;
pub mod schema;
pub mod task;

#[cfg(feature = "plot")]
pub mod chart;

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use serde_json::{Map, Value};

pub use experiment::{Comparison, DatasetVersion, Evaluation};
pub(crate) use record::{run_spending, Flow, Recorder, Restored};
pub use schema::RunConfig;

use crate::error::{Error, Result};
use crate::es::Es;
use crate::theta::Theta;
use crate::util::now_s;

/// The id of a run in its store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RunId(pub i64);

impl std::fmt::Display for RunId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for RunId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        s.trim()
            .parse()
            .map(RunId)
            .map_err(|_| Error::config("run", format!("`{s}` is not a run id (a number)")))
    }
}

/// When checkpoints are written and which are kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Checkpoints {
    /// Every this many generations; `None` (the default): adaptively, so that writing
    /// checkpoints costs at most 2% of the run's time — every generation once a generation
    /// takes 50 times what a checkpoint does. A final checkpoint is always written.
    pub every: Option<usize>,
    /// Periodic checkpoints kept (the newest); at least 1.
    pub keep_last: usize,
    /// Also keep the checkpoint whose generation had the best mean fitness.
    pub keep_best: bool,
}

impl Default for Checkpoints {
    fn default() -> Self {
        Self {
            every: None,
            keep_last: 3,
            keep_best: true,
        }
    }
}

/// One run as the store lists it.
#[derive(Clone, Debug, Serialize)]
pub struct RunInfo {
    /// Its id.
    pub id: RunId,
    /// Its name.
    pub name: String,
    /// The built-in task it trains (what `hyperfunc runs replay` rebuilds), if any.
    pub task: Option<String>,
    /// `created`, `running`, `paused`, `finished`, `stopped` or `failed`.
    pub status: String,
    /// Why it stopped.
    pub stop: Option<String>,
    /// Generations completed.
    pub generation: usize,
    /// Best fitness so far.
    pub best: Option<f64>,
    /// The configuration it started with.
    pub config: RunConfig,
    /// hyperfunc's version that created it.
    pub version: String,
    /// The machine that created it (see `hyperfunc autotune`).
    pub fingerprint: String,
    /// Created, Unix seconds.
    pub created_at: f64,
    /// Last written, Unix seconds (a `running` run that stopped writing has crashed).
    pub updated_at: f64,
}

/// One generation's statistics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GenRow {
    /// Generation index.
    pub gen: usize,
    /// Best candidate fitness (NaN when every candidate failed).
    pub best: f64,
    /// Mean finite fitness.
    pub mean: f64,
    /// Standard deviation of the finite fitness values.
    pub std: f64,
    /// σ used.
    pub sigma: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Population size.
    pub pop_size: usize,
    /// Candidate evaluations so far, this generation included.
    pub evals: u64,
    /// Failed candidates.
    pub failed: usize,
    /// Evaluations per second in this generation.
    pub evals_per_sec: f64,
    /// Wall seconds since the run started (across resumes).
    pub seconds: f64,
    /// LLM tokens (prompt + completion) spent so far, this generation included, by the clients
    /// given to [`Es::llm_client`](crate::Es::llm_client) (across resumes); `None` without one.
    #[serde(default)]
    pub tokens: Option<u64>,
    /// Dollars spent so far by those clients (at their configured prices); `None` without one.
    #[serde(default)]
    pub usd: Option<f64>,
}

/// One entry of a run's event log.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// Its id (increasing).
    pub id: i64,
    /// The generation boundary it happened at.
    pub gen: Option<usize>,
    /// Unix seconds.
    pub at: f64,
    /// `start`, `resume`, `command`, `rejected`, `pause`, `checkpoint`, `alert`, `finish`…
    pub kind: String,
    /// What happened, in words.
    pub message: String,
}

/// What a command asks.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Action {
    /// Set live settings (all or nothing).
    Set(Map<String, Value>),
    /// Clear live values: back to the run's configuration (and its schedule).
    Clear(Vec<String>),
    /// Pause at the next boundary.
    Pause,
    /// Go on after a pause.
    Resume,
    /// Stop at the next boundary.
    Stop,
    /// Stop now: cancel the generation in flight (still writes the final checkpoint).
    StopNow,
    /// Write a checkpoint that retention never removes.
    Snapshot,
}

impl Action {
    /// Folds this command into live values (`Set` adds, `Clear` removes, others leave them);
    /// whether it touched them.
    pub(crate) fn apply_live(&self, live: &mut Map<String, Value>) -> bool {
        match self {
            Action::Set(m) => live.extend(m.clone()),
            Action::Clear(keys) => keys.iter().for_each(|k| {
                live.remove(k);
            }),
            _ => return false,
        }
        true
    }

    /// The command as a control file writes it: `{"action": "set", "values": {"lr": 0.05}}`,
    /// `{"action": "clear", "names": ["lr"]}`, `{"action": "pause"}`… (what
    /// [`Control::send_json`] reads).
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({ "action": self.name() });
        match self {
            Action::Set(m) => v["values"] = Value::Object(m.clone()),
            Action::Clear(k) => v["names"] = serde_json::json!(k),
            _ => {}
        }
        v
    }

    fn name(&self) -> &'static str {
        match self {
            Action::Set(_) => "set",
            Action::Clear(_) => "clear",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Stop => "stop",
            Action::StopNow => "stop_now",
            Action::Snapshot => "snapshot",
        }
    }

    fn payload(&self) -> Option<String> {
        match self {
            Action::Set(m) => Some(Value::Object(m.clone()).to_string()),
            Action::Clear(k) => Some(serde_json::json!(k).to_string()),
            _ => None,
        }
    }

    fn from_row(action: &str, payload: Option<&str>) -> std::result::Result<Action, String> {
        let json = || -> std::result::Result<Value, String> {
            serde_json::from_str(payload.unwrap_or("null")).map_err(|e| e.to_string())
        };
        Ok(match action {
            "set" => match json()? {
                Value::Object(m) => Action::Set(m),
                v => return Err(format!("set expects an object of settings, got {v}")),
            },
            "clear" => match json()? {
                Value::Array(a) => Action::Clear(
                    a.iter()
                        .map(|v| v.as_str().map(str::to_string).ok_or("clear expects names"))
                        .collect::<std::result::Result<_, _>>()?,
                ),
                v => return Err(format!("clear expects a list of names, got {v}")),
            },
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            "stop" => Action::Stop,
            "stop_now" => Action::StopNow,
            "snapshot" => Action::Snapshot,
            other => {
                return Err(format!(
                    "unknown action `{other}`; one of set, clear, pause, resume, stop, stop_now, snapshot"
                ))
            }
        })
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Set(m) => {
                let kv: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "set {}", kv.join(" "))
            }
            Action::Clear(k) => write!(f, "clear {}", k.join(" ")),
            Action::StopNow => f.write_str("stop --now"),
            a => f.write_str(a.name()),
        }
    }
}

/// One stored command.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Command {
    /// Its id (the order of application).
    pub id: i64,
    /// Who wrote it: `rust`, `python`, `cli`, `file`, `web`…
    pub source: String,
    /// What it asks.
    pub action: Action,
    /// The generation it waits for, if scheduled.
    pub at_gen: Option<usize>,
    /// `pending`, `applied` or `rejected`.
    pub status: String,
    /// The generation boundary it was applied (or rejected) at.
    pub applied_gen: Option<usize>,
    /// Why it was rejected.
    pub reason: Option<String>,
}

/// One checkpoint of a run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckpointInfo {
    /// Generations completed when it was written.
    pub gen: usize,
    /// Its file.
    pub file: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Mean fitness of its last generation.
    pub score: Option<f64>,
    /// `auto`, `snapshot` or `final`.
    pub kind: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs(
  id INTEGER PRIMARY KEY, name TEXT NOT NULL, task TEXT, created_at REAL NOT NULL,
  updated_at REAL NOT NULL, config TEXT NOT NULL, seed INTEGER NOT NULL, version TEXT NOT NULL,
  fingerprint TEXT NOT NULL, status TEXT NOT NULL, stop TEXT,
  generation INTEGER NOT NULL DEFAULT 0, best REAL);
CREATE TABLE IF NOT EXISTS generations(
  run INTEGER NOT NULL, gen INTEGER NOT NULL, best REAL, mean REAL, std REAL,
  sigma REAL NOT NULL, lr REAL NOT NULL, pop_size INTEGER NOT NULL, evals INTEGER NOT NULL,
  failed INTEGER NOT NULL, evals_per_sec REAL, seconds REAL NOT NULL, tokens INTEGER, usd REAL,
  PRIMARY KEY(run, gen)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events(
  id INTEGER PRIMARY KEY, run INTEGER NOT NULL, gen INTEGER, at REAL NOT NULL,
  kind TEXT NOT NULL, message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_run ON events(run, id);
CREATE TABLE IF NOT EXISTS commands(
  id INTEGER PRIMARY KEY, run INTEGER NOT NULL, created_at REAL NOT NULL, source TEXT NOT NULL,
  action TEXT NOT NULL, patch TEXT, at_gen INTEGER, status TEXT NOT NULL DEFAULT 'pending',
  applied_gen INTEGER, reason TEXT);
CREATE INDEX IF NOT EXISTS commands_run ON commands(run, status);
CREATE TABLE IF NOT EXISTS checkpoints(
  run INTEGER NOT NULL, gen INTEGER NOT NULL, file TEXT NOT NULL, bytes INTEGER NOT NULL,
  score REAL, kind TEXT NOT NULL, best_file TEXT, created_at REAL NOT NULL,
  PRIMARY KEY(run, gen));
CREATE TABLE IF NOT EXISTS datasets(
  name TEXT NOT NULL, version INTEGER NOT NULL, hash TEXT NOT NULL, items INTEGER NOT NULL,
  body TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY(name, version));
CREATE TABLE IF NOT EXISTS evaluations(
  run INTEGER NOT NULL, dataset TEXT NOT NULL, version INTEGER NOT NULL, hash TEXT NOT NULL,
  split TEXT NOT NULL, metric TEXT NOT NULL, n INTEGER NOT NULL, mean REAL NOT NULL,
  scores TEXT NOT NULL, created_at REAL NOT NULL,
  PRIMARY KEY(run, dataset, version, split, metric));
CREATE TABLE IF NOT EXISTS answers(
  id INTEGER PRIMARY KEY, question TEXT NOT NULL, model TEXT NOT NULL, source TEXT NOT NULL,
  answer TEXT NOT NULL, proposal TEXT, tool_calls TEXT NOT NULL, input_tokens INTEGER NOT NULL,
  output_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL, estimate_usd REAL, created_at REAL NOT NULL);
";

/// A directory of runs: `runs.sqlite` and one `run-<id>/` folder of checkpoints per run.
/// Cheap to clone; every clone opens its own connection per operation.
#[derive(Clone, Debug)]
pub struct RunStore {
    dir: PathBuf,
    db: PathBuf,
}

impl RunStore {
    /// Opens (creating it if needed) the store in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|source| Error::File {
            path: dir.display().to_string(),
            source,
        })?;
        let store = Self {
            db: dir.join("runs.sqlite"),
            dir,
        };
        let conn = store.conn()?;
        // Stores written before generation rows had LLM usage gain the two columns.
        let has_usage = conn
            .prepare("SELECT 1 FROM pragma_table_info('generations') WHERE name = 'usd'")
            .and_then(|mut st| st.exists([]))
            .map_err(|e| store.err(e))?;
        if !has_usage {
            conn.execute_batch(
                "ALTER TABLE generations ADD COLUMN tokens INTEGER; ALTER TABLE generations ADD COLUMN usd REAL;",
            )
            .map_err(|e| store.err(e))?;
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder of one run's checkpoints and control file.
    pub fn run_dir(&self, run: RunId) -> PathBuf {
        self.dir.join(format!("run-{}", run.0))
    }

    pub(crate) fn conn(&self) -> Result<Connection> {
        let path = self.db.display().to_string();
        crate::tune::store::open_shared(&path, SCHEMA).map_err(|e| match e {
            Error::TuneStore { path, reason } => Error::RunStore { path, reason },
            e => e,
        })
    }

    pub(crate) fn err(&self, e: rusqlite::Error) -> Error {
        Error::RunStore {
            path: self.db.display().to_string(),
            reason: e.to_string(),
        }
    }

    /// The rows of `sql` with `params`, each mapped by `map`.
    pub(crate) fn rows<T>(
        &self,
        conn: &Connection,
        sql: &str,
        params: impl rusqlite::Params,
        map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        let mut st = conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params, map)
            .and_then(|r| r.collect())
            .map_err(|e| self.err(e));
        rows
    }

    /// Creates a run of `es`'s configuration named `name`; it starts when `optimize` is given
    /// its id with [`Es::run`](crate::Es::run).
    pub fn create(&self, name: &str, es: &Es) -> Result<RunId> {
        self.create_task(name, None, es)
    }

    /// Like [`RunStore::create`], recording the built-in task it trains.
    pub fn create_task(&self, name: &str, task: Option<&str>, es: &Es) -> Result<RunId> {
        es.validate()?;
        let config = es.run_config();
        let json = serde_json::to_string(&config).map_err(|e| Error::RunStore {
            path: self.db.display().to_string(),
            reason: e.to_string(),
        })?;
        let conn = self.conn()?;
        let now = now_s();
        conn.execute(
            "INSERT INTO runs(name, task, created_at, updated_at, config, seed, version, fingerprint, status)
             VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7, 'created')",
            params![
                name,
                task,
                now,
                json,
                config.seed as i64,
                env!("CARGO_PKG_VERSION"),
                crate::autotune::machine_fingerprint()
            ],
        )
        .map_err(|e| self.err(e))?;
        let id = RunId(conn.last_insert_rowid());
        std::fs::create_dir_all(self.run_dir(id)).map_err(|source| Error::File {
            path: self.run_dir(id).display().to_string(),
            source,
        })?;
        Ok(id)
    }

    fn row_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<(RunInfo, String)> {
        let config: String = r.get(5)?;
        Ok((
            RunInfo {
                id: RunId(r.get(0)?),
                name: r.get(1)?,
                task: r.get(2)?,
                created_at: r.get(3)?,
                updated_at: r.get(4)?,
                config: serde_json::from_str(&config).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        5,
                        rusqlite::types::Type::Text,
                        e.into(),
                    )
                })?,
                version: r.get(6)?,
                fingerprint: r.get(7)?,
                status: r.get(8)?,
                stop: r.get(9)?,
                generation: r.get::<_, i64>(10)? as usize,
                best: r.get(11)?,
            },
            config,
        ))
    }

    const INFO: &'static str = "SELECT id, name, task, created_at, updated_at, config, version, fingerprint, status, stop, generation, best FROM runs";

    /// Every run, newest first.
    pub fn list(&self) -> Result<Vec<RunInfo>> {
        let conn = self.conn()?;
        let rows = self.rows(
            &conn,
            &format!("{} ORDER BY id DESC", Self::INFO),
            [],
            |r| Self::row_info(r).map(|(i, _)| i),
        )?;
        Ok(rows)
    }

    /// One run.
    pub fn info(&self, run: RunId) -> Result<RunInfo> {
        self.info_with(&self.conn()?, run)
    }

    pub(crate) fn info_with(&self, conn: &Connection, run: RunId) -> Result<RunInfo> {
        let found = conn
            .query_row(
                &format!("{} WHERE id = ?1", Self::INFO),
                [run.0],
                Self::row_info,
            )
            .optional()
            .map_err(|e| self.err(e))?;
        match found {
            Some((info, _)) => Ok(info),
            None => {
                let ids: Vec<i64> = conn
                    .prepare("SELECT id FROM runs ORDER BY id")
                    .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                    .map_err(|e| self.err(e))?;
                Err(Error::RunNotFound {
                    run: run.0,
                    known: match ids.len() {
                        0 => "no runs".into(),
                        n if n <= 10 => format!("runs {ids:?}"),
                        n => format!("{n} runs ({} to {})", ids[0], ids[n - 1]),
                    },
                })
            }
        }
    }

    /// Every generation row of a run, in order.
    pub fn generations(&self, run: RunId) -> Result<Vec<GenRow>> {
        self.generations_from(run, 0)
    }

    /// The generation rows of a run from generation `from` on, in order (what a live view
    /// polls for).
    pub fn generations_from(&self, run: RunId, from: usize) -> Result<Vec<GenRow>> {
        self.generations_thinned(run, from, usize::MAX)
    }

    /// At most `max_rows` (+ 1) of the generation rows from `from` on, evenly spaced, the last
    /// one always included: a curve's worth of a long run.
    pub fn generations_thinned(
        &self,
        run: RunId,
        from: usize,
        max_rows: usize,
    ) -> Result<Vec<GenRow>> {
        let conn = self.conn()?;
        self.info_with(&conn, run)?;
        // Every row (`generations`, `generations_from`): no need to count them first.
        let (step, last) = if max_rows == usize::MAX {
            (1, None)
        } else {
            let (n, last): (i64, Option<i64>) = conn
                .query_row(
                    "SELECT COUNT(*), MAX(gen) FROM generations WHERE run = ?1 AND gen >= ?2",
                    [run.0, from as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(|e| self.err(e))?;
            ((n as usize).div_ceil(max_rows.max(1)).max(1) as i64, last)
        };
        let rows = self.rows(&conn, "SELECT gen, best, mean, std, sigma, lr, pop_size, evals, failed, evals_per_sec, seconds, tokens, usd
                 FROM generations WHERE run = ?1 AND gen >= ?2 AND ((gen - ?2) % ?3 = 0 OR gen = ?4) AND (?4 < 0 OR gen <= ?4)
                 ORDER BY gen", [run.0, from as i64, step, last.unwrap_or(-1)], |r| {
                let f = |i| r.get::<_, Option<f64>>(i).map(|v| v.unwrap_or(f64::NAN));
                Ok(GenRow {
                    gen: r.get::<_, i64>(0)? as usize,
                    best: f(1)?,
                    mean: f(2)?,
                    std: f(3)?,
                    sigma: r.get(4)?,
                    lr: r.get(5)?,
                    pop_size: r.get::<_, i64>(6)? as usize,
                    evals: r.get::<_, i64>(7)? as u64,
                    failed: r.get::<_, i64>(8)? as usize,
                    evals_per_sec: f(9)?,
                    seconds: r.get(10)?,
                    tokens: r.get::<_, Option<i64>>(11)?.map(|t| t as u64),
                    usd: r.get(12)?,
                })
            })?;
        Ok(rows)
    }

    /// A run's event log, oldest first.
    pub fn events(&self, run: RunId) -> Result<Vec<Event>> {
        self.events_after(run, 0)
    }

    /// A run's events whose id is greater than `after`, oldest first.
    pub fn events_after(&self, run: RunId, after: i64) -> Result<Vec<Event>> {
        let conn = self.conn()?;
        self.info_with(&conn, run)?;
        let rows = self.rows(
            &conn,
            "SELECT id, gen, at, kind, message FROM events WHERE run = ?1 AND id > ?2 ORDER BY id",
            [run.0, after],
            |r| {
                Ok(Event {
                    id: r.get(0)?,
                    gen: r.get::<_, Option<i64>>(1)?.map(|g| g as usize),
                    at: r.get(2)?,
                    kind: r.get(3)?,
                    message: r.get(4)?,
                })
            },
        )?;
        Ok(rows)
    }

    /// A run's commands, in the order they were written.
    pub fn commands(&self, run: RunId) -> Result<Vec<Command>> {
        let conn = self.conn()?;
        self.info_with(&conn, run)?;
        self.commands_with(&conn, run, "1 = 1")
    }

    pub(crate) fn commands_with(
        &self,
        conn: &Connection,
        run: RunId,
        filter: &str,
    ) -> Result<Vec<Command>> {
        let rows = self.rows(
            conn,
            &format!(
                "SELECT id, source, action, patch, at_gen, status, applied_gen, reason
                 FROM commands WHERE run = ?1 AND {filter} ORDER BY id"
            ),
            [run.0],
            |r| {
                let action: String = r.get(2)?;
                let patch: Option<String> = r.get(3)?;
                let parsed = Action::from_row(&action, patch.as_deref());
                Ok((
                    Command {
                        id: r.get(0)?,
                        source: r.get(1)?,
                        action: parsed.clone().unwrap_or(Action::Snapshot),
                        at_gen: r.get::<_, Option<i64>>(4)?.map(|g| g as usize),
                        status: r.get(5)?,
                        applied_gen: r.get::<_, Option<i64>>(6)?.map(|g| g as usize),
                        reason: r.get(7)?,
                    },
                    parsed.err(),
                ))
            },
        )?;
        Ok(rows
            .into_iter()
            .map(|(mut c, bad)| {
                if let Some(why) = bad {
                    c.status = "rejected".into();
                    c.reason = Some(why);
                }
                c
            })
            .collect())
    }

    /// A run's checkpoints, oldest first.
    pub fn checkpoints(&self, run: RunId) -> Result<Vec<CheckpointInfo>> {
        let conn = self.conn()?;
        self.info_with(&conn, run)?;
        let dir = self.run_dir(run);
        let rows = self.rows(
            &conn,
            "SELECT gen, file, bytes, score, kind FROM checkpoints WHERE run = ?1 ORDER BY gen",
            [run.0],
            |r| {
                Ok(CheckpointInfo {
                    gen: r.get::<_, i64>(0)? as usize,
                    file: dir.join(r.get::<_, String>(1)?),
                    bytes: r.get::<_, i64>(2)? as u64,
                    score: r.get(3)?,
                    kind: r.get(4)?,
                })
            },
        )?;
        Ok(rows)
    }

    /// θ of the run's latest checkpoint (its final θ once it finished).
    pub fn theta(&self, run: RunId) -> Result<Theta> {
        let last = self
            .checkpoints(run)?
            .pop()
            .ok_or_else(|| Error::RunStore {
                path: self.run_dir(run).display().to_string(),
                reason: format!("run {run} has no checkpoint yet"),
            })?;
        Ok(checkpoint::load(&last.file, &candle_core::Device::Cpu)?.theta)
    }

    /// The live values in force after the commands applied at boundaries `<= gen`.
    pub fn live_values(&self, run: RunId, gen: usize) -> Result<Map<String, Value>> {
        let conn = self.conn()?;
        self.info_with(&conn, run)?;
        self.live_with(&conn, run, gen)
    }

    pub(crate) fn live_with(
        &self,
        conn: &Connection,
        run: RunId,
        gen: usize,
    ) -> Result<Map<String, Value>> {
        let mut applied = self.commands_with(conn, run, "status = 'applied'")?;
        applied.sort_by_key(|c| (c.applied_gen, c.id));
        Ok(fold(
            applied
                .iter()
                .filter(|c| c.applied_gen.is_some_and(|g| g <= gen)),
        ))
    }

    /// The configuration in force at generation `gen`: the starting one with the live values
    /// of every command applied at or before that boundary (a fold of the log).
    pub fn effective_config(&self, run: RunId, gen: usize) -> Result<RunConfig> {
        let conn = self.conn()?;
        let info = self.info_with(&conn, run)?;
        let live = self.live_with(&conn, run, gen)?;
        info.config
            .with_live(&live)
            .map_err(|reason| Error::RunCommand { run: run.0, reason })
    }

    /// A handle that writes commands to a run.
    pub fn control(&self, run: RunId) -> Control {
        Control {
            store: self.clone(),
            run,
            source: "rust".into(),
            at_gen: None,
        }
    }

    /// Settings, commands and curves of two runs side by side.
    pub fn diff(&self, a: RunId, b: RunId) -> Result<RunDiff> {
        let (ia, ib) = (self.info(a)?, self.info(b)?);
        let summary = |rows: &[GenRow]| {
            rows.iter()
                .fold((0usize, f64::NAN, f64::NAN), |(n, best, last), r| {
                    let best = if best.is_nan() || (r.best.is_finite() && better(&ia, r.best, best))
                    {
                        r.best
                    } else {
                        best
                    };
                    (n + 1, best, if r.mean.is_finite() { r.mean } else { last })
                })
        };
        let (ga, gb) = (self.generations(a)?, self.generations(b)?);
        let diverged = ga
            .iter()
            .zip(&gb)
            .find(|(x, y)| {
                x.best.to_bits() != y.best.to_bits() || x.mean.to_bits() != y.mean.to_bits()
            })
            .map(|(x, _)| x.gen);
        let applied = |run| -> Result<Vec<String>> {
            Ok(self
                .events(run)?
                .into_iter()
                .filter(|e| e.kind == "command" || e.kind == "rejected")
                .map(|e| e.message)
                .collect())
        };
        let (sa, sb) = (summary(&ga), summary(&gb));
        Ok(RunDiff {
            a,
            b,
            config: ia
                .config
                .diff(&ib.config)
                .into_iter()
                .map(|(k, x, y)| format!("{k}: {x} → {y}"))
                .collect(),
            commands_a: applied(a)?,
            commands_b: applied(b)?,
            generations: (sa.0, sb.0),
            best: (sa.1, sb.1),
            last_mean: (sa.2, sb.2),
            first_divergence: if ga.len() == gb.len() && diverged.is_none() {
                None
            } else {
                Some(diverged.unwrap_or(ga.len().min(gb.len())))
            },
        })
    }
}

fn better(info: &RunInfo, a: f64, b: f64) -> bool {
    match info.config.direction {
        crate::Direction::Maximize => a > b,
        crate::Direction::Minimize => a < b,
    }
}

/// The live values after applying `commands` in order.
pub(crate) fn fold<'a>(commands: impl Iterator<Item = &'a Command>) -> Map<String, Value> {
    let mut live = Map::new();
    for c in commands {
        c.action.apply_live(&mut live);
    }
    live
}

/// What [`RunStore::diff`] finds.
#[derive(Clone, Debug, Serialize)]
pub struct RunDiff {
    /// The first run.
    pub a: RunId,
    /// The second run.
    pub b: RunId,
    /// Differing starting settings, `name: a → b`.
    pub config: Vec<String>,
    /// Commands applied or rejected in the first run (the event lines).
    pub commands_a: Vec<String>,
    /// Commands applied or rejected in the second run.
    pub commands_b: Vec<String>,
    /// Generations of each.
    pub generations: (usize, usize),
    /// Best generation fitness of each.
    pub best: (f64, f64),
    /// Mean fitness of each's last generation.
    pub last_mean: (f64, f64),
    /// The first generation whose statistics differ bit for bit (`None`: identical curves).
    pub first_divergence: Option<usize>,
}

/// Writes commands to one run. Every channel (this handle, Python, the CLI, the control file)
/// writes the same table; each command is checked here — type, range, mutability and the
/// engine's cross-field rules against the run's current effective configuration — and again
/// when the run applies it.
///
/// # Examples
/// ```
/// use hyperfunc::prelude::*;
/// use hyperfunc::runs::RunStore;
/// let dir = std::env::temp_dir().join(format!("hf-doc-control-{}", std::process::id()));
/// let store = RunStore::open(&dir)?;
/// let run = store.create("demo", &Es::default())?;
/// let ctl = store.control(run).source("cli");
/// ctl.set("lr", 0.01)?;
/// // Refused at once, with what to fix:
/// let err = ctl.set("pop_size", 63).unwrap_err().to_string();
/// assert!(err.contains("even"), "{err}");
/// assert!(ctl.set("seed", 3).unwrap_err().to_string().contains("restart-only"));
/// assert!(ctl.set("lrr", 0.1).unwrap_err().to_string().contains("closest are lr"));
/// assert_eq!(store.commands(run)?.len(), 1);
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), hyperfunc::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Control {
    store: RunStore,
    run: RunId,
    source: String,
    at_gen: Option<usize>,
}

impl Control {
    /// Names the channel the commands come from (`rust` unless set).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Applies the next commands at the boundary before generation `gen` (or the first
    /// boundary after it is seen, when that has passed).
    pub fn at_gen(mut self, gen: usize) -> Self {
        self.at_gen = Some(gen);
        self
    }

    /// Sets one live setting.
    pub fn set(&self, name: &str, value: impl Into<Value>) -> Result<i64> {
        let mut m = Map::new();
        m.insert(name.to_string(), value.into());
        self.send(Action::Set(m))
    }

    /// Sets several live settings at once (all or nothing).
    pub fn set_many(&self, values: Map<String, Value>) -> Result<i64> {
        self.send(Action::Set(values))
    }

    /// Clears live values: the run's own configuration (and schedule) again.
    pub fn clear(&self, names: &[&str]) -> Result<i64> {
        self.send(Action::Clear(names.iter().map(|s| s.to_string()).collect()))
    }

    /// Pauses at the next boundary.
    pub fn pause(&self) -> Result<i64> {
        self.send(Action::Pause)
    }

    /// Resumes a paused run.
    pub fn resume(&self) -> Result<i64> {
        self.send(Action::Resume)
    }

    /// Stops at the next boundary.
    pub fn stop(&self) -> Result<i64> {
        self.send(Action::Stop)
    }

    /// Stops now: the generation in flight is cancelled; the final event and checkpoint are
    /// still written.
    pub fn stop_now(&self) -> Result<i64> {
        self.send(Action::StopNow)
    }

    /// Writes a checkpoint at the next boundary that retention keeps.
    pub fn snapshot(&self) -> Result<i64> {
        self.send(Action::Snapshot)
    }

    /// Checks and writes one command; its id.
    pub fn send(&self, action: Action) -> Result<i64> {
        let ids = self.send_all(vec![(action, self.at_gen)])?;
        Ok(ids[0])
    }

    /// Checks and writes commands in one transaction: all or none.
    fn send_all(&self, items: Vec<(Action, Option<usize>)>) -> Result<Vec<i64>> {
        let store = &self.store;
        let mut conn = store.conn()?;
        // Reads, then writes: IMMEDIATE, as every transaction of the store (`open_shared`).
        let tx = conn.transaction().map_err(|e| store.err(e))?;
        let info = store.info_with(&tx, self.run)?;
        let refuse = |reason: String| Error::RunCommand {
            run: self.run.0,
            reason,
        };
        if matches!(info.status.as_str(), "finished" | "stopped" | "failed") {
            return Err(refuse(format!(
                "the run is {} ({}); there is nothing to control",
                info.status,
                info.stop.as_deref().unwrap_or("no reason recorded")
            )));
        }
        let mut live = store.live_with(&tx, self.run, usize::MAX)?;
        let mut ids = Vec::with_capacity(items.len());
        for (action, at_gen) in items {
            let action = match action {
                Action::Set(m) => Action::Set(schema::check_patch(&m).map_err(refuse)?),
                Action::Clear(keys) => {
                    if keys.is_empty() {
                        return Err(refuse("clear what? name at least one setting".into()));
                    }
                    for k in &keys {
                        schema::setting(k).map_err(refuse)?;
                    }
                    Action::Clear(keys)
                }
                a => a,
            };
            if action.apply_live(&mut live) {
                info.config.with_live(&live).map_err(refuse)?;
            }
            tx.execute(
                "INSERT INTO commands(run, created_at, source, action, patch, at_gen) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    self.run.0,
                    now_s(),
                    self.source,
                    action.name(),
                    action.payload(),
                    at_gen.map(|g| g as i64)
                ],
            )
            .map_err(|e| store.err(e))?;
            ids.push(tx.last_insert_rowid());
        }
        tx.commit().map_err(|e| store.err(e))?;
        Ok(ids)
    }

    /// Writes the commands of a control file's JSON: one object or a list of them, each
    /// `{"action": "set", "values": {"lr": 0.05}, "at_gen": 40}` (`values` for `set`, `names`
    /// for `clear`), written all or none.
    pub fn send_json(&self, text: &str) -> Result<Vec<i64>> {
        let refuse = |reason: String| Error::RunCommand {
            run: self.run.0,
            reason,
        };
        let v: Value = serde_json::from_str(text)
            .map_err(|e| refuse(format!("the control file is not JSON: {e}")))?;
        let items = match v {
            Value::Array(a) => a,
            v => vec![v],
        };
        let mut parsed = Vec::new();
        for item in items {
            let obj = item
                .as_object()
                .ok_or_else(|| refuse(format!("expected an object, got {item}")))?;
            let name = obj
                .get("action")
                .and_then(Value::as_str)
                .ok_or_else(|| refuse("each command needs an \"action\"".into()))?;
            let payload = match name {
                "set" => obj.get("values").map(Value::to_string),
                "clear" => obj.get("names").map(Value::to_string),
                _ => None,
            };
            let action = Action::from_row(name, payload.as_deref()).map_err(refuse)?;
            let at_gen =
                match obj.get("at_gen") {
                    None | Some(Value::Null) => None,
                    Some(g) => Some(g.as_u64().ok_or_else(|| {
                        refuse(format!("at_gen expects a generation number, got {g}"))
                    })? as usize),
                };
            if let Action::Set(m) = &action {
                schema::check_patch(m).map_err(refuse)?;
            }
            parsed.push((action, at_gen));
        }
        self.send_all(
            parsed
                .into_iter()
                .map(|(a, g)| (a, g.or(self.at_gen)))
                .collect(),
        )
    }
}

/// Draws the curves of `runs` (best and mean fitness, σ, lr) against `x` (`gen`, `evals`,
/// `seconds` or `usd`, the dollars of [`Es::llm_client`](crate::Es::llm_client)'s clients) with a marker where a command applied or the run resumed; SVG or PNG by the
/// extension of `out`.
#[cfg(feature = "plot")]
pub fn plot(store: &RunStore, runs: &[RunId], x: &str, out: &Path) -> Result<()> {
    use chart::{Marker, Panel, Series};
    let pick: fn(&GenRow) -> f64 = match x {
        "gen" => |r| r.gen as f64,
        "evals" => |r| r.evals as f64,
        "seconds" => |r| r.seconds,
        "usd" => |r| r.usd.unwrap_or(f64::NAN),
        other => {
            return Err(Error::config(
                "x",
                format!("`{other}`: the x axis is gen, evals, seconds or usd"),
            ))
        }
    };
    // Losses on a log axis (the chart falls back to linear for a value <= 0).
    let minimize = match runs.first() {
        Some(&r) => store.info(r)?.config.direction == crate::Direction::Minimize,
        None => false,
    };
    let mut panels = vec![
        Panel {
            y_label: "fitness".into(),
            log_y: minimize,
            ..Default::default()
        },
        Panel {
            y_label: "sigma".into(),
            ..Default::default()
        },
        Panel {
            y_label: "lr".into(),
            ..Default::default()
        },
    ];
    for &run in runs {
        let rows = store.generations(run)?;
        if x == "usd" && rows.iter().all(|r| r.usd.is_none()) {
            return Err(Error::config(
                "x",
                format!("run {run} recorded no LLM dollars (give its Es the client with Es::llm_client)"),
            ));
        }
        let series = |f: fn(&GenRow) -> f64, what: &str| Series {
            label: format!("run {run} {what}"),
            points: rows
                .iter()
                .filter(|r| pick(r).is_finite())
                .map(|r| (pick(r), f(r)))
                .collect(),
        };
        panels[0].series.push(series(|r| r.best, "best"));
        panels[0].series.push(series(|r| r.mean, "mean"));
        panels[1].series.push(series(|r| r.sigma, "sigma"));
        panels[2].series.push(series(|r| r.lr, "lr"));
        for e in store.events(run)? {
            let Some(g) = e
                .gen
                .filter(|_| matches!(e.kind.as_str(), "command" | "resume"))
            else {
                continue;
            };
            let at = rows
                .iter()
                .find(|r| r.gen == g)
                .or(rows.last())
                .map_or(g as f64, pick);
            let label = e
                .message
                .split_once(": ")
                .map_or(e.message.as_str(), |m| m.1);
            for p in &mut panels {
                p.markers.push(Marker {
                    x: at,
                    label: format!("{run}: {label}"),
                });
            }
        }
    }
    let names: Vec<String> = runs.iter().map(|r| r.to_string()).collect();
    chart::line_chart(
        out,
        &format!("runs {}", names.join(", ")),
        match x {
            "gen" => "generation",
            "evals" => "evaluations",
            "usd" => "dollars (LLM)",
            _ => "seconds",
        },
        &panels,
    )
}
