//! The autotune bench: on a suite of shape keys, quick mode's choice against an exhaustive
//! interleaved sweep of every setting (is it within 5% of the best, in at most 10% of the
//! time?), two quick runs against each other (within 2%?), and the cost of a cache hit.
//!
//! The sweep's best comes from its own timings (the quick runs' choices are added to it); each
//! quick choice is then re-timed head to head against that best, interleaved, because the
//! best of many noisy medians is biased upwards by having been picked.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::tensor::{self, MlpProbe, Options, Probe};
use super::{Mode, Store, SystemProfile};
use crate::error::Result;

/// One shape key of the suite: an MLP probe.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KeySpec {
    /// Layer sizes.
    pub sizes: Vec<usize>,
    /// Population.
    pub pop: usize,
    /// Examples.
    pub rows: usize,
    /// Low-rank noise of this rank (`None`: dense).
    pub rank: Option<usize>,
}

/// The suite: 8 keys (the benchmark MLPs at several populations, dense and low-rank of
/// ranks 1, 4 and 8); `quick` keeps 2 small ones for a smoke run.
pub fn suite(quick: bool) -> Vec<KeySpec> {
    let k = |sizes: &[usize], pop, rows, rank| KeySpec {
        sizes: sizes.to_vec(),
        pop,
        rows,
        rank,
    };
    if quick {
        return vec![k(&[8, 8, 2], 16, 16, None), k(&[8, 8, 2], 16, 16, Some(2))];
    }
    vec![
        k(&[16, 16, 4], 64, 64, None),
        k(&[16, 16, 4], 256, 64, None),
        k(&[64, 64, 10], 64, 64, None),
        k(&[64, 64, 10], 256, 64, None),
        k(&[64, 64, 10], 1024, 32, None),
        k(&[64, 64, 10], 256, 64, Some(1)),
        k(&[64, 64, 10], 256, 64, Some(4)),
        k(&[128, 64, 10], 256, 32, Some(8)),
    ]
}

/// One key's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct KeyResult {
    /// The shape key.
    pub key: String,
    /// The command that tunes it.
    pub command: String,
    /// Quick mode's choice, then a second quick run's (another seed).
    pub quick_choice: String,
    /// The second quick run's choice.
    pub quick_again_choice: String,
    /// Seconds of the first quick run.
    pub quick_s: f64,
    /// Seconds of the exhaustive sweep.
    pub exhaustive_s: f64,
    /// Settings the sweep timed.
    pub exhaustive_settings: usize,
    /// The sweep's best setting.
    pub best: String,
    /// Its median evaluations per second.
    pub best_evals_per_sec: f64,
    /// The quick choice's speed, % of the sweep's best, re-timed head to head against it
    /// (above 100 when the two are equal within noise and quick's came out ahead).
    pub quick_pct_of_best: f64,
    /// The two quick choices' speeds, timed head to head against each other: their gap, % of
    /// the larger (0 when both runs chose the same setting).
    pub repeat_gap_pct: f64,
    /// Quick seconds / exhaustive seconds.
    pub time_ratio: f64,
}

/// The whole bench.
#[derive(Clone, Debug, Serialize)]
pub struct AutotuneBench {
    /// The machine.
    pub machine: SystemProfile,
    /// Per key.
    pub keys: Vec<KeyResult>,
    /// Keys whose quick choice is within 5% of the sweep's best.
    pub within_5pct: usize,
    /// Keys whose two quick choices are within 2% of each other.
    pub repeat_within_2pct: usize,
    /// Median over keys of quick seconds / exhaustive seconds.
    pub median_time_ratio: f64,
    /// A cache hit (`Store::lookup` of a saved record), median µs.
    pub cache_hit_us: f64,
}

