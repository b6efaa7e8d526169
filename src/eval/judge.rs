//! LLM judges: a model grades each case against criteria on an integer scale (feature `llm`).
//!
//! The judge asks for `SCORE: <n>` and `FEEDBACK: <text>` lines and reads the answer with
//! [`parse_judgement`], which also understands the usual ways models stray from that format.
//! Requests go through the [`LlmClient`], so its limiter, retries, cache (temperature is always
//! 0) and per-label statistics apply; this module knows nothing about systems or optimizers.

use futures::future::{join_all, BoxFuture};

use serde_json::json;

use super::{parse_judgement, text_of, Case, OwnedCase, ScoreResult, Scorer};
use crate::error::{Error, Result};
use crate::llm::{ChatRequest, LlmClient};

/// A model that grades each case on an integer scale against written criteria.
///
/// Temperature is always 0 (so the client's cache can serve repeated cases) and every request is
/// labelled with the judge's name in the client's statistics. A reply without a score is an
/// [`Error::Io`] (not retryable) quoting the reply.
///
/// Note that the builder method [`LlmJudge::name`] shadows [`Scorer::name`] in method-call
/// syntax: read the name with `Scorer::name(&judge)`.
///
/// # Examples
/// ```no_run
/// use hyperfunc::eval::{metric, LlmJudge};
/// use hyperfunc::llm::{LlmClient, LlmConfig};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = LlmClient::new(LlmConfig::from_env()?)?;
/// let judge = LlmJudge::new(&client, "gpt-4o-mini")
///     .criteria("Is the answer factually correct and does it cite a source?")
///     .scale(1, 5)
///     .name("citation_judge");
/// let m = metric(judge); // a Metric for evaluate / Es
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LlmJudge {
    client: LlmClient,
    model: String,
    criteria: String,
    min: u32,
    max: u32,
    include_inputs: bool,
    name: String,
}

impl std::fmt::Debug for LlmJudge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmJudge")
            .field("name", &self.name)
            .field("model", &self.model)
            .field("criteria", &self.criteria)
            .field("scale", &(self.min..=self.max))
            .field("include_inputs", &self.include_inputs)
            .finish_non_exhaustive()
    }
}

const DEFAULT_CRITERIA: &str = "Overall quality: the output is correct, complete and clear. \
     When an expected answer is given, the output must agree with it.";

impl LlmJudge {
    /// A judge using `model` through `client`, on a 1–10 scale with general quality criteria,
    /// showing it the inputs, named `llm_judge`.
    pub fn new(client: &LlmClient, model: &str) -> Self {
        Self {
            client: client.clone(),
            model: model.into(),
            criteria: DEFAULT_CRITERIA.into(),
            min: 1,
            max: 10,
            include_inputs: true,
            name: "llm_judge".into(),
        }
    }

    /// What the judge grades on, in words.
    pub fn criteria(mut self, text: impl Into<String>) -> Self {
        self.criteria = text.into();
        self
    }

    /// The integer scale (default 1–10); `min` must be below `max`, checked when scoring.
    pub fn scale(mut self, min: u32, max: u32) -> Self {
        self.min = min;
        self.max = max;
        self
    }

    /// Whether the prompt shows the example's input (default `true`).
    pub fn include_inputs(mut self, yes: bool) -> Self {
        self.include_inputs = yes;
        self
    }

    /// The judge's name: its request label and the `function` of its errors.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The model it asks.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// A judge of summaries: faithful to the source, covers the key points, concise.
    pub fn summarization(client: &LlmClient, model: &str) -> Self {
        Self::new(client, model)
            .name("summarization_judge")
            .criteria(
                "Summary quality: the output is faithful to the input (no invented facts), covers \
             its key points, and is concise and readable.",
            )
    }

    /// A judge of code: correct for the task, handles edge cases, idiomatic.
    pub fn code_correctness(client: &LlmClient, model: &str) -> Self {
        Self::new(client, model)
            .name("code_correctness_judge")
            .criteria(
            "Code correctness: the output code does what the input asks, handles edge cases and \
             errors, would compile or run as written, and is idiomatic and readable.",
        )
    }

