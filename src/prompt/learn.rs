//! Prompt learning by meta-prompting, judged on held-out examples.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::BoxFuture;
use serde::Serialize;

use crate::data::{Examples, Value};
use crate::error::{Error, Result};
use crate::eval::{score_all, ScoreResult, Scorer};
use crate::function::Json;
use crate::llm::{ChatRequest, LlmClient, LlmError};
use crate::metric::{Batch, Metric};
use crate::observe::{Hub, Record, RecordKind, Status};
use crate::population::{evaluate_population, evaluate_population_observed, Population};
use crate::system::HyperSystem;
use crate::theta::{Registry, Theta};

/// Feedback for one failed example: `(input, prediction, expected, score) -> text`. An empty
/// text falls back to the scorer's feedback.
pub type FeedbackFn = Arc<dyn Fn(&Json, &Json, &Json, &ScoreResult) -> String + Send + Sync>;

/// Where a rewritten prompt must prove itself.
#[derive(Clone, Debug)]
pub enum Validation {
    /// Hold out this fraction of the examples (seeded, deterministic); the rest is for finding
    /// failures. The default, with 0.3.
    Split(f64),
    /// These examples judge; all given examples are for finding failures.
    Examples(Examples),
    /// Judge on the same examples the failures come from. Overfits; only if you insist.
    TrainOnly,
}

/// Why prompt learning stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptStop {
    /// It ran `max_iterations` rounds.
    MaxIterations,
    /// No example failed: there was no feedback to learn from.
    NoFeedback,
    /// The meta-prompt model's client refused further calls (request or cost budget).
    Budget(String),
    /// No function has a learnable prompt (or the optimizer is the no-op).
    Nothing,
}

/// One prompt that was tried, with its scores.
#[derive(Clone, Debug, Serialize)]
pub struct PromptCandidate {
    /// Round (0 = the starting prompt).
    pub iteration: usize,
    /// The hyperfunction whose prompt it is.
    pub function: String,
    /// The prompt text.
    pub prompt: String,
    /// Its score on the judging examples.
    pub score: f32,
    /// The score of the prompt it had to beat (the starting prompt's own score for round 0).
    pub baseline: f32,
    /// Whether it was kept.
    pub accepted: bool,
    /// How many failures the meta-prompt showed.
    pub failures_shown: usize,
    /// Why it was kept or rejected.
    pub note: String,
}

/// What prompt learning returns.
#[derive(Clone, Debug, Serialize)]
pub struct PromptReport {
    /// θ with the accepted prompts.
    #[serde(skip)]
    pub theta: Theta,
    /// Every prompt tried, in order (the starting prompts first, as accepted round-0 entries).
    pub history: Vec<PromptCandidate>,
    /// The judging score of the starting θ.
    pub initial_score: f32,
    /// The judging score of the returned θ.
    pub final_score: f32,
    /// Which examples judged: `"validation"` or `"train"`.
    pub judged_on: &'static str,
    /// Rounds run.
    pub iterations: usize,
    /// Calls to the meta-prompt model.
    pub meta_calls: usize,
    /// Why it stopped.
    pub stop: PromptStop,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl PromptReport {
    /// The rejected candidates.
    pub fn rejected(&self) -> impl Iterator<Item = &PromptCandidate> {
        self.history.iter().filter(|c| !c.accepted)
    }

    /// A markdown table of the history.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "prompt learning: {:.3} → {:.3} on {} ({} rounds, {} meta calls, stop: {:?})\n\n\
             | round | function | score | baseline | kept | prompt |\n|---|---|---|---|---|---|\n",
            self.initial_score,
            self.final_score,
            self.judged_on,
            self.iterations,
            self.meta_calls,
            self.stop
        );
        for c in &self.history {
            let prompt: String = c.prompt.chars().take(60).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} | {:.3} | {} | {} |",
                c.iteration,
                c.function,
                c.score,
                c.baseline,
                if c.accepted { "yes" } else { "no" },
                prompt.replace(['\n', '|'], " ")
            );
        }
        s
    }
}

