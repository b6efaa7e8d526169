//! Endpoint autotune: what an OpenAI-compatible server tolerates, found by measurement within
//! a hard request and time budget.
//!
//! The steps: `GET /models` (the model must be listed; a 401/403 aborts at once), one small
//! request whose `x-ratelimit-*` headers give the declared limits (a hard ceiling), a latency
//! model `latency ≈ a + b·prompt_tokens + c·output_tokens` from prompts of several sizes (which
//! also gives the largest prompt answered validly), a `max_tokens` sweep (256 … 16 384, asking
//! for a long answer, to the first refusal or timeout: the largest safe `max_tokens`), then a
//! concurrency sweep 1, 2, 4, … until
//! throughput stops growing, p95 passes the latency goal, answers degrade, or the first
//! 429/503/timeout — which stops the sweep at once and is waited out (`Retry-After`) — followed
//! by a bisection between the last good and the first bad level. Requests that fail with
//! 400/401/403/404 are never retried.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

use crate::error::{Error, Result};
use crate::llm::EndpointConfig;
use crate::util::nearest_rank;

/// Checks one answer: `true` when it is usable.
pub type Validator = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// What to tune and within what budget.
#[derive(Clone)]
pub struct EndpointProbe {
    /// Base URL including the version path (`http://127.0.0.1:4000/v1`).
    pub base_url: String,
    /// Bearer key.
    pub api_key: Option<String>,
    /// The model to call.
    pub model: String,
    /// Most requests tuning may send (quick: 150; full: 2 000).
    pub max_requests: u64,
    /// Wall-clock budget.
    pub budget: Duration,
    /// Highest concurrency tried.
    pub max_concurrency: usize,
    /// p95 latency a level may not exceed (default: 4 × the single-request median).
    pub latency_goal: Option<Duration>,
    /// Per-request timeout while tuning.
    pub request_timeout: Duration,
    /// Judges an answer (text, finish reason); default: non-empty and not cut off by the
    /// length limit.
    pub validator: Validator,
    /// Where to report progress (the CLI draws a bar); `None`: silent.
    pub progress: Option<super::OnProgress>,
}

impl std::fmt::Debug for EndpointProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointProbe")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("max_requests", &self.max_requests)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl EndpointProbe {
    /// Quick defaults: at most 150 requests and 2 minutes, concurrency up to 64.
    pub fn new(base_url: &str, api_key: Option<&str>, model: &str) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.map(str::to_string),
            model: model.to_string(),
            max_requests: 150,
            budget: Duration::from_secs(120),
            max_concurrency: 64,
            latency_goal: None,
            request_timeout: Duration::from_secs(60),
            validator: Arc::new(|text, finish| !text.trim().is_empty() && finish != "length"),
            progress: None,
        }
    }

    /// The full mode's budget: 2 000 requests, 15 minutes.
    pub fn full(mut self) -> Self {
        self.max_requests = 2_000;
        self.budget = Duration::from_secs(900);
        self
    }
}

/// `latency_ms ≈ a + b·prompt_tokens + c·output_tokens`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyModel {
    /// Fixed part, ms.
    pub a_ms: f64,
    /// Per prompt token, ms.
    pub b_ms_per_prompt_token: f64,
    /// Per output token, ms.
    pub c_ms_per_output_token: f64,
}

impl LatencyModel {
    /// Predicted latency, ms.
    pub fn predict_ms(&self, prompt_tokens: u64, output_tokens: u64) -> f64 {
        self.a_ms
            + self.b_ms_per_prompt_token * prompt_tokens as f64
            + self.c_ms_per_output_token * output_tokens as f64
    }

    /// The timeout for a call: three times the prediction plus a second.
    pub fn timeout_ms(&self, prompt_tokens: u64, output_tokens: u64) -> u64 {
        (3.0 * self.predict_ms(prompt_tokens, output_tokens) + 1_000.0).ceil() as u64
    }
}

/// One concurrency level of the sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Level {
    /// Requests in flight.
    pub concurrency: usize,
    /// Requests sent at this level.
    pub requests: u64,
    /// Valid answers per second.
    pub throughput_rps: f64,
    /// Latency percentiles of the answers, ms.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Failed requests (429/5xx/timeouts/connection).
    pub errors: u64,
    /// 429 answers.
    pub throttled: u64,
    /// Answers the validator refused.
    pub invalid: u64,
    /// Whether the level is usable.
    pub good: bool,
}

