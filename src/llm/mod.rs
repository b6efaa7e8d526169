//! LLM hyperfunctions over rate-limited, concurrent, cached async HTTP (feature `llm`).
//!
//! [`LlmClient`] talks to any OpenAI-compatible server through `async-openai`, with its own HTTP
//! service underneath so that it sees every status and header:
//!
//! - **Per-endpoint limiter** (never one global lock): configured requests/tokens per minute
//!   ([`governor`]), plus what it learns — `Retry-After`, `x-ratelimit-*` headers, and an AIMD
//!   window that a 429 lowers to the level the server took (at least half) and that probes
//!   above it slowly, so it settles at a server's capacity and follows it when it changes.
//! - **Retries** only for 429, 5xx, timeouts and connection failures (exponential 1, 2, 4 … 60 s
//!   with jitter, or exactly `Retry-After`); never for other 4xx, never after cancellation.
//! - **Response cache**: content-addressed in SQLite (in memory by default, a file to share
//!   across runs); used when temperature is 0 or a seed is given; identical concurrent requests
//!   send one HTTP request.
//! - **Usage and cost** per model, per hyperfunction (label) and in total, a request budget and a
//!   dollar budget that raise a [`StopSignal`] so [`Es::optimize`](crate::Es::optimize) stops
//!   cleanly.
//! - [`LlmClient::race`]: several models, first valid answer wins, the rest are cancelled.
//!
//! # Examples
//! ```no_run
//! use hyperfunc::llm::{LlmClient, LlmConfig};
//! use hyperfunc::HyperFn;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = LlmClient::new(LlmConfig::from_env()?)?; // OPENAI_BASE_URL, OPENAI_API_KEY
//! let answer = HyperFn::llm("answer", &client, "gpt-4o-mini").prompt("Answer in one word.");
//! # Ok(()) }
//! ```

pub mod bench;
mod cache;
mod config;
mod limiter;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{CreateChatCompletionRequest, CreateChatCompletionResponse};
use futures::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};

pub use config::{Budget, EndpointConfig, LlmConfig, ModelConfig, Price};
pub use limiter::LimiterStats;

use crate::es::StopSignal;
use crate::function::{HyperFn, IoError, IoParams, Json};
use crate::observe::note_call;
use crate::param::LmParams;
use cache::Cache;
use limiter::{Headers, Limiter};

/// Why an LLM call failed. [`LlmError::is_retryable`] tells which ones the client retried.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    /// The server answered with an error status (a 4xx other than 429 is never retried).
    #[error("HTTP {status} from endpoint `{endpoint}` after {attempts} attempt(s): {message}")]
    Http {
        /// Endpoint name.
        endpoint: String,
        /// HTTP status.
        status: u16,
        /// The server's error message.
        message: String,
        /// Requests sent for this call.
        attempts: u32,
    },
    /// No answer within the per-attempt timeout (the request was cancelled).
    #[error("endpoint `{endpoint}` gave no answer within {after:?} ({attempts} attempt(s)); raise EndpointConfig.timeout_ms")]
    Timeout {
        /// Endpoint name.
        endpoint: String,
        /// The timeout.
        after: Duration,
        /// Requests sent for this call.
        attempts: u32,
    },
    /// The connection failed or was reset.
    #[error("cannot reach endpoint `{endpoint}` ({attempts} attempt(s)): {message}")]
    Connection {
        /// Endpoint name.
        endpoint: String,
        /// What the HTTP stack said.
        message: String,
        /// Requests sent for this call.
        attempts: u32,
    },
    /// The server answered 2xx with something that is not a chat completion.
    #[error("endpoint `{endpoint}` sent an unreadable answer: {message}")]
    Decode {
        /// Endpoint name.
        endpoint: String,
        /// What was wrong.
        message: String,
    },
    /// The client's request budget is spent.
    #[error("the request budget of {max_requests} is spent; raise Budget.max_requests")]
    RequestBudget {
        /// The budget.
        max_requests: u64,
    },
    /// The client's dollar budget is spent.
    #[error(
        "the cost budget of ${max_usd:.4} is spent (${spent_usd:.4}); raise Budget.max_cost_usd"
    )]
    CostBudget {
        /// The budget.
        max_usd: f64,
        /// Spent so far.
        spent_usd: f64,
    },
    /// Every model of a race failed or gave an invalid answer.
    #[error("no model of the race gave a valid answer: {}", errors.join("; "))]
    RaceLost {
        /// One line per model.
        errors: Vec<String>,
    },
    /// The request cannot be sent as given.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The configuration is unusable.
    #[error("invalid LLM config: {0}")]
    Config(String),
    /// The response cache failed.
    #[error("response cache: {0}")]
    Cache(String),
}

impl LlmError {
    /// Whether the client retries this kind of failure (429, 5xx, timeouts, connections).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Http { status, .. } => *status == 429 || *status >= 500,
            Self::Timeout { .. } | Self::Connection { .. } => true,
            _ => false,
        }
    }

    /// OpenTelemetry `error.type`: the HTTP status, or a short kind.
    pub fn error_type(&self) -> String {
        match self {
            Self::Http { status, .. } => status.to_string(),
            Self::Timeout { .. } => "timeout".into(),
            Self::Connection { .. } => "connection".into(),
            Self::Decode { .. } => "decode".into(),
            Self::RequestBudget { .. } | Self::CostBudget { .. } => "budget".into(),
            Self::RaceLost { .. } => "race_lost".into(),
            Self::InvalidRequest(_) => "invalid_request".into(),
            Self::Config(_) => "config".into(),
            Self::Cache(_) => "cache".into(),
        }
    }
}

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions.
    System,
    /// The user's turn.
    User,
    /// The model's turn.
    Assistant,
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// The text.
    pub content: String,
}

