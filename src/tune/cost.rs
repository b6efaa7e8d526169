//! Money in integer micro-dollars: token classes normalised at ingestion, dated price tables,
//! prices of any paid endpoint.
//!
//! Providers count prompt tokens differently. OpenAI's `prompt_tokens` *includes* the cached
//! tokens (`prompt_tokens_details.cached_tokens`) and `completion_tokens` includes the reasoning
//! tokens; Anthropic's `input_tokens` *excludes* cache reads and cache writes, which come on top
//! (`cache_read_input_tokens`, `cache_creation_input_tokens`). [`TokenUsage`] holds disjoint
//! classes, each priced once, so neither provider's cached tokens are billed twice.
//!
//! A price is kept as integer pico-dollars per token (dollars per million tokens × 10⁶), a
//! call's cost is summed exactly in 128-bit integers and rounded to micro-dollars once, so sums
//! over any grouping equal the per-call records to the micro-dollar.
//!
//! # Examples
//! ```
//! use hyperfunc::tune::{ModelPrice, PriceTable, TokenUsage};
//!
//! let mut table = PriceTable::new();
//! table.add("gpt-4o", "2024-08-06", ModelPrice::per_mtok(2.5, 10.0)?.cache_read(1.25)?)?;
//! let usage = TokenUsage::from_openai(&serde_json::json!({
//!     "prompt_tokens": 2000, "completion_tokens": 300,
//!     "prompt_tokens_details": {"cached_tokens": 1024},
//! }))?;
//! assert_eq!(usage.input, 976);
//! assert_eq!(usage.cache_read, 1024);
//! // 976 × 2.5 + 1024 × 1.25 + 300 × 10 micro-dollars
//! let at = hyperfunc::tune::parse_time("2025-01-01")?;
//! assert_eq!(table.cost("gpt-4o", at, &usage), Some(6720));
//! # Ok::<(), hyperfunc::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::{Error, Result};

/// Integer micro-dollars (10⁻⁶ US dollars).
pub type Micros = i64;

/// Dollars as micro-dollars, rounded to the nearest.
///
/// # Examples
/// ```
/// assert_eq!(hyperfunc::tune::usd_to_micros(0.0015), 1500);
/// ```
pub fn usd_to_micros(usd: f64) -> Micros {
    (usd * 1e6).round() as Micros
}

/// Micro-dollars as dollars.
pub fn micros_to_usd(micros: Micros) -> f64 {
    micros as f64 / 1e6
}

/// Tokens of one call in disjoint classes, each priced once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenUsage {
    /// Prompt tokens read neither from nor into the provider's prompt cache.
    pub input: u64,
    /// Prompt tokens read from the provider's prompt cache.
    pub cache_read: u64,
    /// Prompt tokens written into the provider's prompt cache.
    pub cache_write: u64,
    /// Completion tokens, reasoning tokens included (billed at the output price).
    pub output: u64,
    /// Of `output`, the reasoning tokens (information only; already in `output`).
    pub reasoning: u64,
}

fn field(usage: &Json, path: &[&str]) -> Result<u64> {
    let mut v = usage;
    for p in path {
        match v.get(p) {
            Some(x) => v = x,
            None => return Ok(0),
        }
    }
    if v.is_null() {
        return Ok(0);
    }
    v.as_u64().ok_or_else(|| Error::Price {
        what: path.join("."),
        reason: format!("a token count must be a non-negative integer, got {v}"),
    })
}

impl TokenUsage {
    /// From an OpenAI-style `usage` object (`prompt_tokens` includes
    /// `prompt_tokens_details.cached_tokens`; `completion_tokens` includes
    /// `completion_tokens_details.reasoning_tokens`).
    pub fn from_openai(usage: &Json) -> Result<Self> {
        let prompt = field(usage, &["prompt_tokens"])?;
        let cached = field(usage, &["prompt_tokens_details", "cached_tokens"])?;
        let output = field(usage, &["completion_tokens"])?;
        let reasoning = field(usage, &["completion_tokens_details", "reasoning_tokens"])?;
        if cached > prompt {
            return Err(Error::Price {
                what: "usage".into(),
                reason: format!(
                    "cached_tokens ({cached}) exceed prompt_tokens ({prompt}); \
                     is this an Anthropic usage record? use TokenUsage::from_anthropic"
                ),
            });
        }
        Ok(Self {
            input: prompt - cached,
            cache_read: cached,
            cache_write: 0,
            output,
            reasoning: reasoning.min(output),
        })
    }

