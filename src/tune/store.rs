//! The SQLite store of the tuner: per-choice sufficient statistics and one row per call.
//!
//! Files use the WAL journal and a busy timeout so several processes share one file. Statistics
//! only ever change by atomic increments (`SET n = n + ?`) inside one `BEGIN IMMEDIATE`
//! transaction per batch; a change reset copies the running totals into snapshot columns in the
//! same statement, so no update from another process is lost. The store knows nothing of
//! policies.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::stats::{ArmStats, Life, Pending, RewardSums};
use crate::error::{Error, Result};

const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS hyperfunc_tune_arms (
    label TEXT NOT NULL,
    context TEXT NOT NULL,
    choice TEXT NOT NULL,
    calls INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    cost_n INTEGER NOT NULL DEFAULT 0,
    cost_sum REAL NOT NULL DEFAULT 0,
    resets INTEGER NOT NULL DEFAULT 0,
    r_n REAL NOT NULL DEFAULT 0,
    r_sum REAL NOT NULL DEFAULT 0,
    r_sq REAL NOT NULL DEFAULT 0,
    r_nonbinary REAL NOT NULL DEFAULT 0,
    s_n REAL NOT NULL DEFAULT 0,
    s_sum REAL NOT NULL DEFAULT 0,
    s_sq REAL NOT NULL DEFAULT 0,
    s_nonbinary REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (label, context, choice)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hyperfunc_tune_calls (
    id INTEGER PRIMARY KEY,
    label TEXT NOT NULL,
    context TEXT NOT NULL,
    choice TEXT NOT NULL,
    policy TEXT NOT NULL,
    probability REAL,
    caller TEXT NOT NULL,
    started_at REAL NOT NULL,
    latency_s REAL NOT NULL,
    error TEXT,
    reward REAL,
    cost REAL
);
CREATE INDEX IF NOT EXISTS hyperfunc_tune_calls_label ON hyperfunc_tune_calls (label, context);
";

const ARM_COLUMNS: &str = "context, choice, calls, errors, cost_n, cost_sum, resets, \
     r_n, r_sum, r_sq, r_nonbinary, s_n, s_sum, s_sq, s_nonbinary";

/// One call as it is written.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub id: u64,
    pub label: Arc<str>,
    pub context: Arc<str>,
    pub choice: Arc<str>,
    pub policy: Cow<'static, str>,
    /// A Thompson decision's probability is estimated here, when the row is written.
    pub probability: super::policy::Prob,
    pub caller: Arc<str>,
    pub started_at: f64,
    pub latency_s: f64,
    pub error: Option<String>,
    pub reward: Option<f64>,
    pub cost: Option<f64>,
}

/// A later change to a written call.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Field {
    Reward,
    Cost,
}

/// Everything one flush writes.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// (label, context, choice, delta).
    pub arms: Vec<(String, String, String, Pending)>,
    pub rows: Vec<Row>,
    pub updates: Vec<(u64, Field, f64)>,
    /// Groups to read back after the write: (label, context).
    pub sync: Vec<(String, String)>,
}

/// What a flush reads back: (label, context, choice, stats).
pub(crate) type Synced = Vec<(String, String, String, ArmStats)>;

/// A written call, as `tuner.reward(id, r)` needs it.
pub(crate) struct CallMeta {
    pub label: String,
    pub context: String,
    pub choice: String,
    pub has_reward: bool,
    pub has_cost: bool,
    pub failed: bool,
}

pub(crate) struct Store {
    conn: Connection,
    path: String,
}

impl Store {
    /// Opens (or creates) a store; `:memory:` is a private in-memory database.
    ///
    /// A file that is not a SQLite database is reported before anything is written to it.
    pub(crate) fn open(path: &str) -> Result<Store> {
        let conn = open_shared(path, SCHEMA)?;
        Ok(Store {
            conn,
            path: path.into(),
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        |e| store_err(&self.path, e)
    }

    /// Every arm of a label, all contexts: (context, choice, stats).
    pub(crate) fn load_label(&self, label: &str) -> Result<Vec<(String, String, ArmStats)>> {
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT {ARM_COLUMNS} FROM hyperfunc_tune_arms WHERE label = ?1"
            ))
            .map_err(self.err())?;
        let rows = st
            .query_map([label], read_arm)
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        Ok(rows)
    }