/// Runs the bench on `specs`: per key two quick runs (seeds 1 and 2, `min_sample` each
/// timing) and an exhaustive sweep of `rounds` rounds.
pub fn run(specs: &[KeySpec], min_sample: Duration, rounds: usize) -> Result<AutotuneBench> {
    let mut keys = Vec::new();
    let mut cache_hit_us = f64::NAN;
    for spec in specs {
        let probe = MlpProbe::new(&spec.sizes, spec.pop, spec.rows, spec.rank)?;
        let mut opts = Options::new(Mode::Quick);
        opts.min_sample = min_sample;
        let t = Instant::now();
        let first = tensor::tune(&probe, &opts)?;
        let quick_s = t.elapsed().as_secs_f64();
        opts.seed = 2;
        let again = tensor::tune(&probe, &opts)?;
        opts.seed = 3;
        let t = Instant::now();
        let sweep = tensor::exhaustive(&probe, &opts, rounds, &[first.settings, again.settings])?;
        let exhaustive_s = t.elapsed().as_secs_f64();
        let (best, best_rate) = sweep[0];
        // The first choice against the sweep's winner, re-timed head to head: the winner's sweep
        // samples were picked as the best of many noisy medians, which biases them upwards
        // (by several percent on a noisy machine), so they are not compared directly.
        let n = (2 * rounds).max(6);
        let a = tensor::head_to_head(&probe, first.settings, best, n, min_sample, 4)?;
        // The two choices against each other, directly: each re-timed against the best
        // instead, their gap would carry the noise of two comparisons.
        let repeat =
            tensor::head_to_head(&probe, first.settings, again.settings, n, min_sample, 5)?;
        if cache_hit_us.is_nan() {
            cache_hit_us = time_cache_hit(&first, &probe.key())?;
        }
        keys.push(KeyResult {
            key: first.key.clone(),
            command: probe.command(),
            quick_choice: first.settings.to_string(),
            quick_again_choice: again.settings.to_string(),
            quick_s,
            exhaustive_s,
            exhaustive_settings: sweep.len(),
            best: best.to_string(),
            best_evals_per_sec: best_rate,
            quick_pct_of_best: 100.0 * a,
            repeat_gap_pct: 100.0 * (repeat - 1.0).abs() / repeat.max(1.0),
            time_ratio: quick_s / exhaustive_s.max(1e-9),
        });
    }
    let mut ratios: Vec<f64> = keys.iter().map(|k| k.time_ratio).collect();
    ratios.sort_by(f64::total_cmp);
    Ok(AutotuneBench {
        machine: SystemProfile::detect(),
        within_5pct: keys.iter().filter(|k| k.quick_pct_of_best >= 95.0).count(),
        repeat_within_2pct: keys.iter().filter(|k| k.repeat_gap_pct <= 2.0).count(),
        median_time_ratio: crate::util::median(&ratios),
        cache_hit_us,
        keys,
    })
}

/// Median µs of the lookup `optimize` makes, of `record` saved in a fresh temporary store.
fn time_cache_hit(record: &super::Record, key: &super::tensor::ShapeKey) -> Result<f64> {
    let dir = std::env::temp_dir().join(format!(
        "hyperfunc-autotune-bench-{}-{}",
        std::process::id(),
        crate::util::now_s() as u64
    ));
    let store = Store::at(&dir);
    store.save(record, true)?;
    let mut times = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        let hit = store.lookup(key, &record.fingerprint);
        times.push(t.elapsed().as_secs_f64() * 1e6);
        if hit.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(crate::Error::config(
                "autotune bench",
                "a record just saved was not found again",
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(crate::util::median(&times))
}

/// A Markdown table of the bench.
pub fn render(b: &AutotuneBench) -> String {
    let mut s = format!(
        "# Autotune bench ({} keys)\n\nquick within 5% of the exhaustive best: {}/{}; two quick runs within 2%: {}/{}; \
         median time quick/exhaustive {:.1}%; cache hit {:.1} µs\n\n\
         | key | quick choice | % of best | repeat gap | quick s | exhaustive s (settings) | best |\n\
         |---|---|---:|---:|---:|---:|---|\n",
        b.keys.len(),
        b.within_5pct,
        b.keys.len(),
        b.repeat_within_2pct,
        b.keys.len(),
        100.0 * b.median_time_ratio,
        b.cache_hit_us
    );
    for k in &b.keys {
        s.push_str(&format!(
            "| `{}` | {} | {:.1}% | {:.1}% | {:.1} | {:.1} ({}) | {} |\n",
            k.command,
            k.quick_choice,
            k.quick_pct_of_best,
            k.repeat_gap_pct,
            k.quick_s,
            k.exhaustive_s,
            k.exhaustive_settings,
            k.best
        ));
    }
    s
}