/// A chat completion request. Everything but `label` and `no_cache` is part of the cache key.
///
/// # Examples
/// ```
/// use hyperfunc::llm::ChatRequest;
/// let r = ChatRequest::new("gpt-4o-mini").system("Be brief.").user("2+2?").temperature(0.0);
/// assert_eq!(r.messages.len(), 2);
/// assert!(r.is_cacheable(), "temperature 0 is deterministic enough to cache");
/// assert!(!ChatRequest::new("m").user("hi").temperature(0.7).is_cacheable());
/// assert!(ChatRequest::new("m").user("hi").temperature(0.7).seed(1).is_cacheable());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// Model name as the server knows it.
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Sampling temperature (server default when `None`).
    pub temperature: Option<f32>,
    /// Nucleus mass.
    pub top_p: Option<f32>,
    /// Presence penalty.
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// Completion token limit.
    pub max_tokens: Option<u32>,
    /// Stop sequences (at most 4).
    pub stop: Vec<String>,
    /// Sampling seed (makes a temperature > 0 request cacheable).
    pub seed: Option<i64>,
    /// Ask for a JSON object (`response_format: json_object`).
    pub json: bool,
    /// Never serve or store this request in the cache.
    #[serde(skip)]
    pub no_cache: bool,
    /// Whose call this is, for per-hyperfunction statistics.
    #[serde(skip)]
    pub label: Option<String>,
    /// Per-attempt timeout for this request (the endpoint's when `None`).
    #[serde(skip)]
    pub timeout: Option<Duration>,
    /// Where the request was built (`file:line`, captured by [`ChatRequest::new`]), for the
    /// ledger's cost attribution.
    #[serde(skip)]
    pub caller: Option<String>,
    /// The optimisation run, for the ledger.
    #[serde(skip)]
    pub run: Option<String>,
    /// A user or customer tag, for the ledger.
    #[serde(skip)]
    pub user: Option<String>,
    /// The fragments the messages were built from, in the order sent (role, fragment).
    #[serde(skip)]
    pub fragments: Vec<(Role, crate::tune::Fragment)>,
}

impl ChatRequest {
    /// An empty request for `model`; the caller (`file:line` of this call) is recorded for
    /// cost attribution.
    #[track_caller]
    pub fn new(model: &str) -> Self {
        let at = std::panic::Location::caller();
        Self {
            model: model.into(),
            caller: Some(format!("{}:{}", at.file(), at.line())),
            ..Self::default()
        }
    }

    /// Records `site` as the caller instead of where the request was built.
    pub fn caller(mut self, site: &str) -> Self {
        self.caller = Some(site.into());
        self
    }

    /// Attributes the call to an optimisation run in the ledger.
    pub fn run(mut self, run: &str) -> Self {
        self.run = Some(run.into());
        self
    }

    /// Attributes the call to a user or customer in the ledger.
    pub fn user_tag(mut self, user: &str) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Appends a system message assembled from `prompt`'s fragments (stable ones first) and
    /// records them for the ledger.
    pub fn system_prompt(self, prompt: &crate::tune::Prompt) -> Self {
        self.prompt_message(Role::System, prompt)
    }

    /// Appends a user message assembled from `prompt`'s fragments and records them.
    pub fn user_prompt(self, prompt: &crate::tune::Prompt) -> Self {
        self.prompt_message(Role::User, prompt)
    }

    fn prompt_message(mut self, role: Role, prompt: &crate::tune::Prompt) -> Self {
        for f in prompt.fragments() {
            self.fragments.push((role, f.clone()));
        }
        self.message(role, prompt.text())
    }

    /// Appends a message.
    pub fn message(mut self, role: Role, content: impl Into<String>) -> Self {
        self.messages.push(Message {
            role,
            content: content.into(),
        });
        self
    }

    /// Appends a system message.
    pub fn system(self, content: impl Into<String>) -> Self {
        self.message(Role::System, content)
    }

    /// Appends a user message.
    pub fn user(self, content: impl Into<String>) -> Self {
        self.message(Role::User, content)
    }

    /// Sets the temperature.
    pub fn temperature(mut self, t: f32) -> Self {
        self.temperature = Some(t);
        self
    }

    /// Sets the seed.
    pub fn seed(mut self, seed: i64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Sets the completion token limit.
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Adds a stop sequence.
    pub fn stop(mut self, s: impl Into<String>) -> Self {
        self.stop.push(s.into());
        self
    }

    /// Asks for a JSON object answer.
    pub fn json(mut self) -> Self {
        self.json = true;
        self
    }

    /// Sets this request's per-attempt timeout.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// Bypasses the response cache.
    pub fn no_cache(mut self) -> Self {
        self.no_cache = true;
        self
    }

    /// Attributes the call to a hyperfunction (or any label) in the statistics.
    pub fn label(mut self, label: &str) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Applies sampling knobs; `max_tokens` becomes `max_tokens_frac × model_max`.
    pub fn lm(mut self, p: &LmParams, model_max: u32) -> Self {
        self.temperature = Some(p.temperature);
        self.top_p = Some(p.top_p);
        self.presence_penalty = Some(p.presence_penalty);
        self.frequency_penalty = Some(p.frequency_penalty);
        self.max_tokens = Some(p.max_tokens(model_max));
        self
    }

    /// Whether the cache may serve it: not opted out, and temperature 0 or a seed.
    pub fn is_cacheable(&self) -> bool {
        !self.no_cache && (self.seed.is_some() || self.temperature == Some(0.0))
    }

    /// A rough token cost before the call: the prompt's estimate plus the completion limit.
    fn naive_tokens(&self) -> u32 {
        self.prompt_tokens_estimate() + self.max_tokens.unwrap_or(256)
    }

    /// A rough count of the prompt's tokens: characters / 4 (16 per message for the framing).
    pub(crate) fn prompt_tokens_estimate(&self) -> u32 {
        let chars: usize = self.messages.iter().map(|m| m.content.len() + 16).sum();
        (chars / 4) as u32
    }

    /// What a call cancelled in flight is assumed to have used: its prompt, read by the
    /// provider, and no completion.
    fn cancelled_usage(&self) -> Usage {
        Usage {
            input_tokens: u64::from(self.prompt_tokens_estimate()),
            ..Usage::default()
        }
    }

    fn validate(&self) -> Result<(), LlmError> {
        if self.messages.is_empty() {
            return Err(LlmError::InvalidRequest(format!(
                "request to `{}` has no messages: add .user(text)",
                self.model
            )));
        }
        if self.stop.len() > 4 {
            return Err(LlmError::InvalidRequest(format!(
                "{} stop sequences given; the API takes at most 4",
                self.stop.len()
            )));
        }
        Ok(())
    }

    fn to_openai(&self, stream: bool) -> Result<CreateChatCompletionRequest, LlmError> {
        let mut v = serde_json::json!({
            "model": self.model,
            "messages": self.messages,
        });
        let o = v
            .as_object_mut()
            .ok_or_else(|| LlmError::InvalidRequest("request".into()))?;
        let mut set = |k: &str, x: Option<Json>| {
            if let Some(x) = x {
                o.insert(k.into(), x);
            }
        };
        set("temperature", self.temperature.map(Json::from));
        set("top_p", self.top_p.map(Json::from));
        set("presence_penalty", self.presence_penalty.map(Json::from));
        set("frequency_penalty", self.frequency_penalty.map(Json::from));
        set("max_tokens", self.max_tokens.map(Json::from));
        set("seed", self.seed.map(Json::from));
        set(
            "stop",
            (!self.stop.is_empty()).then(|| Json::from(self.stop.clone())),
        );
        set(
            "response_format",
            self.json
                .then(|| serde_json::json!({"type": "json_object"})),
        );
        if stream {
            set("stream", Some(Json::Bool(true)));
            set(
                "stream_options",
                Some(serde_json::json!({"include_usage": true})),
            );
        }
        serde_json::from_value(v).map_err(|e| LlmError::InvalidRequest(e.to_string()))
    }
}

/// Tokens of one response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Prompt tokens (cached ones included).
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Prompt tokens the provider served from its prompt cache.
    pub cached_input_tokens: u64,
    /// Completion tokens spent on reasoning (included in `output_tokens`).
    pub reasoning_tokens: u64,
}

