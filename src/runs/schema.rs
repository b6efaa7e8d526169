//! The settings of a run, which of them a live command may change, and how a command's values
//! are checked: type, range, mutability, then the engine's own cross-field rules.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::es::{Direction, Es, Schedule, Shaping, Update};

/// The numeric settings of an [`Es`] run, as stored with the run and folded with its commands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Candidates per generation.
    pub pop_size: usize,
    /// Noise scale σ.
    pub sigma: f64,
    /// Learning rate.
    pub lr: f64,
    /// Generation limit.
    pub generations: usize,
    /// Run seed.
    pub seed: u64,
    /// Optimisation direction.
    pub direction: Direction,
    /// Fitness shaping.
    pub shaping: Shaping,
    /// Update rule.
    pub update: Update,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Schedule of σ.
    pub sigma_schedule: Schedule,
    /// Schedule of the learning rate.
    pub lr_schedule: Schedule,
    /// Early stop after this many generations without improvement.
    pub patience: Option<usize>,
    /// Early stop when a candidate reaches this fitness.
    pub target: Option<f32>,
    /// Mirrored sampling.
    pub antithetic: bool,
    /// Rows per batched forward.
    pub max_batch_size: usize,
    /// Fraction of failed candidates that aborts a generation.
    pub max_failure_rate: f64,
    /// Examples per generation's evaluation (`None`: all).
    #[serde(default)]
    pub examples_per_eval: Option<usize>,
    /// The run's LLM dollar budget (`None`: none), checked at every generation boundary.
    #[serde(default)]
    pub max_cost_usd: Option<f64>,
    /// The run's LLM token budget (`None`: none), checked at every generation boundary.
    #[serde(default)]
    pub max_tokens: Option<u64>,
}

/// What a setting's value must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A finite number greater than 0.
    Positive,
    /// A finite number ≥ 0.
    NonNegative,
    /// A number in [0, 1].
    Fraction,
    /// A whole number ≥ 1.
    Count,
    /// A whole number ≥ 1, or `null` for none.
    OptionalCount,
    /// A finite number, or `null` for none.
    OptionalNumber,
    /// A finite number ≥ 0, or `null` for none.
    OptionalAmount,
    /// Fixed for the run's lifetime.
    RestartOnly,
}

/// One setting of the schema: its name, what it accepts, and what it means.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    /// The name commands use (`lr`, `pop_size`…).
    pub name: &'static str,
    /// What it accepts; [`Kind::RestartOnly`] settings cannot be changed on a running run.
    pub kind: Kind,
    /// One line of documentation.
    pub doc: &'static str,
}

/// Every setting of a run, live or restart-only.
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "lr",
        kind: Kind::Positive,
        doc: "learning rate (overrides the lr schedule until cleared)",
    },
    Setting {
        name: "sigma",
        kind: Kind::Positive,
        doc: "noise scale (overrides the sigma schedule until cleared)",
    },
    Setting {
        name: "pop_size",
        kind: Kind::Count,
        doc: "candidates per generation (even with antithetic sampling)",
    },
    Setting {
        name: "generations",
        kind: Kind::Count,
        doc: "generation limit",
    },
    Setting {
        name: "patience",
        kind: Kind::OptionalCount,
        doc: "stop after this many generations without improvement (null: never)",
    },
    Setting {
        name: "target",
        kind: Kind::OptionalNumber,
        doc: "stop when a candidate reaches this fitness (null: never)",
    },
    Setting {
        name: "weight_decay",
        kind: Kind::NonNegative,
        doc: "decoupled weight decay",
    },
    Setting {
        name: "max_failure_rate",
        kind: Kind::Fraction,
        doc: "fraction of failed candidates that aborts a generation",
    },
    Setting {
        name: "max_batch_size",
        kind: Kind::Count,
        doc: "rows per batched forward",
    },
    Setting {
        name: "examples_per_eval",
        kind: Kind::OptionalCount,
        doc: "examples per generation's evaluation, a fresh seeded subset each generation (null: all)",
    },
    Setting {
        name: "max_cost_usd",
        kind: Kind::OptionalAmount,
        doc: "the run's LLM dollar budget, across resumes; it stops at the first boundary where it is spent (null: none)",
    },
    Setting {
        name: "max_tokens",
        kind: Kind::OptionalCount,
        doc: "the run's LLM token budget, across resumes; it stops at the first boundary where it is spent (null: none)",
    },
    Setting {
        name: "seed",
        kind: Kind::RestartOnly,
        doc: "run seed",
    },
    Setting {
        name: "antithetic",
        kind: Kind::RestartOnly,
        doc: "mirrored sampling",
    },
    Setting {
        name: "direction",
        kind: Kind::RestartOnly,
        doc: "maximize or minimize",
    },
    Setting {
        name: "shaping",
        kind: Kind::RestartOnly,
        doc: "fitness shaping",
    },
    Setting {
        name: "update",
        kind: Kind::RestartOnly,
        doc: "update rule",
    },
    Setting {
        name: "lr_schedule",
        kind: Kind::RestartOnly,
        doc: "schedule of the learning rate",
    },
    Setting {
        name: "sigma_schedule",
        kind: Kind::RestartOnly,
        doc: "schedule of sigma",
    },
];

/// The schema entry of `name`, or an error naming the closest settings.
pub fn setting(name: &str) -> std::result::Result<&'static Setting, String> {
    SETTINGS.iter().find(|s| s.name == name).ok_or_else(|| {
        let mut close: Vec<(usize, &str)> = SETTINGS
            .iter()
            .map(|s| (crate::util::edit_distance(name, s.name), s.name))
            .collect();
        close.sort();
        let names: Vec<&str> = close.iter().take(3).map(|c| c.1).collect();
        format!(
            "unknown setting `{name}`; the closest are {}; live settings: {}",
            names.join(", "),
            live_names().join(", ")
        )
    })
}

