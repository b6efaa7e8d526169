//! What the stored LLM calls say: costly operations, cache candidates and breakers, unused
//! fragments, latency bottlenecks, observations by model and label, and before/after
//! comparisons (`hyperfunc llm report`, `hyperfunc llm compare`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::cost::{micros_to_usd, parse_span, parse_time, Micros};
use super::ledger::Ledger;
use crate::error::{Error, Result};
use crate::util::nearest_rank;

/// Settings of [`Ledger::llm_report`].
#[derive(Clone, Debug, PartialEq)]
pub struct LlmReportOptions {
    /// First second covered (all calls when `None`).
    pub since: Option<i64>,
    /// The provider's minimum cacheable prefix, tokens (OpenAI and Anthropic: 1024).
    pub min_cacheable_tokens: u64,
    /// How long the provider keeps a cached prefix, seconds (typically 300).
    pub cache_lifetime_s: f64,
    /// Rows per section.
    pub top: usize,
}

impl Default for LlmReportOptions {
    fn default() -> Self {
        Self {
            since: None,
            min_cacheable_tokens: 1024,
            cache_lifetime_s: 300.0,
            top: 10,
        }
    }
}

/// One operation: the calls of one (caller, label, model).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Operation {
    /// Call site.
    pub caller: String,
    /// Label.
    pub label: String,
    /// Model.
    pub model: String,
    /// Calls.
    pub calls: u64,
    /// Failed calls.
    pub errors: u64,
    /// Calls served by our response cache.
    pub from_cache: u64,
    /// Prompt tokens (all classes).
    pub prompt_tokens: u64,
    /// Of which read from the provider's cache.
    pub cache_read_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Micro-dollars.
    pub micros: Micros,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 95th percentile latency, ms.
    pub p95_ms: f64,
    /// Total latency, seconds.
    pub total_s: f64,
}

/// A fragment and how often it was sent.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FragmentUse {
    /// Its name.
    pub name: String,
    /// Its content hash.
    pub hash: String,
    /// Estimated tokens.
    pub tokens: u64,
    /// Calls that sent it.
    pub sends: u64,
    /// Distinct callers that sent it.
    pub callers: u64,
}

/// The longest prefix of fragments every call of a call site shares: worth a provider cache.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CacheCandidate {
    /// The call site.
    pub caller: String,
    /// The prefix's fragment names, in order.
    pub prefix: Vec<String>,
    /// Its estimated tokens.
    pub prefix_tokens: u64,
    /// Calls of the call site.
    pub calls: u64,
    /// Calls that came within the cache lifetime of the previous one (a cache could serve them).
    pub within_lifetime: u64,
    /// Estimated saving over the period with the prefix cached, micro-dollars (from the price
    /// table's input and cache-read prices; tokens already read from the cache not counted).
    pub saving_micros: Micros,
}

/// A varying fragment ahead of a long stable one: it stops the provider from caching the rest.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CacheBreaker {
    /// The call site.
    pub caller: String,
    /// The fragment (name) whose text varies.
    pub varying: String,
    /// Its position in the prompt.
    pub position: usize,
    /// How many different texts it had.
    pub variants: u64,
    /// The stable fragments after it.
    pub stable_after: Vec<String>,
    /// Their estimated tokens.
    pub stable_tokens: u64,
}

/// A fragment sent from a call site that had never sent it before the period.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnexpectedFragment {
    /// The fragment.
    pub fragment: String,
    /// The new call site.
    pub caller: String,
    /// When it first sent it, Unix seconds.
    pub first_sent: f64,
}

/// How often an observation fired, per model or per label, against that group's LLM calls.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ObservationRate {
    /// The observation's name.
    pub name: String,
    /// `model` or `label`.
    pub by: String,
    /// The model or label.
    pub key: String,
    /// Observations.
    pub count: u64,
    /// LLM calls of that model or label in the period.
    pub llm_calls: u64,
    /// count / llm_calls (`None` without calls).
    pub rate: Option<f64>,
}