/// A prompt optimizer: [`PromptLearningOptimizer`] or the [`NoOpPromptOptimizer`].
pub trait PromptOptimizer: Send + Sync {
    /// Improves the learnable prompts of `theta` on `examples` against `scorer`.
    fn optimize_prompts<'a, S: HyperSystem>(
        &'a self,
        sys: &'a S,
        theta: &'a Theta,
        examples: &'a Examples,
        scorer: &'a dyn Scorer,
    ) -> impl Future<Output = Result<PromptReport>> + Send + 'a;
}

/// Leaves every prompt as it is (and reports its score): the control arm, or the prompt half
/// of a joint run that should only tune numbers.
#[derive(Clone, Debug, Default)]
pub struct NoOpPromptOptimizer;

impl PromptOptimizer for NoOpPromptOptimizer {
    async fn optimize_prompts<'a, S: HyperSystem>(
        &'a self,
        sys: &'a S,
        theta: &'a Theta,
        examples: &'a Examples,
        scorer: &'a dyn Scorer,
    ) -> Result<PromptReport> {
        let start = Instant::now();
        let s = score_theta(sys, theta, examples, scorer, None).await?.score;
        Ok(PromptReport {
            theta: theta.clone(),
            history: Vec::new(),
            initial_score: s,
            final_score: s,
            judged_on: "train",
            iterations: 0,
            meta_calls: 0,
            stop: PromptStop::Nothing,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// Improves instructions by meta-prompting: evaluate, collect the failures with feedback, ask a
/// model for a better instruction, and keep it only if the score on held-out examples improves.
///
/// Defaults: 5 rounds, 30 % of the examples held out (seed 0), an example fails below score 1,
/// at most 8 failures shown within 6 000 characters, meta-model temperature 0.7.
///
/// # Examples
/// ```no_run
/// use hyperfunc::prelude::*;
/// use hyperfunc::eval::ExactMatch;
/// use hyperfunc::llm::{LlmClient, LlmConfig};
/// use hyperfunc::prompt::{PromptLearningOptimizer, PromptOptimizer, Signature};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let client = LlmClient::new(LlmConfig::from_env()?)?;
/// let sig = Signature::new("Answer.").input("question", "").output("answer", "");
/// let sys = Chain::new(vec![HyperFn::predict("qa", &client, "gpt-4o-mini", sig)?]);
/// let data = Examples::json(
///     vec![serde_json::json!({"question": "2+2?"}), serde_json::json!({"question": "3+3?"})],
///     vec![serde_json::json!("4"), serde_json::json!("6")],
/// )?;
/// let theta = Theta::init(&sys, 0, &candle_core::Device::Cpu)?;
/// let report = PromptLearningOptimizer::new(&client, "gpt-4o-mini")
///     .optimize_prompts(&sys, &theta, &data, &ExactMatch::new()).await?;
/// println!("{}", report.to_markdown());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct PromptLearningOptimizer {
    client: LlmClient,
    model: String,
    max_iterations: usize,
    validation: Validation,
    seed: u64,
    threshold: f32,
    max_failures: usize,
    context_chars: usize,
    temperature: f32,
    min_improvement: f32,
    feedback: Option<FeedbackFn>,
    hub: Option<Hub>,
}

impl std::fmt::Debug for PromptLearningOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptLearningOptimizer")
            .field("model", &self.model)
            .field("max_iterations", &self.max_iterations)
            .field("validation", &self.validation)
            .field("threshold", &self.threshold)
            .finish_non_exhaustive()
    }
}

const META_SYSTEM: &str = "You are an expert prompt engineer. You rewrite the instruction of one \
step of an AI system so that it stops making the mistakes shown, without breaking what works.";

impl PromptLearningOptimizer {
    /// An optimizer asking `model` through `client` for better instructions.
    pub fn new(client: &LlmClient, model: &str) -> Self {
        Self {
            client: client.clone(),
            model: model.to_string(),
            max_iterations: 5,
            validation: Validation::Split(0.3),
            seed: 0,
            threshold: 1.0,
            max_failures: 8,
            context_chars: 6000,
            temperature: 0.7,
            min_improvement: 0.0,
            feedback: None,
            hub: None,
        }
    }

    /// Rounds (each proposes one rewrite per learnable prompt).
    pub fn max_iterations(mut self, n: usize) -> Self {
        self.max_iterations = n;
        self
    }

