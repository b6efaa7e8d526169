//! Persistent memory for chat agents: facts, preferences and events a user told the agent,
//! stored in SQLite or PostgreSQL and retrieved by natural-language questions.
//!
//! A [`Memory`] opens a store from a URL (`:memory:`, a file path, `sqlite://path`,
//! `postgres://…` with the `postgres` feature), adds [`NewEntry`]s, and answers a [`Query`] with
//! [`Scored`] entries ranked by
//!
//! ```text
//! score = w_bm25 · relevance + w_importance · importance + w_recency · recency
//! ```
//!
//! - **relevance**: full-text rank of the entry against the query's terms ([`tokenize`]: any term
//!   may match, never all are required), divided by the best candidate's rank so that it lies in
//!   \[0, 1\] with 1 for the best match (SQLite: FTS5 BM25, negated since FTS5 reports lower as
//!   better, with the porter stemmer; PostgreSQL: length-normalised `ts_rank` over an `english`
//!   `tsvector`). The top `max(10 × limit, 50)` candidates by rank are scored. Dividing by the
//!   maximum rather than min-max keeps two nearly equal matches nearly equal. On SQLite a term
//!   that matches more than 1 000 entries is ranked over the 1 000 most recent of them only, which
//!   keeps retrieval within milliseconds at 100 000 entries (such a term has little weight in
//!   BM25 anyway; rarer terms of the query are always ranked over all their matches). With an
//!   embedder ([`Memory::with_embedder`]) the relevance is instead the reciprocal rank fusion
//!   (k = 60) of the full-text ranking and the cosine-similarity ranking, scaled to \[0, 1\].
//! - **recency**: `0.5^(age / half_life)` with the age since the entry was created (default
//!   half-life 7 days).
//! - weights default to 0.5 / 0.3 / 0.2 ([`Weights`]).
//!
//! A query with no search terms (empty, or only stopwords such as "what is it?") returns the
//! user's entries ranked by importance and recency alone, from the most recent ones.
//!
//! Every query is scoped to one `user_id`; no query returns another user's memories. This module
//! knows nothing of agents or prompts beyond [`Memory::format_context`]; extraction of memories
//! from a chat turn ([`Memory::store_turn`]) uses `hyperfunc::llm` when the `llm` feature is on.
//!
//! # Examples
//! ```
//! use hyperfunc::memory::{Memory, MemoryType, NewEntry, Query};
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let memory = Memory::open(":memory:").await?;
//! memory.add(NewEntry::new("I'm building a FastAPI project").kind(MemoryType::Fact)
//!     .user("u1").importance(0.8).entities(["FastAPI"])).await?;
//! memory.add(NewEntry::new("likes dark mode").kind(MemoryType::Preference).user("u1")).await?;
//!
//! let hits = memory.retrieve(&Query::new("What project am I working on?").user("u1")).await?;
//! assert_eq!(hits[0].entry.content, "I'm building a FastAPI project");
//! assert!(Memory::format_context(&hits).starts_with("- [fact] I'm building a FastAPI project"));
//! assert!(memory.retrieve(&Query::new("project").user("u2")).await?.is_empty());
//! # Ok::<(), hyperfunc::Error>(())
//! # }).unwrap();
//! ```

mod bench;
mod embed;
#[cfg(feature = "llm")]
mod extract;
#[cfg(feature = "postgres")]
mod postgres;
mod query;
mod sqlite;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use bench::{bench, MemoryBench, SizeBench};
pub use embed::Embed;
#[cfg(feature = "llm")]
pub use embed::OpenAiEmbedder;
pub use query::{tokenize, Query};

use crate::error::{Error, Result};
use crate::function::Json;
use query::Filter;

/// The user id of entries and queries that name none.
pub const DEFAULT_USER: &str = "default";

/// Reciprocal rank fusion constant.
const RRF_K: f64 = 60.0;

/// What kind of thing a memory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryType {
    /// Something true about the user or their world ("works at Acme").
    Fact,
    /// A like, dislike or way they want things done ("likes dark mode").
    Preference,
    /// Background of the conversation; also the type of unextracted turns.
    Context,
    /// Something that happened at a time ("moved to Berlin in May").
    Event,
    /// A named person, project, product or place.
    Entity,
}

