//! Offline judge pass over stored responses of several models to the same prompt.
//!
//! [`JudgePass`] ranks models from responses they already gave, with an LLM as the judge:
//!
//! - **Pairwise**: every two responses of different models to one prompt are compared twice,
//!   A/B and then B/A. A response wins the pair only when both orders agree; anything else is a
//!   tie, so a judge that prefers a position cancels out.
//! - **Points**: the judge lists the points each response makes, then groups equivalent points
//!   across the item's responses. A point that only one model raised is a *unique catch*
//!   candidate; the judge confirms or rejects each one, and a confirmed catch adds
//!   [`JudgePass::unique_weight`] to the model's score for that item.
//! - **Ranking**: a model's score is the mean over the items it appears in of (pairwise win rate,
//!   ties counting ½) + unique weight × validated catches, with a percentile bootstrap interval
//!   over items and the cost of the model's responses per extracted point.
//!
//! Every judge answer that parses is written to a SQLite table (`judge_answers`) before the pass
//! moves on, keyed by a SHA-256 of the judge model, the prompt template and the call's inputs.
//! A pass that stopped (an error, a killed process) resumes where it was: a second
//! [`JudgePass::run`] over the same items asks the judge only what is missing. Judge requests
//! bypass the client's own response cache, so a malformed answer is asked again, not replayed.
//!
//! This module knows the LLM client and nothing of the tuner or the ES engine.
//!
//! # Examples
//! ```no_run
//! use hyperfunc::llm::{LlmClient, LlmConfig};
//! use hyperfunc::tune::judge::{JudgeItem, JudgePass, JudgeResponse};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = LlmClient::new(LlmConfig::new("http://127.0.0.1:8000/v1"))?;
//! let items = vec![JudgeItem {
//!     prompt_id: "q1".into(),
//!     prompt: "How do I reverse a linked list?".into(),
//!     responses: vec![
//!         JudgeResponse { model: "small".into(), text: "…".into(), cost_micros: 120 },
//!         JudgeResponse { model: "large".into(), text: "…".into(), cost_micros: 2_400 },
//!     ],
//! }];
//! let pass = JudgePass::new(client, "judge-model", "judge.sqlite")?.bootstrap(2000).seed(7);
//! let report = pass.run(&items).await?;
//! println!("{}", report.to_table());
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::stream::{self, StreamExt};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::error::{Error, Result};
use crate::llm::{ChatRequest, LlmClient};

/// Bootstrap resamples (default).
const DEFAULT_RESAMPLES: usize = 1000;
/// Extra score per validated unique catch (default).
const DEFAULT_UNIQUE_WEIGHT: f64 = 0.5;
/// Judge calls in flight at once (default).
const DEFAULT_CONCURRENCY: usize = 8;
/// Items worked on at once; their calls share the concurrency limit above.
const ITEMS_AT_ONCE: usize = 4;

/// One prompt template of the judge: the system message and the user message with `{name}`
/// placeholders. Both texts are part of the cache key, so editing a template re-asks the judge.
struct Template {
    name: &'static str,
    system: &'static str,
    user: &'static str,
}

const PAIRWISE: Template = Template {
    name: "pairwise",
    system: "You are an impartial expert judge. You compare two responses to the same prompt \
             and decide which one answers it better: correctness first, then completeness, \
             then clarity. Ignore the order in which the responses are shown and their length \
             as such. Answer with JSON only: {\"winner\": \"A\"}, {\"winner\": \"B\"} or \
             {\"winner\": \"tie\"}.",
    user: "### Prompt\n{prompt}\n\n### Response A\n{a}\n\n### Response B\n{b}\n\n\
           Which response is better? Answer with JSON only.",
};

const POINTS: Template = Template {
    name: "points",
    system: "You extract the distinct points a response makes: each claim, step, caveat or \
             recommendation that matters for the prompt, as a short self-contained sentence. \
             Answer with a JSON array of strings only, e.g. [\"point one\", \"point two\"]; an \
             empty array when the response makes no point.",
    user: "### Prompt\n{prompt}\n\n### Response\n{response}\n\n\
           List the points of this response as a JSON array of strings.",
};

