//! Joint optimisation: prompt-learning rounds alternating with ES generations, one budget.

use std::time::Instant;

use serde::Serialize;

use super::learn::{score_theta, PromptOptimizer, PromptReport};
use crate::data::Examples;
use crate::error::{Error, Result};
use crate::es::Es;
use crate::eval::{Scorer, ScorerMetric};
use crate::llm::LlmClient;
use crate::observe::Hub;
use crate::population::evaluate_population_observed;
use crate::system::HyperSystem;
use crate::theta::Theta;

/// Why a joint run stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JointStop {
    /// All rounds ran.
    Rounds,
    /// The ES generation budget is spent.
    Generations,
    /// The LLM request budget is spent.
    LlmCalls,
    /// The dollar budget is spent.
    Cost,
}

/// One ES generation of a joint run.
#[derive(Clone, Debug, Serialize)]
pub struct JointGeneration {
    /// Generation index over the whole run.
    pub generation: usize,
    /// Best candidate's mean score.
    pub best: f32,
    /// Mean over finite candidates.
    pub mean: f32,
    /// Candidates that failed.
    pub failed: usize,
}

/// One round: a prompt-learning phase, then ES generations.
#[derive(Clone, Debug, Serialize)]
pub struct JointRound {
    /// Round index.
    pub round: usize,
    /// The prompt phase (None when the budget ran out before it).
    pub prompts: Option<PromptReport>,
    /// The ES generations of the round.
    pub generations: Vec<JointGeneration>,
    /// Score of the mean θ on all examples after the round.
    pub score: f32,
}

/// What [`JointOptimizer::optimize`] returns.
#[derive(Clone, Debug, Serialize)]
pub struct JointReport {
    /// θ: ES's mean with the accepted prompts.
    #[serde(skip)]
    pub theta: Theta,
    /// Score of the starting θ on all examples.
    pub initial_score: f32,
    /// Score of the returned θ on all examples.
    pub final_score: f32,
    /// Every round.
    pub rounds: Vec<JointRound>,
    /// ES generations run.
    pub generations: usize,
    /// HTTP requests the tracked clients sent during the run.
    pub llm_calls: u64,
    /// Dollars the tracked clients spent during the run.
    pub cost_usd: f64,
    /// Why it stopped.
    pub stop: JointStop,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl JointReport {
    /// Prompt rewrites accepted over the run.
    pub fn accepted_prompts(&self) -> usize {
        self.rounds
            .iter()
            .filter_map(|r| r.prompts.as_ref())
            .map(|p| {
                p.history
                    .iter()
                    .filter(|c| c.accepted && c.iteration > 0)
                    .count()
            })
            .sum()
    }

    /// A markdown summary: one line per round with both halves.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "joint optimisation: {:.3} → {:.3} ({} generations, {} LLM requests, ${:.4}, stop: {:?})\n\n\
             | round | prompt phase | ES best per generation | score |\n|---|---|---|---|\n",
            self.initial_score, self.final_score, self.generations, self.llm_calls, self.cost_usd, self.stop
        );
        for r in &self.rounds {
            let p = r.prompts.as_ref().map_or("—".to_string(), |p| {
                format!(
                    "{:.3} → {:.3}, {} tried, {} kept",
                    p.initial_score,
                    p.final_score,
                    p.history.iter().filter(|c| c.iteration > 0).count(),
                    p.history
                        .iter()
                        .filter(|c| c.accepted && c.iteration > 0)
                        .count()
                )
            });
            let g: Vec<String> = r
                .generations
                .iter()
                .map(|g| format!("{:.3}", g.best))
                .collect();
            s.push_str(&format!(
                "| {} | {} | {} | {:.3} |\n",
                r.round,
                p,
                g.join(" "),
                r.score
            ));
        }
        s
    }
}

/// Alternates prompt learning with ES on the numeric θ (LLM sampling knobs, weights), under one
/// budget: rounds, ES generations, LLM requests and dollars — whichever ends first. The ES
/// half maximises the scorer's mean; its optimizer state (Adam moments) carries across rounds.
///
/// # Examples
/// ```no_run
/// use hyperfunc::prelude::*;
/// use hyperfunc::eval::ExactMatch;
/// use hyperfunc::llm::{LlmClient, LlmConfig};
/// use hyperfunc::prompt::{JointOptimizer, PromptLearningOptimizer, Signature};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let client = LlmClient::new(LlmConfig::from_env()?)?;
/// let sig = Signature::new("Answer.").input("question", "").output("answer", "");
/// let sys = Chain::new(vec![HyperFn::predict("qa", &client, "gpt-4o-mini", sig)?]);
/// let data = Examples::json(
///     vec![serde_json::json!({"question": "2+2?"}), serde_json::json!({"question": "3+3?"})],
///     vec![serde_json::json!("4"), serde_json::json!("6")],
/// )?;
/// let report = JointOptimizer::new(
///         Es::default().pop_size(8).progress(false),
///         PromptLearningOptimizer::new(&client, "gpt-4o-mini"))
///     .rounds(3).generations_per_round(2).max_llm_calls(500).track(&client)
///     .optimize(&sys, &data, &ExactMatch::new()).await?;
/// println!("{}", report.to_markdown());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct JointOptimizer<P> {
    es: Es,
    prompts: P,
    rounds: usize,
    per_round: usize,
    max_generations: Option<usize>,
    max_llm_calls: Option<u64>,
    max_cost_usd: Option<f64>,
    clients: Vec<LlmClient>,
    hub: Option<Hub>,
}