impl MemoryType {
    /// All types.
    pub const ALL: [MemoryType; 5] = [
        MemoryType::Fact,
        MemoryType::Preference,
        MemoryType::Context,
        MemoryType::Event,
        MemoryType::Entity,
    ];

    /// The lowercase name (`fact`, `preference`…), as stored and serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryType::Fact => "fact",
            MemoryType::Preference => "preference",
            MemoryType::Context => "context",
            MemoryType::Event => "event",
            MemoryType::Entity => "entity",
        }
    }

    /// Parses a lowercase name (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

impl fmt::Display for MemoryType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Its id in the store.
    pub id: i64,
    /// The text.
    pub content: String,
    /// What kind of memory it is.
    #[serde(rename = "type")]
    pub kind: MemoryType,
    /// Names it mentions (people, projects, products).
    pub entities: Vec<String>,
    /// How much it matters, in \[0, 1\].
    pub importance: f32,
    /// When it was stored.
    pub created_at: SystemTime,
    /// When it was last returned by [`Memory::retrieve`] (its creation time until then).
    pub accessed_at: SystemTime,
    /// How often [`Memory::retrieve`] returned it.
    pub access_count: u64,
    /// Free-form JSON (the extraction outcome, the source…).
    pub metadata: Json,
    /// Whose memory it is.
    pub user_id: String,
}

/// A memory to store; see [`Memory::add`].
///
/// # Examples
/// ```
/// use hyperfunc::memory::{MemoryType, NewEntry};
/// let e = NewEntry::new("likes dark mode").kind(MemoryType::Preference).user("u1")
///     .importance(0.8).entities(["editor"]).metadata(serde_json::json!({"source": "chat"}));
/// assert_eq!(e.user_id, "u1");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewEntry {
    /// The text.
    pub content: String,
    /// What kind of memory it is (default `fact`).
    #[serde(rename = "type")]
    pub kind: MemoryType,
    /// Names it mentions.
    pub entities: Vec<String>,
    /// How much it matters, in \[0, 1\] (default 0.5); checked when stored.
    pub importance: f32,
    /// Free-form JSON (default `{}`).
    pub metadata: Json,
    /// Whose memory it is (default [`DEFAULT_USER`]).
    pub user_id: String,
    /// When it happened (default: when stored). Lets an import keep original dates.
    pub created_at: Option<SystemTime>,
}

impl NewEntry {
    /// A `fact` of the default user with importance 0.5.
    pub fn new(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            kind: MemoryType::Fact,
            entities: Vec::new(),
            importance: 0.5,
            metadata: Json::Object(Default::default()),
            user_id: DEFAULT_USER.into(),
            created_at: None,
        }
    }

    /// Sets the type.
    pub fn kind(mut self, kind: MemoryType) -> Self {
        self.kind = kind;
        self
    }

    /// Sets the owner.
    pub fn user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = user_id.into();
        self
    }

    /// Sets the importance (must be in \[0, 1\]; checked by [`Memory::add`]).
    pub fn importance(mut self, importance: f32) -> Self {
        self.importance = importance;
        self
    }

    /// Sets the entities.
    pub fn entities<S: Into<String>>(mut self, entities: impl IntoIterator<Item = S>) -> Self {
        self.entities = entities.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the metadata.
    pub fn metadata(mut self, metadata: Json) -> Self {
        self.metadata = metadata;
        self
    }

    /// Sets the creation time (for imports and tests of recency).
    pub fn created_at(mut self, at: SystemTime) -> Self {
        self.created_at = Some(at);
        self
    }

    /// Checks the entry and turns it into a row.
    fn into_row(self, now: f64) -> Result<Row> {
        if !(0.0..=1.0).contains(&self.importance) {
            return Err(Error::InvalidMemory {
                field: "importance",
                reason: format!("{} is outside [0, 1]", self.importance),
            });
        }
        check_user(&self.user_id)?;
        if self.entities.iter().any(|e| e.contains('\0')) {
            return Err(Error::InvalidMemory {
                field: "entities",
                reason: "an entity contains a NUL character".into(),
            });
        }
        let created_at = match self.created_at {
            Some(t) => secs(t),
            None => now,
        };
        Ok(Row {
            user_id: self.user_id,
            kind: self.kind,
            entities: self.entities,
            importance: f64::from(self.importance),
            created_at,
            metadata: serde_json::to_string(&self.metadata).map_err(|e| Error::InvalidMemory {
                field: "metadata",
                reason: e.to_string(),
            })?,
            content: self.content,
            embedding: None,
        })
    }
}

