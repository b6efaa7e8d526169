//! Sufficient statistics of one choice and the per-choice change test.
//!
//! Counts are kept as sums so that two processes can add to them with atomic SQL increments and a
//! change reset is a snapshot (`snap = total`), never a read-modify-write: the statistics a policy
//! uses are `total − snap`. Nothing here knows about SQL or policies.

/// Sums over the rewards of one choice.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct RewardSums {
    /// Number of rewards (fractional for a shrunk prior).
    pub n: f64,
    /// Σ r.
    pub sum: f64,
    /// Σ r².
    pub sq: f64,
    /// Number of rewards outside {0, 1}: any makes an `Auto` label continuous.
    pub nonbinary: f64,
}

impl RewardSums {
    pub(crate) fn one(r: f64) -> Self {
        Self {
            n: 1.0,
            sum: r,
            sq: r * r,
            nonbinary: if r == 0.0 || r == 1.0 { 0.0 } else { 1.0 },
        }
    }

    pub(crate) fn add(&mut self, o: &RewardSums) {
        self.n += o.n;
        self.sum += o.sum;
        self.sq += o.sq;
        self.nonbinary += o.nonbinary;
    }

    pub(crate) fn minus(&self, o: &RewardSums) -> RewardSums {
        RewardSums {
            n: (self.n - o.n).max(0.0),
            sum: self.sum - o.sum,
            sq: (self.sq - o.sq).max(0.0),
            nonbinary: (self.nonbinary - o.nonbinary).max(0.0),
        }
    }

    pub(crate) fn scaled(&self, k: f64) -> RewardSums {
        RewardSums {
            n: self.n * k,
            sum: self.sum * k,
            sq: self.sq * k,
            nonbinary: self.nonbinary * k,
        }
    }

    /// The mean reward, `None` without rewards.
    pub(crate) fn mean(&self) -> Option<f64> {
        (self.n > 0.0).then(|| self.sum / self.n)
    }

    /// The sample variance (n − 1 denominator), `None` below two rewards.
    pub(crate) fn variance(&self) -> Option<f64> {
        if self.n < 2.0 {
            return None;
        }
        let m = self.sum / self.n;
        Some(((self.sq - self.n * m * m) / (self.n - 1.0)).max(0.0))
    }
}

/// Lifetime counters of one choice; never reset.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Life {
    pub calls: u64,
    pub errors: u64,
    pub cost_n: u64,
    pub cost_sum: f64,
    pub resets: u64,
}

impl Life {
    pub(crate) fn add(&mut self, o: &Life) {
        self.calls += o.calls;
        self.errors += o.errors;
        self.cost_n += o.cost_n;
        self.cost_sum += o.cost_sum;
        self.resets += o.resets;
    }

    /// Mean cost per call that reported one (0 when none did).
    pub(crate) fn mean_cost(&self) -> f64 {
        if self.cost_n == 0 {
            0.0
        } else {
            self.cost_sum / self.cost_n as f64
        }
    }
}

/// What the store holds for one (label, context, choice).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct ArmStats {
    pub life: Life,
    /// Every reward ever.
    pub total: RewardSums,
    /// `total` at the last change reset.
    pub snap: RewardSums,
}

impl ArmStats {
    /// The rewards since the last change reset: what the policy learns from.
    pub(crate) fn current(&self) -> RewardSums {
        self.total.minus(&self.snap)
    }

    /// Applies a pending delta in the order it happened.
    pub(crate) fn apply(&mut self, p: &Pending) {
        self.life.add(&p.life);
        self.total.add(&p.pre);
        if p.reset {
            self.snap = self.total;
        }
        self.total.add(&p.post);
    }
}

/// Changes not yet written to the store: rewards before a reset, the reset, rewards after it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Pending {
    pub life: Life,
    pub pre: RewardSums,
    pub reset: bool,
    pub post: RewardSums,
}

impl Pending {
    pub(crate) fn is_empty(&self) -> bool {
        *self == Pending::default()
    }

    /// One reward.
    pub(crate) fn of_reward(r: f64) -> Pending {
        Pending {
            pre: RewardSums::one(r),
            ..Pending::default()
        }
    }

    /// A change reset of the choice's reward statistics.
    pub(crate) fn of_reset() -> Pending {
        Pending {
            reset: true,
            life: Life {
                resets: 1,
                ..Life::default()
            },
            ..Pending::default()
        }
    }

