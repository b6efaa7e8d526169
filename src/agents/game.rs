//! GAME: episodes in an environment, stepped for all candidates at once.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::{Data, Value};
use crate::error::{Error, Result, TensorContext};
use crate::metric::JsonMetric;
use crate::{Cx, Examples, HyperFn, HyperSystem, Json};

/// The actions an environment accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionSpace {
    /// One of `n` actions. A tensor policy outputs `n` scores per cell (the runner takes the
    /// argmax) or one number (rounded and clamped); a JSON policy outputs an integer.
    Discrete(usize),
    /// A vector of `d` numbers; a tensor policy outputs `d` values per cell, a JSON policy an
    /// array of `d` numbers.
    Continuous(usize),
}

/// One action.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// The index of a discrete action.
    Discrete(usize),
    /// A continuous action.
    Continuous(Vec<f32>),
}

/// What [`Environment::step`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The observation after the action.
    pub observation: Vec<f32>,
    /// The reward for the action.
    pub reward: f32,
    /// The episode reached a terminal state (goal, failure).
    pub terminated: bool,
    /// The environment cut the episode short (its own time limit).
    pub truncated: bool,
}

/// An environment, Gymnasium style: `reset(seed)` then `step(action)` until terminated or
/// truncated. One instance serves one episode of one candidate at a time.
pub trait Environment: Send {
    /// Length of every observation vector.
    fn observation_size(&self) -> usize;

    /// The actions [`Environment::step`] accepts.
    fn action_space(&self) -> ActionSpace;

    /// Starts an episode; the same seed gives the same episode (seed 0 is a seed like any other).
    fn reset(&mut self, seed: u64) -> Result<Vec<f32>>;

    /// Applies an action.
    fn step(&mut self, action: &Action) -> Result<Step>;

    /// Anything the metric should see about the final state (`null` by default).
    fn info(&self) -> Json {
        Json::Null
    }
}

/// One GAME example: which episode to play.
///
/// # Examples
/// ```
/// use hyperfunc::agents::Episode;
/// let e = Episode::new(0).max_steps(50);
/// assert_eq!((e.seed, e.max_steps), (0, 50));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    /// The seed the environment is reset with.
    pub seed: u64,
    /// Steps after which the runner truncates the episode.
    pub max_steps: usize,
    /// Configuration for the environment factory (`null` by default).
    #[serde(default)]
    pub config: Json,
}

impl Episode {
    /// An episode with `seed`, at most 100 steps and no config.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            max_steps: 100,
            config: Json::Null,
        }
    }

    /// Sets the step limit.
    pub fn max_steps(mut self, n: usize) -> Self {
        self.max_steps = n;
        self
    }

    /// Sets the environment config the factory receives.
    pub fn config(mut self, config: Json) -> Self {
        self.config = config;
        self
    }
}

/// GAME examples: one [`Episode`] per seed, each at most `max_steps` long (targets are `null`).
///
/// # Examples
/// ```
/// let train = hyperfunc::agents::episodes(0..16, 40)?;
/// assert_eq!(train.len(), 16);
/// # Ok::<(), hyperfunc::Error>(())
/// ```
pub fn episodes(seeds: impl IntoIterator<Item = u64>, max_steps: usize) -> Result<Examples> {
    let inputs: Vec<Json> = seeds
        .into_iter()
        .map(|s| serde_json::to_value(Episode::new(s).max_steps(max_steps)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::config("episodes", e.to_string()))?;
    let targets = vec![Json::Null; inputs.len()];
    Examples::json(inputs, targets)
}

/// What the metric sees of one episode of one candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpisodeResult {
    /// Sum of the rewards.
    pub total_reward: f32,
    /// Steps taken.
    pub steps: usize,
    /// The episode ended: terminated or truncated.
    pub done: bool,
    /// It reached a terminal state.
    pub terminated: bool,
    /// It was cut short: by the environment or by `max_steps`.
    pub truncated: bool,
    /// The episode's seed.
    pub seed: u64,
    /// [`Environment::info`] at the end.
    pub info: Json,
}

/// A GAME system: runs `policy` in one environment per candidate × episode.
///
/// The policy gets the observations of the chunk's cells as one value — a per-candidate tensor
/// `[P, N, observation_size]`, or with [`Game::json_observations`] a grid of JSON arrays — and
/// returns one action per cell. Environments come from `make_env(&episode)`.
pub struct Game<S, F> {
    policy: S,
    make_env: F,
    json_obs: bool,
}

