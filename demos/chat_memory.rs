//! CHAT with a persistent SQLite memory: in a first session the user tells the assistant about
//! themselves; in a second session (a new conversation, same user) the assistant answers
//! questions from what the memory retrieves.
//!
//! With `OPENAI_BASE_URL` (and `OPENAI_API_KEY`, optional `OPENAI_MODEL`, default gpt-4o-mini)
//! the assistant is an LLM that sees the retrieved memories, and the same model extracts facts
//! from each turn. Without it, a scripted assistant answers with what the memory retrieved, so
//! the demo shows retrieval working with no network at all. Prints one JSON line.

use hyperfunc::agents::{Chat, ChatMemory, Conversation, Reply};
use hyperfunc::memory::Memory;
use hyperfunc::prelude::*;

/// The assistant: an LLM when an endpoint is configured, otherwise a script that answers
/// questions with the first memory the runner retrieved.
fn assistant(memory: Memory) -> anyhow::Result<(Chain, Memory, &'static str)> {
    #[cfg(feature = "llm")]
    if let Ok(url) = std::env::var("OPENAI_BASE_URL") {
        use hyperfunc::llm::{ChatRequest, LlmClient, LlmConfig};
        let key = std::env::var("OPENAI_API_KEY").unwrap_or_default();
        let model = std::env::var("OPENAI_MODEL").unwrap_or_else(|_| "gpt-4o-mini".into());
        let client = LlmClient::new(LlmConfig::new(&url).api_key(&key))?;
        let memory = memory.with_extractor(client.clone(), &model);
        let bot = HyperFn::io("assistant", None, move |turn: Json, _| {
            let (client, model) = (client.clone(), model.clone());
            async move {
                let context = turn["memory_context"].as_str().unwrap_or_default();
                let req = ChatRequest::new(&model)
                    .system(format!(
                        "You are a helpful assistant. Answer in one short sentence. What you remember about the user:\n{context}"
                    ))
                    .user(turn["message"].as_str().unwrap_or_default());
                let resp = client
                    .chat(req)
                    .await
                    .map_err(|e| IoError::fatal(e.to_string()))?;
                Ok(Reply::new(resp.text).to_json())
            }
        });
        return Ok((Chain::new(vec![bot]), memory, "llm"));
    }
    let bot = HyperFn::io("assistant", None, |turn: Json, _| async move {
        let message = turn["message"].as_str().unwrap_or_default();
        let context = turn["memory_context"].as_str().unwrap_or_default();
        let reply = if message.ends_with('?') {
            match context.lines().next() {
                Some(first) => format!("From memory: {}", first.trim_start_matches("- ")),
                None => "I don't know yet.".to_string(),
            }
        } else {
            "Noted.".to_string()
        };
        Ok(Reply::new(reply).to_json())
    });
    Ok((Chain::new(vec![bot]), memory, "scripted"))
}

/// Runs both sessions and returns the demo's JSON summary.
pub async fn run() -> anyhow::Result<serde_json::Value> {
    let path =
        std::env::temp_dir().join(format!("hyperfunc-chat-memory-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let memory = Memory::open(&path.to_string_lossy()).await?;
    let (bot, memory, mode) = assistant(memory)?;
    // Serving one θ: turns are kept under the user (the default, isolated mode is for
    // optimising a population).
    let chat = Chat::new(bot).memory_mode(memory.clone(), ChatMemory::Persistent);
    let theta = Theta::init(&chat, 0, &candle_core::Device::Cpu)?;

    let first = Conversation::new([
        "I'm building a FastAPI project for my team.",
        "I prefer dark mode in every editor I use.",
        "My sister Ada lives in Oslo.",
    ])
    .user("sam");
    chat.converse(&theta, first).await?;

    let questions = [
        ("What project am I working on?", "FastAPI"),
        ("Which editor theme do I like?", "dark mode"),
        ("Where does Ada live?", "Oslo"),
    ];
    let second = Conversation::new(questions.map(|(q, _)| q)).user("sam");
    let result = chat.converse(&theta, second).await?;
    let answers: Vec<serde_json::Value> = result
        .messages
        .iter()
        .zip(questions)
        .map(|(turn, (_, expect))| {
            serde_json::json!({
                "question": turn.user,
                "answer": turn.assistant,
                "recalled": turn.assistant.to_lowercase().contains(&expect.to_lowercase()),
            })
        })
        .collect();
    let recalled = answers.iter().filter(|a| a["recalled"] == true).count();
    let stored = memory.count(Some("sam")).await?;
    drop(memory);
    let _ = std::fs::remove_file(&path);
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
    }
    Ok(serde_json::json!({
        "demo": "chat_memory",
        "mode": mode,
        "memories": stored,
        "answers": answers,
        "recalled": format!("{recalled}/{}", questions.len()),
    }))
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("{}", run().await?);
    Ok(())
}