impl<P: PromptOptimizer> JointOptimizer<P> {
    /// A joint run of `es` (its population, σ, learning rate, seed; its `generations` is
    /// ignored in favour of the rounds) and the prompt optimizer `prompts`. Defaults: 3 rounds
    /// of 5 generations.
    pub fn new(es: Es, prompts: P) -> Self {
        Self {
            es,
            prompts,
            rounds: 3,
            per_round: 5,
            max_generations: None,
            max_llm_calls: None,
            max_cost_usd: None,
            clients: Vec::new(),
            hub: None,
        }
    }

    /// Rounds of (prompt phase, ES phase).
    pub fn rounds(mut self, n: usize) -> Self {
        self.rounds = n;
        self
    }

    /// ES generations after each prompt phase.
    pub fn generations_per_round(mut self, n: usize) -> Self {
        self.per_round = n;
        self
    }

    /// Stops after this many ES generations in all.
    pub fn max_generations(mut self, n: usize) -> Self {
        self.max_generations = Some(n);
        self
    }

    /// Stops once the tracked clients have sent this many HTTP requests during the run.
    pub fn max_llm_calls(mut self, n: u64) -> Self {
        self.max_llm_calls = Some(n);
        self
    }

    /// Stops once the tracked clients have spent this many dollars during the run.
    pub fn max_cost_usd(mut self, usd: f64) -> Self {
        self.max_cost_usd = Some(usd);
        self
    }

    /// Counts `client`'s requests and cost against the budget (add every client the system
    /// and the meta-prompt model use).
    pub fn track(mut self, client: &LlmClient) -> Self {
        self.clients.push(client.clone());
        self
    }

    /// Records the ES evaluations into `hub`.
    pub fn hub(mut self, hub: Hub) -> Self {
        self.hub = Some(hub);
        self
    }

    fn usage(&self) -> (u64, f64) {
        self.clients.iter().fold((0, 0.0), |(n, c), cl| {
            let t = cl.stats().total;
            (n + t.requests, c + t.cost_usd)
        })
    }

    fn spent(&self, base: (u64, f64), generations: usize) -> Option<JointStop> {
        let (n, c) = self.usage();
        if self.max_llm_calls.is_some_and(|m| n - base.0 >= m) {
            return Some(JointStop::LlmCalls);
        }
        if self.max_cost_usd.is_some_and(|m| c - base.1 >= m) {
            return Some(JointStop::Cost);
        }
        if self.max_generations.is_some_and(|m| generations >= m) {
            return Some(JointStop::Generations);
        }
        None
    }

    /// Runs the rounds on `examples`, scoring with `scorer`.
    pub async fn optimize<S: HyperSystem>(
        &self,
        sys: &S,
        examples: &Examples,
        scorer: &dyn Scorer,
    ) -> Result<JointReport> {
        if self.rounds == 0 {
            return Err(Error::config("rounds", "must be at least 1"));
        }
        let start = Instant::now();
        let base = self.usage();
        let es = self.es.clone().maximize();
        let mut run = es.start(sys)?;
        let hub = self.hub.clone().unwrap_or_default();
        let metric = ScorerMetric::new(scorer);
        let initial = score_theta(sys, run.theta(), examples, scorer, None)
            .await?
            .score;
        let (mut rounds, mut generations, mut stop) = (Vec::new(), 0, JointStop::Rounds);
        'run: for round in 0..self.rounds {
            let mut this = JointRound {
                round,
                prompts: None,
                generations: Vec::new(),
                score: f32::NAN,
            };
            if let Some(s) = self.spent(base, generations) {
                stop = s;
                break;
            }
            let theta = run.theta().clone();
            let report = self
                .prompts
                .optimize_prompts(sys, &theta, examples, scorer)
                .await?;
            for (f, text) in report.theta.prompts() {
                if theta.prompt(f) != Some(text) {
                    run.set_prompt(f, text);
                }
            }
            this.prompts = Some(report);
            for _ in 0..self.per_round {
                if let Some(s) = self.spent(base, generations) {
                    stop = s;
                    this.score = score_theta(sys, run.theta(), examples, scorer, None)
                        .await?
                        .score;
                    rounds.push(this);
                    break 'run;
                }
                let pop = run.ask()?;
                let ev =
                    evaluate_population_observed(sys, &pop, examples, &metric, usize::MAX, &hub)
                        .await?;
                let finite: Vec<f32> = ev
                    .fitness
                    .iter()
                    .copied()
                    .filter(|f| f.is_finite())
                    .collect();
                run.tell(&ev.fitness)?;
                this.generations.push(JointGeneration {
                    generation: generations,
                    best: finite.iter().copied().fold(f32::NAN, f32::max),
                    mean: finite.iter().sum::<f32>() / finite.len().max(1) as f32,
                    failed: ev.failed,
                });
                generations += 1;
            }
            this.score = score_theta(sys, run.theta(), examples, scorer, None)
                .await?
                .score;
            rounds.push(this);
        }
        let theta = run.theta().clone();
        let final_score = score_theta(sys, &theta, examples, scorer, None)
            .await?
            .score;
        let (n, c) = self.usage();
        Ok(JointReport {
            theta,
            initial_score: initial,
            final_score,
            rounds,
            generations,
            llm_calls: n - base.0,
            cost_usd: c - base.1,
            stop,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}
