//! GAME: an MLP policy learns by ES to walk to the goal of a GridWorld. Training episodes and the
//! held-out ones have different seeds, hence different start and goal cells. Prints one JSON line
//! with the success rate and mean steps on the held-out episodes before and after training.

use hyperfunc::agents::{episode_metric, episodes, mean_reward, success_rate, Game, GridWorld};
use hyperfunc::prelude::*;

const SIZE: usize = 5;
const MAX_STEPS: usize = 4 * SIZE;

/// Success rate and mean steps of `theta` on `held_out`.
async fn score(
    game: &Game<Chain, impl Fn(&hyperfunc::agents::Episode) -> Result<GridWorld> + Send + Sync>,
    theta: &Theta,
    held_out: &Examples,
) -> anyhow::Result<(f32, f32)> {
    let success = evaluate(game, theta, held_out, &success_rate()).await?;
    let steps = evaluate(game, theta, held_out, &episode_metric(|r| r.steps as f32)).await?;
    Ok((success, steps))
}

/// Trains the policy and returns the demo's JSON summary.
pub async fn run() -> anyhow::Result<serde_json::Value> {
    // Observation (goal offset + four blocked flags) → 16 tanh units → 4 action scores (argmax).
    let policy = GridWorld::mlp_policy(16);
    let game = Game::new(policy, |_| Ok(GridWorld::new(SIZE)));
    let train = episodes(0..64, MAX_STEPS)?;
    let held_out = episodes(10_000..10_200, MAX_STEPS)?;

    let es = Es::default()
        .pop_size(64)
        .sigma(0.1)
        .lr(0.05)
        .generations(150)
        .seed(7)
        .maximize();
    let before = score(&game, &es.start(&game)?.theta().clone(), &held_out).await?;
    let report = es.optimize(&game, &train, &mean_reward()).await?;
    let after = score(&game, &report.theta, &held_out).await?;

    Ok(serde_json::json!({
        "demo": "gridworld",
        "grid": SIZE,
        "generations": report.history.len(),
        "seconds": report.seconds,
        "held_out_episodes": held_out.len(),
        "success_before": before.0,
        "success_after": after.0,
        "mean_steps_before": before.1,
        "mean_steps_after": after.1,
        "train_reward": report.final_fitness,
    }))
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("{}", run().await?);
    Ok(())
}
