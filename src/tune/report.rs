//! What the tuner learned, per label and context, for the terminal and as JSON.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::policy::{greedy, ArmView, Objective};
use super::store::{Row, Synced};

/// Every label and context of a store, with each choice's statistics.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TuneReport {
    /// One entry per (label, context), sorted.
    pub groups: Vec<GroupReport>,
}

/// One label in one context.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupReport {
    /// The tune label.
    pub label: String,
    /// The context label (empty when none was given).
    pub context: String,
    /// The choice with the best mean reward under the tuner's objective (`None` before any
    /// reward).
    pub winner: Option<String>,
    /// The choices, sorted by name.
    pub choices: Vec<ChoiceReport>,
}

/// One choice's statistics.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChoiceReport {
    /// The choice.
    pub choice: String,
    /// Calls made with it, ever.
    pub calls: u64,
    /// Calls whose closure returned an error, ever.
    pub errors: u64,
    /// Share of calls without error (`None` before any call).
    pub success_rate: Option<f64>,
    /// Rewards since the last change reset (failed calls count as reward 0).
    pub rewards: f64,
    /// Their mean.
    pub mean_reward: Option<f64>,
    /// A 95% interval of the mean reward: Wilson's for rewards in {0, 1}, the normal
    /// approximation otherwise (`None` below two rewards).
    pub ci95: Option<(f64, f64)>,
    /// Dollars reported, ever.
    pub total_cost_usd: f64,
    /// Mean dollars per call that reported a cost.
    pub mean_cost_usd: Option<f64>,
    /// How often the change test reset this choice.
    pub resets: u64,
}

/// One recorded call.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallRecord {
    /// The call id.
    pub id: u64,
    /// The tune label.
    pub label: String,
    /// The context label.
    pub context: String,
    /// The choice used.
    pub choice: String,
    /// The policy that decided (`thompson`, `ucb1`, `epsilon_greedy(ε)`, `fixed`).
    pub policy: String,
    /// The probability the policy had of this decision.
    pub probability: Option<f64>,
    /// `file:line` of the `tune(` call.
    pub caller: String,
    /// Unix time the call started, seconds.
    pub started_at: f64,
    /// Seconds the closure ran.
    pub latency_s: f64,
    /// The error message when the closure failed.
    pub error: Option<String>,
    /// The reward reported.
    pub reward: Option<f64>,
    /// The cost reported, dollars.
    pub cost: Option<f64>,
}

impl From<Row> for CallRecord {
    fn from(r: Row) -> Self {
        CallRecord {
            id: r.id,
            label: r.label.to_string(),
            context: r.context.to_string(),
            choice: r.choice.to_string(),
            policy: r.policy.into_owned(),
            probability: r.probability.value(),
            caller: r.caller.to_string(),
            started_at: r.started_at,
            latency_s: r.latency_s,
            error: r.error,
            reward: r.reward,
            cost: r.cost,
        }
    }
}

pub(crate) fn build(rows: Synced, objective: Objective) -> TuneReport {
    let mut groups: Vec<GroupReport> = Vec::new();
    let mut views: Vec<Vec<ArmView>> = Vec::new();
    for (label, context, choice, s) in rows {
        if groups
            .last()
            .is_none_or(|g| g.label != label || g.context != context)
        {
            groups.push(GroupReport {
                label,
                context,
                winner: None,
                choices: Vec::new(),
            });
            views.push(Vec::new());
        }
        let cur = s.current();
        let life = s.life;
        let ci95 = cur.variance().map(|var| {
            let (n, m) = (cur.n, cur.sum / cur.n);
            if cur.nonbinary <= 0.0 {
                let z2 = 1.96f64 * 1.96;
                let centre = (m + z2 / (2.0 * n)) / (1.0 + z2 / n);
                let half = 1.96 * (m * (1.0 - m) / n + z2 / (4.0 * n * n)).max(0.0).sqrt()
                    / (1.0 + z2 / n);
                (centre - half, centre + half)
            } else {
                let half = 1.96 * (var / n).sqrt();
                (m - half, m + half)
            }
        });
        if let (Some(g), Some(v)) = (groups.last_mut(), views.last_mut()) {
            g.choices.push(ChoiceReport {
                choice,
                calls: life.calls,
                errors: life.errors,
                success_rate: (life.calls > 0)
                    .then(|| (life.calls - life.errors.min(life.calls)) as f64 / life.calls as f64),
                rewards: cur.n,
                mean_reward: cur.mean(),
                ci95,
                total_cost_usd: life.cost_sum,
                mean_cost_usd: (life.cost_n > 0).then(|| life.mean_cost()),
                resets: life.resets,
            });
            v.push(ArmView {
                post: cur,
                mean_cost: life.mean_cost(),
            });
        }
    }
    for (g, v) in groups.iter_mut().zip(&views) {
        g.winner = greedy(&objective, v).map(|i| g.choices[i].choice.clone());
    }
    TuneReport { groups }
}

impl TuneReport {
    /// The statistics of one choice of a label in a context.
    pub fn choice(&self, label: &str, context: &str, choice: &str) -> Option<&ChoiceReport> {
        self.group(label, context)?
            .choices
            .iter()
            .find(|c| c.choice == choice)
    }

    /// One label in one context.
    pub fn group(&self, label: &str, context: &str) -> Option<&GroupReport> {
        self.groups
            .iter()
            .find(|g| g.label == label && g.context == context)
    }

    /// A plain-text table per label and context, for the terminal.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        if self.groups.is_empty() {
            out.push_str("no tuned calls recorded\n");
        }
        for g in &self.groups {
            let ctx = if g.context.is_empty() {
                String::new()
            } else {
                format!(" [{}]", g.context)
            };
            let _ = writeln!(
                out,
                "{}{ctx}: winner {}",
                g.label,
                g.winner.as_deref().unwrap_or("-")
            );
            let _ = writeln!(
                out,
                "  {:<24} {:>8} {:>8} {:>8} {:>19} {:>10} {:>10} {:>6}",
                "choice",
                "calls",
                "success",
                "reward",
                "95% interval",
                "cost $",
                "mean $",
                "resets"
            );
            for c in &g.choices {
                let opt = |x: Option<f64>, d: usize| {
                    x.map_or_else(|| "-".to_string(), |v| format!("{v:.d$}"))
                };
                let ci = c
                    .ci95
                    .map_or_else(|| "-".into(), |(a, b)| format!("[{a:.3}, {b:.3}]"));
                let _ = writeln!(
                    out,
                    "  {:<24} {:>8} {:>8} {:>8} {:>19} {:>10.4} {:>10} {:>6}",
                    c.choice,
                    c.calls,
                    opt(c.success_rate, 3),
                    opt(c.mean_reward, 3),
                    ci,
                    c.total_cost_usd,
                    opt(c.mean_cost_usd, 6),
                    c.resets
                );
            }
        }
        out
    }
}
