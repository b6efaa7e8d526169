//! Configuration of the LLM client: endpoints, models, prices, budget, cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::LlmError;

/// One OpenAI-compatible server (OpenAI, Ollama, vLLM, llama.cpp, LiteLLM, Groq…).
///
/// Every endpoint has its own limiter: a slow or throttled endpoint never holds up another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EndpointConfig {
    /// Name models refer to (`ModelConfig::endpoint`).
    pub name: String,
    /// Base URL including the version path, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Bearer key.
    pub api_key: Option<String>,
    /// OpenAI organisation header.
    pub organization: Option<String>,
    /// Requests per minute the provider allows (a ceiling; the limiter also learns from headers).
    pub rpm: Option<u32>,
    /// Tokens per minute the provider allows (estimated before a call, corrected after).
    pub tpm: Option<u32>,
    /// Most requests in flight at once (the AIMD window starts here and never exceeds it).
    pub max_concurrency: usize,
    /// Per-attempt timeout, milliseconds.
    pub timeout_ms: u64,
    /// Extra attempts after a retryable failure (429, 5xx, timeout, connection reset).
    pub max_retries: u32,
    /// First backoff step without `Retry-After`, milliseconds (doubles per attempt, full jitter).
    pub backoff_base_ms: u64,
    /// Longest backoff step, milliseconds.
    pub backoff_max_ms: u64,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            base_url: "https://api.openai.com/v1".into(),
            api_key: None,
            organization: None,
            rpm: None,
            tpm: None,
            max_concurrency: 32,
            timeout_ms: 60_000,
            max_retries: 6,
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
        }
    }
}

impl EndpointConfig {
    /// An endpoint named `name` at `base_url`, with default limits.
    pub fn new(name: &str, base_url: &str) -> Self {
        Self {
            name: name.into(),
            base_url: base_url.trim_end_matches('/').into(),
            ..Self::default()
        }
    }

    /// The per-attempt timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Prices in US dollars per million tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Price {
    /// Uncached prompt tokens.
    pub input_per_mtok: f64,
    /// Completion tokens.
    pub output_per_mtok: f64,
    /// Prompt tokens served from the provider's prompt cache (defaults to the input price).
    #[serde(default)]
    pub cached_input_per_mtok: Option<f64>,
}

impl Price {
    /// A price with no cached-token discount.
    pub fn new(input_per_mtok: f64, output_per_mtok: f64) -> Self {
        Self {
            input_per_mtok,
            output_per_mtok,
            cached_input_per_mtok: None,
        }
    }

    /// Sets the cached prompt token price.
    pub fn cached(mut self, per_mtok: f64) -> Self {
        self.cached_input_per_mtok = Some(per_mtok);
        self
    }

    /// Dollars for one response's usage.
    ///
    /// # Examples
    /// ```
    /// use hyperfunc::llm::{Price, Usage};
    /// let p = Price::new(1.0, 4.0).cached(0.5);
    /// let u = Usage { input_tokens: 1_000_000, output_tokens: 500_000, cached_input_tokens: 200_000, reasoning_tokens: 0 };
    /// // 800k uncached × $1 + 200k cached × $0.5 + 500k out × $4
    /// assert!((p.cost(&u) - (0.8 + 0.1 + 2.0)).abs() < 1e-12);
    /// ```
    pub fn cost(&self, usage: &super::Usage) -> f64 {
        let cached = usage.cached_input_tokens.min(usage.input_tokens) as f64;
        let uncached = usage.input_tokens as f64 - cached;
        (uncached * self.input_per_mtok
            + cached * self.cached_input_per_mtok.unwrap_or(self.input_per_mtok)
            + usage.output_tokens as f64 * self.output_per_mtok)
            / 1e6
    }
}

/// Per-model settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// The endpoint serving it (the first endpoint when `None`).
    pub endpoint: Option<String>,
    /// Largest completion the model allows (`LmParams::max_tokens_frac` is a fraction of it).
    pub max_output_tokens: u32,
    /// Its price; calls of a model without a price cost 0.
    pub price: Option<Price>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            max_output_tokens: 4096,
            price: None,
        }
    }
}

