//! Content-addressed response cache in SQLite: identical requests are paid for once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use super::{ChatResponse, LlmError};

pub(crate) type Key = [u8; 32];

/// The SQLite cache plus per-key locks so concurrent identical requests send one HTTP request.
pub(crate) struct Cache {
    conn: Mutex<Connection>,
    inflight: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

fn cache_err(e: rusqlite::Error) -> LlmError {
    LlmError::Cache(e.to_string())
}

impl Cache {
    pub fn open(path: Option<&Path>) -> Result<Self, LlmError> {
        let conn = match path {
            Some(p) => Connection::open(p),
            None => Connection::open_in_memory(),
        }
        .map_err(|e| LlmError::Cache(format!("cannot open the response cache: {e}")))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(cache_err)?;
        if path.is_some() {
            // WAL lets several processes read while one writes; the result is the mode name.
            conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
                .map_err(cache_err)?;
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS llm_cache (
                 key BLOB PRIMARY KEY,
                 model TEXT NOT NULL,
                 response TEXT NOT NULL,
                 created_unix_ms INTEGER NOT NULL
             );",
        )
        .map_err(cache_err)?;
        Ok(Self {
            conn: Mutex::new(conn),
            inflight: Mutex::default(),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key of a request: SHA-256 of its canonical JSON (model, messages, params, seed…).
    pub fn key(canonical: &serde_json::Value) -> Key {
        Sha256::digest(canonical.to_string().as_bytes()).into()
    }

    pub fn get(&self, key: &Key) -> Result<Option<ChatResponse>, LlmError> {
        let text: Option<String> = self
            .conn()
            .query_row(
                "SELECT response FROM llm_cache WHERE key = ?1",
                params![&key[..]],
                |r| r.get(0),
            )
            .optional()
            .map_err(cache_err)?;
        // An entry this version cannot read is treated as a miss (and overwritten).
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    pub fn put(&self, key: &Key, model: &str, resp: &ChatResponse) -> Result<(), LlmError> {
        let text = serde_json::to_string(resp).map_err(|e| LlmError::Cache(e.to_string()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO llm_cache (key, model, response, created_unix_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![&key[..], model, text, now],
            )
            .map_err(cache_err)?;
        Ok(())
    }

    /// Entries stored.
    pub fn len(&self) -> Result<u64, LlmError> {
        self.conn()
            .query_row("SELECT COUNT(*) FROM llm_cache", [], |r| r.get(0))
            .map_err(cache_err)
    }

    /// The lock serialising identical requests (taken around lookup + call + store).
    pub fn lock_key(&self, key: &Key) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        // Forget locks nobody holds any more, so the map stays as small as the in-flight set.
        m.retain(|_, l| Arc::strong_count(l) > 1);
        m.entry(*key).or_default().clone()
    }
}
