//! The per-endpoint rate limiter: fixed ceilings from config, plus what it learns from the server.
//!
//! Three gates, in order:
//! 1. **Block.** After a 429 (for `Retry-After`, else the backoff step) or when a response says no
//!    requests/tokens remain until a reset, nobody sends until the block ends.
//! 2. **Adaptive window.** At most `window` requests in flight. A 429 (once per block) sets a
//!    *ceiling* and the window drops to it: one slot below the window when the refused request
//!    was sent with the window (nearly) full, else the level it was sent at less one, never
//!    below half the window (AIMD's halving). Below the ceiling every success adds `1/window`
//!    (a full window of successes adds one slot); at or above it, a quarter of that (a slow
//!    probe: a server at its capacity sees one refusal per four windows, not one per window).
//!    A success at a level above the ceiling, of a request sent after it was set, shows the
//!    server takes more: the ceiling is forgotten. Up to `max_concurrency`. So the window
//!    settles at a server's concurrency capacity, follows it down one slot per refusal and
//!    back up when it grows.
//! 3. **Quotas.** [`governor`] GCRA limiters for the configured requests and tokens per minute;
//!    a request's token cost is estimated before the call and the estimate's scale is corrected
//!    from real usage.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::config::EndpointConfig;

/// What a response said about the server's limits.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Headers {
    pub retry_after: Option<Duration>,
    pub remaining_requests: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub remaining_tokens: Option<u64>,
    pub reset_tokens: Option<Duration>,
}

impl Headers {
    /// Reads `Retry-After`, `retry-after-ms` and the `x-ratelimit-*` family, including
    /// proxies' scoped variants such as `x-ratelimit-api_key-remaining-requests`.
    pub fn parse(h: &reqwest::header::HeaderMap) -> Self {
        let mut out = Self::default();
        for (name, value) in h {
            let Ok(v) = value.to_str() else { continue };
            let n = name.as_str();
            if n == "retry-after-ms" {
                out.retry_after = v.trim().parse::<f64>().ok().map(|ms| secs(ms / 1e3));
            } else if n == "retry-after" && out.retry_after.is_none() {
                out.retry_after = v.trim().parse::<f64>().ok().map(secs);
            } else if let Some(rest) = n.strip_prefix("x-ratelimit-") {
                if rest.ends_with("remaining-requests") {
                    out.remaining_requests = v.trim().parse().ok();
                } else if rest.ends_with("remaining-tokens") {
                    out.remaining_tokens = v.trim().parse().ok();
                } else if rest.ends_with("reset-requests") {
                    out.reset_requests = parse_duration(v);
                } else if rest.ends_with("reset-tokens") {
                    out.reset_tokens = parse_duration(v);
                }
            }
        }
        out
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 3600.0))
}

/// OpenAI's reset format (`1s`, `6m0s`, `20ms`, `1h2m3.5s`) or plain seconds.
pub(crate) fn parse_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(s) = v.parse::<f64>() {
        return Some(secs(s));
    }
    let (mut total, mut num) = (0.0f64, String::new());
    let mut chars = v.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let x: f64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1e-3
            }
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
        total += x * unit;
        any = true;
    }
    (any && num.is_empty()).then(|| secs(total))
}

#[derive(Debug)]
struct Adaptive {
    blocked_until: Option<Instant>,
    window: f64,
    /// The highest level the server last took without refusing, if it refused one.
    ceiling: Option<f64>,
    /// Refusal events so far (a permit remembers the count it was let in at).
    events: u64,
    in_flight: usize,
    /// Real tokens / estimated tokens, smoothed.
    token_scale: f64,
}

/// Counters of one endpoint's limiter (for reports and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct LimiterStats {
    /// 429 responses seen (retried, not surfaced unless retries ran out).
    pub throttled: u64,
    /// Times a 429 lowered the window.
    pub decreases: u64,
    /// Current window (requests in flight allowed: its floor).
    pub window: f64,
    /// The level the server last refused, less one; `None` before a refusal or once a
    /// success above it showed the server takes more.
    pub ceiling: Option<f64>,
}

/// Slow probing above the ceiling: one slot per this many windows of successes.
const PROBE: f64 = 4.0;

pub(crate) struct Limiter {
    max_window: f64,
    rpm: Option<DefaultDirectRateLimiter>,
    tpm: Option<(DefaultDirectRateLimiter, u32)>,
    state: Mutex<Adaptive>,
    throttled: std::sync::atomic::AtomicU64,
    decreases: std::sync::atomic::AtomicU64,
    notify: Notify,
}

/// A slot in the window; frees itself when dropped (cancellation included).
pub(crate) struct Permit {
    limiter: Arc<Limiter>,
    level: usize,
    events: u64,
}