/// Limits that stop an optimisation cleanly once spent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Budget {
    /// Most HTTP requests (retries included) the client may send.
    pub max_requests: Option<u64>,
    /// Most dollars the client may spend (checked before each request).
    pub max_cost_usd: Option<f64>,
}

/// Everything the client needs. Loadable from JSON; see [`LlmConfig::from_env`] for the
/// environment variables.
///
/// # Examples
/// ```
/// use hyperfunc::llm::{LlmConfig, ModelConfig, Price};
/// let cfg = LlmConfig::new("http://127.0.0.1:4000/v1")
///     .api_key("sk-local")
///     .rpm(600)
///     .model("gpt-4o-mini", ModelConfig { price: Some(Price::new(0.15, 0.6)), ..Default::default() });
/// assert_eq!(cfg.endpoints[0].rpm, Some(600));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LlmConfig {
    /// The servers; the first is the default.
    pub endpoints: Vec<EndpointConfig>,
    /// Per-model settings, by the model name sent to the server.
    pub models: BTreeMap<String, ModelConfig>,
    /// SQLite file of the response cache (in memory, for this client only, when `None`).
    pub cache_path: Option<PathBuf>,
    /// Turns the response cache off entirely.
    pub no_cache: bool,
    /// Spending limits.
    pub budget: Budget,
    /// `gen_ai.provider.name` of the records (default `openai`).
    pub provider: Option<String>,
}

impl LlmConfig {
    /// One default endpoint at `base_url`.
    pub fn new(base_url: &str) -> Self {
        Self {
            endpoints: vec![EndpointConfig::new("default", base_url)],
            ..Self::default()
        }
    }

    /// Starts every endpoint's limiter from the settings `hyperfunc autotune endpoint` saved
    /// for its base URL in `store` (concurrency, rate ceilings, timeout, retries, backoff; with
    /// records of several models the most cautious concurrency), and lowers a model's
    /// `max_output_tokens` to the largest `max_tokens` its record found safe. Endpoints without
    /// a record are left as they are. Returns the names of the endpoints changed.
    pub fn apply_autotune(&mut self, store: &crate::autotune::Store) -> Vec<String> {
        let mut changed = Vec::new();
        for ep in &mut self.endpoints {
            let models: Vec<String> = self
                .models
                .iter()
                .filter(|(_, m)| m.endpoint.as_deref().is_none_or(|e| e == ep.name))
                .map(|(name, _)| name.clone())
                .collect();
            let best = models
                .iter()
                .filter_map(|m| store.get_endpoint(&ep.base_url, m))
                .min_by_key(|r| r.concurrency);
            if let Some(r) = best {
                r.apply(ep);
                changed.push(ep.name.clone());
            }
            for name in &models {
                let safe = store
                    .get_endpoint(&ep.base_url, name)
                    .map_or(0, |r| r.max_ok_max_tokens);
                if let Some(m) = self.models.get_mut(name) {
                    if safe > 0 && m.max_output_tokens > safe {
                        m.max_output_tokens = safe;
                    }
                }
            }
        }
        changed
    }