/// One request of the size measurements: how latency and validity change with the prompt's
/// length and `max_tokens`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SizePoint {
    /// Prompt tokens (as the server counted them, else the estimate sent).
    pub prompt_tokens: u64,
    /// `max_tokens` asked for.
    pub max_tokens: u32,
    /// Output tokens the server counted.
    pub output_tokens: u64,
    /// Latency, ms.
    pub latency_ms: f64,
    /// HTTP status (0: timed out).
    pub status: u16,
    /// The finish reason (`stop`, `length`…).
    pub finish: String,
    /// Answered (200) with a non-empty text: the server handles this size. (An answer cut
    /// at `max_tokens` counts: the cap was honoured.)
    pub ok: bool,
}

/// The `max_tokens` values the sweep asks for, in order (stopped at the first refusal).
pub const MAX_TOKENS_SWEEP: [u32; 4] = [256, 1024, 4096, 16384];

/// The saved result of tuning one endpoint and model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// `endpoint-<host>-<model>`.
    pub key: String,
    /// The base URL.
    pub base_url: String,
    /// The model.
    pub model: String,
    /// Whether `/models` listed the model (`None`: the server has no `/models`).
    pub listed: Option<bool>,
    /// Requests per minute the server declared (`x-ratelimit-limit-requests`).
    pub declared_rpm: Option<u64>,
    /// Tokens per minute the server declared.
    pub declared_tpm: Option<u64>,
    /// The concurrency to use.
    pub concurrency: usize,
    /// Requests per minute to allow: 0.95 of the declared limit.
    pub rpm: Option<u32>,
    /// Tokens per minute to allow: 0.95 of the declared limit.
    pub tpm: Option<u32>,
    /// Per-request timeout for a typical call (500 prompt, 256 output tokens), ms.
    pub timeout_ms: u64,
    /// Extra attempts after a retryable failure.
    pub max_retries: u32,
    /// First backoff step, ms (at least the longest `Retry-After` seen).
    pub backoff_base_ms: u64,
    /// The latency model.
    pub latency: LatencyModel,
    /// The largest prompt (estimated tokens) answered validly.
    pub max_ok_prompt_tokens: u64,
    /// The largest `max_tokens` of the sweep the server accepted and answered within the
    /// tuning timeout (0: none measured); recommend no larger.
    #[serde(default)]
    pub max_ok_max_tokens: u32,
    /// Every request of the latency and size measurements, in the order sent.
    #[serde(default)]
    pub sizes: Vec<SizePoint>,
    /// The sweep, in the order run.
    pub curve: Vec<Level>,
    /// Requests sent while tuning.
    pub requests_sent: u64,
    /// 429 answers while tuning.
    pub throttles: u64,
    /// The longest `Retry-After` seen, seconds.
    pub retry_after_s: f64,
    /// Why the sweep stopped.
    pub stop_reason: String,
    /// Confidence in [0, 1].
    pub confidence: f64,
    /// Unix seconds when tuned.
    pub created_at: i64,
    /// Seconds tuning took.
    pub seconds: f64,
}

impl EndpointRecord {
    /// Starts `ep`'s adaptive limiter from these settings: concurrency, rate ceilings,
    /// timeout, retries and backoff.
    pub fn apply(&self, ep: &mut EndpointConfig) {
        ep.max_concurrency = self.concurrency.max(1);
        if self.rpm.is_some() {
            ep.rpm = self.rpm;
        }
        if self.tpm.is_some() {
            ep.tpm = self.tpm;
        }
        ep.timeout_ms = self.timeout_ms;
        ep.max_retries = self.max_retries;
        ep.backoff_base_ms = self.backoff_base_ms;
    }

