//! Policies that pick a choice, and the probability of each decision.
//!
//! The math only: a policy sees each eligible choice's reward sums (own rewards since the last
//! change reset plus the context prior) and its mean cost, and returns a choice and the
//! probability the policy had of making that decision. It knows nothing of the store.

use rand::Rng;
use rand_distr::{Beta, Distribution, StudentT};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};

use super::stats::RewardSums;

/// How a tuned call picks among its choices.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Policy {
    /// Thompson sampling (the default): a Beta(1, 1) posterior for rewards in {0, 1}, a
    /// Normal–Gamma posterior (Student-t for the mean) for continuous rewards.
    #[default]
    Thompson,
    /// UCB1: the mean plus `sqrt(2 ln N / n)`; deterministic.
    Ucb1,
    /// ε-greedy: a uniformly random choice with probability ε, the best mean otherwise.
    EpsilonGreedy(f64),
    /// Always this choice (A/B freeze); its decision probability is 1.
    Fixed(String),
}

impl Policy {
    /// A short name for records (`thompson`, `ucb1`, `epsilon_greedy(0.1)`, `fixed`).
    pub fn name(&self) -> String {
        self.short_name().into_owned()
    }

    /// [`Policy::name`] without an allocation for the policies without a parameter.
    pub(crate) fn short_name(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Policy::Thompson => "thompson".into(),
            Policy::Ucb1 => "ucb1".into(),
            Policy::EpsilonGreedy(e) => format!("epsilon_greedy({e})").into(),
            Policy::Fixed(_) => "fixed".into(),
        }
    }
}

/// What a choice is worth, in absolute units: cost is never rescaled over the candidate set, so
/// adding a choice that never wins cannot change the winner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Objective {
    /// The mean reward alone (the default).
    #[default]
    Quality,
    /// The mean reward minus `lambda_per_usd` × the mean cost in dollars.
    QualityMinusCost {
        /// Reward units given up per dollar.
        lambda_per_usd: f64,
    },
    /// The best mean reward among choices whose mean cost is at most `max_mean_usd`; when none
    /// qualifies, the cheapest.
    BestQualityWithCostCap {
        /// The largest acceptable mean cost per call, in dollars.
        max_mean_usd: f64,
    },
}

impl Objective {
    pub(crate) fn penalty(&self, mean_cost: f64) -> f64 {
        match self {
            Objective::QualityMinusCost { lambda_per_usd } => lambda_per_usd * mean_cost,
            _ => 0.0,
        }
    }
}

/// The reward model of Thompson sampling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RewardKind {
    /// Binary while every reward seen for the label and context is 0 or 1, continuous after.
    #[default]
    Auto,
    /// Success/failure rewards in [0, 1]: a Beta posterior.
    Binary,
    /// Real-valued rewards: a Normal–Gamma posterior (rewards on roughly a unit scale).
    Continuous,
}

/// A policy's view of one eligible choice.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ArmView {
    pub post: RewardSums,
    pub mean_cost: f64,
}

/// The prior scale of the Normal–Gamma model (α₀ = 1, β₀ = 0.25: a reward sd of about 0.5).
const NG_ALPHA0: f64 = 1.0;
const NG_BETA0: f64 = 0.25;

/// Positions of the arms a cost cap allows (the cheapest when none fits).
pub(crate) fn eligible(objective: &Objective, arms: &[ArmView]) -> Vec<usize> {
    if let Objective::BestQualityWithCostCap { max_mean_usd } = objective {
        let ok: Vec<usize> = (0..arms.len())
            .filter(|&i| arms[i].mean_cost <= *max_mean_usd)
            .collect();
        if !ok.is_empty() {
            return ok;
        }
        let min = arms
            .iter()
            .map(|a| a.mean_cost)
            .fold(f64::INFINITY, f64::min);
        return (0..arms.len())
            .filter(|&i| arms[i].mean_cost <= min)
            .collect();
    }
    (0..arms.len()).collect()
}

/// One arm's Thompson posterior, ready to draw from.
enum Sampler {
    Beta(Beta<f64>),
    StudentT {
        m: f64,
        scale: f64,
        t: StudentT<f64>,
    },
    Fixed(f64),
}

impl Sampler {
    fn new(post: &RewardSums, binary: bool) -> Sampler {
        if binary {
            let a = (1.0 + post.sum).max(1e-3);
            let b = (1.0 + post.n - post.sum).max(1e-3);
            match Beta::new(a, b) {
                Ok(d) => Sampler::Beta(d),
                Err(_) => Sampler::Fixed(a / (a + b)),
            }
        } else {
            let n = post.n.max(1e-9);
            let m = post.sum / n;
            let alpha = NG_ALPHA0 + n / 2.0;
            let beta = NG_BETA0 + 0.5 * (post.sq - n * m * m).max(0.0);
            let scale = (beta / (alpha * n)).sqrt();
            match StudentT::new(2.0 * alpha) {
                Ok(t) => Sampler::StudentT { m, scale, t },
                Err(_) => Sampler::Fixed(m),
            }
        }
    }

