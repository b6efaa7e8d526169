//! Tuned races: the policy picks which models race, and learns which one wins.

use std::time::Duration;

use super::{clip, Outcome, TuneCall};
use crate::error::{Error, Result};
use crate::llm::{ChatRequest, ChatResponse, Entrant, LlmClient, RaceEntry};
use crate::util::now_s;

/// How a tuned race runs ([`TuneCall::race`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RaceOptions {
    /// How many of the choices race (the policy's top k; default 2).
    pub top_k: usize,
    /// Launch the next choice only after this long without a valid answer (or at once when
    /// every launched one has ended without one); `None` launches all k at once.
    pub hedge: Option<Duration>,
}

impl Default for RaceOptions {
    fn default() -> Self {
        Self {
            top_k: 2,
            hedge: None,
        }
    }
}

impl RaceOptions {
    /// The top `k` choices race at once.
    pub fn top_k(k: usize) -> Self {
        Self {
            top_k: k,
            hedge: None,
        }
    }

    /// Launches each next choice after `delay` without a valid answer.
    pub fn hedge(mut self, delay: Duration) -> Self {
        self.hedge = Some(delay);
        self
    }
}

/// The result of a tuned race.
#[derive(Clone, Debug)]
pub struct TunedRace {
    /// The winning model.
    pub winner: String,
    /// Its answer.
    pub response: ChatResponse,
    /// The top-k entrants in launch order (never-launched ones included).
    pub entrants: Vec<Entrant>,
    /// One tuned call per launched entrant (reward 1 for the winner, 0 for the others; cost
    /// recorded), in the order of `entrants`.
    pub outcomes: Vec<Outcome>,
}

impl TuneCall {
    /// Races the policy's top-k choices (model names) on `request`: the first answer that
    /// `valid` accepts wins and the others are cancelled. Every launched entrant is recorded
    /// as a call of this label — reward 1 for the winner and 0 for the rest, its latency, and
    /// its cost in dollars (an estimate for a cancelled one) — so the policy learns which
    /// model wins, and `tune report` shows each model's win rate and cost.
    ///
    /// # Examples
    /// ```no_run
    /// use hyperfunc::llm::{ChatRequest, LlmClient, LlmConfig};
    /// use hyperfunc::tune::{RaceOptions, Tuner};
    ///
    /// # async fn go() -> hyperfunc::Result<()> {
    /// let client = LlmClient::new(LlmConfig::from_env().unwrap()).unwrap();
    /// let tuner = Tuner::open("tune.sqlite")?;
    /// let race = tuner
    ///     .tune("answer")
    ///     .choices(["gpt-4o-mini", "claude-haiku", "llama-3.1-8b"])
    ///     .race(
    ///         &client,
    ///         ChatRequest::new("").user("What is 2 + 2?"),
    ///         RaceOptions::top_k(2).hedge(std::time::Duration::from_millis(400)),
    ///         |r| r.text.contains('4'),
    ///     )
    ///     .await?;
    /// println!("{} won", race.winner);
    /// # Ok(()) }
    /// ```
    pub async fn race(
        self,
        client: &LlmClient,
        request: ChatRequest,
        options: RaceOptions,
        valid: impl Fn(&ChatResponse) -> bool,
    ) -> Result<TunedRace> {
        if options.top_k == 0 {
            return Err(Error::TuneConfig {
                label: self.label.to_string(),
                reason: "a race needs top_k ≥ 1".into(),
            });
        }
        let decisions = self.decide_k(options.top_k)?;
        let models: Vec<String> = decisions
            .iter()
            .map(|d| d.choice.name().to_string())
            .collect();
        let started_at = now_s();
        let (result, entrants) = client
            .race_hedged(&models, request, &self.label, &valid, options.hedge)
            .await;
        let mut outcomes = Vec::new();
        for (d, e) in decisions.into_iter().zip(&entrants) {
            let Some(latency) = e.latency_s else {
                continue;
            };
            let error = match &e.entry {
                RaceEntry::Won { .. } => None,
                RaceEntry::Invalid { .. } => Some("invalid answer".to_string()),
                RaceEntry::Failed { error } => Some(clip(error)),
                RaceEntry::Cancelled => Some("cancelled: another entrant won".to_string()),
                RaceEntry::NotLaunched => continue,
            };
            let won = error.is_none();
            let outcome = self.record(d, started_at, latency, error);
            if won {
                outcome.reward(1.0)?;
            }
            outcome.cost(e.cost_usd)?;
            outcomes.push(outcome);
        }
        match result {
            Ok((winner, response)) => Ok(TunedRace {
                winner,
                response,
                entrants,
                outcomes,
            }),
            Err(e) => Err(Error::Io {
                function: self.label.to_string(),
                message: e.to_string(),
                retryable: e.is_retryable(),
            }),
        }
    }
}