/// A chat completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// The first choice's text.
    pub text: String,
    /// The model that answered (as the server reports it).
    pub model: String,
    /// Finish reason per choice (`stop`, `length`…).
    pub finish_reasons: Vec<String>,
    /// Tokens.
    pub usage: Usage,
    /// Dollars this call cost (0 for a cache hit).
    #[serde(default)]
    pub cost_usd: f64,
    /// Served from the response cache.
    #[serde(default)]
    pub cached: bool,
    /// HTTP requests sent for it (0 for a cache hit).
    #[serde(default)]
    pub attempts: u32,
}

impl ChatResponse {
    /// The text parsed as JSON (a surrounding Markdown code fence is stripped first).
    pub fn json(&self) -> Result<Json, LlmError> {
        let t = self.text.trim();
        let t = t
            .strip_prefix("```json")
            .or_else(|| t.strip_prefix("```"))
            .and_then(|s| s.strip_suffix("```"))
            .unwrap_or(t);
        serde_json::from_str(t.trim()).map_err(|e| LlmError::Decode {
            endpoint: self.model.clone(),
            message: format!("answer is not JSON ({e}): {:?}", self.text),
        })
    }
}

/// Counters of a group of calls (a model, a hyperfunction, or all).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CallStats {
    /// `chat` calls.
    pub calls: u64,
    /// HTTP requests sent (retries included; cache hits send none).
    pub requests: u64,
    /// Calls served from the cache.
    pub cache_hits: u64,
    /// Cacheable calls that missed.
    pub cache_misses: u64,
    /// Retries after a retryable failure.
    pub retries: u64,
    /// 429 responses seen.
    pub throttled: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Provider-cached prompt tokens.
    pub cached_input_tokens: u64,
    /// Dollars.
    pub cost_usd: f64,
}

/// Everything the client counted.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LlmStats {
    /// All calls.
    pub total: CallStats,
    /// Per model.
    pub by_model: BTreeMap<String, CallStats>,
    /// Per label (hyperfunction name); unlabelled calls are under `""`.
    pub by_label: BTreeMap<String, CallStats>,
    /// Race winners: label → model → wins.
    pub race_wins: BTreeMap<String, BTreeMap<String, u64>>,
    /// Each endpoint's limiter.
    pub endpoints: BTreeMap<String, LimiterStats>,
}

impl LlmStats {
    /// A Markdown table per model and per label.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        for (title, groups) in [("model", &self.by_model), ("function", &self.by_label)] {
            s.push_str(&format!(
                "| {title} | calls | requests | cache hits | retries | 429s | errors | in tok | out tok | cost $ |\n\
                 | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
            ));
            for (name, c) in groups {
                s.push_str(&format!(
                    "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {:.6} |\n",
                    c.calls,
                    c.requests,
                    c.cache_hits,
                    c.retries,
                    c.throttled,
                    c.errors,
                    c.input_tokens,
                    c.output_tokens,
                    c.cost_usd
                ));
            }
            s.push('\n');
        }
        s
    }
}

/// What happened to one entrant of a race.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum RaceEntry {
    /// First valid answer.
    Won {
        /// What it cost.
        cost_usd: f64,
    },
    /// Answered, but the answer was judged invalid.
    Invalid {
        /// What it cost.
        cost_usd: f64,
    },
    /// Failed.
    Failed {
        /// Why.
        error: String,
    },
    /// Still running when another won: cancelled (its request was dropped).
    Cancelled,
    /// Never launched: a valid answer came before its hedge delay ran out.
    NotLaunched,
}

/// One entrant of a race: what happened, how long it ran and what it cost.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entrant {
    /// The model.
    pub model: String,
    /// What happened.
    pub entry: RaceEntry,
    /// Seconds from its launch to its answer (or to its cancellation); `None` if never launched.
    pub latency_s: Option<f64>,
    /// Dollars: its usage for an answer; for a cancelled call an estimate (the prompt tokens at
    /// the input price), since the provider bills what it read.
    pub cost_usd: f64,
    /// Whether `cost_usd` is an estimate.
    pub cost_estimated: bool,
}

