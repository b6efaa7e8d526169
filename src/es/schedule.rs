//! Schedules for σ and the learning rate over generations.

/// How a value changes from its start over the generations of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Schedule {
    /// Constant (the default).
    #[default]
    Constant,
    /// Linear from the start value to `to` at the last generation.
    Linear {
        /// Final value.
        to: f64,
    },
    /// Multiplied by `factor` every generation.
    Exponential {
        /// Per-generation factor, in (0, 1] to decay.
        factor: f64,
    },
    /// Half-cosine from the start value to `to` at the last generation.
    Cosine {
        /// Final value.
        to: f64,
    },
}

impl Schedule {
    /// The value at generation `g` of `total`, starting from `start`.
    pub fn at(&self, start: f64, g: usize, total: usize) -> f64 {
        let frac = if total > 1 {
            g as f64 / (total - 1) as f64
        } else {
            0.0
        };
        match *self {
            Schedule::Constant => start,
            Schedule::Linear { to } => start + (to - start) * frac,
            Schedule::Exponential { factor } => start * factor.powi(g as i32),
            Schedule::Cosine { to } => {
                to + (start - to) * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos())
            }
        }
    }

    pub(crate) fn validate(&self, field: &str) -> crate::Result<()> {
        let ok = match *self {
            Schedule::Constant => true,
            Schedule::Linear { to } | Schedule::Cosine { to } => to.is_finite() && to > 0.0,
            Schedule::Exponential { factor } => factor.is_finite() && factor > 0.0,
        };
        if ok {
            Ok(())
        } else {
            Err(crate::Error::config(
                field,
                format!("schedule {self:?} must keep the value positive and finite"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Schedule;

    #[test]
    fn schedules_hit_their_ends() {
        assert_eq!(Schedule::Constant.at(0.3, 5, 10), 0.3);
        assert!((Schedule::Linear { to: 0.1 }.at(0.3, 9, 10) - 0.1).abs() < 1e-12);
        assert!((Schedule::Cosine { to: 0.1 }.at(0.3, 0, 10) - 0.3).abs() < 1e-12);
        assert!((Schedule::Cosine { to: 0.1 }.at(0.3, 9, 10) - 0.1).abs() < 1e-12);
        assert!((Schedule::Exponential { factor: 0.5 }.at(1.0, 2, 10) - 0.25).abs() < 1e-12);
    }
}