/// `hyperfunc llm report`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LlmReport {
    /// First second covered.
    pub since: Option<i64>,
    /// Calls.
    pub calls: u64,
    /// Micro-dollars.
    pub micros: Micros,
    /// Operations by cost, highest first.
    pub costly: Vec<Operation>,
    /// Operations by total latency, highest first.
    pub slowest: Vec<Operation>,
    /// Fragments by sends.
    pub fragments: Vec<FragmentUse>,
    /// Cache candidates by estimated saving.
    pub cache_candidates: Vec<CacheCandidate>,
    /// Cache breakers.
    pub cache_breakers: Vec<CacheBreaker>,
    /// Declared fragments never sent (names).
    pub unused_fragments: Vec<String>,
    /// Fragments sent from a new call site in the period.
    pub unexpected_fragments: Vec<UnexpectedFragment>,
    /// Observations per model and per label.
    pub observations: Vec<ObservationRate>,
    /// (observation, label): labels with LLM calls in the period that never fired it.
    pub quiet_labels: Vec<(String, String)>,
}

/// A call's fragments in order: (hash, name, tokens).
type Seq = Vec<(String, String, u64)>;

struct CallRow {
    ts: f64,
    caller: String,
    label: String,
    model: String,
    prompt_tokens: u64,
    cache_read: u64,
    output: u64,
    micros: Micros,
    latency_ms: f64,
    source: String,
    ok: bool,
}