    /// A judge of a conversational reply: helpful, on topic, coherent, polite.
    pub fn conversation_quality(client: &LlmClient, model: &str) -> Self {
        Self::new(client, model)
            .name("conversation_quality_judge")
            .criteria(
                "Conversation quality: the reply is helpful and relevant to the user's message, \
                 coherent with the conversation so far, appropriately brief, and polite.",
            )
    }

    /// A judge of facts: every claim agrees with the expected answer and common knowledge.
    pub fn factual_accuracy(client: &LlmClient, model: &str) -> Self {
        Self::new(client, model)
            .name("factual_accuracy_judge")
            .criteria(
                "Factual accuracy: every claim in the output is true and agrees with the expected \
             answer; penalise errors and unsupported claims more than omissions.",
            )
    }

    /// A judge of instruction following: does what the input asks, in the asked form.
    pub fn instruction_following(client: &LlmClient, model: &str) -> Self {
        Self::new(client, model)
            .name("instruction_following_judge")
            .criteria(
                "Instruction following: the output does exactly what the input instructs, \
                 respects every stated constraint (format, length, language, style), and adds \
                 nothing that was not asked for.",
            )
    }

    /// The request for one case.
    pub fn request(&self, case: Case<'_>) -> ChatRequest {
        let (min, max) = (self.min, self.max);
        let system = format!(
            "You are a strict, fair evaluator. Grade the output against these criteria:\n{}\n\n\
             Use an integer scale from {min} (worst) to {max} (best). Reply with exactly two \
             lines and nothing else:\nSCORE: <integer from {min} to {max}>\nFEEDBACK: <one or two \
             sentences on what is right or wrong>",
            self.criteria
        );
        let mut user = String::new();
        if self.include_inputs && !case.input.is_null() {
            user.push_str(&format!("## Input\n{}\n\n", text_of(case.input)));
        }
        if !case.expected.is_null() {
            user.push_str(&format!(
                "## Expected answer\n{}\n\n",
                text_of(case.expected)
            ));
        }
        user.push_str(&format!("## Output to grade\n{}", text_of(case.pred)));
        ChatRequest::new(&self.model)
            .system(system)
            .user(user)
            .temperature(0.0)
            .label(&self.name)
    }

    /// Grades every case at once (the client's limiter bounds the request rate); results in
    /// order.
    pub async fn score_batch(&self, cases: &[OwnedCase]) -> Vec<Result<ScoreResult>> {
        join_all(cases.iter().map(|c| Scorer::score(self, c.as_case()))).await
    }

    async fn judge(&self, case: Case<'_>) -> Result<ScoreResult> {
        if self.min >= self.max {
            return Err(Error::InvalidConfig {
                field: format!("{}.scale", self.name),
                reason: format!("min {} must be below max {}", self.min, self.max),
            });
        }
        let req = self.request(case);
        // Never touch the HTTP stack on the first poll: a synchronous `Metric::score` polls once
        // (possibly outside any runtime) and must see this scorer as async, not panic.
        tokio::task::yield_now().await;
        let resp = self.client.chat(req).await.map_err(|e| Error::Io {
            function: self.name.clone(),
            message: e.to_string(),
            retryable: e.is_retryable(),
        })?;
        let Some((score, feedback)) = parse_judgement(&resp.text, self.min as f32, self.max as f32)
        else {
            return Err(Error::Io {
                function: self.name.clone(),
                message: format!(
                    "no score in judge reply: {}",
                    resp.text.chars().take(200).collect::<String>()
                ),
                retryable: false,
            });
        };
        Ok(ScoreResult::new(score, feedback)
            .with_details(json!({"model": resp.model, "reply": resp.text})))
    }
}

impl Scorer for LlmJudge {
    fn name(&self) -> &str {
        &self.name
    }

    fn score<'a>(&'a self, case: Case<'a>) -> BoxFuture<'a, Result<ScoreResult>> {
        Box::pin(self.judge(case))
    }
}
