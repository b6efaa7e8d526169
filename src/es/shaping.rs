//! Fitness shaping: raw fitness → utilities where higher is better.
//!
//! Non-finite fitness (NaN, ±∞) always ranks worst, so a failing candidate pulls θ away from itself
//! and never injects a non-finite number into the update.

use crate::es::Direction;

/// How raw fitness values become utilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Shaping {
    /// Ranks mapped linearly onto [−0.5, 0.5] (OpenAI-ES); robust to outliers. The default.
    #[default]
    CenteredRanks,
    /// `(f − mean) / std`.
    ZScore,
}

/// Utilities (higher is better) for `fitness` under `direction`; also the count of non-finite values.
pub(crate) fn utilities(
    fitness: &[f32],
    direction: Direction,
    shaping: Shaping,
) -> (Vec<f32>, usize) {
    let score: Vec<f64> = fitness
        .iter()
        .map(|&f| {
            let f = f64::from(f);
            if !f.is_finite() {
                f64::NEG_INFINITY
            } else if direction == Direction::Minimize {
                -f
            } else {
                f
            }
        })
        .collect();
    let bad = score.iter().filter(|s| !s.is_finite()).count();
    let p = score.len();
    let u = match shaping {
        Shaping::CenteredRanks => {
            let mut order: Vec<usize> = (0..p).collect();
            order.sort_by(|&i, &j| score[i].total_cmp(&score[j]).then(i.cmp(&j)));
            let mut u = vec![0.0f32; p];
            if p > 1 {
                for (rank, &i) in order.iter().enumerate() {
                    u[i] = (rank as f64 / (p - 1) as f64 - 0.5) as f32;
                }
            }
            u
        }
        Shaping::ZScore => {
            let finite: Vec<f64> = score.iter().copied().filter(|s| s.is_finite()).collect();
            if finite.is_empty() {
                return (vec![0.0; p], bad);
            }
            let worst = finite.iter().copied().fold(f64::INFINITY, f64::min);
            let s: Vec<f64> = score
                .iter()
                .map(|&x| if x.is_finite() { x } else { worst })
                .collect();
            let mean = s.iter().sum::<f64>() / p as f64;
            let std = (s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / p as f64).sqrt();
            s.iter()
                .map(|x| {
                    if std > 0.0 {
                        ((x - mean) / std) as f32
                    } else {
                        0.0
                    }
                })
                .collect()
        }
    };
    (u, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centered_ranks_are_a_permutation_and_nan_is_worst() {
        let (u, bad) = utilities(
            &[3.0, f32::NAN, 1.0, 2.0],
            Direction::Maximize,
            Shaping::CenteredRanks,
        );
        assert_eq!(bad, 1);
        assert_eq!(u[1], -0.5);
        assert_eq!(u[0], 0.5);
        let mut s = u.clone();
        s.sort_by(f32::total_cmp);
        let expect: Vec<f32> = (0..4).map(|r| r as f32 / 3.0 - 0.5).collect();
        for (a, b) in s.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn minimize_flips_the_order() {
        let (u, _) = utilities(&[1.0, 2.0], Direction::Minimize, Shaping::CenteredRanks);
        assert!(u[0] > u[1]);
        let (z, _) = utilities(
            &[1.0, 2.0, f32::INFINITY],
            Direction::Minimize,
            Shaping::ZScore,
        );
        assert!(z.iter().all(|x| x.is_finite()));
        assert!(z[0] > z[1] && z[1] >= z[2]);
    }
}