impl Ledger {
    /// Analyses the stored LLM calls (see [`LlmReport`]).
    pub fn llm_report(&self, opts: &LlmReportOptions) -> Result<LlmReport> {
        let since = opts.since.unwrap_or(i64::MIN);
        let prices = self.prices();
        let conn = self.reader()?;
        let err = self.err();
        let q = |sql: &str| conn.prepare(sql).map_err(&err);
        // Calls.
        let mut st = q(
            "SELECT id, ts, caller, label, model, input + cache_read + cache_write, \
                        cache_read, output, micros, latency_ms, source, ok \
                        FROM hyperfunc_llm_calls WHERE ts >= ?1 ORDER BY ts, id",
        )?;
        let calls: Vec<(i64, CallRow)> = st
            .query_map([since], |r| {
                Ok((
                    r.get(0)?,
                    CallRow {
                        ts: r.get(1)?,
                        caller: r.get(2)?,
                        label: r.get(3)?,
                        model: r.get(4)?,
                        prompt_tokens: r.get::<_, i64>(5)? as u64,
                        cache_read: r.get::<_, i64>(6)? as u64,
                        output: r.get::<_, i64>(7)? as u64,
                        micros: r.get(8)?,
                        latency_ms: r.get(9)?,
                        source: r.get(10)?,
                        ok: r.get::<_, i64>(11)? != 0,
                    },
                ))
            })
            .map_err(&err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(&err)?;
        // Operations.
        let mut ops: BTreeMap<(String, String, String), (Operation, Vec<f64>)> = BTreeMap::new();
        for (_, c) in &calls {
            let (op, lat) = ops
                .entry((c.caller.clone(), c.label.clone(), c.model.clone()))
                .or_insert_with(|| {
                    (
                        Operation {
                            caller: c.caller.clone(),
                            label: c.label.clone(),
                            model: c.model.clone(),
                            calls: 0,
                            errors: 0,
                            from_cache: 0,
                            prompt_tokens: 0,
                            cache_read_tokens: 0,
                            output_tokens: 0,
                            micros: 0,
                            p50_ms: 0.0,
                            p95_ms: 0.0,
                            total_s: 0.0,
                        },
                        Vec::new(),
                    )
                });
            op.calls += 1;
            op.errors += u64::from(!c.ok);
            op.from_cache += u64::from(c.source == "cache");
            op.prompt_tokens += c.prompt_tokens;
            op.cache_read_tokens += c.cache_read;
            op.output_tokens += c.output;
            op.micros += c.micros;
            op.total_s += c.latency_ms / 1e3;
            lat.push(c.latency_ms);
        }
        let ops: Vec<Operation> = ops
            .into_values()
            .map(|(mut op, mut lat)| {
                lat.sort_by(f64::total_cmp);
                op.p50_ms = nearest_rank(&lat, 0.5);
                op.p95_ms = nearest_rank(&lat, 0.95);
                op
            })
            .collect();
        let mut costly = ops.clone();
        costly.sort_by(|a, b| b.micros.cmp(&a.micros).then(b.calls.cmp(&a.calls)));
        costly.truncate(opts.top);
        let mut slowest = ops;
        slowest.sort_by(|a, b| b.total_s.total_cmp(&a.total_s));
        slowest.truncate(opts.top);

        // Fragments of every call in the period, in order.
        let mut st = q("SELECT f.call, f.pos, f.hash, f.name, g.tokens, g.stable \
                        FROM hyperfunc_call_fragments f \
                        JOIN hyperfunc_llm_calls c ON c.id = f.call \
                        JOIN hyperfunc_fragments g ON g.hash = f.hash \
                        WHERE c.ts >= ?1 ORDER BY f.call, f.pos")?;
        let mut seqs: HashMap<i64, Seq> = HashMap::new();
        let rows = st
            .query_map([since], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)? as u64,
                ))
            })
            .map_err(&err)?;
        for row in rows {
            let (call, hash, name, tokens) = row.map_err(&err)?;
            seqs.entry(call).or_default().push((hash, name, tokens));
        }
        let mut uses: BTreeMap<String, (FragmentUse, BTreeSet<String>)> = BTreeMap::new();
        let mut by_caller: BTreeMap<String, Vec<(&CallRow, &Seq)>> = BTreeMap::new();
        for (id, c) in &calls {
            let Some(seq) = seqs.get(id) else { continue };
            by_caller
                .entry(c.caller.clone())
                .or_default()
                .push((c, seq));
            for (hash, name, tokens) in seq {
                let (u, callers) = uses.entry(hash.clone()).or_insert_with(|| {
                    (
                        FragmentUse {
                            name: name.clone(),
                            hash: hash.clone(),
                            tokens: *tokens,
                            sends: 0,
                            callers: 0,
                        },
                        BTreeSet::new(),
                    )
                });
                u.sends += 1;
                callers.insert(c.caller.clone());
            }
        }
        let mut fragments: Vec<FragmentUse> = uses
            .into_values()
            .map(|(mut u, callers)| {
                u.callers = callers.len() as u64;
                u
            })
            .collect();
        fragments.sort_by(|a, b| b.sends.cmp(&a.sends).then(b.tokens.cmp(&a.tokens)));
        fragments.truncate(opts.top.max(1) * 5);

        // Cache candidates and breakers, per call site.
        let mut cache_candidates = Vec::new();
        let mut cache_breakers = Vec::new();
        for (caller, list) in &by_caller {
            let first = list[0].1;
            let mut lcp = first.len();
            for (_, seq) in list {
                lcp = lcp.min(
                    first
                        .iter()
                        .zip(seq.iter())
                        .take_while(|(a, b)| a.0 == b.0)
                        .count(),
                );
            }
            let prefix_tokens: u64 = first[..lcp].iter().map(|f| f.2).sum();
            if lcp > 0 && prefix_tokens >= opts.min_cacheable_tokens {
                let mut within = 0u64;
                let mut saving: i128 = 0;
                let mut last: HashMap<&str, f64> = HashMap::new();
                for (c, _) in list {
                    if let Some(&t) = last.get(c.model.as_str()) {
                        if c.ts - t <= opts.cache_lifetime_s {
                            within += 1;
                            if let Some(p) = prices.price_at(&c.model, c.ts.floor() as i64) {
                                let tokens = prefix_tokens.saturating_sub(c.cache_read);
                                saving += i128::from(tokens) * i128::from(p.input - p.cache_read);
                            }
                        }
                    }
                    last.insert(c.model.as_str(), c.ts);
                }
                cache_candidates.push(CacheCandidate {
                    caller: caller.clone(),
                    prefix: first[..lcp].iter().map(|f| f.1.clone()).collect(),
                    prefix_tokens,
                    calls: list.len() as u64,
                    within_lifetime: within,
                    saving_micros: ((saving + 500_000) / 1_000_000) as Micros,
                });
            }
            // Position by position: distinct texts and tokens.
            let width = list.iter().map(|(_, s)| s.len()).max().unwrap_or(0);
            let mut pos_info: Vec<(BTreeSet<&str>, String, u64)> =
                vec![(BTreeSet::new(), String::new(), 0); width];
            for (_, seq) in list {
                for (i, (hash, name, tokens)) in seq.iter().enumerate() {
                    pos_info[i].0.insert(hash.as_str());
                    pos_info[i].1 = name.clone();
                    pos_info[i].2 = pos_info[i].2.max(*tokens);
                }
            }
            if list.len() > 1 {
                if let Some(v) = pos_info.iter().position(|p| p.0.len() > 1) {
                    let after: Vec<&(BTreeSet<&str>, String, u64)> = pos_info[v + 1..]
                        .iter()
                        .take_while(|p| p.0.len() == 1)
                        .collect();
                    let stable_tokens: u64 = after.iter().map(|p| p.2).sum();
                    if stable_tokens >= opts.min_cacheable_tokens {
                        cache_breakers.push(CacheBreaker {
                            caller: caller.clone(),
                            varying: pos_info[v].1.clone(),
                            position: v,
                            variants: pos_info[v].0.len() as u64,
                            stable_after: after.iter().map(|p| p.1.clone()).collect(),
                            stable_tokens,
                        });
                    }
                }
            }
        }
        cache_candidates.sort_by_key(|c| std::cmp::Reverse(c.saving_micros));

        // Declared, never sent (ever).
        let mut st = q(
            "SELECT name FROM hyperfunc_fragments g WHERE declared = 1 AND NOT EXISTS \
                        (SELECT 1 FROM hyperfunc_call_fragments f WHERE f.hash = g.hash) \
                        ORDER BY name",
        )?;
        let unused_fragments: Vec<String> = st
            .query_map([], |r| r.get(0))
            .map_err(&err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(&err)?;

        // Sent from a new call site in the period (only with a period).
        let mut unexpected_fragments = Vec::new();
        if opts.since.is_some() {
            let mut st = q("SELECT f.name, c.caller, MIN(c.ts) AS first FROM \
                            hyperfunc_call_fragments f JOIN hyperfunc_llm_calls c \
                            ON c.id = f.call GROUP BY f.hash, c.caller \
                            HAVING first >= ?1 AND EXISTS (SELECT 1 FROM \
                            hyperfunc_call_fragments f2 JOIN hyperfunc_llm_calls c2 \
                            ON c2.id = f2.call WHERE f2.hash = f.hash AND c2.ts < ?1) \
                            ORDER BY first")?;
            unexpected_fragments = st
                .query_map([since], |r| {
                    Ok(UnexpectedFragment {
                        fragment: r.get(0)?,
                        caller: r.get(1)?,
                        first_sent: r.get(2)?,
                    })
                })
                .map_err(&err)?
                .collect::<rusqlite::Result<_>>()
                .map_err(&err)?;
        }

        // Observations against LLM calls, by model and by label.
        let mut observations = Vec::new();
        let mut quiet_labels = Vec::new();
        let mut model_calls: BTreeMap<&str, u64> = BTreeMap::new();
        let mut label_calls: BTreeMap<&str, u64> = BTreeMap::new();
        for (_, c) in &calls {
            *model_calls.entry(c.model.as_str()).or_default() += 1;
            *label_calls.entry(c.label.as_str()).or_default() += 1;
        }
        for (by, col) in [("model", "model"), ("label", "label")] {
            let mut st = conn
                .prepare(&format!(
                    "SELECT name, {col}, COUNT(*) FROM hyperfunc_observations WHERE ts >= ?1 \
                     GROUP BY name, {col} ORDER BY name, COUNT(*) DESC"
                ))
                .map_err(&err)?;
            let rows: Vec<(String, String, i64)> = st
                .query_map([since], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(&err)?
                .collect::<rusqlite::Result<_>>()
                .map_err(&err)?;
            let calls_of = if by == "model" {
                &model_calls
            } else {
                &label_calls
            };
            let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (name, key, n) in rows {
                let llm_calls = calls_of.get(key.as_str()).copied().unwrap_or(0);
                seen.entry(name.clone()).or_default().insert(key.clone());
                observations.push(ObservationRate {
                    name,
                    by: by.into(),
                    key,
                    count: n as u64,
                    llm_calls,
                    rate: (llm_calls > 0).then(|| n as f64 / llm_calls as f64),
                });
            }
            if by == "label" {
                for (name, keys) in &seen {
                    for label in label_calls.keys() {
                        if !label.is_empty() && !keys.contains(*label) {
                            quiet_labels.push((name.clone(), label.to_string()));
                        }
                    }
                }
            }
        }

        Ok(LlmReport {
            since: opts.since,
            calls: calls.len() as u64,
            micros: calls.iter().map(|(_, c)| c.micros).sum(),
            costly,
            slowest,
            fragments,
            cache_candidates,
            cache_breakers,
            unused_fragments,
            unexpected_fragments,
            observations,
            quiet_labels,
        })
    }

    /// Compares the LLM calls of two windows (see [`Window`]): tokens, dollars, latency and
    /// quality per call, with 95% intervals of the differences.
    pub fn compare(
        &self,
        before: &Window,
        after: &Window,
        label: Option<&str>,
    ) -> Result<Comparison> {
        let a = self.window_calls(before, label)?;
        let b = self.window_calls(after, label)?;
        type Metric = (&'static str, fn(&Sample) -> Option<f64>);
        let metrics: [Metric; 6] = [
            ("prompt_tokens", |s| Some(s.prompt_tokens)),
            ("output_tokens", |s| Some(s.output_tokens)),
            ("usd", |s| Some(s.usd)),
            ("latency_ms", |s| Some(s.latency_ms)),
            ("quality", |s| s.quality),
            ("error_rate", |s| Some(s.error)),
        ];
        let deltas = metrics
            .iter()
            .map(|(name, f)| {
                let xa: Vec<f64> = a.iter().filter_map(f).collect();
                let xb: Vec<f64> = b.iter().filter_map(f).collect();
                Delta::of(name, &xa, &xb)
            })
            .collect();
        Ok(Comparison {
            before: before.to_string(),
            after: after.to_string(),
            label: label.map(str::to_string),
            before_calls: a.len() as u64,
            after_calls: b.len() as u64,
            before_usd: a.iter().map(|s| s.usd).sum(),
            after_usd: b.iter().map(|s| s.usd).sum(),
            deltas,
        })
    }

    fn window_calls(&self, w: &Window, label: Option<&str>) -> Result<Vec<Sample>> {
        let conn = self.reader()?;
        let err = self.err();
        let (cond, a, b) = match w {
            Window::Run(r) => ("run = ?1 AND ?2 = ?2".to_string(), r.clone(), String::new()),
            Window::Time { from, to } => (
                "ts >= CAST(?1 AS REAL) AND ts < CAST(?2 AS REAL)".to_string(),
                from.to_string(),
                to.to_string(),
            ),
        };
        let sql = format!(
            "SELECT input + cache_read + cache_write, output, micros, latency_ms, quality, ok \
             FROM hyperfunc_llm_calls WHERE {cond} AND (?3 IS NULL OR label = ?3) \
             AND source != 'cancelled'"
        );
        let mut st = conn.prepare(&sql).map_err(&err)?;
        let v = st
            .query_map(rusqlite::params![a, b, label], |r| {
                Ok(Sample {
                    prompt_tokens: r.get::<_, i64>(0)? as f64,
                    output_tokens: r.get::<_, i64>(1)? as f64,
                    usd: micros_to_usd(r.get(2)?),
                    latency_ms: r.get(3)?,
                    quality: r.get(4)?,
                    error: if r.get::<_, i64>(5)? != 0 { 0.0 } else { 1.0 },
                })
            })
            .map_err(&err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(&err)?;
        Ok(v)
    }
}

struct Sample {
    prompt_tokens: f64,
    output_tokens: f64,
    usd: f64,
    latency_ms: f64,
    quality: Option<f64>,
    error: f64,
}

/// A set of LLM calls to compare: one run's, or a time window's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Window {
    /// The calls tagged with this run ([`crate::llm::ChatRequest::run`]).
    Run(String),
    /// Calls from Unix second `from` (included) to `to` (excluded).
    Time {
        /// First second.
        from: i64,
        /// End, excluded.
        to: i64,
    },
}

impl Window {
    /// `run:ID`, `FROM..TO` (dates or times, see [`parse_time`]; an empty end means now) or a
    /// span back from `now` such as `24h` (the last 24 hours).
    ///
    /// # Examples
    /// ```
    /// use hyperfunc::tune::Window;
    /// assert_eq!(Window::parse("run:r7", 0).unwrap(), Window::Run("r7".into()));
    /// assert_eq!(
    ///     Window::parse("1970-01-01..1970-01-02", 0).unwrap(),
    ///     Window::Time { from: 0, to: 86_400 }
    /// );
    /// // The last hour, now included.
    /// assert_eq!(Window::parse("1h", 7200).unwrap(), Window::Time { from: 3600, to: 7201 });
    /// assert!(Window::parse("yesterday", 0).is_err());
    /// ```
    pub fn parse(s: &str, now: i64) -> Result<Window> {
        let s = s.trim();
        if let Some(run) = s.strip_prefix("run:") {
            return Ok(Window::Run(run.to_string()));
        }
        if let Some((a, b)) = s.split_once("..") {
            let from = parse_time(a)?;
            let to = if b.trim().is_empty() {
                now + 1
            } else {
                parse_time(b)?
            };
            if to <= from {
                return Err(Error::config(
                    "window",
                    format!("`{s}`: the end must come after the start"),
                ));
            }
            return Ok(Window::Time { from, to });
        }
        match parse_span(s) {
            Ok(span) => Ok(Window::Time {
                from: now - span,
                to: now + 1,
            }),
            Err(_) => Err(Error::config(
                "window",
                format!("`{s}`: write run:ID, FROM..TO (YYYY-MM-DD[THH:MM]) or a span like 24h"),
            )),
        }
    }
}

/// [`Window::parse`] against the clock.
impl std::str::FromStr for Window {
    type Err = Error;

    fn from_str(s: &str) -> Result<Window> {
        Window::parse(s, crate::util::now_s() as i64)
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Window::Run(r) => write!(f, "run:{r}"),
            Window::Time { from, to } => write!(f, "{from}..{to}"),
        }
    }
}