const MATCH: Template = Template {
    name: "match",
    system: "You group points that say the same thing. You are given numbered points taken \
             from several responses to one prompt; each is tagged with the response it comes \
             from. Put points that make the same claim (even in other words) in one group. \
             Answer with JSON only: an array of groups, each an array of point numbers, every \
             point number in exactly one group, e.g. [[1, 4], [2], [3, 5]].",
    user: "### Prompt\n{prompt}\n\n### Points\n{points}\n\n\
           Group the equivalent points. Answer with a JSON array of arrays of point numbers.",
};

const VALIDATE: Template = Template {
    name: "validate",
    system: "You check one point that only one response to a prompt made. Decide whether the \
             point is correct and genuinely relevant to the prompt (a real catch), or wrong, \
             irrelevant or made up. Answer with JSON only: {\"valid\": true} or \
             {\"valid\": false}.",
    user: "### Prompt\n{prompt}\n\n### Response\n{response}\n\n### Point\n{point}\n\n\
           Is this point correct and relevant? Answer with JSON only.",
};

/// One prompt and the stored responses of several models to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgeItem {
    /// An id of the prompt, named in unique catches and error messages.
    pub prompt_id: String,
    /// The prompt the models answered.
    pub prompt: String,
    /// The models' responses (usually one per model; items with fewer than two distinct models
    /// are skipped, as there is nothing to compare).
    pub responses: Vec<JudgeResponse>,
}

/// One stored response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgeResponse {
    /// The model that wrote it.
    pub model: String,
    /// Its text.
    pub text: String,
    /// What producing it cost, integer micro-dollars.
    pub cost_micros: i64,
}

/// The ranking of a [`JudgePass`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JudgeReport {
    /// One row per model, best score first (ties by name).
    pub models: Vec<ModelRank>,
    /// Every unique-catch candidate, in item order, with the judge's verdict.
    pub unique_catches: Vec<UniqueCatch>,
    /// Judge answers received over HTTP in this run (a malformed one included).
    pub judge_calls: u64,
    /// Judge answers read from the judge cache in this run.
    pub cached_judgements: u64,
    /// What all judgements behind this report cost, integer micro-dollars (cached ones at what
    /// they cost when they were made, so a resumed pass reports the whole pass).
    pub judge_cost_micros: i64,
}

/// One model's row of a [`JudgeReport`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelRank {
    /// The model.
    pub model: String,
    /// Mean over its items of pairwise win rate (ties ½) + unique weight × validated catches.
    pub score: f64,
    /// 2.5 % bootstrap percentile of the score (items resampled).
    pub ci_low: f64,
    /// 97.5 % bootstrap percentile of the score.
    pub ci_high: f64,
    /// Pairs won (both orders agreed on it).
    pub wins: u64,
    /// Pairs lost (both orders agreed on the other response).
    pub losses: u64,
    /// Pairs where the two orders disagreed or the judge called a tie.
    pub ties: u64,
    /// Points the judge extracted from its responses.
    pub points: u64,
    /// Its unique catches the judge confirmed.
    pub validated_unique: u64,
    /// What its responses cost, integer micro-dollars.
    pub cost_micros: i64,
    /// `cost_micros / points`; `None` without points.
    pub cost_per_point_micros: Option<f64>,
}

/// A point only one model raised in an item.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UniqueCatch {
    /// The item's prompt id.
    pub prompt_id: String,
    /// The model that raised it.
    pub model: String,
    /// The point, as extracted.
    pub point: String,
    /// Whether the judge confirmed it as correct and relevant.
    pub validated: bool,
}