    /// A Markdown report: the settings and the concurrency curve.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "## {}\n\nconcurrency **{}**, rpm {}, tpm {}, timeout {} ms, retries {}, backoff {} ms; \
             latency ≈ {:.0} ms + {:.3} ms/prompt token + {:.3} ms/output token; largest valid \
             prompt ≈ {} tokens; largest safe max_tokens {}; {} requests, {} throttles; \
             stopped: {}; confidence {:.2}\n\n\
             | concurrency | requests | answers/s | p50 ms | p95 ms | p99 ms | errors | 429 | invalid | good |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
            self.key,
            self.concurrency,
            self.rpm.map_or("-".into(), |r| r.to_string()),
            self.tpm.map_or("-".into(), |r| r.to_string()),
            self.timeout_ms,
            self.max_retries,
            self.backoff_base_ms,
            self.latency.a_ms,
            self.latency.b_ms_per_prompt_token,
            self.latency.c_ms_per_output_token,
            self.max_ok_prompt_tokens,
            if self.max_ok_max_tokens == 0 {
                "not measured".to_string()
            } else {
                self.max_ok_max_tokens.to_string()
            },
            self.requests_sent,
            self.throttles,
            self.stop_reason,
            self.confidence
        );
        for l in &self.curve {
            s.push_str(&format!(
                "| {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |\n",
                l.concurrency,
                l.requests,
                l.throughput_rps,
                l.p50_ms,
                l.p95_ms,
                l.p99_ms,
                l.errors,
                l.throttled,
                l.invalid,
                if l.good { "yes" } else { "no" }
            ));
        }
        if !self.sizes.is_empty() {
            s.push_str(
                "\n| prompt tokens | max_tokens | output tokens | latency ms | status | finish | ok |\n\
                 |---:|---:|---:|---:|---:|---|---|\n",
            );
            for p in &self.sizes {
                s.push_str(&format!(
                    "| {} | {} | {} | {:.0} | {} | {} | {} |\n",
                    p.prompt_tokens,
                    p.max_tokens,
                    p.output_tokens,
                    p.latency_ms,
                    if p.status == 0 {
                        "timeout".to_string()
                    } else {
                        p.status.to_string()
                    },
                    p.finish,
                    if p.ok { "yes" } else { "no" }
                ));
            }
        }
        s
    }
}

/// The outcome of one request.
#[derive(Debug)]
struct Shot {
    status: u16,
    latency_ms: f64,
    text: String,
    finish: String,
    prompt_tokens: u64,
    output_tokens: u64,
    retry_after_s: Option<f64>,
    headers: BTreeMap<String, String>,
    timeout: bool,
}

struct Session<'a> {
    probe: &'a EndpointProbe,
    http: reqwest::Client,
    sent: AtomicU64,
    throttles: AtomicU64,
    started: Instant,
}

fn endpoint_error(message: String) -> Error {
    Error::Io {
        function: "autotune endpoint".into(),
        message,
        retryable: false,
    }
}