/// One metric's change between two windows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Delta {
    /// `prompt_tokens`, `output_tokens`, `usd`, `latency_ms`, `quality`, `error_rate` (per call).
    pub metric: String,
    /// Calls with a value, before.
    pub n_before: u64,
    /// Calls with a value, after.
    pub n_after: u64,
    /// Mean before.
    pub before: f64,
    /// Mean after.
    pub after: f64,
    /// after − before.
    pub delta: f64,
    /// 95% interval of the difference (Welch, normal approximation).
    pub ci_low: f64,
    /// Upper end.
    pub ci_high: f64,
    /// delta / before (`None` when before is 0).
    pub relative: Option<f64>,
}

fn mean_var(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    if x.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = x.iter().sum::<f64>() / n;
    let v = if x.len() > 1 {
        x.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, v)
}

impl Delta {
    fn of(metric: &str, a: &[f64], b: &[f64]) -> Delta {
        let (ma, va) = mean_var(a);
        let (mb, vb) = mean_var(b);
        let d = mb - ma;
        let se = (va / a.len().max(1) as f64 + vb / b.len().max(1) as f64).sqrt();
        Delta {
            metric: metric.into(),
            n_before: a.len() as u64,
            n_after: b.len() as u64,
            before: ma,
            after: mb,
            delta: d,
            ci_low: d - 1.96 * se,
            ci_high: d + 1.96 * se,
            relative: (ma.is_finite() && ma != 0.0).then(|| d / ma),
        }
    }