/// The result of [`LlmClient::race`].
#[derive(Clone, Debug)]
pub struct RaceOutcome {
    /// The winning model.
    pub winner: String,
    /// Its answer.
    pub response: ChatResponse,
    /// Every entrant, in the order given (launch order).
    pub entrants: Vec<Entrant>,
}

/// A non-2xx answer, passed from the HTTP service up through async-openai.
#[derive(Debug)]
struct HttpFailure {
    status: u16,
    retry_after: Option<Duration>,
    body: String,
}

impl std::fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.body)
    }
}

impl std::error::Error for HttpFailure {}

struct Endpoint {
    cfg: EndpointConfig,
    client: async_openai::Client<OpenAIConfig>,
    limiter: Arc<Limiter>,
}

#[derive(Default)]
struct Acc {
    stats: LlmStats,
}

struct Inner {
    cfg: LlmConfig,
    endpoints: Vec<Endpoint>,
    cache: Option<Cache>,
    acc: Mutex<Acc>,
    requests: AtomicU64,
    stop: StopSignal,
    names: Mutex<HashMap<String, usize>>,
    provider: String,
    ledger: std::sync::RwLock<Option<crate::tune::Ledger>>,
}

/// A cheap-to-clone handle on the configured endpoints, limiters, cache and statistics.
#[derive(Clone)]
pub struct LlmClient(Arc<Inner>);

impl std::fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmClient")
            .field(
                "endpoints",
                &self
                    .0
                    .endpoints
                    .iter()
                    .map(|e| &e.cfg.name)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn failure_message(body: &str) -> String {
    serde_json::from_str::<Json>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(500).collect())
}

impl LlmClient {
    /// Builds the client (no network traffic until the first call).
    pub fn new(cfg: LlmConfig) -> Result<Self, LlmError> {
        cfg.validate()?;
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| LlmError::Config(format!("HTTP client: {e}")))?;
        let endpoints = cfg
            .endpoints
            .iter()
            .map(|ep| {
                let limiter = Limiter::new(ep);
                let mut oc = OpenAIConfig::new()
                    .with_api_base(ep.base_url.clone())
                    .with_api_key(ep.api_key.clone().unwrap_or_default());
                if let Some(org) = &ep.organization {
                    oc = oc.with_org_id(org.clone());
                }
                let (http, lim) = (http.clone(), limiter.clone());
                // Our own HTTP service: it sees every status and header (async-openai's error
                // type carries none) and replaces async-openai's built-in retry with ours.
                let service = tower::service_fn(move |factory: HttpRequestFactory| {
                    let (http, lim) = (http.clone(), lim.clone());
                    async move {
                        let request = factory.build().await?;
                        let resp = http.execute(request).await.map_err(OpenAIError::Reqwest)?;
                        let headers = Headers::parse(resp.headers());
                        lim.observe(&headers);
                        let status = resp.status();
                        if status.is_success() {
                            return Ok(resp);
                        }
                        let body = resp.text().await.unwrap_or_default();
                        Err(OpenAIError::Boxed(Box::new(HttpFailure {
                            status: status.as_u16(),
                            retry_after: headers.retry_after,
                            body,
                        })))
                    }
                });
                Endpoint {
                    cfg: ep.clone(),
                    client: async_openai::Client::with_config(oc).with_http_service(service),
                    limiter,
                }
            })
            .collect();
        let cache = if cfg.no_cache {
            None
        } else {
            Some(Cache::open(cfg.cache_path.as_deref())?)
        };
        let provider = cfg.provider.clone().unwrap_or_else(|| "openai".into());
        Ok(Self(Arc::new(Inner {
            cfg,
            endpoints,
            cache,
            acc: Mutex::default(),
            requests: AtomicU64::new(0),
            stop: StopSignal::new(),
            names: Mutex::default(),
            provider,
            ledger: std::sync::RwLock::new(None),
        })))
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &LlmConfig {
        &self.0.cfg
    }

    /// Raised when a budget is spent; pass it to [`Es::stop_on`](crate::Es::stop_on).
    pub fn stop_signal(&self) -> StopSignal {
        self.0.stop.clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> LlmStats {
        let mut s = self.acc().stats.clone();
        for ep in &self.0.endpoints {
            s.endpoints.insert(ep.cfg.name.clone(), ep.limiter.stats());
        }
        s
    }

    /// The counters over every call (what [`LlmClient::stats`] gives as `total`, without
    /// copying the per-model, per-label and endpoint tables).
    pub fn total(&self) -> CallStats {
        self.acc().stats.total.clone()
    }

    /// Entries in the response cache (0 without a cache).
    pub fn cache_len(&self) -> Result<u64, LlmError> {
        self.0.cache.as_ref().map_or(Ok(0), Cache::len)
    }

    /// A name `base`, or `base#2`, `base#3`… if this client already handed `base` out, so that
    /// several LLM hyperfunctions built by one factory can live in one system.
    pub fn unique_name(&self, base: &str) -> String {
        let mut names = self.0.names.lock().unwrap_or_else(|e| e.into_inner());
        let n = names.entry(base.to_string()).or_insert(0);
        *n += 1;
        if *n == 1 {
            base.to_string()
        } else {
            format!("{base}#{n}")
        }
    }

    fn acc(&self) -> MutexGuard<'_, Acc> {
        self.0.acc.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self, req: &ChatRequest, f: impl Fn(&mut CallStats)) {
        let mut a = self.acc();
        let s = &mut a.stats;
        f(&mut s.total);
        f(s.by_model.entry(req.model.clone()).or_default());
        f(s.by_label
            .entry(req.label.clone().unwrap_or_default())
            .or_default());
    }

    pub(crate) fn model(&self, model: &str) -> ModelConfig {
        self.0.cfg.models.get(model).cloned().unwrap_or_default()
    }

    fn endpoint(&self, model: &ModelConfig) -> &Endpoint {
        model
            .endpoint
            .as_ref()
            .and_then(|n| self.0.endpoints.iter().find(|e| &e.cfg.name == n))
            .unwrap_or(&self.0.endpoints[0])
    }

