//! Extraction of memories from a chat turn by an LLM (feature `llm`).
//!
//! Owns the prompt and the lenient parsing of the answer; storing and the fallback for an
//! unparsable answer are [`Memory::store_turn`](super::Memory::store_turn)'s.

use crate::error::{Error, Result};
use crate::function::Json;
use crate::llm::{ChatRequest, LlmClient};

use super::{MemoryType, NewEntry};

const PROMPT: &str = "You extract long-term memories about the user from one conversation turn. \
Keep only what will still matter in later conversations: facts about the user, preferences, \
events with their time, and named entities (people, projects, products, places). \
Write each memory as one short sentence in the third person or as the user said it. \
Answer with JSON only: {\"memories\": [{\"content\": \"...\", \"type\": \
\"fact|preference|context|event|entity\", \"entities\": [\"...\"], \"importance\": 0.0-1.0}]}. \
Answer {\"memories\": []} when there is nothing worth remembering.";

/// A model that extracts memories.
pub(crate) struct Extractor {
    client: LlmClient,
    model: String,
}

/// What the model's answer gave.
pub(crate) enum Outcome {
    /// Parsed memories (maybe none).
    Memories(Vec<NewEntry>),
    /// The answer was not the asked-for JSON; why.
    Unparsed(String),
}

impl Extractor {
    pub(crate) fn new(client: LlmClient, model: &str) -> Self {
        Self {
            client,
            model: model.into(),
        }
    }

    pub(crate) fn model(&self) -> &str {
        &self.model
    }

    /// Asks the model; a failed call is an error, an unreadable answer is an [`Outcome`].
    pub(crate) async fn extract(&self, user_msg: &str, assistant_msg: &str) -> Result<Outcome> {
        let req = ChatRequest::new(&self.model)
            .system(PROMPT)
            .user(format!("User: {user_msg}\nAssistant: {assistant_msg}"))
            .temperature(0.0)
            .json()
            .label("memory.extract");
        let resp = self.client.chat(req).await.map_err(|e| Error::Io {
            function: "memory.store_turn".into(),
            retryable: e.is_retryable(),
            message: format!("extraction with `{}` failed: {e}", self.model),
        })?;
        Ok(parse(&resp.text))
    }
}

/// Parses `[{…}]`, `{"memories": [{…}]}` or either inside a Markdown code fence. Items without
/// content are skipped, unknown types become `context`, importance is clamped into \[0, 1\]
/// (0.5 when missing).
pub(crate) fn parse(text: &str) -> Outcome {
    let t = text.trim();
    let t = match t.strip_prefix("```") {
        Some(rest) => {
            // Drop the info string (`json`) up to the first newline, and the closing fence.
            let rest = rest.split_once('\n').map_or("", |(_, body)| body);
            rest.trim_end().strip_suffix("```").unwrap_or(rest)
        }
        None => t,
    };
    let json: Json = match serde_json::from_str(t.trim()) {
        Ok(j) => j,
        Err(e) => return Outcome::Unparsed(format!("not JSON: {e}")),
    };
    let items = match &json {
        Json::Array(items) => items,
        Json::Object(o) => match o.get("memories") {
            Some(Json::Array(items)) => items,
            _ => return Outcome::Unparsed("an object without a `memories` array".into()),
        },
        _ => return Outcome::Unparsed("neither a list nor an object".into()),
    };
    let mut out = Vec::new();
    for item in items {
        let Some(content) = item.get("content").and_then(Json::as_str) else {
            continue;
        };
        if content.trim().is_empty() {
            continue;
        }
        let kind = item
            .get("type")
            .and_then(Json::as_str)
            .and_then(MemoryType::parse)
            .unwrap_or(MemoryType::Context);
        let entities: Vec<String> = item
            .get("entities")
            .and_then(Json::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Json::as_str)
                    .filter(|s| !s.contains('\0'))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let importance = item
            .get("importance")
            .and_then(Json::as_f64)
            .filter(|x| x.is_finite())
            .map_or(0.5, |x| x.clamp(0.0, 1.0)) as f32;
        out.push(
            NewEntry::new(content.trim())
                .kind(kind)
                .entities(entities)
                .importance(importance),
        );
    }
    if out.is_empty() && !items.is_empty() {
        return Outcome::Unparsed("no item has a `content` string".into());
    }
    Outcome::Memories(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memories(text: &str) -> Vec<NewEntry> {
        match parse(text) {
            Outcome::Memories(m) => m,
            Outcome::Unparsed(why) => panic!("unparsed: {why}"),
        }
    }

    #[test]
    fn fenced_lists_and_wrapped_objects_parse() {
        let m = memories(
            "```json\n[{\"content\": \"likes tea\", \"type\": \"preference\", \"importance\": 1.7}]\n```",
        );
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].kind, MemoryType::Preference);
        assert_eq!(m[0].importance, 1.0);
        let m = memories(
            "{\"memories\": [{\"content\": \"x\", \"type\": \"opinion\", \"entities\": [\"A\", 3]}]}",
        );
        assert_eq!(m[0].kind, MemoryType::Context);
        assert_eq!(m[0].entities, ["A"]);
        assert!(memories("[]").is_empty());
    }

    #[test]
    fn prose_and_wrong_shapes_are_unparsed() {
        for text in [
            "I think the user likes tea.",
            "{\"facts\": []}",
            "42",
            "[{\"text\": \"x\"}]",
        ] {
            assert!(matches!(parse(text), Outcome::Unparsed(_)), "{text}");
        }
    }
}
