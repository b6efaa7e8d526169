//! Evaluation: scorers that grade one prediction against its expected answer, and the bridge
//! that turns any scorer into a [`Metric`] for [`evaluate`](crate::evaluate) and [`Es`](crate::Es).
//!
//! A [`Scorer`] sees one [`Case`] (input, prediction, expected answer) and returns a
//! [`ScoreResult`]: a score in `[0, 1]`, feedback in words and optional details. Deterministic
//! scorers implement the simpler [`SyncScorer`]; scorers that wait on I/O (an
//! `LlmJudge`, with feature `llm`) implement [`Scorer`] directly.
//! [`ScorerMetric`] averages a scorer over the examples of each candidate, all cases in flight at
//! once, through [`Metric::score_async`] — so an async scorer never blocks a runtime thread.
//!
//! This module knows nothing about how predictions are produced (systems, hyperfunctions); it
//! only grades JSON values.
//!
//! # Examples
//! ```
//! use hyperfunc::eval::{score_all, ExactMatch};
//! use serde_json::json;
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let scores = score_all(
//!     &ExactMatch::new(),
//!     &[json!("capital of France?"), json!("2+2?")],
//!     &[json!("Paris."), json!("5")],
//!     &[json!("paris"), json!("4")],
//! )
//! .await?;
//! assert_eq!(scores[0].score, 1.0);
//! assert_eq!(scores[1].score, 0.0);
//! assert_eq!(scores[1].feedback, r#"expected "4", got "5""#);
//! # Ok::<(), hyperfunc::Error>(())
//! # }).unwrap();
//! ```

mod dataset;
#[cfg(feature = "llm")]
mod judge;
mod judgement;
mod scorers;
mod trajectory;

use std::future::Future;

use futures::future::{join_all, BoxFuture};
use futures::FutureExt;
use serde::{Deserialize, Serialize};

use crate::data::Value;
use crate::error::{Error, Result};
use crate::function::Json;
use crate::metric::{Batch, Metric};

pub use dataset::{Dataset, Item, Split};
#[cfg(feature = "llm")]
pub use judge::*;
pub use judgement::parse_judgement;
pub use scorers::*;
pub use trajectory::{Step, Trajectory, TrajectoryScore};

/// Feedback of a case whose prediction is `Json::Null`, the engine's mark of a failed call.
pub const NO_OUTPUT_FEEDBACK: &str = "no output (the call failed)";

/// One example to grade: its input, the prediction and the expected answer (borrowed).
#[derive(Clone, Copy, Debug)]
pub struct Case<'a> {
    /// The example's input.
    pub input: &'a Json,
    /// What the system produced.
    pub pred: &'a Json,
    /// The reference answer (`Json::Null` when there is none).
    pub expected: &'a Json,
}

impl Case<'_> {
    /// An owned copy, for scorers whose futures must not borrow.
    pub fn to_owned_case(&self) -> OwnedCase {
        OwnedCase {
            input: self.input.clone(),
            pred: self.pred.clone(),
            expected: self.expected.clone(),
        }
    }
}

/// One example to grade, owned ([`async_scorer_fn`] closures and `LlmJudge::score_batch` take
/// these).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OwnedCase {
    /// The example's input.
    pub input: Json,
    /// What the system produced.
    pub pred: Json,
    /// The reference answer (`Json::Null` when there is none).
    pub expected: Json,
}

impl OwnedCase {
    /// A case from its three values.
    pub fn new(input: Json, pred: Json, expected: Json) -> Self {
        Self {
            input,
            pred,
            expected,
        }
    }

    /// A borrowed view.
    pub fn as_case(&self) -> Case<'_> {
        Case {
            input: &self.input,
            pred: &self.pred,
            expected: &self.expected,
        }
    }
}

/// The grade of one case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreResult {
    /// The score, in `[0, 1]` (higher is better).
    pub score: f32,
    /// Why, in words (empty for a plain pass).
    pub feedback: String,
    /// Scorer-specific details: a JSON object, or `Null`.
    pub details: Json,
}