    /// Whether the interval excludes zero.
    pub fn significant(&self) -> bool {
        self.ci_low > 0.0 || self.ci_high < 0.0
    }
}

/// `hyperfunc llm compare BEFORE AFTER`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    /// The first window.
    pub before: String,
    /// The second window.
    pub after: String,
    /// The label compared (all when `None`).
    pub label: Option<String>,
    /// Calls before.
    pub before_calls: u64,
    /// Calls after.
    pub after_calls: u64,
    /// Dollars before.
    pub before_usd: f64,
    /// Dollars after.
    pub after_usd: f64,
    /// Per-call metrics.
    pub deltas: Vec<Delta>,
}

impl Comparison {
    /// The delta of `metric`.
    pub fn delta(&self, metric: &str) -> Option<&Delta> {
        self.deltas.iter().find(|d| d.metric == metric)
    }

    /// A Markdown table.
    pub fn to_table(&self) -> String {
        let mut s = format!(
            "before {} ({} calls, ${:.6}) → after {} ({} calls, ${:.6})\n\n\
             | per call | before | after | Δ | 95% CI | Δ% |\n|---|---:|---:|---:|---|---:|\n",
            self.before,
            self.before_calls,
            self.before_usd,
            self.after,
            self.after_calls,
            self.after_usd
        );
        for d in &self.deltas {
            if d.n_before == 0 && d.n_after == 0 {
                continue;
            }
            s.push_str(&format!(
                "| {}{} | {:.4} | {:.4} | {:+.4} | [{:+.4}, {:+.4}] | {} |\n",
                d.metric,
                if d.significant() { " *" } else { "" },
                d.before,
                d.after,
                d.delta,
                d.ci_low,
                d.ci_high,
                d.relative
                    .map_or("-".into(), |r| format!("{:+.1}%", 100.0 * r))
            ));
        }
        s.push_str("\n* the 95% interval excludes 0\n");
        s
    }
}