impl JudgeReport {
    /// The ranking as a Markdown table, then one line on the judge's calls and cost.
    pub fn to_table(&self) -> String {
        let mut s = String::from(
            "| rank | model | score | 95% CI | wins | losses | ties | points | unique ✓ | cost $ | $/point |\n\
             | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for (i, m) in self.models.iter().enumerate() {
            let per_point = m
                .cost_per_point_micros
                .map_or_else(|| "–".to_string(), |c| format!("{:.6}", c / 1e6));
            s.push_str(&format!(
                "| {} | {} | {:.3} | [{:.3}, {:.3}] | {} | {} | {} | {} | {} | {:.6} | {} |\n",
                i + 1,
                m.model,
                m.score,
                m.ci_low,
                m.ci_high,
                m.wins,
                m.losses,
                m.ties,
                m.points,
                m.validated_unique,
                m.cost_micros as f64 / 1e6,
                per_point
            ));
        }
        let validated = self.unique_catches.iter().filter(|c| c.validated).count();
        s.push_str(&format!(
            "\nUnique catches: {validated} validated of {}. Judge: {} calls, {} cached, ${:.6}.\n",
            self.unique_catches.len(),
            self.judge_calls,
            self.cached_judgements,
            self.judge_cost_micros as f64 / 1e6
        ));
        s
    }
}

/// The judge cache: a `judge_answers` table in a SQLite file that may hold other tables too.
struct JudgeCache {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl JudgeCache {
    fn open(path: &Path) -> Result<Self> {
        let conn = super::store::open_shared(
            &path.to_string_lossy(),
            "CREATE TABLE IF NOT EXISTS judge_answers (
                 key TEXT PRIMARY KEY,
                 template TEXT NOT NULL,
                 judge_model TEXT NOT NULL,
                 answer TEXT NOT NULL,
                 cost_micros INTEGER NOT NULL,
                 created_unix_ms INTEGER NOT NULL
             );",
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        Error::TuneStore {
            path: self.path.display().to_string(),
            reason: format!("judge cache: {e}"),
        }
    }

