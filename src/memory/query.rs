//! Query tokenisation and the retrieval request.
//!
//! Owns the words a query searches for. Both backends build their full-text expression only from
//! these tokens (alphanumeric, lowercase, no stopwords), never from raw user text, so nothing a
//! user types can become FTS5 or tsquery syntax.

use super::MemoryType;

/// English function words that carry no topic: dropped from queries so that "What project am I
/// working on?" searches for `project` and `working` only.
const STOPWORDS: &[&str] = &[
    "a",
    "about",
    "above",
    "after",
    "again",
    "against",
    "all",
    "am",
    "an",
    "and",
    "any",
    "are",
    "as",
    "at",
    "be",
    "because",
    "been",
    "before",
    "being",
    "below",
    "between",
    "both",
    "but",
    "by",
    "can",
    "could",
    "did",
    "do",
    "does",
    "doing",
    "down",
    "during",
    "each",
    "few",
    "for",
    "from",
    "further",
    "had",
    "has",
    "have",
    "having",
    "he",
    "her",
    "here",
    "hers",
    "herself",
    "him",
    "himself",
    "his",
    "how",
    "i",
    "if",
    "in",
    "into",
    "is",
    "it",
    "its",
    "itself",
    "just",
    "know",
    "let",
    "me",
    "more",
    "most",
    "my",
    "myself",
    "no",
    "nor",
    "not",
    "now",
    "of",
    "off",
    "on",
    "once",
    "only",
    "or",
    "other",
    "our",
    "ours",
    "ourselves",
    "out",
    "over",
    "own",
    "please",
    "remember",
    "same",
    "she",
    "should",
    "so",
    "some",
    "such",
    "tell",
    "than",
    "that",
    "the",
    "their",
    "theirs",
    "them",
    "themselves",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "to",
    "too",
    "under",
    "until",
    "up",
    "us",
    "very",
    "was",
    "we",
    "were",
    "what",
    "when",
    "where",
    "which",
    "while",
    "who",
    "whom",
    "why",
    "will",
    "with",
    "would",
    "you",
    "your",
    "yours",
    "yourself",
    "yourselves",
    "m",
    "s",
    "t",
    "d",
    "ll",
    "re",
    "ve",
];

/// The search terms of a text: maximal runs of alphanumeric characters (Unicode), lowercased,
/// without English stopwords, deduplicated in order of first appearance.
///
/// # Examples
/// ```
/// use hyperfunc::memory::tokenize;
/// assert_eq!(tokenize("What project am I working on?"), ["project", "working"]);
/// // Search syntax becomes plain words: "or" is a stopword, "a" too.
/// assert_eq!(tokenize("\"x\" OR NEAR(a b)*"), ["x", "near", "b"]);
/// ```
pub fn tokenize(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for word in text.split(|c: char| !c.is_alphanumeric()) {
        if word.is_empty() {
            continue;
        }
        let w = word.to_lowercase();
        if STOPWORDS.contains(&w.as_str()) || out.contains(&w) {
            continue;
        }
        out.push(w);
    }
    out
}

/// A retrieval request: the question, whose memories, how many, and filters.
///
/// # Examples
/// ```
/// use hyperfunc::memory::{MemoryType, Query};
/// let q = Query::new("What project am I working on?")
///     .user("u1").limit(5).types([MemoryType::Fact]).min_importance(0.3);
/// assert_eq!(q.limit, 5);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// The natural-language question or keywords.
    pub text: String,
    /// Whose memories to search (default `"default"`); no query ever sees another user's.
    pub user_id: String,
    /// At most this many results (default 5).
    pub limit: usize,
    /// Only these types (all when empty).
    pub types: Vec<MemoryType>,
    /// Only entries at least this important (default 0).
    pub min_importance: f32,
}

impl Query {
    /// A query for `text` over the default user's memories.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            user_id: super::DEFAULT_USER.into(),
            limit: 5,
            types: Vec::new(),
            min_importance: 0.0,
        }
    }

    /// Searches this user's memories.
    pub fn user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = user_id.into();
        self
    }

    /// Returns at most `n` results.
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = n;
        self
    }

    /// Only entries of these types.
    pub fn types(mut self, types: impl IntoIterator<Item = MemoryType>) -> Self {
        self.types = types.into_iter().collect();
        self
    }

    /// Only entries with importance ≥ `min`.
    pub fn min_importance(mut self, min: f32) -> Self {
        self.min_importance = min;
        self
    }

    /// The search terms (see [`tokenize`]).
    pub fn terms(&self) -> Vec<String> {
        tokenize(&self.text)
    }
}

/// The filters of a query that the database applies, in a form both backends bind as parameters.
#[derive(Clone, Debug)]
pub(crate) struct Filter {
    pub user_id: String,
    pub min_importance: f64,
    /// `,fact,preference,` or empty for all types (matched with `instr`/`position`).
    pub kinds: String,
}

impl Filter {
    pub(crate) fn of(q: &Query) -> Self {
        let kinds = if q.types.is_empty() {
            String::new()
        } else {
            let mut s = String::from(",");
            for t in &q.types {
                s.push_str(t.as_str());
                s.push(',');
            }
            s
        };
        Self {
            user_id: q.user_id.clone(),
            min_importance: f64::from(q.min_importance),
            kinds,
        }
    }
}

/// `"a" OR "b"`: an FTS5 MATCH expression from tokens (alphanumeric only, quoted anyway).
pub(crate) fn fts5_match(tokens: &[String]) -> String {
    tokens
        .iter()
        .map(|t| format!("\"{}\"", t.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// `a | b`: a `to_tsquery` expression from tokens (alphanumeric only).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn tsquery(tokens: &[String]) -> String {
    tokens.join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_alphanumeric_lowercase_and_deduplicated() {
        assert_eq!(
            tokenize("I'm building a FastAPI project; FastAPI!"),
            ["building", "fastapi", "project"]
        );
        assert_eq!(tokenize("Straße café 東京"), ["straße", "café", "東京"]);
        assert!(tokenize("what am I? \0 ... ()").is_empty());
        assert_eq!(
            fts5_match(&tokenize("a NEAR(x y)")),
            "\"near\" OR \"x\" OR \"y\""
        );
        assert_eq!(tsquery(&tokenize("x -y")), "x | y");
    }
}