impl ScoreResult {
    /// A score (clamped to `[0, 1]`; NaN becomes 0) with feedback and no details.
    ///
    /// # Examples
    /// ```
    /// use hyperfunc::eval::ScoreResult;
    /// assert_eq!(ScoreResult::new(1.7, "").score, 1.0);
    /// assert_eq!(ScoreResult::new(f32::NAN, "bad").score, 0.0);
    /// ```
    pub fn new(score: f32, feedback: impl Into<String>) -> Self {
        let score = if score.is_nan() {
            0.0
        } else {
            score.clamp(0.0, 1.0)
        };
        Self {
            score,
            feedback: feedback.into(),
            details: Json::Null,
        }
    }

    /// Attaches details (a JSON object by convention).
    pub fn with_details(mut self, details: Json) -> Self {
        self.details = details;
        self
    }

    /// Score 1, no feedback.
    pub fn pass() -> Self {
        Self::new(1.0, "")
    }

    /// Score 0 with the reason.
    pub fn fail(feedback: impl Into<String>) -> Self {
        Self::new(0.0, feedback)
    }
}

/// Grades one case; the async form, for scorers that wait on I/O.
///
/// Deterministic scorers implement [`SyncScorer`] instead and get this trait for free.
pub trait Scorer: Send + Sync {
    /// A short name, used in feedback of composites and in errors.
    fn name(&self) -> &str;

    /// The grade of one case. An `Err` means the scorer itself failed (not that the prediction
    /// is wrong, which is a low score).
    fn score<'a>(&'a self, case: Case<'a>) -> BoxFuture<'a, Result<ScoreResult>>;
}

/// Grades one case without waiting on anything.
pub trait SyncScorer: Send + Sync {
    /// A short name, used in feedback of composites and in errors.
    fn name(&self) -> &str;

    /// The grade of one case.
    fn score_sync(&self, case: Case<'_>) -> ScoreResult;
}

impl<T: SyncScorer> Scorer for T {
    fn name(&self) -> &str {
        SyncScorer::name(self)
    }

    fn score<'a>(&'a self, case: Case<'a>) -> BoxFuture<'a, Result<ScoreResult>> {
        Box::pin(futures::future::ready(Ok(self.score_sync(case))))
    }
}

impl Scorer for Box<dyn Scorer> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn score<'a>(&'a self, case: Case<'a>) -> BoxFuture<'a, Result<ScoreResult>> {
        (**self).score(case)
    }
}

impl Scorer for &dyn Scorer {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn score<'a>(&'a self, case: Case<'a>) -> BoxFuture<'a, Result<ScoreResult>> {
        (**self).score(case)
    }
}

impl Scorer for std::sync::Arc<dyn Scorer> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn score<'a>(&'a self, case: Case<'a>) -> BoxFuture<'a, Result<ScoreResult>> {
        (**self).score(case)
    }
}

/// The text a scorer compares: a JSON string as-is, an object with exactly one key the text of
/// that key's value (so `{"answer": "Paris"}` reads as `Paris`), `Null` the empty string, and
/// anything else (numbers, booleans, arrays, larger objects) its compact JSON.
///
/// # Examples
/// ```
/// use hyperfunc::eval::text_of;
/// use serde_json::json;
/// assert_eq!(text_of(&json!("Paris")), "Paris");
/// assert_eq!(text_of(&json!({"answer": 42})), "42");
/// assert_eq!(text_of(&json!(true)), "true");
/// assert_eq!(text_of(&json!({"a": 1, "b": 2})), r#"{"a":1,"b":2}"#);
/// ```
pub fn text_of(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Null => String::new(),
        Json::Object(o) if o.len() == 1 => o.values().next().map(text_of).unwrap_or_default(),
        other => other.to_string(),
    }
}

/// A [`SyncScorer`] from a closure; see [`scorer_fn`].
pub struct FnScorer<F> {
    name: String,
    f: F,
}

impl<F> SyncScorer for FnScorer<F>
where
    F: Fn(Case<'_>) -> ScoreResult + Send + Sync,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn score_sync(&self, case: Case<'_>) -> ScoreResult {
        (self.f)(case)
    }
}