    /// Records every call from now on in `ledger`: prompt, fragments, answer, token classes,
    /// latency, micro-dollars (from the ledger's price table, else the configured price) and the
    /// caller. Cache hits are recorded at zero cost with source `cache`.
    pub fn attach_ledger(&self, ledger: &crate::tune::Ledger) {
        *self.0.ledger.write().unwrap_or_else(|p| p.into_inner()) = Some(ledger.clone());
    }

    pub(crate) fn ledger(&self) -> Option<crate::tune::Ledger> {
        self.0
            .ledger
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends one chat completion (cache, limiter, retries, usage and cost included).
    pub async fn chat(&self, req: ChatRequest) -> Result<ChatResponse, LlmError> {
        let started = crate::util::now_s();
        let t0 = std::time::Instant::now();
        let out = self.chat_inner(&req).await;
        if let Some(ledger) = self.ledger() {
            let latency_ms = t0.elapsed().as_secs_f64() * 1e3;
            let source = match &out {
                Ok(r) if r.cached => "cache",
                _ => "provider",
            };
            self.record(
                &ledger,
                &req,
                out.as_ref(),
                started,
                latency_ms,
                source,
                false,
            );
        }
        out
    }

    /// Queues `req`'s record in `ledger` (errors are logged: the ledger never fails a call).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record(
        &self,
        ledger: &crate::tune::Ledger,
        req: &ChatRequest,
        out: Result<&ChatResponse, &LlmError>,
        started: f64,
        latency_ms: f64,
        source: &'static str,
        estimated: bool,
    ) -> i64 {
        let model = self.model(&req.model);
        let endpoint = self.endpoint(&model).cfg.name.clone();
        let (mut system, mut prompt) = (String::new(), String::new());
        for m in &req.messages {
            let target = if m.role == Role::System {
                &mut system
            } else {
                &mut prompt
            };
            if !target.is_empty() {
                target.push_str("\n\n");
            }
            target.push_str(&m.content);
        }
        let mut options = serde_json::to_value(req).unwrap_or_default();
        if let Some(o) = options.as_object_mut() {
            o.remove("messages");
            o.remove("model");
            o.retain(|_, v| {
                !(v.is_null() || v == &Json::Bool(false) || v == &serde_json::json!([]))
            });
        }
        let (usage, response, error) = match out {
            Ok(r) => (r.usage, r.text.clone(), None),
            Err(e) => (Usage::default(), String::new(), Some(e.error_type())),
        };
        let usage = if estimated {
            req.cancelled_usage()
        } else {
            usage
        };
        let usage = crate::tune::TokenUsage::from_usage(&usage);
        let client_price = model
            .price
            .and_then(|p| crate::tune::ModelPrice::from_llm(&p));
        let id = ledger.next_id();
        let row = crate::tune::LlmRow {
            cost: crate::tune::CostRow {
                id,
                ts: started,
                kind: "llm",
                who: crate::tune::Attribution {
                    caller: req.caller.clone().unwrap_or_default(),
                    label: req.label.clone().unwrap_or_default(),
                    run: req.run.clone().unwrap_or_default(),
                    user: req.user.clone().unwrap_or_default(),
                },
                endpoint,
                model: req.model.clone(),
                units: 0.0,
                micros: 0,
                estimated,
            },
            system,
            prompt,
            response,
            options: options.to_string(),
            usage,
            latency_ms,
            source,
            error,
            fragments: req
                .fragments
                .iter()
                .map(|(role, f)| {
                    let role = match role {
                        Role::System => "system",
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    };
                    (role, f.clone())
                })
                .collect(),
            client_price,
        };
        if let Err(e) = ledger.record_llm(row) {
            tracing::warn!(error = %e, "ledger record failed");
        }
        id
    }

    async fn chat_inner(&self, req: &ChatRequest) -> Result<ChatResponse, LlmError> {
        req.validate()?;
        self.bump(req, |c| c.calls += 1);
        let out = match (&self.0.cache, req.is_cacheable()) {
            (Some(cache), true) => {
                let key = Cache::key(&serde_json::to_value(req).unwrap_or_default());
                let lock = cache.lock_key(&key);
                let _held = lock.lock().await;
                match cache.get(&key)? {
                    Some(mut hit) => {
                        self.bump(req, |c| c.cache_hits += 1);
                        hit.cached = true;
                        hit.cost_usd = 0.0;
                        hit.attempts = 0;
                        Ok(hit)
                    }
                    None => {
                        self.bump(req, |c| c.cache_misses += 1);
                        let r = self.send(req).await;
                        if let Ok(resp) = &r {
                            cache.put(&key, &req.model, resp)?;
                        }
                        r
                    }
                }
            }
            _ => self.send(req).await,
        };
        if out.is_err() {
            self.bump(req, |c| c.errors += 1);
        }
        out
    }

    /// The budget that is used up, if any.
    fn spent(&self) -> Option<LlmError> {
        let b = self.0.cfg.budget;
        if let Some(max) = b.max_requests {
            if self.0.requests.load(Relaxed) >= max {
                return Some(LlmError::RequestBudget { max_requests: max });
            }
        }
        let max = b.max_cost_usd?;
        let spent = self.acc().stats.total.cost_usd;
        (spent >= max).then_some(LlmError::CostBudget {
            max_usd: max,
            spent_usd: spent,
        })
    }

    /// Raises the stop signal as soon as a budget is used up, so the optimiser stops after the
    /// generation in flight instead of sending requests that must fail.
    fn raise_if_spent(&self) {
        if let Some(e) = self.spent() {
            self.0.stop.raise(e.to_string());
        }
    }

