//! The ES optimizer: reproducibility, the gradient estimator, robustness, update rules, stopping.

use candle_core::{Device, Tensor};
use hyperfunc::prelude::*;
use hyperfunc::{StopReason, StopSignal};

use crate::common::{values, xor_data, xor_net};

fn es() -> Es {
    Es::default()
        .pop_size(16)
        .sigma(0.1)
        .lr(0.05)
        .generations(5)
        .minimize()
        .progress(false)
}

#[tokio::test]
async fn same_seed_gives_bit_identical_theta_and_different_seeds_differ() {
    let (net, data) = (xor_net(Some(2)), xor_data());
    let a = es()
        .seed(42)
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap();
    let b = es()
        .seed(42)
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap();
    let c = es()
        .seed(43)
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap();
    assert!(a.theta.bit_eq(&b.theta).unwrap());
    assert!(!a.theta.bit_eq(&c.theta).unwrap());
    let stats = |r: &hyperfunc::Report| -> Vec<(f32, f32, f32)> {
        r.history.iter().map(|h| (h.best, h.mean, h.std)).collect()
    };
    assert_eq!(stats(&a), stats(&b));
}

/// f(θ) = −Σ (θ − c)²: a quadratic with a known gradient.
fn quadratic() -> (Chain, Examples, Vec<f32>) {
    let d = 10;
    let c: Vec<f32> = (0..d).map(|i| (i as f32 - 4.5) / 3.0).collect();
    let point = HyperFn::tensor("point", ParamSpec::vector(d).zeros(), |x, w| {
        // Output θ itself for every example: [P, N, d].
        let (p, n, _) = x.dims3()?;
        w.unsqueeze(1)?
            .broadcast_as((p, n, w.dim(1)?))?
            .contiguous()
    });
    let x = Tensor::zeros((1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::from_vec(c.clone(), (1, d), &Device::Cpu).unwrap();
    (Chain::new(vec![point]), Examples::tensors(x, y).unwrap(), c)
}

#[tokio::test]
async fn gradient_estimate_at_p1000_points_along_the_true_gradient() {
    let (sys, data, c) = quadratic();
    let mut theta = Theta::default();
    let start: Vec<f32> = (0..c.len())
        .map(|i| if i % 2 == 0 { 0.8 } else { -0.6 })
        .collect();
    theta.insert(
        "point",
        Tensor::from_vec(start.clone(), c.len(), &Device::Cpu).unwrap(),
    );
    // Maximise −MSE (= minimise MSE); raw fitness shaping by z-score keeps the estimator linear.
    let neg_mse = metric::from_fn(|p, y| {
        let d = p.broadcast_sub(y)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
        Ok(-d)
    });
    let es = Es::default()
        .pop_size(1000)
        .sigma(0.02)
        .seed(9)
        .shaping(Shaping::ZScore)
        .maximize();
    let g = hyperfunc::es::gradient_estimate(&es, &sys, &theta, &data, &neg_mse, 0)
        .await
        .unwrap();
    let est = values(g.get("point").unwrap());
    let truth: Vec<f32> = start.iter().zip(&c).map(|(t, c)| -2.0 * (t - c)).collect();
    let dot: f32 = est.iter().zip(&truth).map(|(a, b)| a * b).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let cos = dot / (norm(&est) * norm(&truth));
    assert!(cos > 0.9, "cosine {cos}");
}

#[tokio::test]
async fn centered_ranks_estimate_also_points_along_the_gradient() {
    let (sys, data, c) = quadratic();
    let mut theta = Theta::default();
    theta.insert(
        "point",
        Tensor::zeros(c.len(), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let es = Es::default().pop_size(1000).sigma(0.02).seed(1).minimize();
    let g = hyperfunc::es::gradient_estimate(&es, &sys, &theta, &data, &metric::mse(), 0)
        .await
        .unwrap();
    let est = values(g.get("point").unwrap());
    let truth: Vec<f32> = c.iter().map(|c| 2.0 * c).collect(); // ascent direction of −MSE
    let dot: f32 = est.iter().zip(&truth).map(|(a, b)| a * b).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(dot / (norm(&est) * norm(&truth)) > 0.9);
}

#[tokio::test]
async fn nan_fitness_is_ranked_worst_counted_and_never_reaches_theta() {
    // log(w) is NaN for every candidate whose weight went negative.
    let f = HyperFn::tensor("logw", ParamSpec::scalar().constant(0.05), |x, w| {
        let (p, n, _) = x.dims3()?;
        w.log()?.unsqueeze(1)?.broadcast_as((p, n, 1))?.contiguous()
    });
    let sys = Chain::new(vec![f]);
    let x = Tensor::zeros((2, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::zeros((2, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let data = Examples::tensors(x, y).unwrap();
    let r = Es::default()
        .pop_size(32)
        .sigma(0.2)
        .lr(0.01)
        .generations(10)
        .minimize()
        .progress(false)
        .optimize(&sys, &data, &metric::mse())
        .await
        .unwrap();
    assert!(
        r.history.iter().map(|h| h.failed).sum::<usize>() > 0,
        "no NaN was produced"
    );
    assert!(r
        .theta
        .values("logw")
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
    assert!(r
        .history
        .iter()
        .all(|h| h.mean.is_finite() && h.best.is_finite()));
    // Minimising (log w)² pushes w towards 1, away from the NaN region.
    assert!(r.theta.values("logw").unwrap()[0] > 0.05);
}

#[tokio::test]
async fn all_candidates_failing_is_a_typed_error() {
    let f = HyperFn::tensor("nan", ParamSpec::scalar(), |x, _w| x.affine(0.0, f64::NAN));
    let sys = Chain::new(vec![f]);
    let x = Tensor::zeros((2, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let data = Examples::tensors(x.clone(), x).unwrap();
    let e = es()
        .optimize(&sys, &data, &metric::mse())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::TooManyFailures {
                failed: 16,
                pop_size: 16,
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn compat_rule_matches_its_formula() {
    // One generation of compat ES on the quadratic, recomputed by hand from the candidates.
    let (sys, data, c) = quadratic();
    let theta0 = Theta::init(&sys, 0, &Device::Cpu).unwrap();
    let es = Es::default()
        .pop_size(8)
        .sigma(0.1)
        .lr(0.2)
        .generations(1)
        .seed(5)
        .maximize()
        .compat()
        .progress(false);
    let neg_mse =
        metric::from_fn(|p, y| Ok(-(p.broadcast_sub(y)?.sqr()?.mean_all()?.to_scalar::<f32>()?)));
    let report = es
        .clone()
        .init(theta0.clone())
        .optimize(&sys, &data, &neg_mse)
        .await
        .unwrap();

    let pop = es.population(&sys, &theta0, 0).unwrap();
    let fit = hyperfunc::evaluate_population(&sys, &pop, &data, &neg_mse, 1 << 16)
        .await
        .unwrap()
        .fitness;
    let mean = fit.iter().sum::<f32>() / 8.0;
    let std = (fit.iter().map(|f| (f - mean).powi(2)).sum::<f32>() / 8.0).sqrt();
    let base = theta0.values("point").unwrap();
    let mut expect = base.clone();
    for (i, f) in fit.iter().enumerate() {
        let cand = pop.candidate(i).unwrap().values("point").unwrap();
        let r = (f - mean) / std;
        for (j, e) in expect.iter_mut().enumerate() {
            let eps = (cand[j] - base[j]) / 0.1; // unit noise of candidate i
            *e += 0.2 * (8f32).sqrt() * r * eps / 8.0;
        }
    }
    let got = report.theta.values("point").unwrap();
    for (a, b) in got.iter().zip(&expect) {
        assert!((a - b).abs() < 1e-4, "{got:?} vs {expect:?}");
    }
    let _ = c;
}

#[tokio::test]
async fn sgd_weight_decay_and_schedules_run_and_record_sigma_and_lr() {
    let (net, data) = (xor_net(None), xor_data());
    let r = es()
        .generations(4)
        .sgd(0.9)
        .weight_decay(0.01)
        .sigma_schedule(Schedule::Linear { to: 0.05 })
        .lr_schedule(Schedule::Exponential { factor: 0.5 })
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap();
    let sig: Vec<f64> = r.history.iter().map(|h| h.sigma).collect();
    assert!((sig[0] - 0.1).abs() < 1e-12 && (sig[3] - 0.05).abs() < 1e-12);
    assert!((r.history[2].lr - 0.0125).abs() < 1e-12);
}

#[tokio::test]
async fn early_stopping_by_target_and_patience() {
    let (net, data) = (xor_net(Some(2)), xor_data());
    let r = es()
        .generations(300)
        .lr(0.1)
        .target(0.3)
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap();
    assert_eq!(r.stop, StopReason::Target);
    assert!(r.best.as_ref().unwrap().fitness <= 0.3);
    assert!(r.history.len() < 300);

    // A constant metric never improves after the first generation.
    let flat = metric::from_fn(|_p, _y| Ok(1.0));
    let r = es()
        .generations(100)
        .patience(3)
        .optimize(&net, &data, &flat)
        .await
        .unwrap();
    assert_eq!(r.stop, StopReason::Patience);
    assert_eq!(r.history.len(), 4);
}

#[tokio::test]
async fn best_candidate_is_tracked_and_reevaluates_to_its_fitness() {
    let (net, data) = (xor_net(Some(2)), xor_data());
    let r = es()
        .generations(20)
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap();
    let best = r.best.unwrap();
    let again = evaluate(&net, &best.theta, &data, &metric::bce())
        .await
        .unwrap();
    assert!(
        (again - best.fitness).abs() < 1e-5,
        "{again} vs {}",
        best.fitness
    );
    let min_hist = r
        .history
        .iter()
        .map(|h| h.best)
        .fold(f32::INFINITY, f32::min);
    assert_eq!(best.fitness, min_hist);
}

#[tokio::test]
async fn theta_round_trips_through_safetensors() {
    let (net, data) = (xor_net(None), xor_data());
    let r = es().optimize(&net, &data, &metric::bce()).await.unwrap();
    let dir = std::env::temp_dir().join(format!("hyperfunc-theta-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("theta.safetensors");
    r.theta.save(&path).unwrap();
    let back = Theta::load(&path, &Device::Cpu).unwrap();
    assert!(back.bit_eq(&r.theta).unwrap());
    let missing = Theta::load(dir.join("nope.safetensors"), &Device::Cpu).unwrap_err();
    assert!(matches!(missing, Error::File { .. }), "{missing}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn two_systems_never_share_theta() {
    // Same function names, two systems, two runs: each run's θ is its own value.
    let (a, b, data) = (xor_net(None), xor_net(None), xor_data());
    let ra = es()
        .seed(1)
        .optimize(&a, &data, &metric::bce())
        .await
        .unwrap();
    let before = ra.theta.clone();
    let rb = es()
        .seed(2)
        .optimize(&b, &data, &metric::bce())
        .await
        .unwrap();
    assert!(ra.theta.bit_eq(&before).unwrap());
    assert!(!ra.theta.bit_eq(&rb.theta).unwrap());
}

/// A run does not hold its runtime worker for good: on a one-worker runtime, another task's
/// timer still fires while it runs. (It did not: a generation never returns `Pending`, so the
/// worker polled no timer, and `hyperfunc bench` once hung in a `sleep` beside a run.)
#[test]
fn a_run_lets_another_tasks_timer_fire_on_a_one_worker_runtime() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let report = rt.block_on(async {
            let stop = StopSignal::new();
            let es = es().generations(100_000_000).stop_on(stop.clone());
            let run = tokio::spawn(async move {
                let (net, data) = (xor_net(Some(2)), xor_data());
                es.optimize(&net, &data, &metric::bce()).await
            });
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            stop.raise("the timer fired");
            run.await
        });
        let _ = tx.send(report);
    });
    // Not a timing assertion: a bound on a hang (the run alone would take hours).
    let report = rx
        .recv_timeout(std::time::Duration::from_secs(300))
        .expect("the other task's timer never fired while the run held the worker")
        .unwrap()
        .unwrap();
    assert_eq!(report.stop, StopReason::Signal);
    assert!(!report.history.is_empty());
}