/// A synchronous scorer from a closure.
///
/// # Examples
/// ```
/// use hyperfunc::eval::{scorer_fn, Case, ScoreResult, SyncScorer};
/// use serde_json::json;
/// let short = scorer_fn("short", |c: Case| {
///     let n = c.pred.as_str().map_or(0, str::len);
///     if n <= 10 { ScoreResult::pass() } else { ScoreResult::fail(format!("{n} chars")) }
/// });
/// let (i, e) = (json!(null), json!(null));
/// let p = json!("far too long an answer");
/// let r = short.score_sync(hyperfunc::eval::Case { input: &i, pred: &p, expected: &e });
/// assert_eq!(r.feedback, "22 chars");
/// ```
pub fn scorer_fn<F>(name: &str, f: F) -> FnScorer<F>
where
    F: Fn(Case<'_>) -> ScoreResult + Send + Sync,
{
    FnScorer {
        name: name.into(),
        f,
    }
}

/// An async [`Scorer`] from a closure; see [`async_scorer_fn`].
pub struct AsyncFnScorer<F> {
    name: String,
    f: F,
}

impl<F, Fut> Scorer for AsyncFnScorer<F>
where
    F: Fn(OwnedCase) -> Fut + Send + Sync,
    Fut: Future<Output = Result<ScoreResult>> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn score<'a>(&'a self, case: Case<'a>) -> BoxFuture<'a, Result<ScoreResult>> {
        Box::pin((self.f)(case.to_owned_case()))
    }
}