impl<S, F, E> Game<S, F>
where
    S: HyperSystem,
    F: Fn(&Episode) -> Result<E> + Send + Sync,
    E: Environment,
{
    /// A game of `policy` in environments made by `make_env`.
    pub fn new(policy: S, make_env: F) -> Self {
        Self {
            policy,
            make_env,
            json_obs: false,
        }
    }

    /// Gives the policy observations as JSON arrays (for async policies, e.g. an LLM) instead of
    /// a tensor.
    pub fn json_observations(mut self) -> Self {
        self.json_obs = true;
        self
    }

    /// The policy.
    pub fn policy(&self) -> &S {
        &self.policy
    }

    /// Plays one episode under `theta` and returns its result.
    pub async fn play(&self, theta: &crate::Theta, episode: Episode) -> Result<EpisodeResult> {
        let input = serde_json::to_value(episode).map_err(|e| game_err(e.to_string()))?;
        let examples = Examples::json(vec![input], vec![Json::Null])?;
        let out = super::outputs(self, theta, &examples).await?;
        let first = out
            .first()
            .ok_or_else(|| game_err("the episode produced no result"))?;
        EpisodeResult::deserialize(first).map_err(|e| game_err(e.to_string()))
    }
}

struct Cell<E> {
    env: E,
    obs: Vec<f32>,
    reward: f32,
    steps: usize,
    terminated: bool,
    truncated: bool,
}

impl<E> Cell<E> {
    fn done(&self) -> bool {
        self.terminated || self.truncated
    }
}

