//! Built-in scorers: exact match, numeric distance, classification, containment, regular
//! expressions, and a weighted composite of any scorers.
//!
//! All but [`CompositeScorer`] are deterministic [`SyncScorer`]s; they read values through
//! [`text_of`], so `"Paris"`, `{"answer": "Paris"}` and (for numbers) `42` or `"about 42 km"`
//! all work as predictions and expected answers.

use std::sync::OnceLock;

use futures::future::{join_all, BoxFuture};
use regex::Regex;
use serde_json::json;

use super::{text_of, Case, ScoreResult, Scorer, SyncScorer};
use crate::error::Result;
use crate::function::Json;

/// Collapses runs of whitespace to one space and trims the ends.
fn collapse_ws(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Collapsed whitespace without trailing `.`/`!`.
fn strip_text(s: &str) -> String {
    collapse_ws(s)
        .trim_end_matches(|c: char| c == '.' || c == '!' || c.is_whitespace())
        .to_string()
}

fn fold_case(s: String, case_sensitive: bool) -> String {
    if case_sensitive {
        s
    } else {
        s.to_lowercase()
    }
}

/// Shortens long texts in feedback.
fn clip(s: &str) -> String {
    const MAX: usize = 200;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

/// Scores 1 when the prediction's text equals the expected text, else 0.
///
/// By default the comparison ignores case and strips: surrounding whitespace and trailing `.`
/// and `!` are removed and inner runs of whitespace collapse to one space.
///
/// # Examples
/// ```
/// use hyperfunc::eval::{Case, ExactMatch, ScoreResult, SyncScorer};
/// use serde_json::{json, Value};
/// fn grade(s: &impl SyncScorer, pred: Value, expected: Value) -> ScoreResult {
///     s.score_sync(Case { input: &Value::Null, pred: &pred, expected: &expected })
/// }
/// let m = ExactMatch::new();
/// assert_eq!(grade(&m, json!("  paris. "), json!("Paris")).score, 1.0);
/// assert_eq!(grade(&m, json!({"answer": "Paris"}), json!("Paris")).score, 1.0);
/// let strict = ExactMatch::new().case_sensitive(true).strip(false);
/// let miss = grade(&strict, json!("paris"), json!("Paris"));
/// assert_eq!((miss.score, miss.feedback.as_str()), (0.0, r#"expected "Paris", got "paris""#));
/// ```
#[derive(Clone, Debug)]
pub struct ExactMatch {
    case_sensitive: bool,
    strip: bool,
}

impl Default for ExactMatch {
    fn default() -> Self {
        Self::new()
    }
}

impl ExactMatch {
    /// Case-insensitive, stripped comparison.
    pub fn new() -> Self {
        Self {
            case_sensitive: false,
            strip: true,
        }
    }

    /// Whether case matters (default `false`).
    pub fn case_sensitive(mut self, yes: bool) -> Self {
        self.case_sensitive = yes;
        self
    }

    /// Whether to trim whitespace and trailing `.`/`!` and collapse inner whitespace
    /// (default `true`).
    pub fn strip(mut self, yes: bool) -> Self {
        self.strip = yes;
        self
    }

    fn norm(&self, s: &str) -> String {
        let s = if self.strip {
            strip_text(s)
        } else {
            s.to_string()
        };
        fold_case(s, self.case_sensitive)
    }
}

impl SyncScorer for ExactMatch {
    fn name(&self) -> &str {
        "exact_match"
    }

    fn score_sync(&self, case: Case<'_>) -> ScoreResult {
        let (p, e) = (text_of(case.pred), text_of(case.expected));
        if self.norm(&p) == self.norm(&e) {
            ScoreResult::pass()
        } else {
            ScoreResult::fail(format!("expected \"{}\", got \"{}\"", clip(&e), clip(&p)))
        }
    }
}

/// The first number in a value: a JSON number itself, else the first decimal number in its
/// [`text_of`] (`"about 42.5 km"` gives 42.5).
fn number_in(v: &Json) -> Option<f64> {
    if let Some(x) = v.as_f64() {
        return Some(x);
    }
    static NUM: OnceLock<Regex> = OnceLock::new();
    let re = NUM.get_or_init(|| {
        Regex::new(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")
            .expect("the number pattern is a valid constant")
    });
    re.find(&text_of(v))
        .and_then(|m| m.as_str().parse::<f64>().ok())
        .filter(|x| x.is_finite())
}

/// Scores how close the predicted number is to the expected one: 1 within `tolerance`,
/// falling linearly to 0 at `max_distance` (absolute differences).
///
/// Numbers are read from JSON numbers or from the first number in a text (`"about 42.5 km"`).
/// A prediction or expected answer without a number scores 0, with feedback saying so.
///
/// # Examples
/// ```
/// use hyperfunc::eval::{Case, NumericDistance, ScoreResult, SyncScorer};
/// use serde_json::{json, Value};
/// fn grade(s: &impl SyncScorer, pred: Value, expected: Value) -> ScoreResult {
///     s.score_sync(Case { input: &Value::Null, pred: &pred, expected: &expected })
/// }
/// let m = NumericDistance::new().tolerance(0.5).max_distance(10.5);
/// assert_eq!(grade(&m, json!("about 42.4 km"), json!(42)).score, 1.0);
/// assert!((grade(&m, json!(47.5), json!(42)).score - 0.5).abs() < 1e-6);
/// assert_eq!(grade(&m, json!("far"), json!(42)).score, 0.0);
/// ```
#[derive(Clone, Debug)]
pub struct NumericDistance {
    tolerance: f64,
    max_distance: f64,
}

impl Default for NumericDistance {
    fn default() -> Self {
        Self::new()
    }
}

impl NumericDistance {
    /// Tolerance `1e-6`, zero score at distance `1.0`.
    pub fn new() -> Self {
        Self {
            tolerance: 1e-6,
            max_distance: 1.0,
        }
    }

    /// Absolute difference that still scores 1 (default `1e-6`; the sign is ignored).
    pub fn tolerance(mut self, tol: f64) -> Self {
        self.tolerance = tol.abs();
        self
    }

    /// Absolute difference at which the score reaches 0 (default `1.0`; the sign is ignored).
    /// When it is not above the tolerance, anything outside the tolerance scores 0.
    pub fn max_distance(mut self, d: f64) -> Self {
        self.max_distance = d.abs();
        self
    }
}

impl SyncScorer for NumericDistance {
    fn name(&self) -> &str {
        "numeric_distance"
    }

    fn score_sync(&self, case: Case<'_>) -> ScoreResult {
        let Some(e) = number_in(case.expected) else {
            return ScoreResult::fail(format!(
                "no number found in the expected answer \"{}\"",
                clip(&text_of(case.expected))
            ));
        };
        let Some(p) = number_in(case.pred) else {
            return ScoreResult::fail(format!(
                "no number found in the output \"{}\" (expected {e})",
                clip(&text_of(case.pred))
            ));
        };
        let d = (p - e).abs();
        let details = json!({"expected": e, "got": p, "distance": d});
        if d <= self.tolerance {
            return ScoreResult::pass().with_details(details);
        }
        let span = self.max_distance - self.tolerance;
        let s = if span > 0.0 {
            1.0 - (d - self.tolerance) / span
        } else {
            0.0
        };
        ScoreResult::new(s as f32, format!("expected {e}, got {p} (off by {d})"))
            .with_details(details)
    }
}

/// Scores 1 when the predicted label equals the expected one, comparing case-insensitively with
/// whitespace collapsed and trailing `.`/`!` removed.
///
/// A prediction that is not one of the allowed labels scores 0 with feedback listing them; an
/// empty label list allows any label.
///
/// # Examples
/// ```
/// use hyperfunc::eval::{Case, ClassificationAccuracy, ScoreResult, SyncScorer};
/// use serde_json::{json, Value};
/// fn grade(s: &impl SyncScorer, pred: Value, expected: Value) -> ScoreResult {
///     s.score_sync(Case { input: &Value::Null, pred: &pred, expected: &expected })
/// }
/// let m = ClassificationAccuracy::new(&["positive", "negative"]);
/// assert_eq!(grade(&m, json!(" Positive "), json!("positive")).score, 1.0);
/// let r = grade(&m, json!("happy"), json!("positive"));
/// assert!(r.feedback.contains("positive, negative"), "{}", r.feedback);
/// ```
#[derive(Clone, Debug)]
pub struct ClassificationAccuracy {
    labels: Vec<String>,
    normalised: Vec<String>,
}

impl ClassificationAccuracy {
    /// The allowed labels (empty: any label).
    pub fn new(labels: &[&str]) -> Self {
        Self {
            labels: labels.iter().map(|l| l.to_string()).collect(),
            normalised: labels.iter().map(|l| Self::norm(l)).collect(),
        }
    }

    fn norm(s: &str) -> String {
        strip_text(s).to_lowercase()
    }
}

impl SyncScorer for ClassificationAccuracy {
    fn name(&self) -> &str {
        "classification_accuracy"
    }

    fn score_sync(&self, case: Case<'_>) -> ScoreResult {
        let (p, e) = (text_of(case.pred), text_of(case.expected));
        let np = Self::norm(&p);
        if !self.normalised.is_empty() && !self.normalised.contains(&np) {
            return ScoreResult::fail(format!(
                "\"{}\" is not an allowed label; allowed: {}",
                clip(&p),
                self.labels.join(", ")
            ));
        }
        if np == Self::norm(&e) {
            ScoreResult::pass()
        } else {
            ScoreResult::fail(format!("expected \"{}\", got \"{}\"", clip(&e), clip(&p)))
        }
    }
}

/// Scores whether the expected text occurs in the prediction (whitespace collapsed on both
/// sides, case-insensitive by default).
///
/// An expected array means every element must occur: the score is the fraction found and the
/// feedback lists the missing ones.
///
/// # Examples
/// ```
/// use hyperfunc::eval::{Case, ContainsMatch, SyncScorer};
/// use serde_json::json;
/// let input = json!("describe Paris");
/// let pred = json!("Paris is the capital of France.");
/// let expected = json!(["capital", "france", "Seine"]);
/// let r = ContainsMatch::new().score_sync(Case { input: &input, pred: &pred, expected: &expected });
/// assert!((r.score - 2.0 / 3.0).abs() < 1e-6);
/// assert_eq!(r.feedback, r#"missing: "Seine""#);
/// ```
#[derive(Clone, Debug, Default)]
pub struct ContainsMatch {
    case_sensitive: bool,
}

impl ContainsMatch {
    /// Case-insensitive containment.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether case matters (default `false`).
    pub fn case_sensitive(mut self, yes: bool) -> Self {
        self.case_sensitive = yes;
        self
    }

    fn norm(&self, s: &str) -> String {
        fold_case(collapse_ws(s), self.case_sensitive)
    }
}

impl SyncScorer for ContainsMatch {
    fn name(&self) -> &str {
        "contains"
    }

    fn score_sync(&self, case: Case<'_>) -> ScoreResult {
        let hay = self.norm(&text_of(case.pred));
        let needles: Vec<String> = match case.expected {
            Json::Array(items) => items.iter().map(text_of).collect(),
            other => vec![text_of(other)],
        };
        if needles.is_empty() {
            return ScoreResult::pass();
        }
        let missing: Vec<&String> = needles
            .iter()
            .filter(|n| !hay.contains(&self.norm(n)))
            .collect();
        let found = needles.len() - missing.len();
        let feedback = if missing.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = missing.iter().map(|m| format!("\"{}\"", clip(m))).collect();
            format!("missing: {}", list.join(", "))
        };
        ScoreResult::new(found as f32 / needles.len() as f32, feedback)
    }
}

/// Scores 1 when the prediction's text matches a regular expression (the expected answer is not
/// used). By default a match anywhere counts; [`RegexMatch::full_match`] requires the whole text.
///
/// The constructor never fails: an invalid pattern makes every score 0 with the compile error as
/// feedback.
///
/// # Examples
/// ```
/// use hyperfunc::eval::{Case, RegexMatch, ScoreResult, SyncScorer};
/// use serde_json::{json, Value};
/// fn grade(s: &impl SyncScorer, pred: Value, expected: Value) -> ScoreResult {
///     s.score_sync(Case { input: &Value::Null, pred: &pred, expected: &expected })
/// }
/// let iso = RegexMatch::new(r"\d{4}-\d{2}-\d{2}");
/// assert_eq!(grade(&iso, json!("on 2024-05-01."), Value::Null).score, 1.0);
/// let whole = iso.clone().full_match(true);
/// assert_eq!(grade(&whole, json!("on 2024-05-01."), Value::Null).score, 0.0);
/// let broken = RegexMatch::new("(unclosed");
/// assert!(grade(&broken, json!("x"), Value::Null).feedback.contains("invalid regex"));
/// ```
#[derive(Clone, Debug)]
pub struct RegexMatch {
    pattern: String,
    full: bool,
    compiled: std::result::Result<Regex, String>,
}

impl RegexMatch {
    /// A scorer for `pattern` (Rust `regex` syntax; `(?i)` for case-insensitive).
    pub fn new(pattern: &str) -> Self {
        Self {
            pattern: pattern.to_string(),
            full: false,
            compiled: Self::compile(pattern, false),
        }
    }

    /// Whether the whole text must match (default `false`: a match anywhere).
    pub fn full_match(mut self, yes: bool) -> Self {
        self.full = yes;
        self.compiled = Self::compile(&self.pattern, yes);
        self
    }

    fn compile(pattern: &str, full: bool) -> std::result::Result<Regex, String> {
        let anchored;
        let p = if full {
            anchored = format!(r"\A(?:{pattern})\z");
            anchored.as_str()
        } else {
            pattern
        };
        // Compile the pattern alone first so the error points into the user's text.
        Regex::new(pattern)
            .and_then(|_| Regex::new(p))
            .map_err(|e| e.to_string())
    }
}

impl SyncScorer for RegexMatch {
    fn name(&self) -> &str {
        "regex_match"
    }

    fn score_sync(&self, case: Case<'_>) -> ScoreResult {
        let re = match &self.compiled {
            Ok(re) => re,
            Err(e) => return ScoreResult::fail(format!("invalid regex /{}/: {e}", self.pattern)),
        };
        let text = text_of(case.pred);
        if re.is_match(&text) {
            ScoreResult::pass()
        } else {
            let how = if self.full { "fully match" } else { "match" };
            ScoreResult::fail(format!(
                "output \"{}\" does not {how} /{}/",
                clip(&text),
                self.pattern
            ))
        }
    }
}

/// A weighted mean of other scorers (sync or async), scored concurrently.
///
/// Weights are normalised by their sum. Every weight must be finite and non-negative, and their
/// sum positive; otherwise every score is 0 with feedback saying the weights are invalid. The
/// feedback joins the children's non-empty feedback as `name: feedback; name2: feedback`, and
/// the details are `{"components": [{"name", "score", "weight"}]}` (weights as given). The first
/// child error is returned as the composite's error.
///
/// # Examples
/// ```
/// use hyperfunc::eval::{score_all, CompositeScorer, ContainsMatch, ExactMatch};
/// use serde_json::json;
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let both = CompositeScorer::new()
///     .add(ExactMatch::new(), 3.0)
///     .add(ContainsMatch::new(), 1.0);
/// let s = score_all(&both, &[json!("q")], &[json!("Paris, France")], &[json!("Paris")]).await?;
/// assert!((s[0].score - 0.25).abs() < 1e-6);
/// assert_eq!(s[0].feedback, r#"exact_match: expected "Paris", got "Paris, France""#);
/// # Ok::<(), hyperfunc::Error>(())
/// # }).unwrap();
/// ```
#[derive(Default)]
pub struct CompositeScorer {
    parts: Vec<(Box<dyn Scorer>, f32)>,
}

impl CompositeScorer {
    /// No scorers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a scorer with its weight.
    pub fn add(mut self, scorer: impl Scorer + 'static, weight: f32) -> Self {
        self.parts.push((Box::new(scorer), weight));
        self
    }

    /// `None` when the weights are usable, else why not.
    fn invalid_weights(&self) -> Option<String> {
        if self.parts.is_empty() {
            return Some("there are no scorers".into());
        }
        if let Some((s, w)) = self.parts.iter().find(|(_, w)| !w.is_finite() || *w < 0.0) {
            return Some(format!(
                "the weight of `{}` is {w}; weights must be finite and non-negative",
                s.name()
            ));
        }
        let total: f32 = self.parts.iter().map(|(_, w)| w).sum();
        (!(total.is_finite() && total > 0.0))
            .then(|| format!("the weights sum to {total}; they must sum to a positive number"))
    }
}

impl Scorer for CompositeScorer {
    fn name(&self) -> &str {
        "composite"
    }

    fn score<'a>(&'a self, case: Case<'a>) -> BoxFuture<'a, Result<ScoreResult>> {
        Box::pin(async move {
            if let Some(why) = self.invalid_weights() {
                return Ok(ScoreResult::fail(format!("invalid weights: {why}")));
            }
            let total: f32 = self.parts.iter().map(|(_, w)| w).sum();
            let results = join_all(self.parts.iter().map(|(s, _)| s.score(case))).await;
            let mut score = 0.0f32;
            let mut feedback = Vec::new();
            let mut components = Vec::new();
            for ((s, w), r) in self.parts.iter().zip(results) {
                let r = r?;
                score += r.score * w / total;
                if !r.feedback.is_empty() {
                    feedback.push(format!("{}: {}", s.name(), r.feedback));
                }
                components.push(json!({"name": s.name(), "score": r.score, "weight": w}));
            }
            Ok(ScoreResult::new(score, feedback.join("; "))
                .with_details(json!({ "components": components })))
        })
    }
}