    /// Where rewrites are judged (default: 30 % held out).
    pub fn validation(mut self, v: Validation) -> Self {
        self.validation = v;
        self
    }

    /// Seed of the held-out split and of the failure sample.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// An example whose score is below this is a failure (default 1.0).
    pub fn failure_threshold(mut self, t: f32) -> Self {
        self.threshold = t;
        self
    }

    /// Most failures shown to the meta-prompt model per proposal.
    pub fn max_failures(mut self, n: usize) -> Self {
        self.max_failures = n;
        self
    }

    /// Character budget of the failures section of the meta-prompt.
    pub fn context_chars(mut self, n: usize) -> Self {
        self.context_chars = n;
        self
    }

    /// Temperature of the meta-prompt model.
    pub fn temperature(mut self, t: f32) -> Self {
        self.temperature = t;
        self
    }

    /// A rewrite is kept only if it beats the current score by more than this (default 0:
    /// strictly better).
    pub fn min_improvement(mut self, d: f32) -> Self {
        self.min_improvement = d;
        self
    }

    /// Custom feedback for failed examples (instead of the scorer's, or the default
    /// expected-vs-got diff).
    pub fn feedback_fn(
        mut self,
        f: impl Fn(&Json, &Json, &Json, &ScoreResult) -> String + Send + Sync + 'static,
    ) -> Self {
        self.feedback = Some(Arc::new(f));
        self
    }

    /// Records every evaluation into `hub`.
    pub fn hub(mut self, hub: Hub) -> Self {
        self.hub = Some(hub);
        self
    }

    fn validate(&self) -> Result<()> {
        if let Validation::Split(f) = self.validation {
            if !(f > 0.0 && f < 1.0) {
                return Err(Error::config(
                    "validation",
                    format!("the held-out fraction must be in (0, 1), got {f}"),
                ));
            }
        }
        if self.max_failures == 0 {
            return Err(Error::config("max_failures", "must be at least 1"));
        }
        Ok(())
    }

    /// The failures section: numbered examples, each field clipped, within the budget.
    fn failures_text(&self, scored: &Scored, iteration: usize) -> (String, usize) {
        let mut idx: Vec<usize> = (0..scored.results.len())
            .filter(|&i| scored.results[i].score < self.threshold)
            .collect();
        // A seeded shuffle, so rounds see different failures but runs repeat.
        for i in (1..idx.len()).rev() {
            let u = crate::rng::uniform(&[self.seed, 0xFA11, iteration as u64, i as u64]);
            let j = ((u * (i + 1) as f64) as usize).min(i);
            idx.swap(i, j);
        }
        let mut text = String::new();
        let mut shown = 0;
        for &i in idx.iter().take(self.max_failures) {
            let r = &scored.results[i];
            let (input, pred, expected) = (&scored.inputs[i], &scored.preds[i], &scored.targets[i]);
            let custom = self
                .feedback
                .as_ref()
                .map(|f| f(input, pred, expected, r))
                .unwrap_or_default();
            let feedback = if !custom.trim().is_empty() {
                custom
            } else if !r.feedback.trim().is_empty() {
                r.feedback.clone()
            } else {
                format!("expected {}, got {}", show(expected), show(pred))
            };
            let got = if pred.is_null() {
                format!(
                    "(no output: {})",
                    scored.first_error.as_deref().unwrap_or("the call failed")
                )
            } else {
                show(pred)
            };
            let block = format!(
                "### Failure {}\nInput: {}\nExpected: {}\nGot: {}\nFeedback: {}\n\n",
                shown + 1,
                clip(&show(input), 600),
                clip(&show(expected), 300),
                clip(&got, 300),
                clip(&feedback, 400)
            );
            if shown > 0 && text.len() + block.len() > self.context_chars {
                break;
            }
            text.push_str(&block);
            shown += 1;
        }
        (text, shown)
    }