impl<S, F, E> HyperSystem for Game<S, F>
where
    S: HyperSystem,
    F: Fn(&Episode) -> Result<E> + Send + Sync,
    E: Environment,
{
    fn hyperfunctions(&self) -> Vec<HyperFn> {
        self.policy.hyperfunctions()
    }

    async fn run(&self, cx: &Cx, input: Value) -> Result<Value> {
        let eps: Vec<Episode> = input
            .as_json()
            .map_err(|_| game_err("examples must be JSON episodes (see agents::episodes)"))?
            .iter()
            .enumerate()
            .map(|(i, j)| {
                serde_json::from_value(j.clone()).map_err(|e| {
                    game_err(format!(
                        "example {} is not an episode ({e}); build examples with agents::episodes or Episode",
                        cx.first_example() + i
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let (pc, n) = (cx.population(), eps.len());
        let mut cells: Vec<Cell<E>> = Vec::with_capacity(pc * n);
        let mut shape: Option<(usize, ActionSpace)> = None;
        for _ in 0..pc {
            for ep in &eps {
                let mut env = (self.make_env)(ep)?;
                let this = (env.observation_size(), env.action_space());
                match shape {
                    None => shape = Some(this),
                    Some(s) if s != this => {
                        return Err(game_err(format!(
                            "environments disagree: one has observations of {} and {:?}, another {} and {:?}; every environment of a game must have the same shapes",
                            s.0, s.1, this.0, this.1
                        )))
                    }
                    Some(_) => {}
                }
                let obs = env.reset(ep.seed)?;
                check_obs(&obs, this.0)?;
                cells.push(Cell {
                    env,
                    obs,
                    reward: 0.0,
                    steps: 0,
                    terminated: false,
                    truncated: false,
                });
            }
        }
        let Some((obs_size, space)) = shape else {
            return Ok(Value::json_grid(Vec::new(), true, None));
        };
        let device = cx.device();
        cx.mark_loop();
        let longest = eps.iter().map(|e| e.max_steps).max().unwrap_or(0);
        for t in 0..longest {
            let active: std::sync::Arc<[bool]> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| !c.done() && t < eps[i % n].max_steps)
                .collect();
            if !active.iter().any(|&a| a) {
                break;
            }
            cx.set_active(Some(std::sync::Arc::clone(&active)));
            let obs = if self.json_obs {
                let items = cells.iter().map(|c| serde_json::json!(c.obs)).collect();
                Value::json_grid(items, true, None)
            } else {
                let mut flat = Vec::with_capacity(pc * n * obs_size);
                for c in &cells {
                    flat.extend_from_slice(&c.obs);
                }
                Value::batched(
                    Tensor::from_vec(flat, (pc, n, obs_size), &device).at("game observations")?,
                )
            };
            let out = self.policy.run(cx, obs).await?;
            let actions = decode_actions(&out, space, pc, n, &active)?;
            for ((cell, action), &on) in cells.iter_mut().zip(actions).zip(active.iter()) {
                let (Some(action), true) = (action, on) else {
                    continue;
                };
                let step = cell.env.step(&action)?;
                check_obs(&step.observation, obs_size)?;
                cell.obs = step.observation;
                cell.reward += step.reward;
                cell.steps += 1;
                cell.terminated |= step.terminated;
                cell.truncated |= step.truncated && !step.terminated;
            }
        }
        cx.set_active(None);
        let results = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let ep = &eps[i % n];
                let truncated = c.truncated || (!c.terminated && c.steps >= ep.max_steps);
                serde_json::to_value(EpisodeResult {
                    total_reward: c.reward,
                    steps: c.steps,
                    done: c.terminated || truncated,
                    terminated: c.terminated,
                    truncated,
                    seed: ep.seed,
                    info: c.env.info(),
                })
                .map_err(|e| game_err(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Value::json_grid(results, true, None))
    }
}

fn game_err(message: impl Into<String>) -> Error {
    Error::Agent {
        runner: "game".into(),
        message: message.into(),
    }
}

fn check_obs(obs: &[f32], size: usize) -> Result<()> {
    if obs.len() != size {
        return Err(game_err(format!(
            "the environment returned an observation of {} values but declares observation_size {size}",
            obs.len()
        )));
    }
    Ok(())
}

/// One action per cell (`None` for cells that are not active or whose async call failed).
fn decode_actions(
    out: &Value,
    space: ActionSpace,
    pc: usize,
    n: usize,
    active: &[bool],
) -> Result<Vec<Option<Action>>> {
    let bad = |got: String| {
        game_err(format!(
            "the policy must return one action per candidate × episode for {space:?}, got {got}"
        ))
    };
    match &out.data {
        Data::Tensor { t, batched } => {
            let dims = t.dims();
            let lead = if *batched { 2 } else { 1 };
            let k: usize = dims[lead.min(dims.len())..].iter().product();
            let rows = if *batched { pc * n } else { n };
            if dims.len() < lead || t.elem_count() != rows * k || dims[lead - 1] != n {
                return Err(bad(format!("a tensor of shape {dims:?}")));
            }
            let t = t.reshape((rows, k)).at("game actions")?;
            let cell_row = |i: usize| if *batched { i } else { i % n };
            match space {
                ActionSpace::Discrete(a) if k == a => {
                    let idx = t
                        .argmax(D::Minus1)
                        .and_then(|i| i.to_vec1::<u32>())
                        .at("game actions")?;
                    Ok((0..pc * n)
                        .map(|i| Some(Action::Discrete(idx[cell_row(i)] as usize)))
                        .collect())
                }
                ActionSpace::Discrete(a) if k == 1 => {
                    let v = t
                        .flatten_all()
                        .and_then(|v| v.to_vec1::<f32>())
                        .at("game actions")?;
                    Ok((0..pc * n)
                        .map(|i| {
                            let x = v[cell_row(i)];
                            let x = if x.is_finite() { x.round() } else { 0.0 };
                            Some(Action::Discrete(x.clamp(0.0, (a - 1) as f32) as usize))
                        })
                        .collect())
                }
                ActionSpace::Continuous(d) if k == d => {
                    let v = t.to_vec2::<f32>().at("game actions")?;
                    Ok((0..pc * n)
                        .map(|i| Some(Action::Continuous(v[cell_row(i)].clone())))
                        .collect())
                }
                _ => Err(bad(format!("{k} values per cell"))),
            }
        }
        Data::Json { items, batched } => {
            let rows = if *batched { pc * n } else { n };
            if items.len() != rows {
                return Err(bad(format!("{} JSON items", items.len())));
            }
            (0..pc * n)
                .map(|i| {
                    let j = &items[if *batched { i } else { i % n }];
                    if !active[i] || j.is_null() {
                        return Ok(None);
                    }
                    let a = match space {
                        ActionSpace::Discrete(a) => j
                            .as_u64()
                            .map(|x| x as usize)
                            .filter(|&x| x < a)
                            .map(Action::Discrete),
                        ActionSpace::Continuous(d) => j
                            .as_array()
                            .filter(|v| v.len() == d)
                            .and_then(|v| {
                                v.iter()
                                    .map(|x| x.as_f64().map(|x| x as f32))
                                    .collect::<Option<Vec<_>>>()
                            })
                            .map(Action::Continuous),
                    };
                    a.map(Some).ok_or_else(|| bad(format!("{j}")))
                })
                .collect()
        }
    }
}

/// A metric over the [`EpisodeResult`]s of each candidate: `f(result)` averaged over episodes.
///
/// # Examples
/// ```
/// let steps = hyperfunc::agents::episode_metric(|r| r.steps as f32);
/// # let _ = steps;
/// ```
pub fn episode_metric<G>(f: G) -> JsonMetric<impl Fn(&Json, &Json) -> f32 + Send + Sync>
where
    G: Fn(&EpisodeResult) -> f32 + Send + Sync,
{
    JsonMetric(move |pred: &Json, _target: &Json| {
        match EpisodeResult::deserialize(pred) {
            Ok(r) => f(&r),
            // A failed cell (its async policy call failed) scores NaN; the engine marks it failed.
            Err(_) => f32::NAN,
        }
    })
}

/// Mean total reward per episode (maximize).
pub fn mean_reward() -> JsonMetric<impl Fn(&Json, &Json) -> f32 + Send + Sync> {
    episode_metric(|r| r.total_reward)
}

/// Fraction of episodes that reached a terminal state (maximize); for environments whose
/// terminal states are successes, like [`GridWorld`](super::GridWorld)'s goal.
pub fn success_rate() -> JsonMetric<impl Fn(&Json, &Json) -> f32 + Send + Sync> {
    episode_metric(|r| f32::from(u8::from(r.terminated)))
}