impl Session<'_> {
    /// Reports the phase and the requests sent so far.
    fn say(&self, phase: &str) {
        if let Some(p) = &self.probe.progress {
            let sent = self.sent.load(Ordering::Relaxed);
            p.report(phase, sent, self.probe.max_requests, "requests");
        }
    }

    fn left(&self) -> u64 {
        self.probe
            .max_requests
            .saturating_sub(self.sent.load(Ordering::Relaxed))
    }

    fn out_of_time(&self) -> bool {
        self.started.elapsed() >= self.probe.budget
    }

    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.probe.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// `GET /models`: the ids, `None` when the server has no such route.
    async fn models(&self) -> Result<Option<Vec<String>>> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        list_models(
            &self.http,
            &self.probe.base_url,
            self.probe.api_key.as_deref(),
            self.probe.request_timeout,
        )
        .await
    }

    /// One chat completion of about `prompt_tokens` tokens asking for `max_tokens`.
    async fn shot(&self, prompt_tokens: usize, max_tokens: u32) -> Result<Shot> {
        self.shot_asking(prompt_tokens, max_tokens, "Reply with one short sentence.")
            .await
    }

    /// [`Session::shot`] ending with `ask`.
    async fn shot_asking(&self, prompt_tokens: usize, max_tokens: u32, ask: &str) -> Result<Shot> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let filler = "Background detail that the answer does not need. ".repeat(prompt_tokens / 10);
        let body = json!({
            "model": self.probe.model,
            "messages": [{"role": "user", "content": format!("{filler}{ask}")}],
            "max_tokens": max_tokens,
            "temperature": 0.7,
        });
        let t0 = Instant::now();
        let sent = self
            .auth(
                self.http
                    .post(format!("{}/chat/completions", self.probe.base_url)),
            )
            .timeout(self.probe.request_timeout)
            .json(&body)
            .send()
            .await;
        let r = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Ok(Shot {
                    status: 0,
                    latency_ms: t0.elapsed().as_secs_f64() * 1e3,
                    text: String::new(),
                    finish: String::new(),
                    prompt_tokens: 0,
                    output_tokens: 0,
                    retry_after_s: None,
                    headers: BTreeMap::new(),
                    timeout: true,
                })
            }
            Err(e) => return Err(endpoint_error(format!("{}: {e}", self.probe.base_url))),
        };
        let status = r.status().as_u16();
        let headers: BTreeMap<String, String> = r
            .headers()
            .iter()
            .filter(|(k, _)| {
                let k = k.as_str();
                k.starts_with("x-ratelimit") || k == "retry-after"
            })
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let retry_after_s = headers
            .get("retry-after")
            .and_then(|v| v.parse::<f64>().ok());
        let v: Json = r.json().await.unwrap_or_default();
        let latency_ms = t0.elapsed().as_secs_f64() * 1e3;
        if status == 429 {
            self.throttles.fetch_add(1, Ordering::Relaxed);
        }
        if matches!(status, 401 | 403 | 404) {
            return Err(endpoint_error(format!(
                "{} answered {status} for model `{}`: {}; not retried",
                self.probe.base_url,
                self.probe.model,
                v["error"]["message"].as_str().unwrap_or("no message")
            )));
        }
        Ok(Shot {
            status,
            latency_ms,
            text: v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            finish: v["choices"][0]["finish_reason"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
            output_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
            retry_after_s,
            headers,
            timeout: false,
        })
    }

    /// Runs `n` requests with at most `level` in flight; stops launching at the first 429, 503
    /// or timeout.
    async fn level(&self, level: usize, n: u64, goal_ms: f64) -> Result<(Level, Option<f64>)> {
        let t0 = Instant::now();
        let mut running = FuturesUnordered::new();
        let (mut launched, mut requests, mut errors, mut throttled, mut invalid) = (0, 0, 0, 0, 0);
        let mut lat = Vec::new();
        let mut retry_after = None;
        loop {
            while launched < n && running.len() < level {
                running.push(self.shot(100, 32));
                launched += 1;
            }
            let Some(shot) = running.next().await else {
                break;
            };
            let shot = shot?;
            requests += 1;
            if shot.status == 400 {
                return Err(endpoint_error(format!(
                    "{} refused a request as bad (400) for model `{}`; not retried",
                    self.probe.base_url, self.probe.model
                )));
            }
            if shot.status == 429 || shot.status >= 500 || shot.timeout {
                errors += 1;
                throttled += u64::from(shot.status == 429);
                retry_after = Some(shot.retry_after_s.unwrap_or(1.0));
                // What is still in flight is dropped: it would only add throttles.
                break;
            }
            if (self.probe.validator)(&shot.text, &shot.finish) {
                lat.push(shot.latency_ms);
            } else {
                invalid += 1;
            }
        }
        drop(running);
        lat.sort_by(f64::total_cmp);
        let p95_ms = nearest_rank(&lat, 0.95);
        let level = Level {
            concurrency: level,
            requests,
            throughput_rps: lat.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            p50_ms: nearest_rank(&lat, 0.5),
            p95_ms,
            p99_ms: nearest_rank(&lat, 0.99),
            errors,
            throttled,
            invalid,
            good: errors == 0 && invalid == 0 && p95_ms <= goal_ms && !lat.is_empty(),
        };
        Ok((level, retry_after))
    }
}

fn size_point(shot: &Shot, prompt: usize, max_tokens: u32, probe: &EndpointProbe) -> SizePoint {
    let answered = shot.status == 200 && !shot.text.trim().is_empty();
    SizePoint {
        prompt_tokens: if shot.prompt_tokens > 0 {
            shot.prompt_tokens
        } else {
            prompt as u64
        },
        max_tokens,
        output_tokens: shot.output_tokens,
        latency_ms: shot.latency_ms,
        status: if shot.timeout { 0 } else { shot.status },
        finish: shot.finish.clone(),
        ok: answered && (shot.finish == "length" || (probe.validator)(&shot.text, &shot.finish)),
    }
}