    /// From an Anthropic-style `usage` object (`input_tokens` excludes
    /// `cache_read_input_tokens` and `cache_creation_input_tokens`, which come on top).
    pub fn from_anthropic(usage: &Json) -> Result<Self> {
        Ok(Self {
            input: field(usage, &["input_tokens"])?,
            cache_read: field(usage, &["cache_read_input_tokens"])?,
            cache_write: field(usage, &["cache_creation_input_tokens"])?,
            output: field(usage, &["output_tokens"])?,
            reasoning: 0,
        })
    }

    /// From the LLM client's usage (OpenAI convention: cached tokens inside input tokens).
    #[cfg(feature = "llm")]
    pub fn from_usage(u: &crate::llm::Usage) -> Self {
        let cached = u.cached_input_tokens.min(u.input_tokens);
        Self {
            input: u.input_tokens - cached,
            cache_read: cached,
            cache_write: 0,
            output: u.output_tokens,
            reasoning: u.reasoning_tokens.min(u.output_tokens),
        }
    }

    /// All prompt tokens (uncached, cache reads and cache writes).
    pub fn prompt_tokens(&self) -> u64 {
        self.input + self.cache_read + self.cache_write
    }

    /// Prompt and completion tokens.
    pub fn total(&self) -> u64 {
        self.prompt_tokens() + self.output
    }
}

/// Pico-dollars per token from dollars per million tokens (checked).
fn pico(what: &str, usd_per_mtok: f64) -> Result<i64> {
    if !(0.0..=1e6).contains(&usd_per_mtok) {
        return Err(Error::Price {
            what: what.into(),
            reason: format!(
                "dollars per million tokens must be finite and in [0, 1e6], got {usd_per_mtok}"
            ),
        });
    }
    Ok((usd_per_mtok * 1e6).round() as i64)
}

/// A model's token prices, stored as integer pico-dollars per token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelPrice {
    /// Uncached prompt tokens.
    pub input: i64,
    /// Prompt tokens read from the provider's cache.
    pub cache_read: i64,
    /// Prompt tokens written into the provider's cache.
    pub cache_write: i64,
    /// Completion tokens.
    pub output: i64,
}

impl ModelPrice {
    /// Prices in dollars per million tokens; cache reads and writes cost the input price until
    /// set.
    pub fn per_mtok(input_usd: f64, output_usd: f64) -> Result<Self> {
        let input = pico("input", input_usd)?;
        Ok(Self {
            input,
            cache_read: input,
            cache_write: input,
            output: pico("output", output_usd)?,
        })
    }

    /// Sets the cache-read price, dollars per million tokens.
    pub fn cache_read(mut self, usd_per_mtok: f64) -> Result<Self> {
        self.cache_read = pico("cache_read", usd_per_mtok)?;
        Ok(self)
    }

    /// Sets the cache-write price, dollars per million tokens.
    pub fn cache_write(mut self, usd_per_mtok: f64) -> Result<Self> {
        self.cache_write = pico("cache_write", usd_per_mtok)?;
        Ok(self)
    }

    /// The LLM client's configured price (a cached-token price, when set, for cache reads);
    /// `None` for a price out of range.
    #[cfg(feature = "llm")]
    pub(crate) fn from_llm(p: &crate::llm::Price) -> Option<Self> {
        Self::per_mtok(p.input_per_mtok, p.output_per_mtok)
            .and_then(|m| m.cache_read(p.cached_input_per_mtok.unwrap_or(p.input_per_mtok)))
            .ok()
    }

    /// The exact cost of `usage`, rounded to the nearest micro-dollar (halves up).
    pub fn cost(&self, usage: &TokenUsage) -> Micros {
        let p = i128::from(usage.input) * i128::from(self.input)
            + i128::from(usage.cache_read) * i128::from(self.cache_read)
            + i128::from(usage.cache_write) * i128::from(self.cache_write)
            + i128::from(usage.output) * i128::from(self.output);
        ((p + 500_000) / 1_000_000) as Micros
    }

    /// Dollars per million tokens: (input, cache read, cache write, output).
    pub fn per_mtok_usd(&self) -> (f64, f64, f64, f64) {
        let f = |x: i64| x as f64 / 1e6;
        (
            f(self.input),
            f(self.cache_read),
            f(self.cache_write),
            f(self.output),
        )
    }
}

