//! Measurements of the LLM path for `hyperfunc bench-llm`: the limiter's own overhead per call
//! and the request rate achieved against a server that enforces a fixed-window limit.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::limiter::Limiter;
use super::{ChatRequest, EndpointConfig, LlmClient, LlmConfig};

/// What `hyperfunc bench-llm` prints.
#[derive(Clone, Debug, Serialize)]
pub struct LlmBench {
    /// Nanoseconds of limiter bookkeeping per call (acquire, release, success), uncontended.
    pub limiter_ns_per_call: f64,
    /// The rate run, when a server was given.
    pub rate: Option<RateBench>,
}

/// The request rate achieved against a server limited to `limit_requests` per `window_s`.
#[derive(Clone, Debug, Serialize)]
pub struct RateBench {
    /// Requests the server allows per window.
    pub limit_requests: u32,
    /// The window, seconds.
    pub window_s: f64,
    /// The limit as requests per minute (R).
    pub limit_rpm: f64,
    /// Calls made (all at once).
    pub calls: u32,
    /// Calls that failed (surfaced to the caller).
    pub surfaced_errors: u32,
    /// 429s the client absorbed.
    pub throttled: u64,
    /// First send to last answer, seconds.
    pub elapsed_s: f64,
    /// The least time the limit allows for `calls`: `(ceil(calls / limit) − 1) × window`.
    pub ideal_s: f64,
    /// `ideal_s / elapsed_s`: the fraction of the allowed rate achieved (target ≥ 0.95).
    pub rate_fraction: f64,
}

/// Median nanoseconds of one uncontended acquire + success + release, over `calls` calls.
pub async fn limiter_overhead_ns(calls: u32) -> f64 {
    let ep = EndpointConfig {
        rpm: Some(u32::MAX / 2),
        tpm: Some(u32::MAX / 2),
        ..EndpointConfig::default()
    };
    let l = Limiter::new(&ep);
    let mut rounds = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..calls.max(1) {
            let p = l.acquire(100).await;
            l.on_success(100, Some(120), p.level());
            drop(p);
        }
        rounds.push(t.elapsed().as_nanos() as f64 / f64::from(calls.max(1)));
    }
    rounds.sort_by(f64::total_cmp);
    rounds[rounds.len() / 2]
}

/// Sends `calls` requests at once through a fresh client and times them against the limit.
pub async fn rate(
    base_url: &str,
    key: &str,
    model: &str,
    calls: u32,
    limit_requests: u32,
    window: Duration,
) -> Result<RateBench, super::LlmError> {
    let client = LlmClient::new(
        LlmConfig::new(base_url)
            .api_key(key)
            .with_endpoint(|e| e.max_retries = 20),
    )?;
    let t0 = Instant::now();
    let out = futures::future::join_all(
        (0..calls)
            .map(|i| client.chat(ChatRequest::new(model).user(format!("rate {i}")).no_cache())),
    )
    .await;
    let elapsed_s = t0.elapsed().as_secs_f64();
    let windows = calls.div_ceil(limit_requests.max(1)).saturating_sub(1);
    let ideal_s = f64::from(windows) * window.as_secs_f64();
    Ok(RateBench {
        limit_requests,
        window_s: window.as_secs_f64(),
        limit_rpm: f64::from(limit_requests) * 60.0 / window.as_secs_f64(),
        calls,
        surfaced_errors: out.iter().filter(|r| r.is_err()).count() as u32,
        throttled: client.stats().total.throttled,
        elapsed_s,
        ideal_s,
        rate_fraction: ideal_s / elapsed_s.max(1e-9),
    })
}