    fn check_budget(&self) -> Result<(), LlmError> {
        match self.spent() {
            Some(e) => {
                self.0.stop.raise(e.to_string());
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn backoff(ep: &EndpointConfig, attempt: u32) -> Duration {
        let cap = (ep.backoff_base_ms as f64 * 2f64.powi(attempt.min(30) as i32))
            .min(ep.backoff_max_ms as f64);
        Duration::from_secs_f64(cap * (0.5 + 0.5 * rand::random::<f64>()) / 1e3)
    }

    async fn send(&self, req: &ChatRequest) -> Result<ChatResponse, LlmError> {
        let model = self.model(&req.model);
        let ep = self.endpoint(&model);
        let oa = req.to_openai(false)?;
        let naive = req.naive_tokens();
        let name = &ep.cfg.name;
        let timeout = req.timeout.unwrap_or_else(|| ep.cfg.timeout());
        let mut attempt: u32 = 0;
        loop {
            self.check_budget()?;
            let est = ep.limiter.scaled_tokens(naive);
            let permit = ep.limiter.acquire(est).await;
            let level = permit.level();
            self.0.requests.fetch_add(1, Relaxed);
            self.bump(req, |c| c.requests += 1);
            self.raise_if_spent();
            let res = tokio::time::timeout(timeout, ep.client.chat().create(oa.clone())).await;
            drop(permit);
            attempt += 1;
            let err = match res {
                Ok(Ok(resp)) => {
                    let out = self.finish(req, &model, resp, attempt, name)?;
                    ep.limiter.on_success(
                        est,
                        Some((out.usage.input_tokens + out.usage.output_tokens) as u32),
                        level,
                    );
                    return Ok(out);
                }
                Err(_) => LlmError::Timeout {
                    endpoint: name.clone(),
                    after: timeout,
                    attempts: attempt,
                },
                Ok(Err(e)) => self.classify(e, name, attempt, ep, level),
            };
            if !err.is_retryable() || attempt > ep.cfg.max_retries {
                return Err(err);
            }
            self.bump(req, |c| c.retries += 1);
            // A 429 already blocked the endpoint's limiter; other failures back off here.
            if !matches!(err, LlmError::Http { status: 429, .. }) {
                tokio::time::sleep(Self::backoff(&ep.cfg, attempt - 1)).await;
            }
        }
    }

    fn classify(
        &self,
        e: OpenAIError,
        endpoint: &str,
        attempts: u32,
        ep: &Endpoint,
        level: (usize, u64),
    ) -> LlmError {
        let endpoint = endpoint.to_string();
        match e {
            OpenAIError::Boxed(b) => match b.downcast::<HttpFailure>() {
                Ok(f) => {
                    if f.status == 429 {
                        // A little jitter on top of Retry-After keeps clients that were
                        // refused together from returning in one herd.
                        let wait = match f.retry_after {
                            Some(d) => {
                                d.mul_f64(1.0 + 0.02 * rand::random::<f64>())
                                    + Duration::from_millis(10)
                            }
                            None => Self::backoff(&ep.cfg, attempts - 1),
                        };
                        ep.limiter.on_throttled(wait, level);
                        self.acc().stats.total.throttled += 1;
                    }
                    LlmError::Http {
                        endpoint,
                        status: f.status,
                        message: failure_message(&f.body),
                        attempts,
                    }
                }
                Err(other) => LlmError::Connection {
                    endpoint,
                    message: other.to_string(),
                    attempts,
                },
            },
            OpenAIError::Reqwest(r) if r.is_timeout() => LlmError::Timeout {
                endpoint,
                after: ep.cfg.timeout(),
                attempts,
            },
            OpenAIError::Reqwest(r) if r.is_decode() || r.is_builder() => LlmError::Decode {
                endpoint,
                message: r.to_string(),
            },
            OpenAIError::Reqwest(r) => LlmError::Connection {
                endpoint,
                message: r.to_string(),
                attempts,
            },
            OpenAIError::JSONDeserialize(e, body) => LlmError::Decode {
                endpoint,
                message: format!("{e}: {}", body.chars().take(300).collect::<String>()),
            },
            OpenAIError::InvalidArgument(m) => LlmError::InvalidRequest(m),
            other => LlmError::Decode {
                endpoint,
                message: other.to_string(),
            },
        }
    }

    fn finish(
        &self,
        req: &ChatRequest,
        model: &ModelConfig,
        resp: CreateChatCompletionResponse,
        attempts: u32,
        endpoint: &str,
    ) -> Result<ChatResponse, LlmError> {
        let first = resp.choices.first().ok_or_else(|| LlmError::Decode {
            endpoint: endpoint.to_string(),
            message: "the answer has no choices".into(),
        })?;
        let usage = resp.usage.as_ref().map_or(Usage::default(), |u| Usage {
            input_tokens: u64::from(u.prompt_tokens),
            output_tokens: u64::from(u.completion_tokens),
            cached_input_tokens: u
                .prompt_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens)
                .map_or(0, u64::from),
            reasoning_tokens: u
                .completion_tokens_details
                .as_ref()
                .and_then(|d| d.reasoning_tokens)
                .map_or(0, u64::from),
        });
        let cost = model.price.map_or(0.0, |p| p.cost(&usage));
        let finish_reasons = resp
            .choices
            .iter()
            .filter_map(|c| c.finish_reason)
            .map(|f| {
                serde_json::to_value(f)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            })
            .collect();
        self.bump(req, |c| {
            c.input_tokens += usage.input_tokens;
            c.output_tokens += usage.output_tokens;
            c.cached_input_tokens += usage.cached_input_tokens;
            c.cost_usd += cost;
        });
        self.raise_if_spent();
        Ok(ChatResponse {
            text: first.message.content.clone().unwrap_or_default(),
            model: resp.model,
            finish_reasons,
            usage,
            cost_usd: cost,
            cached: false,
            attempts,
        })
    }

    /// Streams the answer's text as it arrives (for interactive use; one attempt, no cache).
    /// The endpoint's limiter slot is held until the stream ends or is dropped.
    pub async fn chat_stream(
        &self,
        req: ChatRequest,
    ) -> Result<impl futures::Stream<Item = Result<String, LlmError>> + Send + 'static, LlmError>
    {
        req.validate()?;
        self.check_budget()?;
        let model = self.model(&req.model);
        let ep = self.endpoint(&model);
        let permit = ep
            .limiter
            .acquire(ep.limiter.scaled_tokens(req.naive_tokens()))
            .await;
        self.0.requests.fetch_add(1, Relaxed);
        self.bump(&req, |c| {
            c.calls += 1;
            c.requests += 1;
        });
        let name = ep.cfg.name.clone();
        let stream = ep
            .client
            .chat()
            .create_stream(req.to_openai(true)?)
            .await
            .map_err(|e| self.classify(e, &name, 1, ep, permit.level()))?;
        let (client, price) = (self.clone(), model.price);
        Ok(stream.filter_map(move |chunk| {
            let _held = &permit;
            let out = match chunk {
                Ok(c) => {
                    if let Some(u) = &c.usage {
                        let usage = Usage {
                            input_tokens: u64::from(u.prompt_tokens),
                            output_tokens: u64::from(u.completion_tokens),
                            cached_input_tokens: 0,
                            reasoning_tokens: 0,
                        };
                        let cost = price.map_or(0.0, |p| p.cost(&usage));
                        client.bump(&req, |s| {
                            s.input_tokens += usage.input_tokens;
                            s.output_tokens += usage.output_tokens;
                            s.cost_usd += cost;
                        });
                    }
                    c.choices
                        .first()
                        .and_then(|ch| ch.delta.content.clone())
                        .filter(|t| !t.is_empty())
                        .map(Ok)
                }
                Err(e) => Some(Err(LlmError::Decode {
                    endpoint: name.clone(),
                    message: e.to_string(),
                })),
            };
            futures::future::ready(out)
        }))
    }

    /// Sends `request` to every model at once; the first answer that `valid` accepts wins and
    /// the others are cancelled (their requests dropped). Wins are counted per `label`.
    pub async fn race(
        &self,
        models: &[&str],
        request: ChatRequest,
        label: &str,
        valid: impl Fn(&ChatResponse) -> bool,
    ) -> Result<RaceOutcome, LlmError> {
        let models: Vec<String> = models.iter().map(|m| m.to_string()).collect();
        let (res, entrants) = self
            .race_hedged(&models, request, label, &valid, None)
            .await;
        res.map(|(winner, response)| RaceOutcome {
            winner,
            response,
            entrants,
        })
    }

    /// The race behind [`LlmClient::race`] and tuned races: models launch in order, the next
    /// one when `hedge` has passed without a valid answer or when every running one has ended
    /// without one (all at once when `hedge` is `None`).
    pub(crate) async fn race_hedged(
        &self,
        models: &[String],
        request: ChatRequest,
        label: &str,
        valid: &(impl Fn(&ChatResponse) -> bool + ?Sized),
        hedge: Option<Duration>,
    ) -> (Result<(String, ChatResponse), LlmError>, Vec<Entrant>) {
        let mut entrants: Vec<Entrant> = models
            .iter()
            .map(|m| Entrant {
                model: m.clone(),
                entry: RaceEntry::NotLaunched,
                latency_s: None,
                cost_usd: 0.0,
                cost_estimated: false,
            })
            .collect();
        if models.is_empty() {
            return (
                Err(LlmError::InvalidRequest(
                    "race needs at least one model".into(),
                )),
                entrants,
            );
        }
        let requests: Vec<ChatRequest> = models
            .iter()
            .map(|m| {
                let mut r = request.clone();
                r.model = m.clone();
                r.label = Some(label.to_string());
                r
            })
            .collect();
        let started: Vec<std::cell::Cell<Option<(f64, std::time::Instant)>>> =
            models.iter().map(|_| std::cell::Cell::new(None)).collect();
        let mut running = FuturesUnordered::new();
        let mut next = 0usize;
        let launch = |i: usize| {
            started[i].set(Some((crate::util::now_s(), std::time::Instant::now())));
            let r = requests[i].clone();
            async move { (i, self.chat(r).await) }
        };
        let won = loop {
            // Launch: everything at once without a hedge, else the next when nothing runs.
            while next < models.len() && (hedge.is_none() || running.is_empty()) {
                running.push(launch(next));
                next += 1;
            }
            let step = match hedge {
                Some(d) if next < models.len() => {
                    match tokio::time::timeout(d, running.next()).await {
                        Ok(x) => x,
                        Err(_) => {
                            running.push(launch(next));
                            next += 1;
                            continue;
                        }
                    }
                }
                _ => running.next().await,
            };
            let Some((i, res)) = step else { break None };
            let e = &mut entrants[i];
            e.latency_s = started[i].get().map(|(_, t)| t.elapsed().as_secs_f64());
            match res {
                Ok(resp) if valid(&resp) => {
                    e.entry = RaceEntry::Won {
                        cost_usd: resp.cost_usd,
                    };
                    e.cost_usd = resp.cost_usd;
                    break Some((i, resp));
                }
                Ok(resp) => {
                    e.entry = RaceEntry::Invalid {
                        cost_usd: resp.cost_usd,
                    };
                    e.cost_usd = resp.cost_usd;
                }
                Err(err) => {
                    e.entry = RaceEntry::Failed {
                        error: err.to_string(),
                    }
                }
            }
        };
        drop(running);
        // The ones still running were cancelled: record their estimated cost.
        let ledger = self.ledger();
        for (i, e) in entrants.iter_mut().enumerate() {
            let Some((t_start, t0)) = started[i].get() else {
                continue;
            };
            if e.latency_s.is_some() {
                continue;
            }
            let latency = t0.elapsed().as_secs_f64();
            e.entry = RaceEntry::Cancelled;
            e.latency_s = Some(latency);
            e.cost_estimated = true;
            e.cost_usd = self
                .model(&requests[i].model)
                .price
                .map_or(0.0, |p| p.cost(&requests[i].cancelled_usage()));
            if let Some(l) = &ledger {
                let err = LlmError::InvalidRequest("cancelled by a race".into());
                self.record(
                    l,
                    &requests[i],
                    Err(&err),
                    t_start,
                    latency * 1e3,
                    "cancelled",
                    true,
                );
            }
        }
        match won {
            Some((i, resp)) => {
                let winner = models[i].clone();
                *self
                    .acc()
                    .stats
                    .race_wins
                    .entry(label.to_string())
                    .or_default()
                    .entry(winner.clone())
                    .or_default() += 1;
                (Ok((winner, resp)), entrants)
            }
            None => (
                Err(LlmError::RaceLost {
                    errors: entrants
                        .iter()
                        .map(|e| format!("{}: {:?}", e.model, e.entry))
                        .collect(),
                }),
                entrants,
            ),
        }
    }
}

/// How an LLM hyperfunction calls its model.
#[derive(Clone, Debug)]
pub struct LlmOptions {
    /// Model name.
    pub model: String,
    /// Learn [`LmParams`] with ES (θ = 5 knobs); `false` sends `params` as fixed values.
    pub learn: bool,
    /// Starting (or fixed) knobs.
    pub params: LmParams,
    /// Seed sent with every request (makes answers cacheable at temperature > 0).
    pub seed: Option<i64>,
    /// Ask for JSON answers; the output value is then the parsed object.
    pub json: bool,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Use the response cache where the request allows it.
    pub cache: bool,
}

impl LlmOptions {
    /// Learned knobs starting at [`LmParams::default`], cache on, text output.
    pub fn new(model: &str) -> Self {
        Self {
            model: model.into(),
            learn: true,
            params: LmParams::default(),
            seed: None,
            json: false,
            stop: Vec::new(),
            cache: true,
        }
    }
}

/// The request an LLM hyperfunction sends for one input value.
///
/// A string is the user message; `{"messages": [...]}` is a whole conversation; any other JSON
/// is sent as its compact text.
fn request_for(
    input: &Json,
    prompt: Option<&str>,
    opts: &LlmOptions,
    p: &LmParams,
    model_max: u32,
    label: &str,
) -> Result<ChatRequest, IoError> {
    let mut r = ChatRequest::new(&opts.model).label(label);
    if let Some(sys) = prompt {
        r = r.system(sys);
    }
    match input {
        Json::String(s) => r = r.user(s.clone()),
        Json::Object(o) if o.contains_key("messages") => {
            let msgs: Vec<Message> =
                serde_json::from_value(o["messages"].clone()).map_err(|e| {
                    IoError::fatal(format!(
                        "`{label}`: input `messages` must be [{{role, content}}]: {e}"
                    ))
                })?;
            r.messages.extend(msgs);
        }
        other => r = r.user(other.to_string()),
    }
    r = r.lm(p, model_max);
    r.seed = opts.seed;
    r.json = opts.json;
    r.stop = opts.stop.clone();
    r.no_cache = !opts.cache;
    Ok(r)
}

/// Tokens (input + output) and dollars `clients` have counted so far.
pub(crate) fn usage_of(clients: &[LlmClient]) -> (u64, f64) {
    clients.iter().fold((0, 0.0), |(t, d), c| {
        let s = c.total();
        (t + s.input_tokens + s.output_tokens, d + s.cost_usd)
    })
}

pub(crate) fn note_request(client: &LlmClient, r: &ChatRequest) {
    note_call("gen_ai.operation.name", "chat");
    note_call("gen_ai.provider.name", client.0.provider.as_str());
    note_call("gen_ai.request.model", r.model.as_str());
    if let Some(t) = r.temperature {
        note_call("gen_ai.request.temperature", f64::from(t));
    }
    if let Some(t) = r.top_p {
        note_call("gen_ai.request.top_p", f64::from(t));
    }
    if let Some(t) = r.max_tokens {
        note_call("gen_ai.request.max_tokens", t);
    }
}

pub(crate) fn note_response(resp: &ChatResponse) {
    note_call("gen_ai.response.model", resp.model.as_str());
    note_call(
        "gen_ai.response.finish_reasons",
        Json::from(resp.finish_reasons.clone()),
    );
    note_call("gen_ai.usage.input_tokens", resp.usage.input_tokens);
    note_call("gen_ai.usage.output_tokens", resp.usage.output_tokens);
    note_call(
        "gen_ai.usage.cache_read.input_tokens",
        resp.usage.cached_input_tokens,
    );
    note_call("cost", resp.cost_usd);
    note_call("hyperfunc.cache_hit", resp.cached);
    note_call("hyperfunc.attempts", resp.attempts);
}

impl HyperFn {
    /// An LLM hyperfunction: one chat completion per candidate × example, all in flight at once
    /// under the endpoint's limiter. θ is [`LmParams`] (temperature, top_p, penalties,
    /// max_tokens_frac); the function's [`prompt`](HyperFn::prompt) is the system message.
    /// The output is the answer's text.
    ///
    /// Retries and timeouts are the client's (per endpoint), so the function's own policy
    /// retries nothing. Calls are recorded with the OpenTelemetry GenAI attributes.
    pub fn llm(name: &str, client: &LlmClient, model: &str) -> Self {
        Self::llm_with(name, client, LlmOptions::new(model))
    }

    /// [`HyperFn::llm`] with every option.
    pub fn llm_with(name: &str, client: &LlmClient, opts: LlmOptions) -> Self {
        let model_max = client.model(&opts.model).max_output_tokens;
        let spec = opts.learn.then(|| opts.params.spec_at());
        let (client, opts, label) = (client.clone(), Arc::new(opts), Arc::<str>::from(name));
        Self::io(name, spec, move |input: Json, params: IoParams| {
            let (client, opts, label) = (client.clone(), opts.clone(), label.clone());
            async move {
                let p = if opts.learn {
                    params
                        .lm()
                        .map_err(|e| IoError::fatal(format!("`{label}`: {e}")))?
                } else {
                    opts.params
                };
                let req = request_for(&input, params.prompt(), &opts, &p, model_max, &label)?;
                note_request(&client, &req);
                match client.chat(req).await {
                    Ok(resp) => {
                        note_response(&resp);
                        if opts.json {
                            resp.json()
                                .map_err(|e| IoError::fatal(format!("`{label}`: {e}")))
                        } else {
                            Ok(Json::String(resp.text))
                        }
                    }
                    Err(e) => {
                        note_call("error.type", e.error_type());
                        Err(IoError::fatal(e.to_string()))
                    }
                }
            }
        })
        .retries(0)
        .concurrency(1024)
    }
}
