//! Async hyperfunctions: fan-out over candidates × examples, retries, timeouts, budgets, failures.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyperfunc::prelude::*;
use serde_json::json;

fn data(n: usize) -> Examples {
    Examples::json((0..n).map(|i| json!(i)).collect(), vec![json!(0); n]).unwrap()
}

fn exact() -> impl Metric {
    metric::per_example(|p, y| if p == y { 1.0 } else { 0.0 })
}

#[tokio::test]
async fn calls_fan_out_over_candidates_and_examples_with_their_own_params() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let f = HyperFn::io(
        "knob",
        Some(ParamSpec::scalar().zeros()),
        move |x, p: IoParams| {
            c.fetch_add(1, Ordering::SeqCst);
            async move { Ok(json!([x, p.values()[0]])) }
        },
    );
    let sys = Chain::new(vec![f]);
    let theta = Theta::init(&sys, 0, &candle_core::Device::Cpu).unwrap();
    let pop = Es::default()
        .pop_size(6)
        .population(&sys, &theta, 0)
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let record = metric::per_example(move |p, _y| {
        s.lock().unwrap().push(p.clone());
        0.0
    });
    evaluate_population(&sys, &pop, &data(5), &record, 1 << 16)
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 30);
    let seen = seen.lock().unwrap();
    // Candidate 0 and 1 are mirrored: their knob values are negatives of each other.
    let k0 = seen[0][1].as_f64().unwrap();
    let k1 = seen[5][1].as_f64().unwrap();
    assert!(k0 != 0.0 && (k0 + k1).abs() < 1e-6, "{k0} {k1}");
    assert_eq!(seen[3][0], json!(3));
}

#[tokio::test]
async fn parameterless_function_on_shared_input_is_called_once_per_example() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let f = HyperFn::io("tool", None, move |x, _p| {
        c.fetch_add(1, Ordering::SeqCst);
        async move { Ok(x) }
    });
    let sys = Chain::new(vec![f]);
    let pop = Population::center(Theta::default());
    let out = evaluate_population(&sys, &pop, &data(7), &exact(), 1 << 16)
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 7);
    assert_eq!(out.fitness, vec![1.0 / 7.0]);
}

#[tokio::test(start_paused = true)]
async fn retryable_errors_are_retried_and_fatal_ones_are_not() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let flaky = HyperFn::io("flaky", None, move |x, _p| {
        let n = a.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < 2 {
                Err(IoError::retryable("HTTP 503"))
            } else {
                Ok(x)
            }
        }
    })
    .retries(3);
    let sys = Chain::new(vec![flaky]);
    let fit = evaluate(&sys, &Theta::default(), &data(1), &exact())
        .await
        .unwrap();
    assert_eq!(
        fit, 1.0,
        "the third attempt returned the input, which equals the target"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 3);

    let fatal_attempts = Arc::new(AtomicUsize::new(0));
    let a = fatal_attempts.clone();
    let bad = HyperFn::io("bad", None, move |_x, _p| {
        a.fetch_add(1, Ordering::SeqCst);
        async move { Err::<Json, _>(IoError::fatal("HTTP 400: bad request")) }
    })
    .retries(5);
    let sys = Chain::new(vec![bad]);
    let e = evaluate(&sys, &Theta::default(), &data(1), &exact())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Io { function, retryable: false, .. } if function == "bad"),
        "{e}"
    );
    assert_eq!(fatal_attempts.load(Ordering::SeqCst), 1);
}

struct DropFlag(Arc<AtomicUsize>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn timeouts_cancel_the_call() {
    let finished = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let (f2, d2) = (finished.clone(), dropped.clone());
    let slow = HyperFn::io("slow", None, move |x, _p| {
        let (f, guard) = (f2.clone(), DropFlag(d2.clone()));
        async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            f.fetch_add(1, Ordering::SeqCst);
            Ok(x)
        }
    })
    .timeout(Duration::from_millis(100))
    .retries(1);
    let sys = Chain::new(vec![slow]);
    let e = evaluate(&sys, &Theta::default(), &data(2), &exact())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Timeout { function, .. } if function == "slow"),
        "{e}"
    );
    assert_eq!(
        finished.load(Ordering::SeqCst),
        0,
        "a timed-out call must not run to completion"
    );
    assert!(
        dropped.load(Ordering::SeqCst) >= 2,
        "the future is dropped (cancelled) on timeout, and retried once"
    );
}

#[tokio::test]
async fn call_budget_is_scoped_to_one_evaluation() {
    let f = HyperFn::io("budgeted", None, |x, _p| async move { Ok(x) }).max_calls(3);
    let sys = Chain::new(vec![f]);
    let e = evaluate(&sys, &Theta::default(), &data(4), &exact())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::BudgetExhausted { function, max_calls: 3 } if function == "budgeted"),
        "{e}"
    );
    // A new evaluation gets a fresh budget.
    let ok = evaluate(&sys, &Theta::default(), &data(3), &exact())
        .await
        .unwrap();
    assert!(ok.is_finite());
    let ok = evaluate(&sys, &Theta::default(), &data(3), &exact())
        .await
        .unwrap();
    assert!(ok.is_finite());
}

#[tokio::test]
async fn a_failing_candidate_is_data_not_an_abort() {
    // Candidates whose knob is negative fail; the generation goes on and they rank worst.
    let f = crate::common::picky();
    let sys = Chain::new(vec![f]);
    let theta = Theta::init(&sys, 0, &candle_core::Device::Cpu).unwrap();
    let pop = Es::default()
        .pop_size(8)
        .population(&sys, &theta, 0)
        .unwrap();
    let score = metric::per_example(|p, _y| p.as_f64().unwrap_or(0.0) as f32);
    let out = evaluate_population(&sys, &pop, &data(2), &score, 1 << 16)
        .await
        .unwrap();
    assert_eq!(
        out.failed, 4,
        "mirrored pairs: exactly one of each pair is negative"
    );
    assert_eq!(out.fitness.iter().filter(|f| f.is_nan()).count(), 4);
    let first = out.first_error.unwrap();
    assert!(
        matches!(&first, Error::Io { function, .. } if function == "picky"),
        "{first}"
    );
    assert!(first.to_string().contains("negative knob"));

    let r = Es::default()
        .pop_size(8)
        .generations(3)
        .progress(false)
        .optimize(&sys, &data(2), &score)
        .await
        .unwrap();
    assert_eq!(r.history[0].failed, 4);
    assert!(
        r.theta.values("picky").unwrap()[0] > 0.0,
        "θ moves away from the failing side"
    );
}