/// One row of a price table, as written in JSON (dollars per million tokens).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PriceEntry {
    /// The model (as the server reports it, or as requested).
    pub model: String,
    /// The first day (UTC, `YYYY-MM-DD`) this price applies.
    pub from: String,
    /// Uncached prompt tokens.
    pub input: f64,
    /// Completion tokens.
    pub output: f64,
    /// Cache reads (the input price when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read: Option<f64>,
    /// Cache writes (the input price when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write: Option<f64>,
}

/// Prices per model, each valid from a date until the next entry of the same model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PriceTable {
    /// model → [(first second it applies, price)], sorted by time.
    models: BTreeMap<String, Vec<(i64, ModelPrice)>>,
}

impl PriceTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `model`'s price from the day `from` (`YYYY-MM-DD`, UTC) on.
    pub fn add(&mut self, model: &str, from: &str, price: ModelPrice) -> Result<&mut Self> {
        let t = parse_time(from)?;
        self.add_at(model, t, price);
        Ok(self)
    }

    /// Adds `model`'s price from Unix second `t` on.
    pub fn add_at(&mut self, model: &str, t: i64, price: ModelPrice) {
        let v = self.models.entry(model.to_string()).or_default();
        match v.binary_search_by_key(&t, |e| e.0) {
            Ok(i) => v[i].1 = price,
            Err(i) => v.insert(i, (t, price)),
        }
    }

    /// Whether the table has no price.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The price of `model` at Unix second `t` (the latest entry not after `t`).
    pub fn price_at(&self, model: &str, t: i64) -> Option<&ModelPrice> {
        let v = self.models.get(model)?;
        let i = v.partition_point(|e| e.0 <= t);
        (i > 0).then(|| &v[i - 1].1)
    }

    /// The cost of `usage` for `model` at Unix second `t`; `None` when the table has no price
    /// for it then.
    pub fn cost(&self, model: &str, t: i64, usage: &TokenUsage) -> Option<Micros> {
        self.price_at(model, t).map(|p| p.cost(usage))
    }

    /// The table from entries (checked: prices finite and not negative, dates valid).
    pub fn from_entries(entries: &[PriceEntry]) -> Result<Self> {
        let mut t = Self::new();
        for e in entries {
            let what = |f: &str| format!("{}.{f} (from {})", e.model, e.from);
            let mut p = ModelPrice::per_mtok(e.input, e.output).map_err(|err| match err {
                Error::Price { reason, .. } => Error::Price {
                    what: what("input/output"),
                    reason,
                },
                other => other,
            })?;
            if let Some(x) = e.cache_read {
                p.cache_read = pico(&what("cache_read"), x)?;
            }
            if let Some(x) = e.cache_write {
                p.cache_write = pico(&what("cache_write"), x)?;
            }
            t.add(&e.model, &e.from, p)?;
        }
        Ok(t)
    }

    /// The table as entries (dollars per million tokens).
    pub fn entries(&self) -> Vec<PriceEntry> {
        let mut out = Vec::new();
        for (m, v) in &self.models {
            for (t, p) in v {
                let (i, r, w, o) = p.per_mtok_usd();
                out.push(PriceEntry {
                    model: m.clone(),
                    from: format_day(t.div_euclid(86_400)),
                    input: i,
                    output: o,
                    cache_read: (r != i).then_some(r),
                    cache_write: (w != i).then_some(w),
                });
            }
        }
        out
    }

    /// Reads a JSON array of [`PriceEntry`].
    pub fn from_json(text: &str) -> Result<Self> {
        let entries: Vec<PriceEntry> = serde_json::from_str(text).map_err(|e| Error::Price {
            what: "table".into(),
            reason: format!(
                "expected a JSON array of {{\"model\", \"from\": \"YYYY-MM-DD\", \"input\", \
                 \"output\", \"cache_read\"?, \"cache_write\"?}} in dollars per million tokens: {e}"
            ),
        })?;
        Self::from_entries(&entries)
    }

    /// Reads a JSON price table file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let p = path.as_ref();
        let text = std::fs::read_to_string(p).map_err(|e| Error::Price {
            what: p.display().to_string(),
            reason: format!("cannot read the price table: {e}"),
        })?;
        Self::from_json(&text)
    }
}

/// How a metered (non-LLM) endpoint charges.
#[derive(Clone, Debug, PartialEq)]
pub enum MeterPrice {
    /// The same price for every call, micro-dollars.
    PerCall(Micros),
    /// A price per unit (page, minute of audio, credit…), pico-dollars per unit.
    PerUnit {
        /// The unit's name, for reports.
        unit: String,
        /// Pico-dollars per unit.
        pico_per_unit: i64,
    },
    /// The price is read from each response ([`crate::tune::Charge::usd`]).
    FromResponse,
}