/// User ids are identifiers: not empty, no NUL (PostgreSQL text cannot hold one).
fn check_user(user_id: &str) -> Result<()> {
    if user_id.is_empty() || user_id.contains('\0') {
        return Err(Error::InvalidMemory {
            field: "user_id",
            reason: format!("{user_id:?} is empty or contains NUL; use a non-empty id"),
        });
    }
    Ok(())
}

/// A validated entry on its way into a backend.
pub(crate) struct Row {
    pub user_id: String,
    pub kind: MemoryType,
    pub content: String,
    pub entities: Vec<String>,
    pub importance: f64,
    pub created_at: f64,
    pub metadata: String,
    /// f32 little-endian.
    pub embedding: Option<Vec<u8>>,
}

impl Row {
    pub(crate) fn entities_json(&self) -> String {
        serde_json::to_string(&self.entities).unwrap_or_else(|_| "[]".into())
    }
}

/// A retrieved entry with its score and the parts of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scored {
    /// The entry (its access count and time already include this retrieval).
    pub entry: Entry,
    /// The combined score the results are sorted by.
    pub score: f32,
    /// Query relevance in \[0, 1\] (0 for a query without terms).
    pub relevance: f32,
    /// Recency in \[0, 1\].
    pub recency: f32,
}

/// How retrieval combines relevance, importance and recency.
///
/// # Examples
/// ```
/// use hyperfunc::memory::{Memory, Weights};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let m = Memory::open(":memory:").await?
///     .with_weights(Weights { importance: 0.8, ..Weights::default() })?;
/// assert!(Memory::open(":memory:").await?
///     .with_weights(Weights { bm25: -1.0, ..Weights::default() }).is_err());
/// # Ok::<(), hyperfunc::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    /// Weight of query relevance (default 0.5).
    pub bm25: f32,
    /// Weight of importance (default 0.3).
    pub importance: f32,
    /// Weight of recency (default 0.2).
    pub recency: f32,
    /// Age at which recency is 0.5 (default 7 days).
    pub half_life: Duration,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            bm25: 0.5,
            importance: 0.3,
            recency: 0.2,
            half_life: Duration::from_secs(7 * 86_400),
        }
    }
}

impl Weights {
    fn validate(&self) -> Result<()> {
        let ws = [self.bm25, self.importance, self.recency];
        if ws.iter().any(|w| !w.is_finite() || *w < 0.0) || ws.iter().sum::<f32>() <= 0.0 {
            return Err(Error::InvalidMemory {
                field: "weights",
                reason: format!(
                    "{ws:?} must be finite, non-negative and not all zero (bm25, importance, recency)"
                ),
            });
        }
        if self.half_life.is_zero() {
            return Err(Error::InvalidMemory {
                field: "weights.half_life",
                reason: "must be positive".into(),
            });
        }
        Ok(())
    }

    fn recency(&self, now: f64, created_at: f64) -> f64 {
        let age = (now - created_at).max(0.0);
        (-std::f64::consts::LN_2 * age / self.half_life.as_secs_f64()).exp()
    }
}