    fn sample(&self, rng: &mut Xoshiro256PlusPlus) -> f64 {
        match self {
            Sampler::Beta(d) => d.sample(rng),
            Sampler::StudentT { m, scale, t } => m + scale * t.sample(rng),
            Sampler::Fixed(v) => *v,
        }
    }
}

fn thompson_sample(post: &RewardSums, binary: bool, rng: &mut Xoshiro256PlusPlus) -> f64 {
    Sampler::new(post, binary).sample(rng)
}

fn argmax(scores: impl Iterator<Item = (usize, f64)>) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, s) in scores {
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

/// The choice with the best posterior mean under the objective (no exploration), among arms
/// with at least one reward.
pub(crate) fn greedy(objective: &Objective, arms: &[ArmView]) -> Option<usize> {
    let ok = eligible(objective, arms);
    argmax(ok.iter().filter_map(|&i| {
        let a = &arms[i];
        a.post
            .mean()
            .map(|m| (i, m - objective.penalty(a.mean_cost)))
    }))
}

/// A decision's probability: known at once, or (Thompson) estimated later from a snapshot of
/// the posteriors, off the call's path.
#[derive(Clone, Debug)]
pub(crate) enum Prob {
    /// Known (or not estimated at all).
    Known(Option<f64>),
    /// Estimated by [`Deferred::estimate`] when the call's row is written or asked for.
    Later(std::sync::Arc<Deferred>),
}

impl Prob {
    /// The probability, estimating it now when it was deferred.
    pub(crate) fn value(&self) -> Option<f64> {
        match self {
            Prob::Known(p) => *p,
            Prob::Later(d) => Some(d.estimate()),
        }
    }
}

/// What a Thompson decision's probability is estimated from: the posteriors at decision time.
#[derive(Clone, Debug)]
pub(crate) struct Deferred {
    arms: Vec<ArmView>,
    /// The eligible positions; `None` when every arm is.
    ok: Option<Vec<usize>>,
    binary: bool,
    objective: Objective,
    pick: usize,
    draws: usize,
    seed: u64,
}

impl Deferred {
    /// `(wins + 1) / (draws + 1)` over `draws` fresh Thompson draws (the decision itself counts
    /// as one), from its own seeded generator: the same decision always gets the same estimate.
    pub(crate) fn estimate(&self) -> f64 {
        use rand::SeedableRng;
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(self.seed);
        // The posteriors are fixed: build each arm's sampler once (the draws are the same as
        // building it for every draw).
        let all: Vec<usize>;
        let ok = match &self.ok {
            Some(ok) => ok.as_slice(),
            None => {
                all = (0..self.arms.len()).collect();
                &all
            }
        };
        let samplers: Vec<(usize, Sampler, f64)> = ok
            .iter()
            .map(|&i| {
                let a = &self.arms[i];
                (
                    i,
                    Sampler::new(&a.post, self.binary),
                    self.objective.penalty(a.mean_cost),
                )
            })
            .collect();
        let wins = (0..self.draws)
            .filter(|_| {
                argmax(
                    samplers
                        .iter()
                        .map(|(i, s, pen)| (*i, s.sample(&mut rng) - pen)),
                )
                .unwrap_or(ok[0])
                    == self.pick
            })
            .count();
        (wins + 1) as f64 / (self.draws + 1) as f64
    }
}

fn thompson_pick(
    arms: &[ArmView],
    ok: &[usize],
    binary: bool,
    objective: &Objective,
    rng: &mut Xoshiro256PlusPlus,
) -> usize {
    argmax(ok.iter().map(|&i| {
        let a = &arms[i];
        (
            i,
            thompson_sample(&a.post, binary, rng) - objective.penalty(a.mean_cost),
        )
    }))
    .unwrap_or(ok[0])
}

/// [`select`] for the hot path: a Thompson decision takes one draw, and its probability is
/// deferred ([`Prob::Later`]) instead of `draws` more draws now. Takes the views, which the
/// deferred estimate keeps.
pub(crate) fn select_deferred(
    policy: &Policy,
    objective: &Objective,
    binary: bool,
    arms: Vec<ArmView>,
    draws: usize,
    rng: &mut Xoshiro256PlusPlus,
) -> (usize, Prob) {
    if !matches!(policy, Policy::Thompson) || draws == 0 {
        let (pick, p) = select(policy, objective, binary, &arms, draws, rng);
        return (pick, Prob::Known(p));
    }
    let (pick, ok) = if matches!(objective, Objective::BestQualityWithCostCap { .. }) {
        let (pick, p) = select(policy, objective, binary, &arms, 0, rng);
        if p.is_some() {
            return (pick, Prob::Known(p));
        }
        (pick, Some(eligible(objective, &arms)))
    } else {
        // Every arm is eligible: `select` with zero draws, without its allocations (the same
        // random numbers, so the same decision).
        let untried = arms.iter().filter(|a| a.post.n <= 0.0).count();
        if untried > 0 {
            let k = rng.random_range(0..untried);
            let pick = arms
                .iter()
                .enumerate()
                .filter(|(_, a)| a.post.n <= 0.0)
                .nth(k)
                .map_or(0, |(i, _)| i);
            return (pick, Prob::Known(Some(1.0 / untried as f64)));
        }
        let pick = argmax(arms.iter().enumerate().map(|(i, a)| {
            (
                i,
                thompson_sample(&a.post, binary, rng) - objective.penalty(a.mean_cost),
            )
        }))
        .unwrap_or(0);
        (pick, None)
    };
    let seed = rng.random::<u64>();
    (
        pick,
        Prob::Later(std::sync::Arc::new(Deferred {
            arms,
            ok,
            binary,
            objective: *objective,
            pick,
            draws,
            seed,
        })),
    )
}

/// Picks a position in `arms` and its decision probability (`None` when Thompson's Monte-Carlo
/// estimate is switched off with zero draws).
pub(crate) fn select(
    policy: &Policy,
    objective: &Objective,
    binary: bool,
    arms: &[ArmView],
    draws: usize,
    rng: &mut Xoshiro256PlusPlus,
) -> (usize, Option<f64>) {
    let ok = eligible(objective, arms);
    // Every policy tries each untried choice once before it compares.
    let untried: Vec<usize> = ok
        .iter()
        .copied()
        .filter(|&i| arms[i].post.n <= 0.0)
        .collect();
    if !untried.is_empty() {
        let pick = untried[rng.random_range(0..untried.len())];
        return (pick, Some(1.0 / untried.len() as f64));
    }
    let k = ok.len();
    match policy {
        Policy::Thompson | Policy::Fixed(_) => {
            let draw =
                |rng: &mut Xoshiro256PlusPlus| thompson_pick(arms, &ok, binary, objective, rng);
            let pick = draw(rng);
            if draws == 0 {
                return (pick, None);
            }
            // The decision is itself one draw from the same distribution, so counting it gives
            // an estimate from draws + 1 samples that is never 0 for the choice made.
            let wins = (0..draws).filter(|_| draw(rng) == pick).count();
            (pick, Some((wins + 1) as f64 / (draws + 1) as f64))
        }
        Policy::Ucb1 => {
            let total: f64 = ok.iter().map(|&i| arms[i].post.n).sum();
            let ln = total.max(1.0).ln();
            let pick = argmax(ok.iter().map(|&i| {
                let a = &arms[i];
                let m = a.post.sum / a.post.n;
                (
                    i,
                    m + (2.0 * ln / a.post.n).sqrt() - objective.penalty(a.mean_cost),
                )
            }))
            .unwrap_or(ok[0]);
            (pick, Some(1.0))
        }
        Policy::EpsilonGreedy(eps) => {
            let best = greedy(objective, arms).unwrap_or(ok[0]);
            let pick = if rng.random::<f64>() < *eps {
                ok[rng.random_range(0..k)]
            } else {
                best
            };
            let p = eps / k as f64 + if pick == best { 1.0 - eps } else { 0.0 };
            (pick, Some(p))
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn arm(n: f64, mean: f64, cost: f64) -> ArmView {
        ArmView {
            post: RewardSums {
                n,
                sum: n * mean,
                sq: n * mean * mean,
                nonbinary: 0.0,
            },
            mean_cost: cost,
        }
    }

    #[test]
    fn epsilon_greedy_probability_is_exact() {
        let arms = [
            arm(10.0, 0.2, 0.0),
            arm(10.0, 0.8, 0.0),
            arm(10.0, 0.5, 0.0),
        ];
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
        let p = Policy::EpsilonGreedy(0.3);
        let mut seen = [0usize; 3];
        for _ in 0..30_000 {
            let (i, prob) = select(&p, &Objective::Quality, true, &arms, 0, &mut rng);
            seen[i] += 1;
            let expect = if i == 1 { 0.7 + 0.1 } else { 0.1 };
            assert!((prob.unwrap_or(0.0) - expect).abs() < 1e-12);
        }
        assert!((seen[1] as f64 / 30_000.0 - 0.8).abs() < 0.02, "{seen:?}");
    }

    #[test]
    fn cost_cap_falls_back_to_the_cheapest() {
        let arms = [arm(5.0, 0.9, 0.5), arm(5.0, 0.5, 0.1), arm(5.0, 0.7, 0.2)];
        let cap = |c| Objective::BestQualityWithCostCap { max_mean_usd: c };
        assert_eq!(eligible(&cap(0.3), &arms), [1, 2]);
        assert_eq!(greedy(&cap(0.3), &arms), Some(2));
        assert_eq!(eligible(&cap(0.01), &arms), [1]);
        let lambda = Objective::QualityMinusCost {
            lambda_per_usd: 2.0,
        };
        // 0.9 − 1.0, 0.5 − 0.2, 0.7 − 0.4
        assert_eq!(greedy(&lambda, &arms), Some(1));
    }

    #[test]
    fn untried_choices_come_first() {
        let arms = [arm(50.0, 0.9, 0.0), arm(0.0, 0.0, 0.0)];
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(2);
        for p in [Policy::Thompson, Policy::Ucb1, Policy::EpsilonGreedy(0.0)] {
            assert_eq!(
                select(&p, &Objective::Quality, true, &arms, 10, &mut rng),
                (1, Some(1.0))
            );
        }
    }
}