/// Least squares of latency on (1, prompt, output); falls back to the mean when the sizes do
/// not vary.
fn fit(samples: &[(u64, u64, f64)]) -> LatencyModel {
    let n = samples.len() as f64;
    let mean = samples.iter().map(|s| s.2).sum::<f64>() / n.max(1.0);
    let flat = LatencyModel {
        a_ms: mean,
        b_ms_per_prompt_token: 0.0,
        c_ms_per_output_token: 0.0,
    };
    if samples.len() < 3 {
        return flat;
    }
    // Normal equations XᵀX β = Xᵀy, 3 × 3, by Cramer's rule.
    let mut m = [[0.0f64; 3]; 3];
    let mut v = [0.0f64; 3];
    for &(p, o, y) in samples {
        let x = [1.0, p as f64, o as f64];
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] += x[i] * x[j];
            }
            v[i] += x[i] * y;
        }
    }
    let det = |m: &[[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det(&m);
    if d.abs() < 1e-9 * (1.0 + m[1][1] * m[2][2]) {
        return flat;
    }
    let mut beta = [0.0; 3];
    for (k, b) in beta.iter_mut().enumerate() {
        let mut mk = m;
        for i in 0..3 {
            mk[i][k] = v[i];
        }
        *b = det(&mk) / d;
    }
    if beta.iter().any(|b| !b.is_finite()) || beta[1] < 0.0 || beta[2] < 0.0 || beta[0] < 0.0 {
        return flat;
    }
    LatencyModel {
        a_ms: beta[0],
        b_ms_per_prompt_token: beta[1],
        c_ms_per_output_token: beta[2],
    }
}

fn header_u64(h: &BTreeMap<String, String>, key: &str) -> Option<u64> {
    h.get(key)
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .map(|v| v as u64)
}

/// Tunes one endpoint and model (see the module docs).
pub async fn tune(probe: &EndpointProbe) -> Result<EndpointRecord> {
    let http = reqwest::Client::builder()
        .build()
        .map_err(|e| endpoint_error(format!("HTTP client: {e}")))?;
    let s = Session {
        probe,
        http,
        sent: AtomicU64::new(0),
        throttles: AtomicU64::new(0),
        started: Instant::now(),
    };
    // 1. The model list.
    s.say("model list");
    let listed = match s.models().await? {
        Some(ids) if !ids.iter().any(|m| m == &probe.model) => {
            let close = closest_models(&ids, &probe.model);
            return Err(endpoint_error(format!(
                "model `{}` is not served by {}; closest: {:?} (of {} models)",
                probe.model,
                probe.base_url,
                close,
                ids.len()
            )));
        }
        Some(_) => Some(true),
        None => None,
    };
    // 2. One small request: declared limits.
    s.say("declared limits");
    let first = s.shot(20, 16).await?;
    let declared_rpm = header_u64(&first.headers, "x-ratelimit-limit-requests");
    let declared_tpm = header_u64(&first.headers, "x-ratelimit-limit-tokens");
    let mut retry_after_s = first.retry_after_s.unwrap_or(0.0);
    let mut stop_reason = String::new();
    if first.status == 429 {
        stop_reason = "throttled on the first request".into();
    }
    // 3. Latency model from several prompt and answer sizes.
    s.say("latency and prompt sizes");
    let mut sizes = vec![size_point(&first, 20, 16, probe)];
    let mut samples = vec![(first.prompt_tokens, first.output_tokens, first.latency_ms)];
    let mut max_ok_prompt_tokens =
        if first.status == 200 && (probe.validator)(&first.text, &first.finish) {
            first.prompt_tokens.max(20)
        } else {
            0
        };
    if stop_reason.is_empty() {
        for (prompt, out) in [(300, 64), (1500, 16), (300, 256), (6000, 32)] {
            if s.left() < 8 || s.out_of_time() {
                break;
            }
            let shot = s.shot(prompt, out).await?;
            sizes.push(size_point(&shot, prompt, out, probe));
            if shot.status == 400 {
                // Too large for the model: the largest valid prompt is known.
                break;
            }
            if shot.status == 429 {
                retry_after_s = retry_after_s.max(shot.retry_after_s.unwrap_or(1.0));
                stop_reason = "throttled while measuring latency".into();
                break;
            }
            if shot.status == 200 {
                samples.push((shot.prompt_tokens, shot.output_tokens, shot.latency_ms));
                if (probe.validator)(&shot.text, &shot.finish) {
                    max_ok_prompt_tokens =
                        max_ok_prompt_tokens.max(shot.prompt_tokens.max(prompt as u64));
                }
            }
        }
    }
    // 3b. `max_tokens`: ask for a long answer with larger and larger caps, until one is refused
    // (400: over the model's limit), times out or is throttled.
    let mut max_ok_max_tokens = 0u32;
    if stop_reason.is_empty() {
        s.say("max_tokens sweep");
        for m in MAX_TOKENS_SWEEP {
            if s.left() < 8 || s.out_of_time() {
                break;
            }
            let shot = s
                .shot_asking(
                    100,
                    m,
                    "Write a long, detailed essay about rivers, as long as you are allowed.",
                )
                .await?;
            let point = size_point(&shot, 100, m, probe);
            let ok = point.ok;
            sizes.push(point);
            if shot.status == 429 {
                retry_after_s = retry_after_s.max(shot.retry_after_s.unwrap_or(1.0));
                stop_reason = "throttled while measuring max_tokens".into();
                break;
            }
            if !ok {
                break;
            }
            samples.push((shot.prompt_tokens, shot.output_tokens, shot.latency_ms));
            max_ok_max_tokens = m;
        }
    }
    let latency = fit(&samples);
    let single_ms = {
        let mut v: Vec<f64> = samples.iter().map(|x| x.2).collect();
        v.sort_by(f64::total_cmp);
        nearest_rank(&v, 0.5)
    };
    let goal_ms = probe
        .latency_goal
        .map_or(4.0 * single_ms + 250.0, |d| d.as_secs_f64() * 1e3);
    // 4. Concurrency sweep, then bisection.
    let mut curve: Vec<Level> = Vec::new();
    let (mut good, mut bad): (usize, Option<usize>) = (0, None);
    let mut best_rps = 0.0f64;
    let mut level = 1usize;
    let rpm_cap = declared_rpm.map(|r| (r as f64 * 0.95) as u64);
    if stop_reason.is_empty() {
        loop {
            let n = (2 * level as u64).max(4);
            if s.left() < n {
                stop_reason = "request budget".into();
                break;
            }
            if s.out_of_time() {
                stop_reason = "time budget".into();
                break;
            }
            if rpm_cap.is_some_and(|cap| n > cap) {
                stop_reason = "declared rate limit".into();
                break;
            }
            s.say(&format!("concurrency {level}"));
            let (l, ra) = s.level(level, n, goal_ms).await?;
            let ok = l.good;
            let rps = l.throughput_rps;
            curve.push(l);
            if let Some(ra) = ra {
                retry_after_s = retry_after_s.max(ra);
            }
            if !ok {
                bad = Some(level);
                stop_reason = if ra.is_some() {
                    "first 429/503/timeout".into()
                } else {
                    "latency goal or invalid answers".into()
                };
                break;
            }
            if good > 0 && rps < best_rps * 1.1 {
                good = if rps > best_rps { level } else { good };
                stop_reason = "throughput stopped growing".into();
                break;
            }
            best_rps = best_rps.max(rps);
            good = level;
            if level >= probe.max_concurrency {
                stop_reason = "highest concurrency tried".into();
                break;
            }
            level = (level * 2).min(probe.max_concurrency);
        }
        // Bisection between the last good and the first bad level.
        if let Some(mut hi) = bad {
            if retry_after_s > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(retry_after_s.min(30.0))).await;
            }
            let mut lo = good;
            while hi > lo + 1 && s.left() >= (2 * (lo + hi) as u64 / 2).max(4) && !s.out_of_time() {
                let mid = (lo + hi) / 2;
                s.say(&format!("bisection: concurrency {mid}"));
                let (l, ra) = s.level(mid, (2 * mid as u64).max(4), goal_ms).await?;
                let ok = l.good;
                curve.push(l);
                if ok {
                    lo = mid;
                } else {
                    hi = mid;
                    if let Some(ra) = ra {
                        retry_after_s = retry_after_s.max(ra);
                        tokio::time::sleep(Duration::from_secs_f64(ra.min(30.0))).await;
                    }
                }
            }
            good = lo;
        }
    }
    let concurrency = good.max(1);
    let throttles = s.throttles.load(Ordering::Relaxed);
    s.say("done");
    let complete = !stop_reason.contains("budget");
    let confidence = (if complete { 1.0 } else { 0.7 })
        * (if curve.iter().filter(|l| l.good).count() >= 2 {
            1.0
        } else {
            0.6
        });
    let host = probe
        .base_url
        .split("://")
        .nth(1)
        .unwrap_or(&probe.base_url)
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    Ok(EndpointRecord {
        key: format!("endpoint-{host}-{}", probe.model),
        base_url: probe.base_url.clone(),
        model: probe.model.clone(),
        listed,
        declared_rpm,
        declared_tpm,
        concurrency,
        rpm: declared_rpm.map(|r| ((r as f64 * 0.95).floor() as u32).max(1)),
        tpm: declared_tpm.map(|r| ((r as f64 * 0.95).floor() as u32).max(1)),
        timeout_ms: latency.timeout_ms(500, 256),
        max_retries: 4,
        backoff_base_ms: ((retry_after_s * 1e3) as u64).max(500),
        latency,
        max_ok_prompt_tokens,
        max_ok_max_tokens,
        sizes,
        curve,
        requests_sent: s.sent.load(Ordering::Relaxed),
        throttles,
        retry_after_s,
        stop_reason,
        confidence,
        created_at: crate::util::now_s() as i64,
        seconds: s.started.elapsed().as_secs_f64(),
    })
}

