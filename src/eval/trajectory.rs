//! What a system did for one candidate on one example, rebuilt from its trace, and how it
//! compares with what it should have done: exact match of the answer, precision and recall of
//! the steps (tool or function calls, as multisets), and tool efficiency.

use serde::Serialize;

use crate::function::Json;
use crate::observe::{Record, RecordKind, Status};

/// One step: a call or an observed scope.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Step {
    /// The hyperfunction or the observation's name.
    pub name: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// Its duration, seconds.
    pub seconds: f64,
}

/// The steps of one (candidate, example), in start order.
///
/// # Examples
/// ```
/// use hyperfunc::eval::{Step, Trajectory};
/// let t = Trajectory { steps: ["search", "search", "calc"].iter()
///     .map(|n| Step { name: n.to_string(), ok: true, seconds: 0.1 }).collect() };
/// let s = t.score(&["search", "calc"], &"42".into(), &"42".into());
/// assert!(s.exact_match);
/// assert_eq!((s.precision, s.recall), (2.0 / 3.0, 1.0));
/// assert_eq!(s.tool_efficiency, 2.0 / 3.0);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Trajectory {
    /// The steps.
    pub steps: Vec<Step>,
}

/// How a trajectory compares with the expected one.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TrajectoryScore {
    /// The answer equals the expected answer (strings compared trimmed, case-insensitive).
    pub exact_match: bool,
    /// Expected steps taken / steps taken (1 when nothing was taken and nothing expected).
    pub precision: f64,
    /// Expected steps taken / steps expected (1 when nothing was expected).
    pub recall: f64,
    /// Steps expected / steps taken, at most 1: the share of calls that were needed.
    pub tool_efficiency: f64,
    /// Steps that failed.
    pub failed_steps: usize,
}

impl Trajectory {
    /// The I/O calls and observed scopes of `candidate` on `example` in `generation` (`None`:
    /// an evaluation outside the generations, such as a run's final one) among `records` (from
    /// [`Hub::records`](crate::Hub::records)), in start order.
    pub fn from_records(
        records: &[Record],
        generation: Option<usize>,
        candidate: usize,
        example: usize,
    ) -> Self {
        let covers = |r: Option<(usize, usize)>, i: usize| r.is_none_or(|(a, b)| a <= i && i < b);
        let mut picked: Vec<&Record> = records
            .iter()
            .filter(|r| matches!(r.kind, RecordKind::Io | RecordKind::Observe))
            .filter(|r| r.generation == generation)
            .filter(|r| covers(r.candidates, candidate) && covers(r.examples, example))
            .collect();
        picked.sort_by_key(|r| (r.start_unix_ns, r.id));
        Self {
            steps: picked
                .into_iter()
                .map(|r| Step {
                    name: r.name.to_string(),
                    ok: r.status == Status::Ok,
                    seconds: r.duration_ns() as f64 * 1e-9,
                })
                .collect(),
        }
    }

    /// Compares with the expected steps (a multiset of names) and answer.
    pub fn score(
        &self,
        expected_steps: &[&str],
        expected: &Json,
        answer: &Json,
    ) -> TrajectoryScore {
        let mut left: Vec<&str> = expected_steps.to_vec();
        let mut hit = 0usize;
        for s in &self.steps {
            if let Some(i) = left.iter().position(|e| *e == s.name) {
                left.swap_remove(i);
                hit += 1;
            }
        }
        let (taken, wanted) = (self.steps.len(), expected_steps.len());
        let ratio = |a: usize, b: usize| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        TrajectoryScore {
            exact_match: same(expected, answer),
            precision: if taken == 0 && wanted > 0 {
                0.0
            } else {
                ratio(hit, taken)
            },
            recall: ratio(hit, wanted),
            tool_efficiency: ratio(wanted, taken).min(1.0),
            failed_steps: self.steps.iter().filter(|s| !s.ok).count(),
        }
    }
}

fn same(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::String(x), Json::String(y)) => x.trim().eq_ignore_ascii_case(y.trim()),
        _ => a == b,
    }
}