    fn meta_prompt(
        &self,
        function: &str,
        instruction: &str,
        fields: Option<String>,
        score: f32,
        failures: &str,
        rejected: &[&str],
    ) -> String {
        let mut s = format!(
            "Step `{function}` of the system follows this instruction:\n<current>\n{}\n</current>\n\n",
            instruction.trim()
        );
        if let Some(fields) = fields {
            let _ = write!(
                s,
                "The step's inputs and outputs are fixed (do not describe a reply format; the \
                 system adds it):\n{fields}\n"
            );
        }
        let _ = write!(
            s,
            "Its mean score is {score:.3} (1.0 is perfect). Examples it got wrong:\n\n{failures}"
        );
        if !rejected.is_empty() {
            s.push_str("These rewrites were tried and did not score better; do something else:\n");
            for r in rejected {
                let _ = writeln!(s, "- {}", clip(&r.replace('\n', " "), 300));
            }
            s.push('\n');
        }
        s.push_str(
            "Write an improved instruction that fixes these failures and keeps what works. \
             Reply with only the new instruction between <instruction> and </instruction>.",
        );
        s
    }

    /// Asks the meta-prompt model; with a hub, the call is recorded under `parent` with the
    /// GenAI attributes (model, tokens, cost) and the function and round it was for.
    async fn propose(
        &self,
        meta: String,
        parent: Option<u64>,
        function: &str,
        iteration: usize,
    ) -> std::result::Result<Option<String>, LlmError> {
        let req = ChatRequest::new(&self.model)
            .label("prompt_learning")
            .system(META_SYSTEM)
            .user(meta)
            .temperature(self.temperature);
        let (id, start) = self
            .hub
            .as_ref()
            .map_or((0, 0), |h| (h.next_id(), h.now_ns()));
        let out = self.client.chat(req).await;
        if let Some(hub) = &self.hub {
            let mut rec = Record::span(
                id,
                parent,
                "prompt_learning.propose",
                RecordKind::Io,
                start,
                hub.now_ns(),
            );
            rec.attributes = vec![
                ("gen_ai.operation.name".into(), "chat".into()),
                ("gen_ai.request.model".into(), self.model.as_str().into()),
                ("hyperfunc.function".into(), function.into()),
                ("hyperfunc.iteration".into(), iteration.into()),
            ];
            match &out {
                Ok(r) => rec.attributes.extend([
                    (
                        "gen_ai.usage.input_tokens".into(),
                        r.usage.input_tokens.into(),
                    ),
                    (
                        "gen_ai.usage.output_tokens".into(),
                        r.usage.output_tokens.into(),
                    ),
                    ("cost".into(), r.cost_usd.into()),
                ]),
                Err(e) => {
                    rec.status = Status::Error;
                    rec.error_type = Some(e.error_type());
                    rec.error_message = Some(e.to_string());
                }
            }
            hub.push(rec);
        }
        Ok(extract_instruction(&out?.text))
    }

