//! The SQLite store: one connection per [`Memory`](super::Memory) behind a mutex, every call on
//! tokio's blocking pool.
//!
//! Full text goes through an FTS5 table with external content (`hyperfunc_memories` holds the
//! rows, triggers keep `hyperfunc_memories_fts` in step) and the `porter unicode61` tokenizer, so
//! "working" finds "work". Files use the WAL journal with `synchronous = NORMAL`, and a busy
//! timeout so that concurrent writers (other `Memory` values, other processes) wait for each other
//! instead of failing; write transactions start `IMMEDIATE` so that they queue on the write lock
//! up front rather than deadlock on an upgrade.
//!
//! Text may contain NUL: values are bound with their length, stored and read back intact
//! (the FTS tokenizer treats NUL as a separator).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::embed::from_bytes;
use super::query::{fts5_match, Filter};
use super::{entry_from, Entry, Prune, Row};
use crate::error::{Error, Result};

/// Terms matching more entries than this are ranked over the most recent ones only
/// (see [`Sqlite::search`]).
const CAP: i64 = 1_000;

/// How long a statement waits for other writers before [`Error::MemoryBusy`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS hyperfunc_memories (
    id INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    user_key TEXT NOT NULL,
    kind TEXT NOT NULL,
    content TEXT NOT NULL,
    entities TEXT NOT NULL,
    importance REAL NOT NULL,
    created_at REAL NOT NULL,
    accessed_at REAL NOT NULL,
    access_count INTEGER NOT NULL DEFAULT 0,
    metadata TEXT NOT NULL,
    embedding BLOB
);
CREATE INDEX IF NOT EXISTS hyperfunc_memories_user
    ON hyperfunc_memories (user_id, created_at);
CREATE VIRTUAL TABLE IF NOT EXISTS hyperfunc_memories_fts USING fts5(
    content, entities, user_key,
    content = 'hyperfunc_memories', content_rowid = 'id',
    tokenize = 'porter unicode61'
);
CREATE TRIGGER IF NOT EXISTS hyperfunc_memories_ai AFTER INSERT ON hyperfunc_memories BEGIN
    INSERT INTO hyperfunc_memories_fts (rowid, content, entities, user_key)
        VALUES (new.id, new.content, new.entities, new.user_key);
END;
CREATE TRIGGER IF NOT EXISTS hyperfunc_memories_ad AFTER DELETE ON hyperfunc_memories BEGIN
    INSERT INTO hyperfunc_memories_fts (hyperfunc_memories_fts, rowid, content, entities, user_key)
        VALUES ('delete', old.id, old.content, old.entities, old.user_key);
END;
CREATE TRIGGER IF NOT EXISTS hyperfunc_memories_au
    AFTER UPDATE OF content, entities, user_key ON hyperfunc_memories BEGIN
    INSERT INTO hyperfunc_memories_fts (hyperfunc_memories_fts, rowid, content, entities, user_key)
        VALUES ('delete', old.id, old.content, old.entities, old.user_key);
    INSERT INTO hyperfunc_memories_fts (rowid, content, entities, user_key)
        VALUES (new.id, new.content, new.entities, new.user_key);
END;
";

const COLUMNS: &str = "m.id, m.user_id, m.kind, m.content, m.entities, m.importance, \
     m.created_at, m.accessed_at, m.access_count, m.metadata";

/// The filter clause over `m` with parameters `?2` user, `?3` min importance, `?4` kinds.
const FILTER: &str =
    "m.user_id = ?2 AND m.importance >= ?3 AND (?4 = '' OR instr(?4, ',' || m.kind || ',') > 0)";

/// A SQLite database.
pub(crate) struct Sqlite {
    conn: Arc<Mutex<Connection>>,
}

/// Maps a SQLite error, telling a busy timeout from other failures.
fn sql(op: &'static str) -> impl Fn(rusqlite::Error) -> Error {
    move |e| match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => Error::MemoryBusy {
            op,
            waited: BUSY_TIMEOUT,
        },
        _ => Error::Memory {
            op,
            message: e.to_string(),
        },
    }
}

fn read_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawEntry> {
    Ok(RawEntry {
        id: r.get(0)?,
        user_id: r.get(1)?,
        kind: r.get(2)?,
        content: r.get(3)?,
        entities: r.get(4)?,
        importance: r.get(5)?,
        created_at: r.get(6)?,
        accessed_at: r.get(7)?,
        access_count: r.get(8)?,
        metadata: r.get(9)?,
    })
}

/// Columns as read, before JSON parsing (which happens outside rusqlite's error type).
struct RawEntry {
    id: i64,
    user_id: String,
    kind: String,
    content: String,
    entities: String,
    importance: f64,
    created_at: f64,
    accessed_at: f64,
    access_count: i64,
    metadata: String,
}