impl Permit {
    /// Requests in flight when this one was let in, itself included, and the refusal events
    /// before it.
    pub fn level(&self) -> (usize, u64) {
        (self.level, self.events)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.lock().in_flight -= 1;
        self.limiter.notify.notify_waiters();
    }
}

fn per_minute(n: u32) -> Option<Quota> {
    NonZeroU32::new(n).map(Quota::per_minute)
}

impl Limiter {
    pub fn new(ep: &EndpointConfig) -> Arc<Self> {
        let max_window = ep.max_concurrency.max(1) as f64;
        Arc::new(Self {
            max_window,
            rpm: ep.rpm.and_then(per_minute).map(RateLimiter::direct),
            tpm: ep
                .tpm
                .and_then(|t| Some((RateLimiter::direct(per_minute(t)?), t))),
            state: Mutex::new(Adaptive {
                blocked_until: None,
                window: max_window,
                ceiling: None,
                events: 0,
                in_flight: 0,
                token_scale: 1.0,
            }),
            throttled: Default::default(),
            decreases: Default::default(),
            notify: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Adaptive> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> LimiterStats {
        use std::sync::atomic::Ordering::Relaxed;
        let s = self.lock();
        LimiterStats {
            throttled: self.throttled.load(Relaxed),
            decreases: self.decreases.load(Relaxed),
            window: s.window,
            ceiling: s.ceiling,
        }
    }

    /// The token cost to reserve for a request whose naive estimate is `naive`.
    pub fn scaled_tokens(&self, naive: u32) -> u32 {
        let s = self.lock().token_scale;
        ((f64::from(naive) * s).ceil() as u32).max(1)
    }

    /// Waits for every gate, then holds a window slot until the permit drops.
    pub async fn acquire(self: &Arc<Self>, est_tokens: u32) -> Permit {
        let level = loop {
            let notified = self.notify.notified();
            let wait = {
                let mut s = self.lock();
                let now = Instant::now();
                match s.blocked_until {
                    Some(t) if t > now => Some(Some(t)),
                    _ if (s.in_flight as f64) + 1.0 > s.window.floor().max(1.0) => Some(None),
                    _ => {
                        s.in_flight += 1;
                        None
                    }
                }
                .ok_or((s.in_flight, s.events))
            };
            match wait {
                Err(level) => break level,
                Ok(Some(until)) => tokio::time::sleep_until(until).await,
                Ok(None) => notified.await,
            }
        };
        let permit = Permit {
            limiter: self.clone(),
            level: level.0,
            events: level.1,
        };
        if let Some(l) = &self.rpm {
            l.until_ready().await;
        }
        if let Some((l, cap)) = &self.tpm {
            let n = NonZeroU32::new(est_tokens.clamp(1, *cap)).unwrap_or(NonZeroU32::MIN);
            // `n ≤ cap` = the burst size, so the only error (InsufficientCapacity) cannot occur.
            let _ = l.until_n_ready(n).await;
        }
        permit
    }

    fn block_for(&self, s: &mut Adaptive, d: Duration) {
        let until = Instant::now() + d;
        if s.blocked_until.is_none_or(|b| b < until) {
            s.blocked_until = Some(until);
        }
    }

    /// A response arrived (any status): learn from its headers.
    pub fn observe(&self, h: &Headers) {
        let mut s = self.lock();
        if h.remaining_requests == Some(0) {
            if let Some(d) = h.reset_requests {
                self.block_for(&mut s, d);
            }
        }
        if h.remaining_tokens == Some(0) {
            if let Some(d) = h.reset_tokens {
                self.block_for(&mut s, d);
            }
        }
    }

    /// A 2xx response to a request sent at `level`: additive increase (slow at or above the
    /// ceiling), and correct the token estimate's scale.
    pub fn on_success(&self, est_tokens: u32, real_tokens: Option<u32>, level: (usize, u64)) {
        let mut s = self.lock();
        let (level, events) = level;
        if events == s.events && s.ceiling.is_some_and(|c| level as f64 > c) {
            s.ceiling = None;
        }
        let step = match s.ceiling {
            Some(c) if s.window >= c => 1.0 / (PROBE * s.window.max(1.0)),
            _ => 1.0 / s.window.max(1.0),
        };
        s.window = (s.window + step).min(self.max_window);
        if let Some(real) = real_tokens {
            let ratio = f64::from(real.max(1)) / f64::from(est_tokens.max(1)) * s.token_scale;
            s.token_scale = (0.8 * s.token_scale + 0.2 * ratio).clamp(0.05, 20.0);
        }
    }

    /// A 429 to a request sent at `level`: block for `wait` and lower the window to the
    /// ceiling it sets, once per block (see the module's documentation).
    ///
    /// 429s that arrive while a block is on answer requests sent before it began: they are the
    /// same congestion event and neither lower the window again nor push the block's end (the
    /// first refusal dates the server's window best).
    pub fn on_throttled(&self, wait: Duration, level: (usize, u64)) {
        use std::sync::atomic::Ordering::Relaxed;
        self.throttled.fetch_add(1, Relaxed);
        let mut s = self.lock();
        let now = Instant::now();
        if s.blocked_until.is_none_or(|b| b <= now) {
            let full = s.window.floor().max(1.0);
            let level = level.0 as f64;
            // Sent with the window (nearly) full, the refusal says the window is one too many:
            // another request may have held the server's last slot a moment (a refused one, or
            // one whose answer was on its way). Sent with fewer in flight, it says more.
            let ceiling = if level >= full - 1.0 {
                full - 1.0
            } else {
                (level - 1.0).max((full / 2.0).floor())
            }
            .max(1.0);
            s.ceiling = Some(ceiling);
            s.events += 1;
            s.window = ceiling;
            self.decreases.fetch_add(1, Relaxed);
            self.block_for(&mut s, wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_durations_parse_in_openai_format() {
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_duration("2.5"), Some(Duration::from_millis(2500)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("5x"), None);
    }

    #[test]
    fn headers_read_standard_and_scoped_names() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "5".parse().unwrap());
        h.insert(
            "x-ratelimit-api_key-remaining-requests",
            "0".parse().unwrap(),
        );
        h.insert("x-ratelimit-reset-tokens", "1m30s".parse().unwrap());
        let p = Headers::parse(&h);
        assert_eq!(p.retry_after, Some(Duration::from_secs(5)));
        assert_eq!(p.remaining_requests, Some(0));
        assert_eq!(p.reset_tokens, Some(Duration::from_secs(90)));
        h.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(
            Headers::parse(&h).retry_after,
            Some(Duration::from_millis(250))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_lowers_the_window_once_per_block_and_blocks() {
        let ep = EndpointConfig {
            max_concurrency: 8,
            ..EndpointConfig::default()
        };
        let l = Limiter::new(&ep);
        // Refused at level 6 of 8: the server took 5. Later refusals of the same event
        // change nothing.
        l.on_throttled(Duration::from_secs(5), (6, 0));
        l.on_throttled(Duration::from_secs(5), (2, 0));
        assert_eq!(l.stats().window, 5.0);
        assert_eq!(l.stats().ceiling, Some(5.0));
        assert_eq!(l.stats().decreases, 1);
        let t0 = Instant::now();
        let p = l.acquire(1).await;
        assert!(t0.elapsed() >= Duration::from_secs(5));
        assert_eq!(p.level(), (1, 1));
        // At the ceiling, one slot per four windows of successes.
        for _ in 0..5 {
            l.on_success(1, None, (5, 1));
        }
        assert!((l.stats().window - 5.25).abs() < 0.01, "{:?}", l.stats());
        // A success above the ceiling of a request sent before it was set says nothing; of
        // one sent after, the server takes more: back to one slot per window.
        l.on_success(1, None, (8, 0));
        assert_eq!(l.stats().ceiling, Some(5.0));
        l.on_success(1, None, (6, 1));
        assert_eq!(l.stats().ceiling, None);
        for _ in 0..64 {
            l.on_success(1, None, (8, 1));
        }
        assert_eq!(l.stats().window, 8.0, "recovers up to max_concurrency");
        // Refused with the window full: one slot down.
        l.on_throttled(Duration::from_secs(1), (8, 1));
        assert_eq!(l.stats().window, 7.0);
        // Refused at a low level (a rate limit, not concurrency): at most halved.
        tokio::time::advance(Duration::from_secs(2)).await;
        l.on_throttled(Duration::from_secs(1), (1, 2));
        assert_eq!(l.stats().window, 3.0);
    }

    #[tokio::test(start_paused = true)]
    async fn window_caps_requests_in_flight() {
        let ep = EndpointConfig {
            max_concurrency: 2,
            ..EndpointConfig::default()
        };
        let l = Limiter::new(&ep);
        let a = l.acquire(1).await;
        let _b = l.acquire(1).await;
        let third = tokio::time::timeout(Duration::from_secs(1), l.acquire(1)).await;
        assert!(third.is_err(), "a third request waits for a slot");
        drop(a);
        let third = tokio::time::timeout(Duration::from_secs(1), l.acquire(1)).await;
        assert!(third.is_ok(), "a freed slot lets it in");
    }
}