    async fn run<S: HyperSystem>(
        &self,
        sys: &S,
        theta: &Theta,
        examples: &Examples,
        scorer: &dyn Scorer,
    ) -> Result<PromptReport> {
        self.validate()?;
        let start = Instant::now();
        let run_span = self.hub.as_ref().map(|h| (h.next_id(), h.now_ns()));
        let reg = Registry::of(sys)?;
        let (train, judge, judged_on) = match &self.validation {
            Validation::Split(f) => {
                let (t, v) = examples.split(*f, self.seed)?;
                (t, Some(v), "validation")
            }
            Validation::Examples(v) => (examples.clone(), Some(v.clone()), "validation"),
            Validation::TrainOnly => (examples.clone(), None, "train"),
        };
        let hub = self.hub.as_ref();
        let learnable: Vec<_> = reg
            .functions
            .values()
            .filter(|f| f.prompt_learnable())
            .cloned()
            .collect();
        let mut theta = theta.clone();
        let mut train_scored = score_theta(sys, &theta, &train, scorer, hub).await?;
        let mut current = match &judge {
            Some(v) => score_theta(sys, &theta, v, scorer, hub).await?.score,
            None => train_scored.score,
        };
        let initial = current;
        let mut history: Vec<PromptCandidate> = learnable
            .iter()
            .map(|f| PromptCandidate {
                iteration: 0,
                function: f.name().to_string(),
                prompt: prompt_of(&theta, f).to_string(),
                score: current,
                baseline: current,
                accepted: true,
                failures_shown: 0,
                note: "starting prompt".into(),
            })
            .collect();
        let mut stop = if learnable.is_empty() {
            PromptStop::Nothing
        } else {
            PromptStop::MaxIterations
        };
        let (mut iterations, mut meta_calls) = (0, 0);
        'rounds: for it in 1..=self.max_iterations {
            if learnable.is_empty() {
                break;
            }
            if !train_scored
                .results
                .iter()
                .any(|r| r.score < self.threshold)
            {
                stop = PromptStop::NoFeedback;
                break;
            }
            iterations = it;
            for f in &learnable {
                let name = f.name();
                let (failures, shown) = self.failures_text(&train_scored, it);
                if shown == 0 {
                    continue;
                }
                let rejected: Vec<&str> = history
                    .iter()
                    .filter(|c| c.function == name && !c.accepted)
                    .map(|c| c.prompt.as_str())
                    .collect();
                let instruction = prompt_of(&theta, f).to_string();
                let meta = self.meta_prompt(
                    name,
                    &instruction,
                    f.signature().map(|s| s.render_fields()),
                    train_scored.score,
                    &failures,
                    &rejected,
                );
                meta_calls += 1;
                let proposal = match self
                    .propose(meta, run_span.map(|(id, _)| id), name, it)
                    .await
                {
                    Ok(p) => p,
                    Err(e @ (LlmError::RequestBudget { .. } | LlmError::CostBudget { .. })) => {
                        stop = PromptStop::Budget(e.to_string());
                        break 'rounds;
                    }
                    Err(e) => {
                        return Err(Error::Io {
                            function: "prompt_learning".into(),
                            message: format!("the meta-prompt model failed: {e}"),
                            retryable: e.is_retryable(),
                        })
                    }
                };
                let mut cand = PromptCandidate {
                    iteration: it,
                    function: name.to_string(),
                    prompt: proposal.clone().unwrap_or_default(),
                    score: f32::NAN,
                    baseline: current,
                    accepted: false,
                    failures_shown: shown,
                    note: String::new(),
                };
                match proposal {
                    None => cand.note = "the meta-prompt model gave no instruction".into(),
                    Some(p) if p.trim() == instruction.trim() => {
                        cand.note = "unchanged instruction".into()
                    }
                    Some(p) => {
                        let next = theta.clone().with_prompt(name, p);
                        let (score, next_train) = match &judge {
                            Some(v) => (score_theta(sys, &next, v, scorer, hub).await?.score, None),
                            None => {
                                let s = score_theta(sys, &next, &train, scorer, hub).await?;
                                (s.score, Some(s))
                            }
                        };
                        cand.score = score;
                        if score > current + self.min_improvement {
                            cand.accepted = true;
                            cand.note = format!("{current:.3} → {score:.3}");
                            theta = next;
                            current = score;
                            train_scored = match next_train {
                                Some(s) => s,
                                None => score_theta(sys, &theta, &train, scorer, hub).await?,
                            };
                        } else {
                            cand.note = format!("{score:.3} does not beat {current:.3}");
                        }
                    }
                }
                history.push(cand);
            }
        }
        if let (Some(hub), Some((id, t0))) = (&self.hub, run_span) {
            let mut rec = Record::span(
                id,
                hub.session(),
                "prompt_learning",
                RecordKind::Run,
                t0,
                hub.now_ns(),
            );
            rec.attributes = vec![
                (
                    "prompt_learning.initial_score".into(),
                    f64::from(initial).into(),
                ),
                (
                    "prompt_learning.final_score".into(),
                    f64::from(current).into(),
                ),
                ("prompt_learning.iterations".into(), iterations.into()),
                ("prompt_learning.meta_calls".into(), meta_calls.into()),
                ("prompt_learning.judged_on".into(), judged_on.into()),
                (
                    "prompt_learning.accepted".into(),
                    history
                        .iter()
                        .filter(|c| c.accepted && c.iteration > 0)
                        .count()
                        .into(),
                ),
            ];
            hub.push(rec);
        }
        Ok(PromptReport {
            theta,
            history,
            initial_score: initial,
            final_score: current,
            judged_on,
            iterations,
            meta_calls,
            stop,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

impl PromptOptimizer for PromptLearningOptimizer {
    fn optimize_prompts<'a, S: HyperSystem>(
        &'a self,
        sys: &'a S,
        theta: &'a Theta,
        examples: &'a Examples,
        scorer: &'a dyn Scorer,
    ) -> impl Future<Output = Result<PromptReport>> + Send + 'a {
        self.run(sys, theta, examples, scorer)
    }
}

/// The prompt `f` runs with under `theta`.
fn prompt_of<'a>(theta: &'a Theta, f: &'a crate::HyperFn) -> &'a str {
    theta
        .prompt(f.name())
        .or(f.prompt_text())
        .unwrap_or_default()
}

/// The instruction in a meta-model reply: between `<instruction>` tags, else in a fenced block,
/// else the whole reply without a leading label.
pub(crate) fn extract_instruction(text: &str) -> Option<String> {
    let t = text.trim();
    let lower = t.to_lowercase();
    let tagged = lower.find("<instruction>").map(|a| {
        let body = &t[a + "<instruction>".len()..];
        match body.to_lowercase().find("</instruction>") {
            Some(b) => &body[..b],
            None => body,
        }
    });
    let out = tagged.map(str::to_string).unwrap_or_else(|| {
        if let Some(a) = t.find("```") {
            let after = &t[a + 3..];
            let start = after.find('\n').map_or(0, |n| n + 1);
            let body = &after[start..];
            body[..body.find("```").unwrap_or(body.len())].to_string()
        } else {
            let first = t.lines().next().unwrap_or_default().to_lowercase();
            if first.trim_end().ends_with(':') && first.contains("instruction") {
                t.lines().skip(1).collect::<Vec<_>>().join("\n")
            } else {
                t.to_string()
            }
        }
    });
    let out = out.trim();
    (!out.is_empty()).then(|| out.to_string())
}

fn show(v: &Json) -> String {
    crate::eval::text_of(v)
}

fn clip(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// One θ scored example by example.
pub(crate) struct Scored {
    /// Mean score (a failed call counts 0).
    pub score: f32,
    pub results: Vec<ScoreResult>,
    pub inputs: Vec<Json>,
    pub preds: Vec<Json>,
    pub targets: Vec<Json>,
    pub first_error: Option<String>,
}

/// A metric that scores one candidate with a scorer and keeps every per-example result.
struct Capture<'a> {
    scorer: &'a dyn Scorer,
    out: Mutex<Option<Scored>>,
}

impl Metric for Capture<'_> {
    fn score(&self, _: &Value, _: &Value, _: usize) -> Result<Vec<f32>> {
        Err(Error::config(
            "metric",
            "prompt learning scores through Metric::score_async",
        ))
    }