/// `GET {base_url}/models`: the ids; `None` when the server has no such route or answers
/// without a `data` list; an error when the key is refused.
pub(crate) async fn list_models(
    http: &reqwest::Client,
    base_url: &str,
    key: Option<&str>,
    timeout: Duration,
) -> Result<Option<Vec<String>>> {
    let req = http.get(format!("{base_url}/models")).timeout(timeout);
    let req = match key {
        Some(k) => req.bearer_auth(k),
        None => req,
    };
    let r = req
        .send()
        .await
        .map_err(|e| endpoint_error(format!("{base_url}/models: {e}")))?;
    let status = r.status().as_u16();
    if status == 401 || status == 403 {
        return Err(endpoint_error(format!(
            "{base_url}/models answered {status}: the key is refused; nothing else was sent"
        )));
    }
    if !(200..300).contains(&status) {
        return Ok(None);
    }
    let v: Json = r.json().await.unwrap_or_default();
    Ok(v["data"].as_array().map(|a| {
        a.iter()
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect()
    }))
}

/// `GET {base_url}/model/info` (LiteLLM and proxies like it): each model's price, from
/// `model_info.input_cost_per_token` and `output_cost_per_token`. Empty when the server has no
/// such route or lists no prices; a price is a convenience, never a reason to fail.
pub(crate) async fn model_prices(
    http: &reqwest::Client,
    base_url: &str,
    key: Option<&str>,
    timeout: Duration,
) -> std::collections::BTreeMap<String, crate::llm::Price> {
    let mut prices = std::collections::BTreeMap::new();
    let req = http.get(format!("{base_url}/model/info")).timeout(timeout);
    let req = match key {
        Some(k) => req.bearer_auth(k),
        None => req,
    };
    let Ok(r) = req.send().await else {
        return prices;
    };
    if !r.status().is_success() {
        return prices;
    }
    let v: Json = r.json().await.unwrap_or_default();
    for m in v["data"].as_array().into_iter().flatten() {
        let info = &m["model_info"];
        let per_mtok = |k: &str| info[k].as_f64().filter(|p| p.is_finite() && *p >= 0.0);
        if let (Some(name), Some(i), Some(o)) = (
            m["model_name"].as_str(),
            per_mtok("input_cost_per_token"),
            per_mtok("output_cost_per_token"),
        ) {
            prices.insert(name.to_string(), crate::llm::Price::new(i * 1e6, o * 1e6));
        }
    }
    prices
}

/// Up to five of `ids` closest to `model` (by edit distance; ties in the server's order).
pub(crate) fn closest_models<'a>(ids: &'a [String], model: &str) -> Vec<&'a String> {
    let mut close: Vec<(usize, usize, &String)> = ids
        .iter()
        .enumerate()
        .map(|(i, m)| (crate::util::edit_distance(m, model), i, m))
        .collect();
    close.sort();
    close.into_iter().take(5).map(|c| c.2).collect()
}
