//! Named, content-hashed pieces of prompt.
//!
//! A prompt built from [`Fragment`]s puts the stable ones first, in the order given, and the
//! varying ones (today's date, the user's question) after them, so consecutive calls share the
//! longest possible prefix and hit the provider's prompt cache. The [`Ledger`](super::Ledger)
//! stores which fragments every LLM call was built from; `hyperfunc llm report` finds cache
//! candidates, cache breakers and unused fragments from that.
//!
//! # Examples
//! ```
//! use hyperfunc::tune::{Fragment, Prompt};
//!
//! let rules = Fragment::new("rules", "Answer in one word.");
//! let today = Fragment::varying("today", "Today is 2026-11-26.");
//! let prompt = Prompt::new().with(&today).with(&rules);
//! // The stable fragment goes first whatever the order of `add`.
//! assert_eq!(prompt.text(), "Answer in one word.\n\nToday is 2026-11-26.");
//! assert_eq!(prompt.fragments()[0].name(), "rules");
//! assert_eq!(rules.hash(), Fragment::new("other name", "Answer in one word.").hash());
//! ```

use std::fmt;
use std::sync::Arc;

/// A named piece of prompt text with a content hash.
#[derive(Clone, PartialEq, Eq)]
pub struct Fragment {
    name: Arc<str>,
    text: Arc<str>,
    hash: Arc<str>,
    stable: bool,
}

impl fmt::Debug for Fragment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fragment")
            .field("name", &self.name)
            .field("hash", &self.hash)
            .field("chars", &self.text.chars().count())
            .field("stable", &self.stable)
            .finish()
    }
}

impl Fragment {
    /// A stable fragment: the same text on every call (instructions, examples, a schema).
    pub fn new(name: &str, text: impl Into<String>) -> Self {
        Self::make(name, text.into(), true)
    }

    /// A fragment whose text changes between calls (a date, the user's input).
    pub fn varying(name: &str, text: impl Into<String>) -> Self {
        Self::make(name, text.into(), false)
    }

    fn make(name: &str, text: String, stable: bool) -> Self {
        Self {
            name: Arc::from(name),
            hash: Arc::from(crate::util::fnv1a_hex(text.as_bytes())),
            text: Arc::from(text),
            stable,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The hash of its text (16 hex digits): equal texts have equal hashes, whatever the name.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Whether it is declared stable.
    pub fn is_stable(&self) -> bool {
        self.stable
    }

    /// Estimated tokens (a quarter of the characters, at least 1 for non-empty text).
    pub fn tokens_estimate(&self) -> u64 {
        estimate_tokens(&self.text)
    }
}

pub(crate) fn estimate_tokens(text: &str) -> u64 {
    let c = text.chars().count() as u64;
    if c == 0 {
        0
    } else {
        c.div_ceil(4)
    }
}

/// A prompt assembled from fragments: stable ones first (in the order added), then varying ones
/// (in the order added), joined by a blank line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prompt {
    stable: Vec<Fragment>,
    varying: Vec<Fragment>,
}

impl Prompt {
    /// An empty prompt.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a fragment.
    pub fn with(mut self, fragment: &Fragment) -> Self {
        if fragment.stable {
            self.stable.push(fragment.clone());
        } else {
            self.varying.push(fragment.clone());
        }
        self
    }

    /// The fragments in the order they are sent.
    pub fn fragments(&self) -> Vec<&Fragment> {
        self.stable.iter().chain(&self.varying).collect()
    }

    /// The assembled text.
    pub fn text(&self) -> String {
        let parts: Vec<&str> = self.fragments().into_iter().map(Fragment::text).collect();
        parts.join("\n\n")
    }
}
