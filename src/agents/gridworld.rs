//! GridWorld: reach the goal on a square grid.

use super::game::{Action, ActionSpace, Environment, Step};
use crate::error::{Error, Result};
use crate::rng;
use crate::Json;

/// A square grid with walls; the agent starts on a free cell, the goal is another, both drawn
/// from the reset seed. Actions: 0 up, 1 down, 2 left, 3 right. Moving into a wall or the edge
/// leaves the agent where it is.
///
/// Observation ([`GridWorld::OBSERVATION_SIZE`] values): the goal's offset `(dx, dy)` divided by
/// the grid size, then four flags (1 = blocked) for up, down, left, right.
///
/// Reward: `+1` on reaching the goal (terminates), `−0.01` per step, plus a shaping term
/// `0.1 · (distance before − distance after)` in grid cells (potential-based, so it does not
/// change which policies are optimal).
///
/// # Examples
/// ```
/// use hyperfunc::agents::{Action, Environment, GridWorld};
/// let mut g = GridWorld::new(4);
/// let obs = g.reset(0)?;
/// assert_eq!(obs.len(), GridWorld::OBSERVATION_SIZE);
/// let step = g.step(&Action::Discrete(3))?;
/// assert!(step.reward.is_finite());
/// # Ok::<(), hyperfunc::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct GridWorld {
    size: usize,
    walls: Vec<(usize, usize)>,
    pos: (usize, usize),
    goal: (usize, usize),
    reached: bool,
}

impl GridWorld {
    /// Length of an observation.
    pub const OBSERVATION_SIZE: usize = 6;

    /// The usual policy for this environment: an MLP named `policy` from the observation through
    /// `hidden` tanh units to the four action scores (the runner takes their argmax).
    ///
    /// # Examples
    /// ```
    /// use hyperfunc::agents::GridWorld;
    /// use hyperfunc::HyperSystem;
    /// assert_eq!(GridWorld::mlp_policy(16).hyperfunctions().len(), 1);
    /// ```
    pub fn mlp_policy(hidden: usize) -> crate::Chain {
        crate::Chain::new(vec![crate::HyperFn::mlp(
            "policy",
            &[Self::OBSERVATION_SIZE, hidden, 4],
            crate::Activation::Tanh,
            crate::Activation::Identity,
        )])
    }

    /// An open `size × size` grid (at least 2).
    pub fn new(size: usize) -> Self {
        Self {
            size: size.max(2),
            walls: Vec::new(),
            pos: (0, 0),
            goal: (0, 0),
            reached: false,
        }
    }

    /// Adds walls at `(x, y)` cells. Starts and goals are drawn among the other cells.
    pub fn walls(mut self, cells: impl IntoIterator<Item = (usize, usize)>) -> Self {
        self.walls.extend(cells);
        self
    }

    /// The agent's cell `(x, y)`.
    pub fn position(&self) -> (usize, usize) {
        self.pos
    }

    /// The goal's cell `(x, y)`.
    pub fn goal(&self) -> (usize, usize) {
        self.goal
    }

    fn free(&self, x: i64, y: i64) -> bool {
        let s = self.size as i64;
        (0..s).contains(&x)
            && (0..s).contains(&y)
            && !self.walls.contains(&(x as usize, y as usize))
    }

    fn distance(&self) -> f32 {
        (self.pos.0.abs_diff(self.goal.0) + self.pos.1.abs_diff(self.goal.1)) as f32
    }

    fn observe(&self) -> Vec<f32> {
        let s = self.size as f32;
        let (x, y) = (self.pos.0 as i64, self.pos.1 as i64);
        let blocked = |dx: i64, dy: i64| f32::from(u8::from(!self.free(x + dx, y + dy)));
        vec![
            (self.goal.0 as f32 - x as f32) / s,
            (self.goal.1 as f32 - y as f32) / s,
            blocked(0, -1),
            blocked(0, 1),
            blocked(-1, 0),
            blocked(1, 0),
        ]
    }
}

impl Environment for GridWorld {
    fn observation_size(&self) -> usize {
        Self::OBSERVATION_SIZE
    }

    fn action_space(&self) -> ActionSpace {
        ActionSpace::Discrete(4)
    }

    fn reset(&mut self, seed: u64) -> Result<Vec<f32>> {
        let cells: Vec<(usize, usize)> = (0..self.size)
            .flat_map(|y| (0..self.size).map(move |x| (x, y)))
            .filter(|c| !self.walls.contains(c))
            .collect();
        if cells.len() < 2 {
            return Err(Error::Agent {
                runner: "gridworld".into(),
                message: "fewer than two free cells: remove walls or enlarge the grid".into(),
            });
        }
        let pick = |salt: u64, k: usize| {
            let u = rng::uniform(&[rng::name_hash("gridworld"), seed, salt]);
            ((u * k as f64) as usize).min(k - 1)
        };
        let start = pick(0, cells.len());
        let mut goal = pick(1, cells.len() - 1);
        if goal >= start {
            goal += 1;
        }
        self.pos = cells[start];
        self.goal = cells[goal];
        self.reached = false;
        Ok(self.observe())
    }

    fn step(&mut self, action: &Action) -> Result<Step> {
        let (dx, dy) = match action {
            Action::Discrete(0) => (0, -1),
            Action::Discrete(1) => (0, 1),
            Action::Discrete(2) => (-1, 0),
            Action::Discrete(3) => (1, 0),
            other => {
                return Err(Error::Agent {
                    runner: "gridworld".into(),
                    message: format!("action {other:?} is not one of Discrete(0..4)"),
                })
            }
        };
        let before = self.distance();
        let (x, y) = (self.pos.0 as i64 + dx, self.pos.1 as i64 + dy);
        if self.free(x, y) {
            self.pos = (x as usize, y as usize);
        }
        let after = self.distance();
        self.reached = self.pos == self.goal;
        let reward = -0.01 + 0.1 * (before - after) + if self.reached { 1.0 } else { 0.0 };
        Ok(Step {
            observation: self.observe(),
            reward,
            terminated: self.reached,
            truncated: false,
        })
    }

    fn info(&self) -> Json {
        serde_json::json!({ "reached_goal": self.reached, "position": [self.pos.0, self.pos.1] })
    }
}
