//! Regret of the tuner's policies in simulated 5-arm problems, for the bench.
//!
//! Every simulated call goes through a real in-memory [`Tuner`], change test included, with
//! scripted Bernoulli rewards; regret is the best true mean minus the chosen choice's true mean,
//! summed over the calls and averaged over seeds.

use serde::{Deserialize, Serialize};

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::{ChangeDetection, Policy, Tuner};
use crate::error::{Error, Result};

/// Regret per policy in each scenario.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegretReport {
    /// Calls per run.
    pub calls: usize,
    /// Runs (seeds) averaged.
    pub seeds: usize,
    /// The scenarios.
    pub scenarios: Vec<ScenarioRegret>,
}

/// One scenario.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScenarioRegret {
    /// `close` (five close arms, nothing changes) or `changing` (the best arm drops to the
    /// worst at half time).
    pub scenario: String,
    /// The arms' success probabilities at the start.
    pub means: Vec<f64>,
    /// One entry per policy.
    pub policies: Vec<PolicyRegret>,
}

/// One policy's regret.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyRegret {
    /// `thompson`, `thompson_no_change_detection`, `epsilon_greedy(0.1)`, `ucb1`.
    pub policy: String,
    /// Cumulative regret, mean over seeds.
    pub mean_regret: f64,
    /// Its standard error over seeds.
    pub stderr: f64,
}

const NAMES: [&str; 5] = ["arm0", "arm1", "arm2", "arm3", "arm4"];

/// Runs the close-arms and changing-arm scenarios with `calls` calls, averaged over `seeds`
/// seeds: Thompson (the default) against ε-greedy (0.1) and UCB1 on close arms, and Thompson
/// with and without the change test in both scenarios.
pub fn regret_simulation(calls: usize, seeds: usize) -> Result<RegretReport> {
    if calls == 0 || seeds == 0 {
        return Err(Error::TuneConfig {
            label: "regret_simulation".into(),
            reason: "calls and seeds must be at least 1".into(),
        });
    }
    let close = [0.50, 0.53, 0.56, 0.59, 0.62];
    let changing = [0.80, 0.60, 0.50, 0.40, 0.30];
    let half = calls / 2;
    let close_means = |_: usize| close;
    let changing_means = |t: usize| {
        let mut m = changing;
        if t >= half {
            m[0] = 0.20;
        }
        m
    };
    let runs: [(&str, Policy, bool); 4] = [
        ("thompson", Policy::Thompson, true),
        ("thompson_no_change_detection", Policy::Thompson, false),
        ("epsilon_greedy(0.1)", Policy::EpsilonGreedy(0.1), true),
        ("ucb1", Policy::Ucb1, true),
    ];
    let mut scenarios = Vec::new();
    for (scenario, means, which) in [
        ("close", close, &runs[..]),
        ("changing", changing, &runs[..2]),
    ] {
        let mut policies = Vec::new();
        for (name, policy, detect) in which {
            let mut regrets = Vec::with_capacity(seeds);
            for seed in 0..seeds as u64 {
                let regret = if scenario == "close" {
                    run_one(policy, *detect, calls, seed, close_means)?
                } else {
                    run_one(policy, *detect, calls, seed, changing_means)?
                };
                regrets.push(regret);
            }
            let n = regrets.len() as f64;
            let mean = regrets.iter().sum::<f64>() / n;
            let var = if regrets.len() > 1 {
                regrets.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)
            } else {
                0.0
            };
            policies.push(PolicyRegret {
                policy: name.to_string(),
                mean_regret: mean,
                stderr: (var / n).sqrt(),
            });
        }
        scenarios.push(ScenarioRegret {
            scenario: scenario.into(),
            means: means.to_vec(),
            policies,
        });
    }
    Ok(RegretReport {
        calls,
        seeds,
        scenarios,
    })
}

fn run_one(
    policy: &Policy,
    detect: bool,
    calls: usize,
    seed: u64,
    means: impl Fn(usize) -> [f64; 5],
) -> Result<f64> {
    let tuner = Tuner::in_memory()?
        .seed(seed)
        .policy(policy.clone())
        .probability_draws(0)
        .batch_size(4096)
        .change_detection(detect.then(ChangeDetection::default));
    let mut env = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x5EED_CAFE);
    let mut regret = 0.0;
    futures::executor::block_on(async {
        for t in 0..calls {
            let m = means(t);
            let (i, outcome) = tuner
                .tune("regret")
                .choices(NAMES)
                .run(|c| async move { Ok::<_, Error>(c.index()) })
                .await?;
            let best = m.iter().copied().fold(f64::MIN, f64::max);
            regret += best - m[i];
            let r = if env.random::<f64>() < m[i] { 1.0 } else { 0.0 };
            outcome.reward(r)?;
        }
        Ok::<_, Error>(())
    })?;
    Ok(regret)
}