/// An async scorer from a closure that takes an owned case and returns a future.
///
/// # Examples
/// ```
/// use hyperfunc::eval::{async_scorer_fn, score_all, OwnedCase, ScoreResult};
/// use serde_json::json;
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let remote = async_scorer_fn("remote", |c: OwnedCase| async move {
///     tokio::task::yield_now().await; // stands for a network call
///     Ok(ScoreResult::new(if c.pred == c.expected { 1.0 } else { 0.0 }, ""))
/// });
/// let s = score_all(&remote, &[json!(1)], &[json!("a")], &[json!("a")]).await?;
/// assert_eq!(s[0].score, 1.0);
/// # Ok::<(), hyperfunc::Error>(())
/// # }).unwrap();
/// ```
pub fn async_scorer_fn<F, Fut>(name: &str, f: F) -> AsyncFnScorer<F>
where
    F: Fn(OwnedCase) -> Fut + Send + Sync,
    Fut: Future<Output = Result<ScoreResult>> + Send + 'static,
{
    AsyncFnScorer {
        name: name.into(),
        f,
    }
}

/// The grade of one case, where a `Null` prediction (a failed call) scores 0 without asking the
/// scorer.
async fn score_one(scorer: &dyn Scorer, case: Case<'_>) -> Result<ScoreResult> {
    if case.pred.is_null() {
        return Ok(ScoreResult::fail(NO_OUTPUT_FEEDBACK));
    }
    scorer.score(case).await
}

/// Grades every case at once (all futures in flight together); results in input order.
///
/// A prediction that is `Json::Null` (the call failed) scores 0 with feedback
/// [`NO_OUTPUT_FEEDBACK`], without asking the scorer. The three slices must have the same
/// length ([`Error::ShapeMismatch`] otherwise); the first scorer error is returned.
pub async fn score_all(
    scorer: &dyn Scorer,
    inputs: &[Json],
    preds: &[Json],
    expected: &[Json],
) -> Result<Vec<ScoreResult>> {
    let n = expected.len();
    for (what, len) in [("inputs", inputs.len()), ("predictions", preds.len())] {
        if len != n {
            return Err(Error::ShapeMismatch {
                function: scorer.name().to_string(),
                what: what.into(),
                expected: format!("{n} items (one per expected answer)"),
                actual: vec![len],
            });
        }
    }
    join_all(
        inputs
            .iter()
            .zip(preds)
            .zip(expected)
            .map(|((input, pred), expected)| {
                score_one(
                    scorer,
                    Case {
                        input,
                        pred,
                        expected,
                    },
                )
            }),
    )
    .await
    .into_iter()
    .collect()
}

/// A [`Metric`] from a [`Scorer`]: per candidate, the mean score over its examples.
///
/// A `Null` prediction (a failed call) scores 0; a scorer error makes that candidate's value
/// NaN (the engine counts it as a failed candidate). Every case of every candidate is scored
/// concurrently in [`Metric::score_async`], which the engine awaits. Predictions shared by all
/// candidates are scored once.
///
/// The synchronous [`Metric::score`] works for scorers whose futures are ready at once (every
/// [`SyncScorer`]); it has no inputs (cases see `Json::Null`), and for a truly async scorer it
/// returns [`Error::InvalidConfig`] instead of blocking.
///
/// # Examples
/// ```
/// use hyperfunc::eval::{metric, ExactMatch};
/// use hyperfunc::{Metric, Value};
/// use serde_json::json;
/// let m = metric(ExactMatch::new());
/// let preds = Value::json(vec![json!("yes"), json!("no")]);
/// let targets = Value::json(vec![json!("Yes"), json!("yes")]);
/// assert_eq!(m.score(&preds, &targets, 3)?, vec![0.5; 3]);
/// # Ok::<(), hyperfunc::Error>(())
/// ```
pub struct ScorerMetric<S> {
    scorer: S,
}

impl<S: Scorer> ScorerMetric<S> {
    /// Wraps a scorer.
    pub fn new(scorer: S) -> Self {
        Self { scorer }
    }

    /// The scorer.
    pub fn scorer(&self) -> &S {
        &self.scorer
    }

    /// Gives the scorer back.
    pub fn into_inner(self) -> S {
        self.scorer
    }

    async fn values(
        &self,
        inputs: Option<&[Json]>,
        preds: &Value,
        targets: &Value,
        pop: usize,
    ) -> Result<Vec<f32>> {
        let name = self.scorer.name();
        let p = preds.as_json()?;
        let y = targets.as_json()?;
        let n = y.len();
        if n == 0 {
            return Err(Error::EmptyExamples);
        }
        let null = Json::Null;
        let input = |i: usize| inputs.and_then(|x| x.get(i)).unwrap_or(&null);
        if let Some(x) = inputs {
            if x.len() != n {
                return Err(Error::ShapeMismatch {
                    function: name.to_string(),
                    what: "inputs".into(),
                    expected: format!("{n} items (one per target)"),
                    actual: vec![x.len()],
                });
            }
        }
        // Shared predictions are the same for every candidate: score them once.
        let rows = if preds.is_batched() { pop } else { 1 };
        if p.len() != rows * n {
            return Err(Error::ShapeMismatch {
                function: name.to_string(),
                what: "predictions".into(),
                expected: format!(
                    "{} items ({rows} candidate row(s) × {n} examples)",
                    rows * n
                ),
                actual: vec![p.len()],
            });
        }
        let scores = join_all(p.iter().enumerate().map(|(k, pred)| {
            let i = k % n;
            score_one(
                &self.scorer,
                Case {
                    input: input(i),
                    pred,
                    expected: &y[i],
                },
            )
        }))
        .await;
        let per_row: Vec<f32> = scores
            .chunks(n)
            .enumerate()
            .map(|(row, chunk)| {
                let mut sum = 0.0f32;
                for r in chunk {
                    match r {
                        Ok(s) => sum += s.score,
                        Err(e) => {
                            tracing::warn!(scorer = name, candidate = row, error = %e, "scorer failed; the candidate's value is NaN");
                            return f32::NAN;
                        }
                    }
                }
                sum / n as f32
            })
            .collect();
        Ok(if preds.is_batched() {
            per_row
        } else {
            vec![per_row[0]; pop]
        })
    }
}

impl<S: Scorer> Metric for ScorerMetric<S> {
    fn score(&self, preds: &Value, targets: &Value, pop: usize) -> Result<Vec<f32>> {
        match self.values(None, preds, targets, pop).now_or_never() {
            Some(out) => out,
            None => Err(Error::InvalidConfig {
                field: "metric".into(),
                reason: format!(
                    "scorer `{}` is async (its score did not complete at once); await it through \
                     Metric::score_async, which evaluate and Es do, instead of the synchronous \
                     Metric::score",
                    self.scorer.name()
                ),
            }),
        }
    }

    fn score_async<'a>(&'a self, batch: Batch<'a>) -> BoxFuture<'a, Result<Vec<f32>>> {
        Box::pin(async move {
            // Inputs that are tensors have no JSON form: the cases see `Null` inputs.
            let inputs = batch.inputs.as_json().ok();
            self.values(inputs, batch.preds, batch.targets, batch.pop)
                .await
        })
    }
}

/// A [`Metric`] from a scorer: the mean score per candidate (see [`ScorerMetric`]).
pub fn metric<S: Scorer>(scorer: S) -> ScorerMetric<S> {
    ScorerMetric::new(scorer)
}