/// Which entries [`Memory::prune`] removes.
///
/// The rule: an entry goes when its *decayed importance*
/// `importance · 0.5^(idle / half_life)` is below `min_score`, where `idle` is the time since it
/// was last retrieved (or created) — so entries that are used stay. Independently, with `max_age`
/// set, an entry created longer ago than `max_age` goes when its importance is below
/// `keep_importance`.
///
/// # Examples
/// ```
/// use hyperfunc::memory::Prune;
/// use std::time::Duration;
/// let p = Prune::new().user("u1").min_score(0.1).max_age(Duration::from_secs(90 * 86_400));
/// assert_eq!(p.keep_importance, 0.7);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Prune {
    /// Only this user's entries (all users when `None`).
    pub user_id: Option<String>,
    /// Decayed importance below which an entry goes (default 0.05).
    pub min_score: f32,
    /// Idle time that halves an entry's importance (default 30 days).
    pub half_life: Duration,
    /// Entries older than this go unless important (default: no limit).
    pub max_age: Option<Duration>,
    /// Entries at least this important survive `max_age` (default 0.7).
    pub keep_importance: f32,
}

impl Default for Prune {
    fn default() -> Self {
        Self::new()
    }
}

impl Prune {
    /// The default rule over all users.
    pub fn new() -> Self {
        Self {
            user_id: None,
            min_score: 0.05,
            half_life: Duration::from_secs(30 * 86_400),
            max_age: None,
            keep_importance: 0.7,
        }
    }

    /// Only this user's entries.
    pub fn user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into());
        self
    }

    /// Sets the decayed-importance threshold.
    pub fn min_score(mut self, min: f32) -> Self {
        self.min_score = min;
        self
    }

    /// Sets the idle half-life.
    pub fn half_life(mut self, d: Duration) -> Self {
        self.half_life = d;
        self
    }

    /// Sets the maximum age of unimportant entries.
    pub fn max_age(mut self, d: Duration) -> Self {
        self.max_age = Some(d);
        self
    }

    /// Sets the importance that survives `max_age`.
    pub fn keep_importance(mut self, min: f32) -> Self {
        self.keep_importance = min;
        self
    }

    fn validate(&self) -> Result<()> {
        if !self.min_score.is_finite() || self.half_life.is_zero() {
            return Err(Error::InvalidMemory {
                field: "prune",
                reason: "min_score must be finite and half_life positive".into(),
            });
        }
        Ok(())
    }

    /// Whether an entry with these numbers goes (see the type's docs).
    pub(crate) fn removes(&self, now: f64, importance: f64, created: f64, accessed: f64) -> bool {
        let idle = (now - accessed).max(0.0);
        let decayed =
            importance * (-std::f64::consts::LN_2 * idle / self.half_life.as_secs_f64()).exp();
        if decayed < f64::from(self.min_score) {
            return true;
        }
        match self.max_age {
            Some(max) => {
                now - created > max.as_secs_f64() && importance < f64::from(self.keep_importance)
            }
            None => false,
        }
    }
}

/// The database behind a [`Memory`].
enum Store {
    Sqlite(sqlite::Sqlite),
    #[cfg(feature = "postgres")]
    Postgres(postgres::Postgres),
}

/// Calls the same method on whichever backend is open.
macro_rules! store {
    ($self:expr, $s:ident => $e:expr) => {
        match &*$self.store {
            Store::Sqlite($s) => $e,
            #[cfg(feature = "postgres")]
            Store::Postgres($s) => $e,
        }
    };
}

/// A persistent memory store; cheap to clone (clones share the connection).
///
/// Several `Memory` values, in one process or many, may use one database at once: the schema is
/// created idempotently, SQLite runs in WAL mode and waits up to 10 s for other writers
/// ([`Error::MemoryBusy`] after that), and PostgreSQL serialises schema creation with an
/// advisory lock.
#[derive(Clone)]
pub struct Memory {
    store: Arc<Store>,
    weights: Weights,
    embedder: Option<Arc<dyn Embed>>,
    #[cfg(feature = "llm")]
    extractor: Option<Arc<extract::Extractor>>,
    max_per_turn: usize,
}

impl fmt::Debug for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend = match &*self.store {
            Store::Sqlite(_) => "sqlite",
            #[cfg(feature = "postgres")]
            Store::Postgres(_) => "postgres",
        };
        f.debug_struct("Memory")
            .field("backend", &backend)
            .field("weights", &self.weights)
            .field("embedder", &self.embedder.is_some())
            .field("max_per_turn", &self.max_per_turn)
            .finish()
    }
}