    fn score_async<'b>(&'b self, batch: Batch<'b>) -> BoxFuture<'b, Result<Vec<f32>>> {
        Box::pin(async move {
            let inputs = batch.inputs.as_json()?.to_vec();
            let targets = batch.targets.as_json()?.to_vec();
            let preds = batch.preds.as_json()?[..targets.len()].to_vec();
            let results = score_all(self.scorer, &inputs, &preds, &targets).await?;
            let score = results.iter().map(|r| r.score).sum::<f32>() / results.len().max(1) as f32;
            *crate::system::lock(&self.out) = Some(Scored {
                score,
                results,
                inputs,
                preds,
                targets,
                first_error: None,
            });
            Ok(vec![score])
        })
    }
}

/// Runs `sys` with `theta` on `examples` and scores every example.
pub(crate) async fn score_theta<S: HyperSystem>(
    sys: &S,
    theta: &Theta,
    examples: &Examples,
    scorer: &dyn Scorer,
    hub: Option<&Hub>,
) -> Result<Scored> {
    let cap = Capture {
        scorer,
        out: Mutex::new(None),
    };
    let pop = Population::center(theta.clone());
    let ev = match hub {
        Some(h) => evaluate_population_observed(sys, &pop, examples, &cap, usize::MAX, h).await?,
        None => evaluate_population(sys, &pop, examples, &cap, usize::MAX).await?,
    };
    let mut scored = cap
        .out
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .ok_or_else(|| Error::config("metric", "the evaluation scored nothing"))?;
    scored.first_error = ev.first_error.map(|e| e.to_string());
    Ok(scored)
}