    fn get(&self, key: &str) -> Result<Option<(String, i64)>> {
        self.conn()
            .query_row(
                "SELECT answer, cost_micros FROM judge_answers WHERE key = ?1",
                params![key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    fn put(&self, key: &str, template: &str, model: &str, answer: &str, cost: i64) -> Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO judge_answers
                     (key, template, judge_model, answer, cost_micros, created_unix_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![key, template, model, answer, cost, now],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}

/// Counters of one run.
#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    cached: AtomicU64,
    cost_micros: AtomicI64,
}

/// An offline judge pass: ranks models by pairwise judgements and validated unique points.
///
/// Built with [`JudgePass::new`] and the builder methods; [`JudgePass::run`] does the work.
/// See the [module docs](self) for the method.
pub struct JudgePass {
    client: LlmClient,
    judge_model: String,
    cache: JudgeCache,
    resamples: usize,
    seed: u64,
    unique_weight: f64,
    concurrency: usize,
}

impl std::fmt::Debug for JudgePass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JudgePass")
            .field("judge_model", &self.judge_model)
            .field("cache", &self.cache.path)
            .field("resamples", &self.resamples)
            .field("seed", &self.seed)
            .field("unique_weight", &self.unique_weight)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// What the judge said about one item.
#[derive(Default)]
struct ItemOutcome {
    /// Per model: the tallies of this item.
    models: BTreeMap<String, ModelTally>,
    catches: Vec<UniqueCatch>,
}

#[derive(Clone, Copy, Default)]
struct ModelTally {
    wins: u64,
    losses: u64,
    ties: u64,
    points: u64,
    validated: u64,
    cost_micros: i64,
}

impl ModelTally {
    fn add(&mut self, o: &ModelTally) {
        self.wins += o.wins;
        self.losses += o.losses;
        self.ties += o.ties;
        self.points += o.points;
        self.validated += o.validated;
        self.cost_micros += o.cost_micros;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    A,
    B,
    Tie,
}

impl JudgePass {
    /// A pass judged by `judge_model` through `client`, caching answers in the SQLite file
    /// `cache` (created if missing, WAL mode; its table `judge_answers` can share a file with
    /// other tables).
    pub fn new(client: LlmClient, judge_model: &str, cache: impl AsRef<Path>) -> Result<Self> {
        Ok(Self {
            client,
            judge_model: judge_model.to_string(),
            cache: JudgeCache::open(cache.as_ref())?,
            resamples: DEFAULT_RESAMPLES,
            seed: 0,
            unique_weight: DEFAULT_UNIQUE_WEIGHT,
            concurrency: DEFAULT_CONCURRENCY,
        })
    }

    /// Bootstrap resamples of the items for the intervals (default 1000; 0 gives intervals
    /// equal to the score).
    pub fn bootstrap(mut self, resamples: usize) -> Self {
        self.resamples = resamples;
        self
    }

    /// Seed of the bootstrap's random numbers (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Extra score per validated unique catch in an item (default 0.5; finite, not negative,
    /// checked by [`run`](Self::run)).
    pub fn unique_weight(mut self, w: f64) -> Self {
        self.unique_weight = w;
        self
    }

    /// Most judge calls in flight at once (default 8; at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Judges `items` and ranks the models.
    ///
    /// Every independent judge call runs concurrently (up to [`concurrency`](Self::concurrency))
    /// and every answer is cached as soon as it parses. When a call fails or its answer is
    /// malformed, the calls that do not depend on it still finish and are cached, then the
    /// first error (in item order) is returned as [`Error::Io`] with function `judge`.
    pub async fn run(&self, items: &[JudgeItem]) -> Result<JudgeReport> {
        if !(self.unique_weight.is_finite() && self.unique_weight >= 0.0) {
            return Err(Error::config(
                "unique_weight",
                format!(
                    "must be finite and not negative, got {}",
                    self.unique_weight
                ),
            ));
        }
        let tally = Tally::default();
        let gate = Semaphore::new(self.concurrency);
        // By index: a closure over `&JudgeItem` would make the future not provably `Send`.
        let outcomes: Vec<Result<Option<ItemOutcome>>> = stream::iter(0..items.len())
            .map(|i| self.judge_item(&items[i], &gate, &tally))
            .buffered(ITEMS_AT_ONCE)
            .collect()
            .await;
        let mut judged = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            if let Some(o) = o? {
                judged.push(o);
            }
        }
        Ok(self.rank(judged, &tally))
    }

    /// The pairwise judgements, points, matching and validation of one item; `None` when it
    /// has fewer than two distinct models.
    async fn judge_item(
        &self,
        item: &JudgeItem,
        gate: &Semaphore,
        tally: &Tally,
    ) -> Result<Option<ItemOutcome>> {
        let rs = &item.responses;
        let mut distinct: Vec<&str> = rs.iter().map(|r| r.model.as_str()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() < 2 {
            return Ok(None);
        }
        let id = &item.prompt_id;

        // Stage 1: pairwise judgements in both orders and point lists, all independent.
        let pairs: Vec<(usize, usize)> = (0..rs.len())
            .flat_map(|i| (i + 1..rs.len()).map(move |j| (i, j)))
            .filter(|&(i, j)| rs[i].model != rs[j].model)
            .collect();
        let verdict = |a: usize, b: usize| {
            let what = format!(
                "pairwise judgement of prompt `{id}` ({} as A, {} as B)",
                rs[a].model, rs[b].model
            );
            let inputs = [
                ("prompt", item.prompt.as_str()),
                ("a", rs[a].text.as_str()),
                ("b", rs[b].text.as_str()),
            ];
            async move {
                self.ask(&PAIRWISE, &inputs, parse_verdict, &what, gate, tally)
                    .await
            }
        };
        let verdicts = futures::future::join_all(
            pairs
                .iter()
                .flat_map(|&(i, j)| [verdict(i, j), verdict(j, i)]),
        );
        let points = futures::future::join_all(rs.iter().map(|r| {
            let what = format!("points of {}'s response to prompt `{id}`", r.model);
            let inputs = [
                ("prompt", item.prompt.as_str()),
                ("response", r.text.as_str()),
            ];
            async move {
                self.ask(&POINTS, &inputs, parse_points, &what, gate, tally)
                    .await
            }
        }));
        let (verdicts, points) = futures::join!(verdicts, points);
        let verdicts = verdicts.into_iter().collect::<Result<Vec<_>>>()?;
        let points = points.into_iter().collect::<Result<Vec<_>>>()?;

        let mut out = ItemOutcome::default();
        for r in rs {
            let t = out.models.entry(r.model.clone()).or_default();
            t.cost_micros += r.cost_micros;
        }
        for (k, &(i, j)) in pairs.iter().enumerate() {
            // Response i wins only if it won as A and as B: position bias cancels out.
            let won = match (verdicts[2 * k], verdicts[2 * k + 1]) {
                (Verdict::A, Verdict::B) => Some(true),
                (Verdict::B, Verdict::A) => Some(false),
                _ => None,
            };
            for (me, mine) in [(i, won), (j, won.map(|w| !w))] {
                let t = out.models.entry(rs[me].model.clone()).or_default();
                match mine {
                    Some(true) => t.wins += 1,
                    Some(false) => t.losses += 1,
                    None => t.ties += 1,
                }
            }
        }
        for (r, p) in rs.iter().zip(&points) {
            if let Some(t) = out.models.get_mut(&r.model) {
                t.points += p.len() as u64;
            }
        }

        // Stage 2: group equivalent points across the responses.
        let flat: Vec<(usize, &str)> = points
            .iter()
            .enumerate()
            .flat_map(|(r, ps)| ps.iter().map(move |p| (r, p.as_str())))
            .collect();
        if flat.is_empty() {
            return Ok(Some(out));
        }
        let listing: String = flat
            .iter()
            .enumerate()
            .map(|(n, (r, p))| format!("{}. [R{}] {p}\n", n + 1, r + 1))
            .collect();
        let n = flat.len();
        let groups = self
            .ask(
                &MATCH,
                &[
                    ("prompt", item.prompt.as_str()),
                    ("points", listing.trim_end()),
                ],
                |t| parse_groups(t, n),
                &format!("matching of points for prompt `{id}`"),
                gate,
                tally,
            )
            .await?;

        // Stage 3: confirm each point that only one model raised.
        let mut candidates: Vec<(usize, &str)> = Vec::new();
        for g in groups {
            let first = flat[g[0]];
            if g.iter().all(|&p| rs[flat[p].0].model == rs[first.0].model) {
                candidates.push(first);
            }
        }
        let checks = futures::future::join_all(candidates.iter().map(|&(r, point)| {
            let what = format!(
                "validation of {}'s unique point for prompt `{id}`",
                rs[r].model
            );
            let inputs = [
                ("prompt", item.prompt.as_str()),
                ("response", rs[r].text.as_str()),
                ("point", point),
            ];
            async move {
                self.ask(&VALIDATE, &inputs, parse_yes_no, &what, gate, tally)
                    .await
            }
        }))
        .await;
        for (&(r, point), ok) in candidates.iter().zip(checks) {
            let validated = ok?;
            if validated {
                if let Some(t) = out.models.get_mut(&rs[r].model) {
                    t.validated += 1;
                }
            }
            out.catches.push(UniqueCatch {
                prompt_id: item.prompt_id.clone(),
                model: rs[r].model.clone(),
                point: point.to_string(),
                validated,
            });
        }
        Ok(Some(out))
    }

    /// One judge call: from the cache when answered before, else from the model (then cached).
    async fn ask<T>(
        &self,
        tpl: &Template,
        inputs: &[(&str, &str)],
        parse: impl Fn(&str) -> std::result::Result<T, String>,
        what: &str,
        gate: &Semaphore,
        tally: &Tally,
    ) -> Result<T> {
        let key = cache_key(&self.judge_model, tpl, inputs);
        if let Some((answer, cost)) = self.cache.get(&key)? {
            // An answer cached under an older parser that no longer reads is asked again.
            if let Ok(v) = parse(&answer) {
                tally.cached.fetch_add(1, Relaxed);
                tally.cost_micros.fetch_add(cost, Relaxed);
                return Ok(v);
            }
        }
        let judge_err = |message: String, retryable: bool| Error::Io {
            function: "judge".into(),
            message,
            retryable,
        };
        let resp = {
            let _permit = gate
                .acquire()
                .await
                .map_err(|e| judge_err(format!("{what}: {e}"), false))?;
            let req = ChatRequest::new(&self.judge_model)
                .system(tpl.system)
                .user(render(tpl.user, inputs))
                .temperature(0.0)
                .no_cache()
                .label("judge");
            self.client
                .chat(req)
                .await
                .map_err(|e| judge_err(format!("{what}: {e}"), e.is_retryable()))?
        };
        tally.calls.fetch_add(1, Relaxed);
        let cost = (resp.cost_usd * 1e6).round() as i64;
        tally.cost_micros.fetch_add(cost, Relaxed);
        let v = parse(&resp.text).map_err(|why| {
            judge_err(
                format!(
                    "{what}: malformed answer from judge `{}` ({why}): {:?}",
                    self.judge_model,
                    clip(&resp.text)
                ),
                false,
            )
        })?;
        self.cache
            .put(&key, tpl.name, &self.judge_model, &resp.text, cost)?;
        Ok(v)
    }

    /// Scores, bootstrap intervals and the table rows from the judged items.
    fn rank(&self, judged: Vec<ItemOutcome>, tally: &Tally) -> JudgeReport {
        let w = self.unique_weight;
        // Per model: its score in each item it appears in, by item position.
        let mut per_item: BTreeMap<&str, Vec<(usize, f64)>> = BTreeMap::new();
        let mut totals: BTreeMap<&str, ModelTally> = BTreeMap::new();
        for (i, o) in judged.iter().enumerate() {
            for (m, t) in &o.models {
                let pairs = t.wins + t.losses + t.ties;
                let rate = if pairs == 0 {
                    0.0
                } else {
                    (t.wins as f64 + 0.5 * t.ties as f64) / pairs as f64
                };
                per_item
                    .entry(m)
                    .or_default()
                    .push((i, rate + w * t.validated as f64));
                totals.entry(m).or_default().add(t);
            }
        }
        // Resample items; each model's mean is over the drawn items it appears in.
        let n = judged.len();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(self.seed);
        let index: HashMap<&str, usize> =
            per_item.keys().enumerate().map(|(k, &m)| (m, k)).collect();
        let mut item_scores: Vec<Vec<(usize, f64)>> = vec![Vec::new(); n];
        for (&m, scores) in &per_item {
            for &(i, s) in scores {
                item_scores[i].push((index[m], s));
            }
        }
        let mut draws: Vec<Vec<f64>> = vec![Vec::with_capacity(self.resamples); per_item.len()];
        let mut sums = vec![(0.0f64, 0usize); per_item.len()];
        for _ in 0..self.resamples {
            sums.iter_mut().for_each(|s| *s = (0.0, 0));
            for _ in 0..n {
                for &(k, s) in &item_scores[rng.random_range(0..n)] {
                    sums[k].0 += s;
                    sums[k].1 += 1;
                }
            }
            for (k, &(sum, count)) in sums.iter().enumerate() {
                if count > 0 {
                    draws[k].push(sum / count as f64);
                }
            }
        }
        let mut models: Vec<ModelRank> = per_item
            .iter()
            .zip(draws)
            .map(|((&m, scores), mut d)| {
                let score = scores.iter().map(|s| s.1).sum::<f64>() / scores.len() as f64;
                d.sort_by(f64::total_cmp);
                let (ci_low, ci_high) = if d.is_empty() {
                    (score, score)
                } else {
                    (percentile(&d, 0.025), percentile(&d, 0.975))
                };
                let t = totals[m];
                ModelRank {
                    model: m.to_string(),
                    score,
                    ci_low,
                    ci_high,
                    wins: t.wins,
                    losses: t.losses,
                    ties: t.ties,
                    points: t.points,
                    validated_unique: t.validated,
                    cost_micros: t.cost_micros,
                    cost_per_point_micros: (t.points > 0)
                        .then(|| t.cost_micros as f64 / t.points as f64),
                }
            })
            .collect();
        models.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.model.cmp(&b.model)));
        JudgeReport {
            models,
            unique_catches: judged.into_iter().flat_map(|o| o.catches).collect(),
            judge_calls: tally.calls.load(Relaxed),
            cached_judgements: tally.cached.load(Relaxed),
            judge_cost_micros: tally.cost_micros.load(Relaxed),
        }
    }
}

/// The `q` quantile of sorted, non-empty `d`, interpolating between neighbours.
fn percentile(d: &[f64], q: f64) -> f64 {
    let x = q * (d.len() - 1) as f64;
    let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
    d[lo] + (d[hi] - d[lo]) * (x - lo as f64)
}

/// SHA-256 (hex) of the judge model, the template's texts and the call's inputs.
fn cache_key(model: &str, tpl: &Template, inputs: &[(&str, &str)]) -> String {
    let canonical = serde_json::json!([model, tpl.name, tpl.system, tpl.user, inputs]);
    Sha256::digest(canonical.to_string().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Fills `{name}` placeholders in one pass, so text inserted is never read as a placeholder.
fn render(template: &str, inputs: &[(&str, &str)]) -> String {
    let mut out =
        String::with_capacity(template.len() + inputs.iter().map(|i| i.1.len()).sum::<usize>());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let value = after.find('}').and_then(|close| {
            let name = &after[..close];
            inputs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v, close))
        });
        match value {
            Some((v, close)) => {
                out.push_str(v);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The first 300 characters of a text, for error messages.
fn clip(s: &str) -> &str {
    s.char_indices().nth(300).map_or(s, |(i, _)| &s[..i])
}

/// The answer without a surrounding Markdown code fence (and any text around the fence).
fn unfence(text: &str) -> &str {
    let t = text.trim();
    crate::prompt::fences(t).first().map_or(t, |b| b.trim())
}

/// `A`, `B` or a tie, from `{"winner": …}`, a JSON string or bare text.
fn parse_verdict(text: &str) -> std::result::Result<Verdict, String> {
    let t = unfence(text);
    let word = match serde_json::from_str::<Json>(t) {
        Ok(Json::Object(o)) => ["winner", "better", "verdict", "answer"]
            .iter()
            .find_map(|k| o.get(*k).and_then(Json::as_str).map(str::to_string))
            .ok_or("expected {\"winner\": \"A\" | \"B\" | \"tie\"}")?,
        Ok(Json::String(s)) => s,
        _ => t.to_string(),
    };
    let w = word
        .trim()
        .trim_matches(|c: char| c == '"' || c == '\'' || c == '.' || c == '*')
        .to_ascii_lowercase();
    let w = w.strip_prefix("response ").unwrap_or(&w);
    match w {
        "a" => Ok(Verdict::A),
        "b" => Ok(Verdict::B),
        "tie" | "draw" | "equal" | "none" | "neither" | "both" => Ok(Verdict::Tie),
        _ => Err("expected the winner A, B or tie".into()),
    }
}

/// A list of short strings, from a JSON array or `{"points": [...]}`.
fn parse_points(text: &str) -> std::result::Result<Vec<String>, String> {
    let v: Json = serde_json::from_str(unfence(text)).map_err(|e| format!("not JSON: {e}"))?;
    let list = match &v {
        Json::Array(a) => a,
        Json::Object(o) => o
            .get("points")
            .and_then(Json::as_array)
            .ok_or("expected a JSON array of strings")?,
        _ => return Err("expected a JSON array of strings".into()),
    };
    let mut points = Vec::with_capacity(list.len());
    for p in list {
        let s = p
            .as_str()
            .ok_or_else(|| format!("a point is not a string: {p}"))?
            .trim();
        if !s.is_empty() {
            points.push(s.to_string());
        }
    }
    Ok(points)
}

/// Groups of point positions (0-based) covering `0..n`, from 1-based numbers in a JSON array
/// of arrays (or `{"groups": [...]}`). Overlapping groups are merged; a point in no group is a
/// group of its own. Groups come out ordered by their first point.
fn parse_groups(text: &str, n: usize) -> std::result::Result<Vec<Vec<usize>>, String> {
    let v: Json = serde_json::from_str(unfence(text)).map_err(|e| format!("not JSON: {e}"))?;
    let list = match &v {
        Json::Array(a) => a,
        Json::Object(o) => o
            .get("groups")
            .and_then(Json::as_array)
            .ok_or("expected a JSON array of arrays of point numbers")?,
        _ => return Err("expected a JSON array of arrays of point numbers".into()),
    };
    // Union-find over the points.
    let mut parent: Vec<usize> = (0..n).collect();
    fn root(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for g in list {
        let members = g.as_array().ok_or("each group must be an array")?;
        let mut first = None;
        for m in members {
            let k = m
                .as_u64()
                .or_else(|| m.as_str().and_then(|s| s.trim().parse().ok()))
                .filter(|&k| k >= 1 && k as usize <= n)
                .ok_or_else(|| format!("{m} is not a point number in 1..={n}"))?
                as usize
                - 1;
            match first {
                None => first = Some(k),
                Some(f) => {
                    let (a, b) = (root(&mut parent, f), root(&mut parent, k));
                    parent[a.max(b)] = a.min(b);
                }
            }
        }
    }
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut slot: HashMap<usize, usize> = HashMap::new();
    for p in 0..n {
        let r = root(&mut parent, p);
        let g = *slot.entry(r).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(p);
    }
    Ok(groups)
}

/// Yes or no, from a JSON bool, `{"valid": …}` or text starting with yes/no (true/false).
fn parse_yes_no(text: &str) -> std::result::Result<bool, String> {
    let t = unfence(text);
    let word = match serde_json::from_str::<Json>(t) {
        Ok(Json::Bool(b)) => return Ok(b),
        Ok(Json::Object(o)) => {
            match ["valid", "real", "correct", "answer"]
                .iter()
                .find_map(|k| o.get(*k))
            {
                Some(Json::Bool(b)) => return Ok(*b),
                Some(Json::String(s)) => s.clone(),
                _ => return Err("expected {\"valid\": true | false}".into()),
            }
        }
        Ok(Json::String(s)) => s,
        _ => t.to_string(),
    };
    let w = word.to_ascii_lowercase();
    match w
        .split(|c: char| !c.is_ascii_alphabetic())
        .find(|s| !s.is_empty())
    {
        Some("yes" | "true" | "valid") => Ok(true),
        Some("no" | "false" | "invalid") => Ok(false),
        _ => Err("expected yes or no".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_with_or_without_fences() {
        assert_eq!(parse_verdict("{\"winner\": \"A\"}"), Ok(Verdict::A));
        assert_eq!(
            parse_verdict("```json\n{\"winner\": \"b\"}\n```"),
            Ok(Verdict::B)
        );
        assert_eq!(parse_verdict("Tie."), Ok(Verdict::Tie));
        assert!(parse_verdict("I like the first one").is_err());
        assert_eq!(
            parse_points("Here:\n```\n[\"x\", \" y \", \"\"]\n```"),
            Ok(vec!["x".to_string(), "y".to_string()])
        );
        assert!(parse_points("[1]").is_err());
        assert_eq!(
            parse_groups("[[1, 3], [2, 3]]", 4),
            Ok(vec![vec![0, 1, 2], vec![3]])
        );
        assert!(parse_groups("[[0]]", 2).is_err());
        assert_eq!(parse_yes_no("{\"valid\": false}"), Ok(false));
        assert_eq!(parse_yes_no("Yes, it is real."), Ok(true));
        assert!(parse_yes_no("maybe").is_err());
    }

    /// A pass can be spawned on a multi-threaded runtime.
    #[allow(dead_code)]
    fn run_is_send(pass: &JudgePass, items: &[JudgeItem]) {
        fn send<T: Send>(_: T) {}
        send(pass.run(items));
    }

    #[test]
    fn render_fills_placeholders_once() {
        assert_eq!(
            render("{a}|{b}|{c}", &[("a", "{b}"), ("b", "x")]),
            "{b}|x|{c}"
        );
    }

    #[test]
    fn percentile_interpolates() {
        let d = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&d, 0.5), 2.0);
        assert!((percentile(&d, 0.025) - 0.1).abs() < 1e-12);
    }
}