    /// Every arm, or those of one label: (label, context, choice, stats), sorted.
    pub(crate) fn arms(&self, label: Option<&str>) -> Result<Synced> {
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT label, {ARM_COLUMNS} FROM hyperfunc_tune_arms \
                 WHERE ?1 IS NULL OR label = ?1 ORDER BY label, context, choice"
            ))
            .map_err(self.err())?;
        let rows = st
            .query_map([label], |r| {
                let label: String = r.get(0)?;
                let (c, ch, s) = read_arm_at(r, 1)?;
                Ok((label, c, ch, s))
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        Ok(rows)
    }

    /// Writes a batch in one transaction and reads back the groups to sync.
    pub(crate) fn write(&mut self, b: &Batch) -> Result<Synced> {
        let path = self.path.clone();
        let err = |e: rusqlite::Error| store_err(&path, e);
        // Estimated before the file's write lock is taken, so another process is not held up.
        let probabilities: Vec<Option<f64>> =
            b.rows.iter().map(|r| r.probability.value()).collect();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO hyperfunc_tune_arms (label, context, choice) VALUES (?1, ?2, ?3) \
                     ON CONFLICT DO NOTHING",
                )
                .map_err(err)?;
            let mut add = tx
                .prepare_cached(
                    "UPDATE hyperfunc_tune_arms SET calls = calls + ?4, errors = errors + ?5, \
                     cost_n = cost_n + ?6, cost_sum = cost_sum + ?7, resets = resets + ?8, \
                     r_n = r_n + ?9, r_sum = r_sum + ?10, r_sq = r_sq + ?11, \
                     r_nonbinary = r_nonbinary + ?12 \
                     WHERE label = ?1 AND context = ?2 AND choice = ?3",
                )
                .map_err(err)?;
            let mut snap = tx
                .prepare_cached(
                    "UPDATE hyperfunc_tune_arms SET s_n = r_n, s_sum = r_sum, s_sq = r_sq, \
                     s_nonbinary = r_nonbinary WHERE label = ?1 AND context = ?2 AND choice = ?3",
                )
                .map_err(err)?;
            for (label, context, choice, p) in &b.arms {
                ins.execute(params![label, context, choice]).map_err(err)?;
                let l = &p.life;
                add.execute(params![
                    label,
                    context,
                    choice,
                    l.calls as i64,
                    l.errors as i64,
                    l.cost_n as i64,
                    l.cost_sum,
                    l.resets as i64,
                    p.pre.n,
                    p.pre.sum,
                    p.pre.sq,
                    p.pre.nonbinary
                ])
                .map_err(err)?;
                if p.reset {
                    snap.execute(params![label, context, choice]).map_err(err)?;
                    add.execute(params![
                        label,
                        context,
                        choice,
                        0i64,
                        0i64,
                        0i64,
                        0.0f64,
                        0i64,
                        p.post.n,
                        p.post.sum,
                        p.post.sq,
                        p.post.nonbinary
                    ])
                    .map_err(err)?;
                }
            }
            let mut row = tx
                .prepare_cached(
                    "INSERT INTO hyperfunc_tune_calls (id, label, context, choice, policy, \
                     probability, caller, started_at, latency_s, error, reward, cost) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )
                .map_err(err)?;
            for (r, p) in b.rows.iter().zip(&probabilities) {
                row.execute(params![
                    r.id as i64,
                    &*r.label,
                    &*r.context,
                    &*r.choice,
                    &*r.policy,
                    p,
                    &*r.caller,
                    r.started_at,
                    r.latency_s,
                    r.error,
                    r.reward,
                    r.cost
                ])
                .map_err(err)?;
            }
            let mut set_reward = tx
                .prepare_cached("UPDATE hyperfunc_tune_calls SET reward = ?2 WHERE id = ?1")
                .map_err(err)?;
            let mut set_cost = tx
                .prepare_cached("UPDATE hyperfunc_tune_calls SET cost = ?2 WHERE id = ?1")
                .map_err(err)?;
            for (id, field, v) in &b.updates {
                match field {
                    Field::Reward => set_reward.execute(params![*id as i64, v]),
                    Field::Cost => set_cost.execute(params![*id as i64, v]),
                }
                .map_err(err)?;
            }
        }
        let mut synced = Vec::new();
        {
            let mut st = tx
                .prepare_cached(&format!(
                    "SELECT {ARM_COLUMNS} FROM hyperfunc_tune_arms WHERE label = ?1 AND context = ?2"
                ))
                .map_err(err)?;
            for (label, context) in &b.sync {
                let rows = st
                    .query_map(params![label, context], read_arm)
                    .map_err(err)?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(err)?;
                for (c, ch, s) in rows {
                    synced.push((label.clone(), c, ch, s));
                }
            }
        }
        tx.commit().map_err(err)?;
        Ok(synced)
    }

    /// A written call, if the store has it.
    pub(crate) fn call_meta(&self, id: u64) -> Result<Option<CallMeta>> {
        self.conn
            .query_row(
                "SELECT label, context, choice, reward IS NOT NULL, cost IS NOT NULL, \
                 error IS NOT NULL FROM hyperfunc_tune_calls WHERE id = ?1",
                [id as i64],
                |r| {
                    Ok(CallMeta {
                        label: r.get(0)?,
                        context: r.get(1)?,
                        choice: r.get(2)?,
                        has_reward: r.get(3)?,
                        has_cost: r.get(4)?,
                        failed: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(self.err())
    }

    /// Sets a written call's reward or cost if it has none yet; false when another writer got
    /// there first.
    pub(crate) fn set_once(&self, id: u64, field: Field, v: f64) -> Result<bool> {
        let sql = match field {
            Field::Reward => "UPDATE hyperfunc_tune_calls SET reward = ?2 WHERE id = ?1 AND reward IS NULL AND error IS NULL",
            Field::Cost => "UPDATE hyperfunc_tune_calls SET cost = ?2 WHERE id = ?1 AND cost IS NULL",
        };
        let n = self
            .conn
            .execute(sql, params![id as i64, v])
            .map_err(self.err())?;
        Ok(n == 1)
    }

    /// Calls of a label (all labels for `None`), oldest first.
    pub(crate) fn calls(&self, label: Option<&str>) -> Result<Vec<Row>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT id, label, context, choice, policy, probability, caller, started_at, \
                 latency_s, error, reward, cost FROM hyperfunc_tune_calls \
                 WHERE ?1 IS NULL OR label = ?1 ORDER BY started_at, id",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([label], |r| {
                Ok(Row {
                    id: r.get::<_, i64>(0)? as u64,
                    label: r.get::<_, String>(1)?.into(),
                    context: r.get::<_, String>(2)?.into(),
                    choice: r.get::<_, String>(3)?.into(),
                    policy: Cow::Owned(r.get(4)?),
                    probability: super::policy::Prob::Known(r.get(5)?),
                    caller: r.get::<_, String>(6)?.into(),
                    started_at: r.get(7)?,
                    latency_s: r.get(8)?,
                    error: r.get(9)?,
                    reward: r.get(10)?,
                    cost: r.get(11)?,
                })
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        Ok(rows)
    }
}

fn read_arm(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, ArmStats)> {
    read_arm_at(r, 0)
}

fn read_arm_at(r: &rusqlite::Row<'_>, o: usize) -> rusqlite::Result<(String, String, ArmStats)> {
    let count = |i: usize| -> rusqlite::Result<u64> { Ok(r.get::<_, i64>(o + i)?.max(0) as u64) };
    let sums = |i: usize| -> rusqlite::Result<RewardSums> {
        Ok(RewardSums {
            n: r.get(o + i)?,
            sum: r.get(o + i + 1)?,
            sq: r.get(o + i + 2)?,
            nonbinary: r.get(o + i + 3)?,
        })
    };
    Ok((
        r.get(o)?,
        r.get(o + 1)?,
        ArmStats {
            life: Life {
                calls: count(2)?,
                errors: count(3)?,
                cost_n: count(4)?,
                cost_sum: r.get(o + 5)?,
                resets: count(6)?,
            },
            total: sums(7)?,
            snap: sums(11)?,
        },
    ))
}

/// Opens (or creates) a SQLite file that several handles and processes share, with `schema`
/// created in one immediate transaction; `:memory:` is a private in-memory database.
///
/// A busy timeout; a read first, so a corrupt or foreign file fails untouched; the WAL journal
/// (retried while another process switches the same fresh file) with `synchronous = NORMAL`.
/// Used by the tuner's store, the ledger and the judge cache, which may share one file.
pub(crate) fn open_shared(path: &str, schema: &str) -> Result<Connection> {
    let err = |e: rusqlite::Error| store_err(path, e);
    let memory = path == ":memory:";
    let mut conn = if memory {
        Connection::open_in_memory().map_err(err)?
    } else {
        Connection::open(path).map_err(err)?
    };
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    // Every transaction begins IMMEDIATE, taking the write lock (or waiting out the busy
    // timeout for it) before its first read. A deferred one that reads and then writes holds
    // a read snapshot; when another connection commits in between, SQLite refuses its upgrade
    // at once ("database is locked"), without waiting.
    conn.set_transaction_behavior(TransactionBehavior::Immediate);
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })
    .map_err(|e| Error::TuneStore {
        path: path.into(),
        reason: format!("not a readable SQLite database ({e}); the file was left untouched"),
    })?;
    if !memory {
        let mut tries = 0;
        loop {
            match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)) {
                Ok(_) => break,
                Err(e) if tries < 50 && is_busy(&e) => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(err(e)),
            }
        }
        conn.execute_batch("PRAGMA synchronous = NORMAL")
            .map_err(err)?;
    }
    conn.execute_batch(&format!("BEGIN IMMEDIATE; {schema} COMMIT;"))
        .map_err(err)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

pub(crate) fn store_err(path: &str, e: rusqlite::Error) -> Error {
    let reason = match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => format!(
            "the database stayed locked by other writers for more than {BUSY_TIMEOUT:?} ({e})"
        ),
        _ => e.to_string(),
    };
    Error::TuneStore {
        path: path.into(),
        reason,
    }
}