impl RawEntry {
    fn parse(self) -> Result<Entry> {
        entry_from(
            self.id,
            self.user_id,
            &self.kind,
            self.content,
            &self.entities,
            self.importance,
            self.created_at,
            self.accessed_at,
            self.access_count,
            &self.metadata,
        )
    }
}

fn parse_all(raw: Vec<RawEntry>) -> Result<Vec<Entry>> {
    raw.into_iter().map(RawEntry::parse).collect()
}

impl Sqlite {
    /// Opens a file (or a private in-memory database for `None`) and creates the schema.
    pub(crate) async fn open(path: Option<PathBuf>) -> Result<Self> {
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
            let map = sql("open");
            let conn = match &path {
                Some(p) => Connection::open(p).map_err(|e| Error::MemoryUrl {
                    url: p.display().to_string(),
                    reason: format!("{e}; check that the directory exists and is writable"),
                })?,
                None => Connection::open_in_memory().map_err(&map)?,
            };
            conn.busy_timeout(BUSY_TIMEOUT).map_err(&map)?;
            let setup = |conn: &Connection| -> rusqlite::Result<()> {
                if path.is_some() {
                    let _mode: String =
                        conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
                    conn.execute_batch("PRAGMA synchronous = NORMAL")?;
                }
                // IMMEDIATE: two processes creating the schema at once queue instead of racing.
                conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA} COMMIT;"))
            };
            // On a fresh file (still in rollback-journal mode) two connections switching it to
            // WAL while one creates the schema can deadlock on their locks; SQLite then answers
            // SQLITE_BUSY at once instead of calling the busy handler. Back off and retry until
            // the busy timeout.
            let start = std::time::Instant::now();
            let mut attempt = 0u32;
            loop {
                match setup(&conn) {
                    Ok(()) => break,
                    Err(e)
                        if matches!(
                            e.sqlite_error_code(),
                            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                        ) && start.elapsed() < BUSY_TIMEOUT =>
                    {
                        let _ = conn.execute_batch("ROLLBACK");
                        std::thread::sleep(std::time::Duration::from_millis(2 << attempt.min(6)));
                        attempt += 1;
                    }
                    Err(e) => return Err(map(e)),
                }
            }
            conn.set_prepared_statement_cache_capacity(32);
            Ok(conn)
        })
        .await
        .map_err(join("open"))??;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection on the blocking pool.
    async fn call<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave a half-done transaction behind:
            // rusqlite rolls back on drop. The connection stays usable.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(join(op))?
    }

    pub(crate) async fn insert(&self, rows: Vec<Row>) -> Result<Vec<i64>> {
        self.call("add", move |c| {
            let map = sql("add");
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&map)?;
            let mut ids = Vec::with_capacity(rows.len());
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO hyperfunc_memories (user_id, kind, content, entities, \
                         importance, created_at, accessed_at, access_count, metadata, embedding, \
                         user_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 0, ?7, ?8, ?9)",
                    )
                    .map_err(&map)?;
                for r in &rows {
                    stmt.execute(params![
                        r.user_id,
                        r.kind.as_str(),
                        r.content,
                        r.entities_json(),
                        r.importance,
                        r.created_at,
                        r.metadata,
                        r.embedding,
                        user_key(&r.user_id),
                    ])
                    .map_err(&map)?;
                    ids.push(tx.last_insert_rowid());
                }
            }
            tx.commit().map_err(&map)?;
            Ok(ids)
        })
        .await
    }

    /// The user's entries matching any of `tokens`, best `n` first, with their BM25 relevance
    /// (higher is better).
    ///
    /// FTS5 computes BM25 for every row it ranks, so a term matching tens of thousands of rows
    /// would dominate the latency while adding little to the ranking (its IDF is small). Terms
    /// are therefore probed first: a term matching at most [`CAP`] entries is ranked over all of
    /// them; the others ("common" terms) only over the `CAP` most recent entries matching any
    /// common term (of this user, when the most recent matches overall hold fewer than `n` of
    /// theirs). BM25 is a sum over query terms, so the two partial scores add up to the entry's
    /// full score wherever both apply.
    pub(crate) async fn search(
        &self,
        f: &Filter,
        tokens: &[String],
        n: usize,
    ) -> Result<Vec<(Entry, f64)>> {
        let (f, tokens) = (f.clone(), tokens.to_vec());
        let raw = self
            .call("retrieve", move |c| {
                let map = sql("retrieve");
                // The rowid of the CAP+1-th most recent match, when there are that many.
                let bound = |expr: &str| -> Result<Option<i64>> {
                    c.prepare_cached(
                        "SELECT rowid FROM hyperfunc_memories_fts \
                         WHERE hyperfunc_memories_fts MATCH ?1 \
                         ORDER BY rowid DESC LIMIT 1 OFFSET ?2",
                    )
                    .and_then(|mut s| s.query_row(params![expr, CAP], |r| r.get(0)).optional())
                    .map_err(&map)
                };
                // (id, -bm25) of the user's entries matching `expr` with rowid > `above`.
                let rank = |expr: &str, above: i64| -> Result<Vec<(i64, f64)>> {
                    let mut stmt = c
                        .prepare_cached(&format!(
                            "SELECT m.id, bm25(hyperfunc_memories_fts, 1.0, 0.5, 0.0) \
                             FROM hyperfunc_memories_fts \
                             JOIN hyperfunc_memories m ON m.id = hyperfunc_memories_fts.rowid \
                             WHERE hyperfunc_memories_fts MATCH ?1 AND {FILTER} \
                             AND hyperfunc_memories_fts.rowid > ?5"
                        ))
                        .map_err(&map)?;
                    let rows = stmt
                        .query_map(
                            params![expr, f.user_id, f.min_importance, f.kinds, above],
                            // FTS5's bm25() is lower-is-better; relevance is higher-is-better.
                            |r| Ok((r.get::<_, i64>(0)?, -r.get::<_, f64>(1)?)),
                        )
                        .map_err(&map)?;
                    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(&map)
                };
                let (mut rare, mut common) = (Vec::new(), Vec::new());
                for t in tokens {
                    match bound(&fts5_match(std::slice::from_ref(&t)))? {
                        None => rare.push(t),
                        Some(_) => common.push(t),
                    }
                }
                let mut scores: HashMap<i64, f64> = HashMap::new();
                let mut add = |rows: Vec<(i64, f64)>| {
                    for (id, r) in rows {
                        *scores.entry(id).or_default() += r;
                    }
                };
                if !rare.is_empty() {
                    add(rank(&fts5_match(&rare), i64::MIN)?);
                }
                if !common.is_empty() {
                    let expr = fts5_match(&common);
                    let above = bound(&expr)?.unwrap_or(i64::MIN);
                    let mut rows = rank(&expr, above)?;
                    if rows.len() < n && above > i64::MIN {
                        // The recent matches are mostly other users': narrow to this user.
                        let expr = format!("user_key : \"{}\" AND ({expr})", user_key(&f.user_id));
                        let above = bound(&expr)?.unwrap_or(i64::MIN);
                        rows = rank(&expr, above)?;
                    }
                    add(rows);
                }
                let mut top: Vec<(i64, f64)> = scores.into_iter().collect();
                top.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.0.cmp(&a.0)));
                top.truncate(n);
                let mut stmt = c
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM hyperfunc_memories m WHERE m.id = ?1"
                    ))
                    .map_err(&map)?;
                let mut out = Vec::with_capacity(top.len());
                for (id, score) in top {
                    if let Some(e) = stmt.query_row([id], read_entry).optional().map_err(&map)? {
                        out.push((e, score));
                    }
                }
                Ok(out)
            })
            .await?;
        raw.into_iter().map(|(e, b)| Ok((e.parse()?, b))).collect()
    }

    pub(crate) async fn latest(&self, f: &Filter, n: usize) -> Result<Vec<Entry>> {
        let f = f.clone();
        let raw = self
            .call("recent", move |c| {
                let map = sql("recent");
                let mut stmt = c
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM hyperfunc_memories m WHERE ?1 = ?1 AND {FILTER} \
                         ORDER BY m.created_at DESC, m.id DESC LIMIT ?5"
                    ))
                    .map_err(&map)?;
                let rows = stmt
                    .query_map(
                        params![0, f.user_id, f.min_importance, f.kinds, n as i64],
                        read_entry,
                    )
                    .map_err(&map)?;
                rows.collect::<rusqlite::Result<Vec<_>>>().map_err(&map)
            })
            .await?;
        parse_all(raw)
    }

    pub(crate) async fn vectors(&self, f: &Filter) -> Result<Vec<(i64, Vec<f32>)>> {
        let f = f.clone();
        self.call("retrieve", move |c| {
            let map = sql("retrieve");
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT m.id, m.embedding FROM hyperfunc_memories m \
                     WHERE ?1 = ?1 AND {FILTER} AND m.embedding IS NOT NULL"
                ))
                .map_err(&map)?;
            let rows = stmt
                .query_map(params![0, f.user_id, f.min_importance, f.kinds], |r| {
                    Ok((r.get::<_, i64>(0)?, from_bytes(&r.get::<_, Vec<u8>>(1)?)))
                })
                .map_err(&map)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(&map)
        })
        .await
    }

    pub(crate) async fn by_ids(&self, user_id: &str, ids: &[i64]) -> Result<Vec<Entry>> {
        let (user_id, ids) = (user_id.to_string(), ids.to_vec());
        let raw = self
            .call("retrieve", move |c| {
                let map = sql("retrieve");
                let mut stmt = c
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM hyperfunc_memories m WHERE m.id = ?1 AND m.user_id = ?2"
                    ))
                    .map_err(&map)?;
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some(e) = stmt
                        .query_row(params![id, user_id], read_entry)
                        .optional()
                        .map_err(&map)?
                    {
                        out.push(e);
                    }
                }
                Ok(out)
            })
            .await?;
        parse_all(raw)
    }

    pub(crate) async fn touch(&self, ids: &[i64], now: f64) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = ids.to_vec();
        self.call("retrieve", move |c| {
            let map = sql("retrieve");
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&map)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE hyperfunc_memories SET access_count = access_count + 1, \
                         accessed_at = ?1 WHERE id = ?2",
                    )
                    .map_err(&map)?;
                for id in ids {
                    stmt.execute(params![now, id]).map_err(&map)?;
                }
            }
            tx.commit().map_err(&map)
        })
        .await
    }

    pub(crate) async fn by_entity(&self, user_id: &str, entity: &str) -> Result<Vec<Entry>> {
        let (user_id, entity) = (user_id.to_string(), entity.to_string());
        let raw = self
            .call("by_entity", move |c| {
                let map = sql("by_entity");
                let mut stmt = c
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM hyperfunc_memories m WHERE m.user_id = ?1 AND \
                         EXISTS (SELECT 1 FROM json_each(m.entities) j WHERE lower(j.value) = lower(?2)) \
                         ORDER BY m.created_at DESC, m.id DESC"
                    ))
                    .map_err(&map)?;
                let rows = stmt
                    .query_map(params![user_id, entity], read_entry)
                    .map_err(&map)?;
                rows.collect::<rusqlite::Result<Vec<_>>>().map_err(&map)
            })
            .await?;
        parse_all(raw)
    }

    pub(crate) async fn prune(&self, rule: &Prune, now: f64) -> Result<usize> {
        let rule = rule.clone();
        self.call("prune", move |c| {
            let map = sql("prune");
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&map)?;
            let doomed: Vec<i64> = {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT id, importance, created_at, accessed_at FROM hyperfunc_memories \
                         WHERE ?1 IS NULL OR user_id = ?1",
                    )
                    .map_err(&map)?;
                let rows = stmt
                    .query_map(params![rule.user_id], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })
                    .map_err(&map)?;
                let mut doomed = Vec::new();
                for row in rows {
                    let (id, imp, created, accessed) = row.map_err(&map)?;
                    if rule.removes(now, imp, created, accessed) {
                        doomed.push(id);
                    }
                }
                doomed
            };
            {
                let mut del = tx
                    .prepare_cached("DELETE FROM hyperfunc_memories WHERE id = ?1")
                    .map_err(&map)?;
                for id in &doomed {
                    del.execute([id]).map_err(&map)?;
                }
            }
            tx.commit().map_err(&map)?;
            Ok(doomed.len())
        })
        .await
    }

    pub(crate) async fn count(&self, user_id: Option<&str>) -> Result<usize> {
        let user_id = user_id.map(str::to_string);
        self.call("count", move |c| {
            c.prepare_cached(
                "SELECT count(*) FROM hyperfunc_memories WHERE ?1 IS NULL OR user_id = ?1",
            )
            .and_then(|mut s| s.query_row([user_id], |r| r.get::<_, i64>(0)))
            .map(|n| n as usize)
            .map_err(sql("count"))
        })
        .await
    }

    pub(crate) async fn delete(&self, id: i64) -> Result<bool> {
        self.call("delete", move |c| {
            c.execute("DELETE FROM hyperfunc_memories WHERE id = ?1", [id])
                .map(|n| n > 0)
                .map_err(sql("delete"))
        })
        .await
    }

    pub(crate) async fn delete_user(&self, user_id: &str) -> Result<usize> {
        let user_id = user_id.to_string();
        self.call("delete_user", move |c| {
            c.execute(
                "DELETE FROM hyperfunc_memories WHERE user_id = ?1",
                [user_id],
            )
            .map_err(sql("delete_user"))
        })
        .await
    }
}

/// The user's token in the full-text index (`u` + FNV-1a hash in hex), so that a MATCH can
/// narrow to one user before ranking (slower than an unscoped MATCH, so only a fallback). Collisions only widen that narrowing: results are still
/// filtered on the exact `user_id`.
fn user_key(user_id: &str) -> String {
    format!("u{}", crate::util::fnv1a_hex(user_id.as_bytes()))
}

fn join(op: &'static str) -> impl Fn(tokio::task::JoinError) -> Error {
    move |e| Error::Memory {
        op,
        message: format!("the database task failed: {e}"),
    }
}
