//! Prompt learning on a small question-answering system: one `Predict` step answers questions
//! from a context; the optimizer rewrites its instruction from the failures and keeps a rewrite
//! only if the held-out score improves. Needs an OpenAI-compatible endpoint:
//! `OPENAI_BASE_URL`, `OPENAI_API_KEY`, optional `OPENAI_MODEL` (default gpt-4o-mini). Without
//! one it prints what it would do and exits cleanly. Prints one JSON line.

use hyperfunc::eval::ExactMatch;
use hyperfunc::llm::{LlmClient, LlmConfig};
use hyperfunc::prelude::*;
use hyperfunc::prompt::{PromptLearningOptimizer, PromptOptimizer, Signature, Validation};
use serde_json::json;

/// Where the demo sends its calls.
pub struct Endpoint {
    /// Base URL (`…/v1`).
    pub url: String,
    /// API key.
    pub key: String,
    /// The model answering the questions.
    pub model: String,
    /// The model proposing instructions.
    pub meta_model: String,
}

impl Endpoint {
    /// From `OPENAI_BASE_URL`, `OPENAI_API_KEY`, `OPENAI_MODEL`; None without a base URL.
    pub fn from_env() -> Option<Self> {
        let url = std::env::var("OPENAI_BASE_URL").ok()?;
        let model = std::env::var("OPENAI_MODEL").unwrap_or_else(|_| "gpt-4o-mini".into());
        Some(Self {
            url,
            key: std::env::var("OPENAI_API_KEY").unwrap_or_default(),
            meta_model: model.clone(),
            model,
        })
    }
}

/// (context, question, answer): short answers, so exact match is a fair metric.
const DATA: [(&str, &str, &str); 12] = [
    (
        "The Eiffel Tower is in Paris, France.",
        "In which city is the Eiffel Tower?",
        "Paris",
    ),
    (
        "Mount Kilimanjaro is the highest mountain in Africa.",
        "Which is the highest mountain in Africa?",
        "Mount Kilimanjaro",
    ),
    (
        "Water boils at 100 degrees Celsius at sea level.",
        "At how many degrees Celsius does water boil at sea level?",
        "100",
    ),
    (
        "The Nile flows north into the Mediterranean Sea.",
        "Into which sea does the Nile flow?",
        "Mediterranean Sea",
    ),
    (
        "Marie Curie won Nobel Prizes in physics and chemistry.",
        "Who won Nobel Prizes in physics and chemistry?",
        "Marie Curie",
    ),
    (
        "A spider has eight legs.",
        "How many legs does a spider have?",
        "8",
    ),
    (
        "Canberra is the capital of Australia.",
        "What is the capital of Australia?",
        "Canberra",
    ),
    (
        "The Pacific is the largest ocean on Earth.",
        "Which is the largest ocean on Earth?",
        "Pacific",
    ),
    (
        "Light from the Sun reaches Earth in about 8 minutes.",
        "In about how many minutes does sunlight reach Earth?",
        "8",
    ),
    (
        "Leonardo da Vinci painted the Mona Lisa.",
        "Who painted the Mona Lisa?",
        "Leonardo da Vinci",
    ),
    (
        "Jupiter is the largest planet of the Solar System.",
        "Which is the largest planet of the Solar System?",
        "Jupiter",
    ),
    (
        "The human heart has four chambers.",
        "How many chambers does the human heart have?",
        "4",
    ),
];

/// Runs the demo against `endpoint`, or describes it when there is none.
pub async fn run_with(endpoint: Option<Endpoint>) -> anyhow::Result<serde_json::Value> {
    let sig = Signature::new("Answer the question.")
        .input("context", "a sentence with the facts")
        .input("question", "a question about the context")
        .output("answer", "the answer");
    let Some(ep) = endpoint else {
        let plan = format!(
            "prompt_qa: no endpoint (set OPENAI_BASE_URL and OPENAI_API_KEY, optionally \
             OPENAI_MODEL). It would answer {} questions with one Predict step whose system \
             message is:\n---\n{}\n---\nthen rewrite its instruction for up to 4 rounds with the \
             same model, keeping a rewrite only if exact-match accuracy on a held-out third improves.",
            DATA.len(),
            sig.render_system(sig.instruction())
        );
        eprintln!("{plan}");
        return Ok(json!({"demo": "prompt_qa", "skipped": "no endpoint configured"}));
    };
    let client = LlmClient::new(LlmConfig::new(&ep.url).api_key(&ep.key))?;
    let qa = HyperFn::predict("qa", &client, &ep.model, sig)?;
    let sys = Chain::new(vec![qa]);
    let (inputs, targets): (Vec<_>, Vec<_>) = DATA
        .iter()
        .map(|(c, q, a)| (json!({"context": c, "question": q}), json!(a)))
        .unzip();
    let data = Examples::json(inputs, targets)?;
    let theta = Theta::init(&sys, 0, &candle_core::Device::Cpu)?;
    let report = PromptLearningOptimizer::new(&client, &ep.meta_model)
        .max_iterations(4)
        .validation(Validation::Split(1.0 / 3.0))
        .seed(7)
        .optimize_prompts(&sys, &theta, &data, &ExactMatch::new())
        .await?;
    eprintln!("{}", report.to_markdown());
    Ok(json!({
        "demo": "prompt_qa",
        "model": ep.model,
        "initial_score": report.initial_score,
        "final_score": report.final_score,
        "candidates": report.history.len(),
        "rejected": report.rejected().count(),
        "meta_calls": report.meta_calls,
        "stop": report.stop,
        "prompt": report.theta.prompt("qa"),
        "llm_requests": client.stats().total.requests,
    }))
}

/// Runs the demo against the endpoint in the environment (if any).
pub async fn run() -> anyhow::Result<serde_json::Value> {
    run_with(Endpoint::from_env()).await
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("{}", run().await?);
    Ok(())
}