impl MeterPrice {
    /// A per-call price in dollars (finite, not negative).
    pub fn per_call_usd(usd: f64) -> Result<Self> {
        check_usd("per-call price", usd)?;
        Ok(Self::PerCall(usd_to_micros(usd)))
    }

    /// A price per `unit` in dollars (finite, not negative).
    pub fn per_unit_usd(unit: &str, usd: f64) -> Result<Self> {
        check_usd("per-unit price", usd)?;
        Ok(Self::PerUnit {
            unit: unit.to_string(),
            pico_per_unit: (usd * 1e12).round() as i64,
        })
    }
}

pub(crate) fn check_usd(what: &str, usd: f64) -> Result<()> {
    if (0.0..1e9).contains(&usd) {
        Ok(())
    } else {
        Err(Error::Price {
            what: what.into(),
            reason: format!("dollars must be finite, not negative and below 1e9, got {usd}"),
        })
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` of a day number (days since 1970-01-01).
pub fn format_day(day: i64) -> String {
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Unix seconds of `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM[:SS]` (UTC), or of a plain integer.
///
/// # Examples
/// ```
/// assert_eq!(hyperfunc::tune::parse_time("1970-01-02").unwrap(), 86_400);
/// assert_eq!(hyperfunc::tune::parse_time("2024-02-29T12:00").unwrap(), 1_709_208_000);
/// assert!(hyperfunc::tune::parse_time("2024-02-30").is_err());
/// ```
pub fn parse_time(s: &str) -> Result<i64> {
    let bad = |why: &str| Error::Price {
        what: format!("time `{s}`"),
        reason: format!("{why}; write YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] (UTC) or Unix seconds"),
    };
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let (date, time) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t.trim_end_matches('Z'))),
        None => (s, None),
    };
    let parts: Vec<&str> = date.split('-').collect();
    let [y, m, d] = parts[..] else {
        return Err(bad("not a date"));
    };
    let num = |x: &str| x.parse::<i64>().map_err(|_| bad("not a number"));
    let (y, m, d) = (num(y)?, num(m)?, num(d)?);
    if !(1..=12).contains(&m) || d < 1 {
        return Err(bad("month or day out of range"));
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let dim = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if d > dim[(m - 1) as usize] {
        return Err(bad("no such day in that month"));
    }
    let mut t = days_from_civil(y, m, d) * 86_400;
    if let Some(time) = time {
        let hms: Vec<&str> = time.split(':').collect();
        if hms.len() < 2 || hms.len() > 3 {
            return Err(bad("time must be HH:MM or HH:MM:SS"));
        }
        let h = num(hms[0])?;
        let mi = num(hms[1])?;
        let sec = if hms.len() == 3 { num(hms[2])? } else { 0 };
        if !(0..24).contains(&h) || !(0..60).contains(&mi) || !(0..61).contains(&sec) {
            return Err(bad("time out of range"));
        }
        t += h * 3600 + mi * 60 + sec;
    }
    Ok(t)
}

/// The start of a period: a span back from now (`30d`, `12h`, `2w`), else a date, a time or
/// Unix seconds ([`parse_time`]).
///
/// # Examples
/// ```
/// use hyperfunc::tune::{parse_since, parse_time};
/// assert_eq!(parse_since("2026-11-01").unwrap(), parse_time("2026-11-01").unwrap());
/// assert!(parse_since("30d").unwrap() > parse_time("2020-01-01").unwrap());
/// assert!(parse_since("last week").is_err());
/// ```
pub fn parse_since(s: &str) -> Result<i64> {
    match parse_span(s) {
        Ok(span) => Ok(crate::util::now_s() as i64 - span),
        Err(_) => parse_time(s),
    }
}

/// Seconds in a span like `30d`, `12h`, `90m`, `45s` or `2w`.
///
/// # Examples
/// ```
/// assert_eq!(hyperfunc::tune::parse_span("30d").unwrap(), 30 * 86_400);
/// assert!(hyperfunc::tune::parse_span("30 days").is_err());
/// ```
pub fn parse_span(s: &str) -> Result<i64> {
    let t = s.trim();
    let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" | "" => 86_400,
        "w" => 7 * 86_400,
        _ => 0,
    };
    match n.parse::<i64>() {
        Ok(n) if mult > 0 => Ok(n * mult),
        _ => Err(Error::Price {
            what: format!("span `{s}`"),
            reason: "write a whole number and a unit: 45s, 90m, 12h, 30d, 2w".into(),
        }),
    }
}