    /// Reads `OPENAI_BASE_URL` (default `https://api.openai.com/v1`), `OPENAI_API_KEY`,
    /// `OPENAI_ORG_ID` (or `OPENAI_ORGANIZATION`), and optionally `HYPERFUNC_LLM_RPM`,
    /// `HYPERFUNC_LLM_TPM` and `HYPERFUNC_LLM_CACHE` (a SQLite path).
    pub fn from_env() -> Result<Self, LlmError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mut cfg = Self::new(
            var("OPENAI_BASE_URL")
                .as_deref()
                .unwrap_or("https://api.openai.com/v1"),
        );
        let ep = &mut cfg.endpoints[0];
        ep.api_key = var("OPENAI_API_KEY");
        ep.organization = var("OPENAI_ORG_ID").or_else(|| var("OPENAI_ORGANIZATION"));
        let num = |k: &str| -> Result<Option<u32>, LlmError> {
            var(k)
                .map(|v| {
                    v.parse().map_err(|_| {
                        LlmError::Config(format!(
                            "{k}={v:?} is not a whole number of per-minute units"
                        ))
                    })
                })
                .transpose()
        };
        ep.rpm = num("HYPERFUNC_LLM_RPM")?;
        ep.tpm = num("HYPERFUNC_LLM_TPM")?;
        cfg.cache_path = var("HYPERFUNC_LLM_CACHE").map(PathBuf::from);
        Ok(cfg)
    }

    /// Loads a JSON document shaped like this struct.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, LlmError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| LlmError::Config(format!("cannot read {}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| {
            LlmError::Config(format!("{} is not a valid LlmConfig: {e}", path.display()))
        })
    }

    fn first(&mut self) -> &mut EndpointConfig {
        if self.endpoints.is_empty() {
            self.endpoints.push(EndpointConfig::default());
        }
        &mut self.endpoints[0]
    }

    /// Sets the default endpoint's key.
    pub fn api_key(mut self, key: &str) -> Self {
        self.first().api_key = Some(key.into());
        self
    }

    /// Sets the default endpoint's requests-per-minute ceiling.
    pub fn rpm(mut self, rpm: u32) -> Self {
        self.first().rpm = Some(rpm);
        self
    }

    /// Sets the default endpoint's tokens-per-minute ceiling.
    pub fn tpm(mut self, tpm: u32) -> Self {
        self.first().tpm = Some(tpm);
        self
    }

    /// Edits the default endpoint.
    pub fn with_endpoint(mut self, f: impl FnOnce(&mut EndpointConfig)) -> Self {
        f(self.first());
        self
    }

    /// Adds another endpoint.
    pub fn endpoint(mut self, ep: EndpointConfig) -> Self {
        self.endpoints.push(ep);
        self
    }

    /// Adds or replaces a model's settings.
    pub fn model(mut self, name: &str, model: ModelConfig) -> Self {
        self.models.insert(name.into(), model);
        self
    }

    /// Persists the response cache in a SQLite file (shared across runs).
    pub fn cache(mut self, path: impl Into<PathBuf>) -> Self {
        self.cache_path = Some(path.into());
        self
    }

    /// Sets the spending limits.
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), LlmError> {
        if self.endpoints.is_empty() {
            return Err(LlmError::Config(
                "no endpoint: use LlmConfig::new(base_url) or LlmConfig::from_env()".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for ep in &self.endpoints {
            if !names.insert(ep.name.as_str()) {
                return Err(LlmError::Config(format!(
                    "two endpoints are named `{}`: give each a unique name",
                    ep.name
                )));
            }
            if !(ep.base_url.starts_with("http://") || ep.base_url.starts_with("https://")) {
                return Err(LlmError::Config(format!(
                    "endpoint `{}`: base_url {:?} must start with http:// or https://",
                    ep.name, ep.base_url
                )));
            }
            if ep.max_concurrency == 0 || ep.rpm == Some(0) || ep.tpm == Some(0) {
                return Err(LlmError::Config(format!(
                    "endpoint `{}`: max_concurrency, rpm and tpm must be positive",
                    ep.name
                )));
            }
        }
        for (m, mc) in &self.models {
            if let Some(e) = &mc.endpoint {
                if !names.contains(e.as_str()) {
                    return Err(LlmError::Config(format!(
                        "model `{m}` names endpoint `{e}`, which is not configured (have: {})",
                        names.iter().copied().collect::<Vec<_>>().join(", ")
                    )));
                }
            }
        }
        if let Some(c) = self.budget.max_cost_usd {
            if !(c.is_finite() && c >= 0.0) {
                return Err(LlmError::Config(format!(
                    "budget.max_cost_usd must be a finite amount ≥ 0, got {c}"
                )));
            }
        }
        Ok(())
    }
}
