//! Agents: systems that run for several steps per example.
//!
//! Three kinds of system, all optimised by the same engine:
//!
//! - **FLOW** (the default): one input → one output per example. Any [`HyperSystem`] is a flow
//!   system; [`Flow`] names the kind explicitly.
//! - **GAME**: an example is an [`Episode`] (seed, `max_steps`, environment config). [`Game`]
//!   resets one [`Environment`] per candidate × episode with the episode's seed, loops
//!   `policy.run(observation) → action` until every episode has terminated, been truncated by
//!   the environment, or run out of steps, and returns one [`EpisodeResult`] per candidate ×
//!   episode for the metric ([`mean_reward`], [`episode_metric`]).
//! - **CHAT**: an example is a [`Conversation`]. [`Chat`] loops
//!   `system.run({message, history, memory_context}) → reply` until the system says it is done
//!   or the turns run out, optionally retrieving context from and storing each turn in a
//!   [`Memory`](crate::memory::Memory); the metric sees a [`ChatResult`] per candidate ×
//!   conversation ([`chat_metric`]).
//!
//! **Populations.** The runners step all candidates × examples of a chunk in lockstep: at each
//! step the policy (or chat system) runs once for the whole chunk, so a tensor policy is one
//! batched forward per step for all candidates and an async one fans out over the cells still
//! running. Cells that have finished make no more async calls. Because episodes end at different
//! times, the control-flow check compares which functions the loop calls, not how often.
//!
//! # Examples
//! ```
//! use hyperfunc::agents::{episodes, mean_reward, Game, GridWorld};
//! use hyperfunc::prelude::*;
//!
//! // Observation → 16 tanh units → 4 action scores (an MLP hyperfunction named `policy`).
//! let game = Game::new(GridWorld::mlp_policy(16), |_| Ok(GridWorld::new(5)));
//! let train = episodes(0..8, 20)?;
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! let report = Es::default().pop_size(16).generations(2).seed(1).maximize()
//!     .optimize(&game, &train, &mean_reward()).await?;
//! assert_eq!(report.history.len(), 2);
//! # Ok::<(), hyperfunc::Error>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod chat;
mod game;
mod gridworld;

pub use chat::{chat_metric, Chat, ChatMemory, ChatResult, ChatTurn, Conversation, Reply};
pub use game::{
    episode_metric, episodes, mean_reward, success_rate, Action, ActionSpace, Environment, Episode,
    EpisodeResult, Game, Step,
};
pub use gridworld::GridWorld;

use crate::{Cx, HyperFn, HyperSystem, Result, Value};

/// A FLOW system, named: one input → one output per example. Any [`HyperSystem`] already is one;
/// wrapping it changes nothing but says so.
///
/// # Examples
/// ```
/// use hyperfunc::agents::Flow;
/// use hyperfunc::prelude::*;
/// let flow = Flow(Chain::new(vec![HyperFn::linear("out", 2, 1, Activation::Sigmoid)]));
/// assert_eq!(flow.hyperfunctions().len(), 1);
/// ```
#[derive(Clone, Debug)]
pub struct Flow<S>(pub S);

impl<S: HyperSystem> HyperSystem for Flow<S> {
    fn hyperfunctions(&self) -> Vec<HyperFn> {
        self.0.hyperfunctions()
    }

    async fn run(&self, cx: &Cx, input: Value) -> Result<Value> {
        self.0.run(cx, input).await
    }
}

/// The outputs of `sys` under one θ on `examples` (one JSON item per example), for serving an
/// agent outside optimisation.
async fn outputs<S: HyperSystem>(
    sys: &S,
    theta: &crate::Theta,
    examples: &crate::Examples,
) -> Result<Vec<crate::Json>> {
    struct Keep(std::sync::Mutex<Option<Value>>);
    impl crate::Metric for Keep {
        fn score(&self, preds: &Value, _: &Value, pop: usize) -> Result<Vec<f32>> {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(preds.clone());
            Ok(vec![0.0; pop])
        }
    }
    let keep = Keep(std::sync::Mutex::new(None));
    let pop = crate::Population::center(theta.clone());
    let out = crate::evaluate_population(sys, &pop, examples, &keep, usize::MAX).await?;
    if let Some(e) = out.first_error {
        return Err(e);
    }
    let preds = keep.0.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok(preds
        .map(|v| v.as_json().map(<[crate::Json]>::to_vec))
        .transpose()?
        .unwrap_or_default())
}