impl LlmReport {
    /// The report as Markdown sections.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "# LLM calls: {} calls, ${:.6}\n\n## Costly operations\n\n\
             | caller | label | model | calls | errors | prompt tok | cached tok | out tok | USD | p50 ms | p95 ms |\n\
             |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            self.calls,
            micros_to_usd(self.micros)
        );
        let op_row = |o: &Operation| {
            format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.6} | {:.1} | {:.1} |\n",
                o.caller,
                o.label,
                o.model,
                o.calls,
                o.errors,
                o.prompt_tokens,
                o.cache_read_tokens,
                o.output_tokens,
                micros_to_usd(o.micros),
                o.p50_ms,
                o.p95_ms
            )
        };
        for o in &self.costly {
            s.push_str(&op_row(o));
        }
        s.push_str("\n## Latency bottlenecks (total time)\n\n| caller | label | model | calls | total s | p50 ms | p95 ms |\n|---|---|---|---:|---:|---:|---:|\n");
        for o in &self.slowest {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:.2} | {:.1} | {:.1} |\n",
                o.caller, o.label, o.model, o.calls, o.total_s, o.p50_ms, o.p95_ms
            ));
        }
        s.push_str("\n## Frequent fragments\n\n| fragment | hash | tokens | sends | callers |\n|---|---|---:|---:|---:|\n");
        for f in &self.fragments {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                f.name, f.hash, f.tokens, f.sends, f.callers
            ));
        }
        s.push_str("\n## Cache candidates\n\n");
        if self.cache_candidates.is_empty() {
            s.push_str("none above the minimum cacheable length\n");
        }
        for c in &self.cache_candidates {
            s.push_str(&format!(
                "- {}: prefix [{}] ≈ {} tokens, {} of {} calls within the cache lifetime, \
                 saving ≈ ${:.6}\n",
                c.caller,
                c.prefix.join(", "),
                c.prefix_tokens,
                c.within_lifetime,
                c.calls,
                micros_to_usd(c.saving_micros)
            ));
        }
        s.push_str("\n## Cache breakers\n\n");
        if self.cache_breakers.is_empty() {
            s.push_str("none\n");
        }
        for b in &self.cache_breakers {
            s.push_str(&format!(
                "- {}: `{}` (position {}, {} variants) precedes stable [{}] ≈ {} tokens: move it \
                 after them\n",
                b.caller,
                b.varying,
                b.position,
                b.variants,
                b.stable_after.join(", "),
                b.stable_tokens
            ));
        }
        s.push_str(&format!(
            "\n## Unused fragments\n\n{}\n",
            if self.unused_fragments.is_empty() {
                "none".to_string()
            } else {
                self.unused_fragments.join(", ")
            }
        ));
        if !self.unexpected_fragments.is_empty() {
            s.push_str("\n## Fragments from a new caller\n\n");
            for u in &self.unexpected_fragments {
                s.push_str(&format!("- `{}` from {}\n", u.fragment, u.caller));
            }
        }
        if !self.observations.is_empty() {
            s.push_str("\n## Observations\n\n| observation | by | key | count | LLM calls | rate |\n|---|---|---|---:|---:|---:|\n");
            for o in &self.observations {
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} |\n",
                    o.name,
                    o.by,
                    o.key,
                    o.count,
                    o.llm_calls,
                    o.rate.map_or("-".into(), |r| format!("{r:.2}"))
                ));
            }
            for (name, label) in &self.quiet_labels {
                s.push_str(&format!("- `{label}` never needed `{name}`\n"));
            }
        }
        s
    }
}