impl Memory {
    /// Opens (creating when needed) a store:
    ///
    /// - `:memory:` (or `sqlite::memory:`): a private in-memory SQLite database, shared by the
    ///   clones of this `Memory` only;
    /// - a file path or `sqlite://path`: a SQLite file (WAL journal);
    /// - `postgres://user:password@host:port/db` or `postgresql://…`: PostgreSQL (feature
    ///   `postgres`; plain TCP, no TLS).
    pub async fn open(url: &str) -> Result<Memory> {
        let store = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            open_postgres(url).await?
        } else if url == ":memory:" || url == "sqlite::memory:" || url == "sqlite://:memory:" {
            Store::Sqlite(sqlite::Sqlite::open(None).await?)
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            Store::Sqlite(sqlite::Sqlite::open(Some(path.into())).await?)
        } else if let Some((scheme, _)) = url.split_once("://") {
            return Err(Error::MemoryUrl {
                url: redact(url),
                reason: format!(
                    "unknown scheme `{scheme}`; use `:memory:`, a file path, `sqlite://path` or `postgres://user:password@host/db`"
                ),
            });
        } else if url.is_empty() {
            return Err(Error::MemoryUrl {
                url: String::new(),
                reason: "empty; use `:memory:`, a file path or a postgres:// URL".into(),
            });
        } else {
            Store::Sqlite(sqlite::Sqlite::open(Some(url.into())).await?)
        };
        Ok(Memory {
            store: Arc::new(store),
            weights: Weights::default(),
            embedder: None,
            #[cfg(feature = "llm")]
            extractor: None,
            max_per_turn: 5,
        })
    }

    /// Uses these ranking weights (checked: finite, non-negative, not all zero).
    pub fn with_weights(mut self, weights: Weights) -> Result<Self> {
        weights.validate()?;
        self.weights = weights;
        Ok(self)
    }

    /// The ranking weights.
    pub fn weights(&self) -> Weights {
        self.weights
    }

    /// Embeds every entry added from now on and fuses cosine similarity into retrieval
    /// (reciprocal rank fusion with the full-text ranking). Entries stored without an embedding
    /// are found by full text only.
    pub fn with_embedder(mut self, embedder: impl Embed + 'static) -> Self {
        self.embedder = Some(Arc::new(embedder));
        self
    }

    /// Extracts memories from chat turns with `model` ([`Memory::store_turn`]).
    #[cfg(feature = "llm")]
    pub fn with_extractor(mut self, client: crate::llm::LlmClient, model: &str) -> Self {
        self.extractor = Some(Arc::new(extract::Extractor::new(client, model)));
        self
    }

    /// Keeps at most `n` extracted memories per turn (default 5).
    pub fn max_per_turn(mut self, n: usize) -> Self {
        self.max_per_turn = n;
        self
    }

    /// Stores one entry and returns its id.
    pub async fn add(&self, entry: NewEntry) -> Result<i64> {
        let ids = self.add_many(vec![entry]).await?;
        ids.into_iter().next().ok_or(Error::Memory {
            op: "add",
            message: "the store returned no id".into(),
        })
    }

    /// Stores entries in one transaction: all of them, or none when one is invalid or the
    /// database fails. Returns their ids in order.
    pub async fn add_many(&self, entries: Vec<NewEntry>) -> Result<Vec<i64>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let now = now();
        let mut rows = entries
            .into_iter()
            .map(|e| e.into_row(now))
            .collect::<Result<Vec<_>>>()?;
        if let Some(embedder) = &self.embedder {
            let texts: Vec<String> = rows.iter().map(|r| r.content.clone()).collect();
            let vectors = embedder.embed(&texts).await?;
            if vectors.len() != rows.len() {
                return Err(Error::Memory {
                    op: "embed",
                    message: format!(
                        "the embedder returned {} vectors for {} texts",
                        vectors.len(),
                        rows.len()
                    ),
                });
            }
            for (row, v) in rows.iter_mut().zip(vectors) {
                row.embedding = Some(embed::to_bytes(&v));
            }
        }
        store!(self, s => s.insert(rows).await)
    }

    /// The entries best matching `query` (see the module docs for the ranking), best first.
    /// Bumps the access count and time of what it returns.
    pub async fn retrieve(&self, query: &Query) -> Result<Vec<Scored>> {
        check_user(&query.user_id)?;
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let filter = Filter::of(query);
        let pool = (query.limit * 10).max(50);
        let terms = query.terms();
        let now = now();

        // Relevance per entry id, and the entries themselves.
        let mut relevance: HashMap<i64, f64> = HashMap::new();
        let mut entries: HashMap<i64, Entry> = HashMap::new();
        if terms.is_empty() {
            for e in store!(self, s => s.latest(&filter, pool).await)? {
                relevance.insert(e.id, 0.0);
                entries.insert(e.id, e);
            }
        } else {
            let lexical = store!(self, s => s.search(&filter, &terms, pool).await)?;
            let best = lexical.iter().fold(0.0f64, |m, (_, r)| m.max(*r));
            let lexical_ids: Vec<i64> = lexical.iter().map(|(e, _)| e.id).collect();
            for (e, r) in lexical {
                let n = if best > 0.0 {
                    (r / best).clamp(0.0, 1.0)
                } else {
                    1.0
                };
                relevance.insert(e.id, n);
                entries.insert(e.id, e);
            }
            if let Some(embedder) = &self.embedder {
                let semantic = self
                    .semantic(embedder.as_ref(), &query.text, &filter, pool)
                    .await?;
                let missing: Vec<i64> = semantic
                    .iter()
                    .copied()
                    .filter(|id| !entries.contains_key(id))
                    .collect();
                if !missing.is_empty() {
                    for e in store!(self, s => s.by_ids(&filter.user_id, &missing).await)? {
                        entries.insert(e.id, e);
                    }
                }
                relevance = rrf(&[&lexical_ids, &semantic]);
            }
        }

        let w = self.weights;
        let mut scored: Vec<Scored> = entries
            .into_values()
            .map(|entry| {
                let rel = relevance.get(&entry.id).copied().unwrap_or(0.0);
                let rec = w.recency(now, secs(entry.created_at));
                let score = f64::from(w.bm25) * rel
                    + f64::from(w.importance) * f64::from(entry.importance)
                    + f64::from(w.recency) * rec;
                Scored {
                    entry,
                    score: score as f32,
                    relevance: rel as f32,
                    recency: rec as f32,
                }
            })
            .collect();
        scored.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(b.entry.id.cmp(&a.entry.id))
        });
        scored.truncate(query.limit);

        let ids: Vec<i64> = scored.iter().map(|s| s.entry.id).collect();
        store!(self, s => s.touch(&ids, now).await)?;
        for s in &mut scored {
            s.entry.access_count += 1;
            s.entry.accessed_at = time(now);
        }
        Ok(scored)
    }

    /// Ids of the `pool` entries most similar to `text` by cosine similarity (only positive
    /// similarities), best first.
    async fn semantic(
        &self,
        embedder: &dyn Embed,
        text: &str,
        filter: &Filter,
        pool: usize,
    ) -> Result<Vec<i64>> {
        let q = embedder
            .embed(&[text.to_string()])
            .await?
            .into_iter()
            .next()
            .ok_or(Error::Memory {
                op: "embed",
                message: "the embedder returned no vector for the query".into(),
            })?;
        let vectors = store!(self, s => s.vectors(filter).await)?;
        let mut sims: Vec<(i64, f32)> = vectors
            .into_iter()
            .map(|(id, v)| (id, embed::cosine(&q, &v)))
            .filter(|(_, sim)| *sim > 0.0)
            .collect();
        sims.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.0.cmp(&a.0)));
        sims.truncate(pool);
        Ok(sims.into_iter().map(|(id, _)| id).collect())
    }

    /// The user's `n` most recently created entries, newest first.
    pub async fn recent(&self, user_id: &str, n: usize) -> Result<Vec<Entry>> {
        check_user(user_id)?;
        let filter = Filter::of(&Query::new("").user(user_id));
        store!(self, s => s.latest(&filter, n).await)
    }

    /// The user's entries naming `entity` (case-insensitive; ASCII case only on SQLite), newest
    /// first.
    pub async fn by_entity(&self, user_id: &str, entity: &str) -> Result<Vec<Entry>> {
        check_user(user_id)?;
        store!(self, s => s.by_entity(user_id, entity).await)
    }

    /// Removes the entries the rule selects (see [`Prune`]) and returns how many.
    pub async fn prune(&self, rule: &Prune) -> Result<usize> {
        rule.validate()?;
        store!(self, s => s.prune(rule, now()).await)
    }

    /// How many entries the user has (all users when `None`).
    pub async fn count(&self, user_id: Option<&str>) -> Result<usize> {
        store!(self, s => s.count(user_id).await)
    }

    /// Removes one entry; whether it existed.
    pub async fn delete(&self, id: i64) -> Result<bool> {
        store!(self, s => s.delete(id).await)
    }

    /// Removes all of a user's entries and returns how many.
    pub async fn delete_user(&self, user_id: &str) -> Result<usize> {
        store!(self, s => s.delete_user(user_id).await)
    }

    /// The entries as a compact bullet list for a prompt: one `- [type] content` line each,
    /// newlines inside an entry folded to spaces.
    ///
    /// # Examples
    /// See the [module docs](self).
    pub fn format_context(hits: &[Scored]) -> String {
        let mut out = String::new();
        for h in hits {
            let text: Vec<&str> = h.entry.content.split_whitespace().collect();
            out.push_str(&format!("- [{}] {}\n", h.entry.kind, text.join(" ")));
        }
        out
    }

    /// Stores what a chat turn taught about the user and returns the new ids.
    ///
    /// With an extractor (`Memory::with_extractor`, feature `llm`) the model is asked for a
    /// JSON list of `{content, type, entities, importance}` (a Markdown fence or a top-level
    /// `{"memories": [...]}` object is accepted); at most [`Memory::max_per_turn`] of them are
    /// stored, with `{"extraction": "llm", "model": …}` in their metadata. An empty list
    /// stores nothing.
    ///
    /// Without an extractor, or when the answer does not parse, the turn itself is stored as
    /// one `context` entry (`User: … / Assistant: …`) whose metadata says why
    /// (`{"extraction": "none"}` or `{"extraction": "unparsed", "reason": …}`).
    ///
    /// A failed model call (network, 5xx after the client's retries) is returned as
    /// [`Error::Io`] and stores nothing, so a retry neither loses nor duplicates the turn.
    pub async fn store_turn(
        &self,
        user_msg: &str,
        assistant_msg: &str,
        user_id: &str,
    ) -> Result<Vec<i64>> {
        check_user(user_id)?;
        #[cfg(feature = "llm")]
        if let Some(ex) = &self.extractor {
            let entries = match ex.extract(user_msg, assistant_msg).await? {
                extract::Outcome::Memories(list) => list
                    .into_iter()
                    .take(self.max_per_turn)
                    .map(|e| {
                        e.user(user_id)
                            .metadata(serde_json::json!({"extraction": "llm", "model": ex.model()}))
                    })
                    .collect(),
                extract::Outcome::Unparsed(reason) => vec![turn_entry(
                    user_msg,
                    assistant_msg,
                    user_id,
                    serde_json::json!({"extraction": "unparsed", "reason": reason}),
                )],
            };
            return self.add_many(entries).await;
        }
        let entry = turn_entry(
            user_msg,
            assistant_msg,
            user_id,
            serde_json::json!({"extraction": "none"}),
        );
        self.add_many(vec![entry]).await
    }
}