/// The names of the settings a running optimisation accepts.
pub fn live_names() -> Vec<&'static str> {
    SETTINGS
        .iter()
        .filter(|s| s.kind != Kind::RestartOnly)
        .map(|s| s.name)
        .collect()
}

/// Checks one value against its setting's kind; the value to store.
fn checked(s: &Setting, v: &Value) -> std::result::Result<Value, String> {
    let name = s.name;
    let num = |v: &Value| {
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("`{name}` expects a finite number, got {v}"))
    };
    let count = |v: &Value| {
        v.as_u64()
            .filter(|&n| n >= 1)
            .ok_or_else(|| format!("`{name}` expects a whole number >= 1, got {v}"))
    };
    match s.kind {
        Kind::RestartOnly => Err(format!(
            "`{name}` is restart-only: it is fixed for the run's lifetime (start a new run to change it); live settings: {}",
            live_names().join(", ")
        )),
        Kind::Positive => {
            let x = num(v)?;
            if x > 0.0 {
                Ok(v.clone())
            } else {
                Err(format!("`{name}` must be > 0, got {x}"))
            }
        }
        Kind::NonNegative => {
            let x = num(v)?;
            if x >= 0.0 {
                Ok(v.clone())
            } else {
                Err(format!("`{name}` must be >= 0, got {x}"))
            }
        }
        Kind::Fraction => {
            let x = num(v)?;
            if (0.0..=1.0).contains(&x) {
                Ok(v.clone())
            } else {
                Err(format!("`{name}` must lie in [0, 1], got {x}"))
            }
        }
        Kind::Count => count(v).map(Value::from),
        Kind::OptionalCount if v.is_null() => Ok(Value::Null),
        Kind::OptionalCount => count(v).map(Value::from),
        Kind::OptionalNumber if v.is_null() => Ok(Value::Null),
        Kind::OptionalNumber => num(v).map(|_| v.clone()),
        Kind::OptionalAmount if v.is_null() => Ok(Value::Null),
        Kind::OptionalAmount => {
            let x = num(v)?;
            if x >= 0.0 {
                Ok(v.clone())
            } else {
                Err(format!("`{name}` must be >= 0 (or null for none), got {x}"))
            }
        }
    }
}

/// Checks a patch's keys, types and ranges (not yet the cross-field rules); the checked patch.
pub fn check_patch(patch: &Map<String, Value>) -> std::result::Result<Map<String, Value>, String> {
    if patch.is_empty() {
        return Err("an empty patch: give at least one `name=value`".into());
    }
    patch
        .iter()
        .map(|(k, v)| Ok((k.clone(), checked(setting(k)?, v)?)))
        .collect()
}

impl RunConfig {
    /// This configuration with `live` values in place (checked, then validated as a whole by
    /// the engine's own rules, so an odd population with antithetic sampling is refused here).
    pub fn with_live(&self, live: &Map<String, Value>) -> std::result::Result<RunConfig, String> {
        let mut c = self.clone();
        for (k, v) in live {
            let v = checked(setting(k)?, v)?;
            let f = || v.as_f64().unwrap_or(f64::NAN);
            let n = || v.as_u64().unwrap_or(0) as usize;
            match k.as_str() {
                "lr" => c.lr = f(),
                "sigma" => c.sigma = f(),
                "pop_size" => c.pop_size = n(),
                "generations" => c.generations = n(),
                "patience" => c.patience = v.as_u64().map(|n| n as usize),
                "target" => c.target = v.as_f64().map(|x| x as f32),
                "weight_decay" => c.weight_decay = f(),
                "max_failure_rate" => c.max_failure_rate = f(),
                "max_batch_size" => c.max_batch_size = n(),
                "examples_per_eval" => c.examples_per_eval = v.as_u64().map(|n| n as usize),
                "max_cost_usd" => c.max_cost_usd = v.as_f64(),
                "max_tokens" => c.max_tokens = v.as_u64(),
                other => return Err(format!("`{other}` cannot be set live")),
            }
        }
        Es::default()
            .with_run_config(&c)
            .validate()
            .map_err(|e| e.to_string())?;
        Ok(c)
    }

    /// `name: a → b` for every setting that differs from `other`.
    pub fn diff(&self, other: &RunConfig) -> Vec<(String, Value, Value)> {
        let (a, b) = (to_map(self), to_map(other));
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|k| {
                let (x, y) = (a.get(k).cloned(), b.get(k).cloned());
                (x != y).then(|| {
                    (
                        k.clone(),
                        x.unwrap_or(Value::Null),
                        y.unwrap_or(Value::Null),
                    )
                })
            })
            .collect()
    }

    /// The value of one setting as JSON.
    pub fn get(&self, name: &str) -> Option<Value> {
        to_map(self).get(name).cloned()
    }
}

fn to_map(c: &RunConfig) -> Map<String, Value> {
    match serde_json::to_value(c) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// Parses `name=value` as a patch entry: the value as JSON when it parses (`0.05`, `null`,
/// `true`), else as a string (so `direction=minimize` is refused as restart-only, not as JSON).
pub fn parse_assignment(s: &str) -> std::result::Result<(String, Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected name=value, e.g. lr=0.05"))?;
    let v = v.trim();
    let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
    Ok((k.trim().to_string(), value))
}