#[cfg(feature = "llm")]
impl Ledger {
    /// Stored answers of several models to the same prompt, for an offline judge pass
    /// ([`super::judge::JudgePass`]): per prompt (system + messages, any model), the latest
    /// successful answer of each model since `since`, for prompts at least `min_models` models
    /// answered. Cancelled calls and our cache's hits are left out.
    pub fn judge_items(
        &self,
        since: Option<i64>,
        min_models: usize,
    ) -> Result<Vec<super::judge::JudgeItem>> {
        use super::judge::{JudgeItem, JudgeResponse};
        let mut by_prompt: BTreeMap<String, (String, BTreeMap<String, JudgeResponse>)> =
            BTreeMap::new();
        for c in self.llm_calls(since)? {
            if !c.ok || c.source != "provider" || c.response.is_empty() {
                continue;
            }
            let prompt = if c.system.is_empty() {
                c.prompt.clone()
            } else {
                format!("{}\n\n{}", c.system, c.prompt)
            };
            let entry = by_prompt
                .entry(c.prompt_hash.clone())
                .or_insert_with(|| (prompt, BTreeMap::new()));
            // Oldest first: a later answer of the same model replaces an earlier one.
            entry.1.insert(
                c.model.clone(),
                JudgeResponse {
                    model: c.model,
                    text: c.response,
                    cost_micros: c.micros,
                },
            );
        }
        Ok(by_prompt
            .into_iter()
            .filter(|(_, (_, r))| r.len() >= min_models.max(2))
            .map(|(id, (prompt, r))| JudgeItem {
                prompt_id: id,
                prompt,
                responses: r.into_values().collect(),
            })
            .collect())
    }
}