/// The whole turn as one `context` entry.
fn turn_entry(user_msg: &str, assistant_msg: &str, user_id: &str, metadata: Json) -> NewEntry {
    NewEntry::new(format!("User: {user_msg}\nAssistant: {assistant_msg}"))
        .kind(MemoryType::Context)
        .user(user_id)
        .importance(0.3)
        .metadata(metadata)
}

/// Reciprocal rank fusion of rankings (ids best first), scaled so that first in every ranking
/// gives 1.
fn rrf(rankings: &[&[i64]]) -> HashMap<i64, f64> {
    let mut out: HashMap<i64, f64> = HashMap::new();
    for ranking in rankings {
        for (rank, id) in ranking.iter().enumerate() {
            *out.entry(*id).or_default() += 1.0 / (RRF_K + rank as f64 + 1.0);
        }
    }
    let best = rankings.len() as f64 / (RRF_K + 1.0);
    for v in out.values_mut() {
        *v /= best;
    }
    out
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<Store> {
    Ok(Store::Postgres(postgres::Postgres::open(url).await?))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(url: &str) -> Result<Store> {
    Err(Error::FeatureDisabled {
        feature: "postgres",
        what: format!("memory store `{}`", redact(url)),
    })
}

/// The URL without its password.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let auth = &url[s + 3..at];
            match auth.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> f64 {
    secs(SystemTime::now())
}

pub(crate) fn secs(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

pub(crate) fn time(secs: f64) -> SystemTime {
    if secs >= 0.0 {
        UNIX_EPOCH + Duration::from_secs_f64(secs)
    } else {
        UNIX_EPOCH - Duration::from_secs_f64(-secs)
    }
}

/// Builds an [`Entry`] from stored columns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn entry_from(
    id: i64,
    user_id: String,
    kind: &str,
    content: String,
    entities: &str,
    importance: f64,
    created_at: f64,
    accessed_at: f64,
    access_count: i64,
    metadata: &str,
) -> Result<Entry> {
    let bad = |what: &str, e: String| Error::Memory {
        op: "read",
        message: format!("entry {id} has unreadable {what}: {e}"),
    };
    Ok(Entry {
        id,
        content,
        kind: MemoryType::parse(kind).ok_or_else(|| bad("type", kind.to_string()))?,
        entities: serde_json::from_str(entities).map_err(|e| bad("entities", e.to_string()))?,
        importance: importance as f32,
        created_at: time(created_at),
        accessed_at: time(accessed_at),
        access_count: access_count.max(0) as u64,
        metadata: serde_json::from_str(metadata).map_err(|e| bad("metadata", e.to_string()))?,
        user_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrf_prefers_entries_ranked_high_in_both_lists() {
        let r = rrf(&[&[1, 2, 3], &[2, 1, 4]]);
        assert!((r[&1] - r[&2]).abs() < 1e-12);
        assert!(r[&1] > r[&3] && r[&3] > 0.0 && r[&4] > 0.0);
        let top = rrf(&[&[7], &[7]]);
        assert!((top[&7] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn redact_hides_the_password_only() {
        assert_eq!(
            redact("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn prune_rule_decays_importance_with_idle_time() {
        let p = Prune::new()
            .min_score(0.1)
            .half_life(Duration::from_secs(100));
        assert!(!p.removes(1000.0, 0.5, 990.0, 990.0));
        // 0.5 · 0.5^3 = 0.0625 < 0.1
        assert!(p.removes(1000.0, 0.5, 700.0, 700.0));
        // Recently used: survives although old.
        assert!(!p.removes(1000.0, 0.5, 0.0, 999.0));
        let aged = p.clone().max_age(Duration::from_secs(500));
        assert!(aged.removes(1000.0, 0.5, 0.0, 999.0));
        assert!(!aged.removes(1000.0, 0.9, 0.0, 999.0));
    }

    #[test]
    fn type_names_round_trip() {
        for t in MemoryType::ALL {
            assert_eq!(MemoryType::parse(t.as_str()), Some(t));
            assert_eq!(serde_json::to_value(t).unwrap(), Json::from(t.as_str()));
        }
        assert_eq!(
            MemoryType::parse("Preference"),
            Some(MemoryType::Preference)
        );
        assert_eq!(MemoryType::parse("opinion"), None);
    }
}