    /// Lifetime counters only.
    pub(crate) fn of_life(life: Life) -> Pending {
        Pending {
            life,
            ..Pending::default()
        }
    }

    /// Appends `later` (which happened after `self`), keeping the order around resets.
    pub(crate) fn then(&mut self, later: &Pending) {
        self.life.add(&later.life);
        if later.reset {
            let post = std::mem::take(&mut self.post);
            self.pre.add(&post);
            self.pre.add(&later.pre);
            self.post = later.post;
            self.reset = true;
        } else if self.reset {
            self.post.add(&later.pre);
            self.post.add(&later.post);
        } else {
            self.pre.add(&later.pre);
            self.pre.add(&later.post);
        }
    }
}

/// Settings of the per-choice change test (two-sided Page–Hinkley on the choice's own rewards).
///
/// A choice's statistics are reset when its rewards drift from their running mean by more than
/// `threshold` (cumulated, in reward units) beyond a per-reward tolerance `delta`. Only that
/// choice is reset; nothing decays.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChangeDetection {
    /// Tolerated drift per reward, in reward units (default 0.05).
    pub delta: f64,
    /// Cumulated drift that signals a change, in reward units (default 25).
    pub threshold: f64,
    /// Rewards a choice needs since its last reset before a change can be signalled (default 30).
    pub min_rewards: u64,
}

impl Default for ChangeDetection {
    fn default() -> Self {
        Self {
            delta: 0.05,
            threshold: 25.0,
            min_rewards: 30,
        }
    }
}

/// Page–Hinkley state of one choice in this process (not persisted: a restart starts the test
/// afresh, which can only delay a detection).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PageHinkley {
    n: u64,
    mean: f64,
    up: f64,
    up_min: f64,
    down: f64,
    down_max: f64,
}

impl PageHinkley {
    /// Feeds one reward; true when a change is detected (the state then starts over).
    pub(crate) fn update(&mut self, x: f64, cfg: &ChangeDetection) -> bool {
        self.n += 1;
        self.mean += (x - self.mean) / self.n as f64;
        self.up += x - self.mean - cfg.delta;
        self.up_min = self.up_min.min(self.up);
        self.down += x - self.mean + cfg.delta;
        self.down_max = self.down_max.max(self.down);
        let fired = self.n >= cfg.min_rewards
            && (self.up - self.up_min > cfg.threshold || self.down_max - self.down > cfg.threshold);
        if fired {
            *self = PageHinkley::default();
        }
        fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_snapshot_keeps_later_rewards() {
        let mut s = ArmStats::default();
        let mut p = Pending::of_reward(1.0);
        p.then(&Pending::of_reward(1.0));
        p.then(&Pending::of_reset());
        p.then(&Pending::of_reward(0.0));
        s.apply(&p);
        assert_eq!(s.total.n, 3.0);
        assert_eq!(s.current().n, 1.0);
        assert_eq!(s.current().sum, 0.0);
        assert_eq!(s.life.resets, 1);
    }

    #[test]
    fn merged_pendings_equal_applying_them_in_order() {
        let steps = [
            Pending::of_reward(1.0),
            Pending::of_reset(),
            Pending::of_reward(0.5),
            Pending::of_reward(0.0),
            Pending::of_reset(),
            Pending::of_reward(1.0),
        ];
        for split in 0..=steps.len() {
            let mut one_by_one = ArmStats::default();
            for p in &steps {
                one_by_one.apply(p);
            }
            let (a, b) = steps.split_at(split);
            let (mut pa, mut pb) = (Pending::default(), Pending::default());
            a.iter().for_each(|p| pa.then(p));
            b.iter().for_each(|p| pb.then(p));
            // Two batches written one after the other, and two batches merged after a failure.
            let mut two = ArmStats::default();
            two.apply(&pa);
            two.apply(&pb);
            pa.then(&pb);
            let mut merged = ArmStats::default();
            merged.apply(&pa);
            assert_eq!(one_by_one, two, "split {split}");
            assert_eq!(one_by_one, merged, "split {split}");
        }
    }

    #[test]
    fn page_hinkley_fires_on_a_drop_only() {
        let cfg = ChangeDetection::default();
        let mut ph = PageHinkley::default();
        for i in 0..500 {
            assert!(!ph.update(if i % 5 == 0 { 0.0 } else { 1.0 }, &cfg));
        }
        let fired = (0..200).position(|_| ph.update(0.0, &cfg));
        assert!(matches!(fired, Some(k) if k < 60), "{fired:?}");
    }
}
