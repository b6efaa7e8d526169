//! The fused CPU kernels agree with an independent implementation written in plain candle ops.

use candle_core::{Device, Tensor};
use hyperfunc::prelude::*;

use crate::common::{rows, values};

fn act(a: Activation, t: &Tensor) -> candle_core::Result<Tensor> {
    match a {
        Activation::Identity => Ok(t.clone()),
        Activation::Relu => t.relu(),
        Activation::Tanh => t.tanh(),
        Activation::Sigmoid => (t.neg()?.exp()? + 1.0)?.recip(),
        Activation::Gelu => t.gelu(),
    }
}

/// The same 6-8-3 network as a generic tensor body: x [P,N,6], θ materialized per candidate.
fn reference(hidden: Activation, output: Activation) -> HyperFn {
    let specs = vec![
        ("0.weight".to_string(), ParamSpec::matrix(8, 6)),
        ("0.bias".to_string(), ParamSpec::vector(8)),
        ("1.weight".to_string(), ParamSpec::matrix(3, 8)),
        ("1.bias".to_string(), ParamSpec::vector(3)),
    ];
    HyperFn::tensor_multi("net", specs, move |x, p| {
        let h = x
            .matmul(&p[0].transpose(1, 2)?)?
            .broadcast_add(&p[1].unsqueeze(1)?)?;
        let h = act(hidden, &h)?;
        let o = h
            .matmul(&p[2].transpose(1, 2)?)?
            .broadcast_add(&p[3].unsqueeze(1)?)?;
        act(output, &o)
    })
}

#[tokio::test]
async fn fused_layer_kernels_match_plain_candle_ops() {
    let data = Examples::from_rows(&rows(37, 6, 3), &rows(37, 3, 4), &Device::Cpu).unwrap();
    for (hidden, output) in [
        (Activation::Tanh, Activation::Identity),
        (Activation::Relu, Activation::Sigmoid),
        (Activation::Gelu, Activation::Tanh),
    ] {
        for rank in [None, Some(1), Some(3)] {
            let f = HyperFn::mlp("net", &[6, 8, 3], hidden, output);
            let fast = Chain::new(vec![match rank {
                Some(r) => f.noise_rank(r),
                None => f,
            }]);
            let slow = Chain::new(vec![reference(hidden, output)]);
            let theta = Theta::init(&fast, 5, &Device::Cpu).unwrap();
            let pop = Es::default()
                .pop_size(10)
                .sigma(0.4)
                .population(&fast, &theta, 2)
                .unwrap();
            let thetas: Vec<Theta> = (0..10).map(|i| pop.candidate(i).unwrap()).collect();
            let a = evaluate_population(&fast, &pop, &data, &metric::mse(), 64)
                .await
                .unwrap();
            let explicit = Population::from_thetas(&thetas).unwrap();
            let b = evaluate_population(&slow, &explicit, &data, &metric::mse(), 1 << 16)
                .await
                .unwrap();
            for (x, y) in a.fitness.iter().zip(&b.fitness) {
                assert!(
                    (x - y).abs() <= 2e-6 * y.abs().max(1.0),
                    "{hidden:?}/{output:?}/{rank:?}: {x} vs {y}"
                );
            }
        }
    }
}

/// A network of any depth as a generic tensor body: x [P,N,d0], θ materialized per candidate,
/// `hidden` after every layer but the last.
fn deep_reference(dims: &[usize], hidden: Activation) -> HyperFn {
    let mut specs = Vec::new();
    for (i, w) in dims.windows(2).enumerate() {
        specs.push((format!("{i}.weight"), ParamSpec::matrix(w[1], w[0])));
        specs.push((format!("{i}.bias"), ParamSpec::vector(w[1])));
    }
    let layers = dims.len() - 1;
    HyperFn::tensor_multi("net", specs, move |x, p| {
        let mut h = x.clone();
        for i in 0..layers {
            h = h
                .matmul(&p[2 * i].transpose(1, 2)?)?
                .broadcast_add(&p[2 * i + 1].unsqueeze(1)?)?;
            if i + 1 < layers {
                h = act(hidden, &h)?;
            }
        }
        Ok(h)
    })
}

/// Three and four layers: each hidden activation passes to the next layer through a worker's
/// scratch buffers (taking turns), in tiles of several candidates, and a worker reuses its
/// buffers from one tile and one evaluation to the next. Debug builds fill the buffers with NaN
/// before each layer writes, so a kernel that read its output before writing it would show here.
#[tokio::test]
async fn deeper_networks_match_plain_candle_ops() {
    let data = Examples::from_rows(&rows(37, 6, 5), &rows(37, 3, 6), &Device::Cpu).unwrap();
    for dims in [&[6, 8, 5, 3][..], &[6, 9, 7, 5, 3]] {
        for rank in [None, Some(1), Some(2)] {
            let f = HyperFn::mlp("net", dims, Activation::Tanh, Activation::Identity);
            let fast = Chain::new(vec![match rank {
                Some(r) => f.noise_rank(r),
                None => f,
            }]);
            let slow = Chain::new(vec![deep_reference(dims, Activation::Tanh)]);
            let theta = Theta::init(&fast, 8, &Device::Cpu).unwrap();
            let pop = Es::default()
                .pop_size(24)
                .sigma(0.4)
                .population(&fast, &theta, 3)
                .unwrap();
            let thetas: Vec<Theta> = (0..24).map(|i| pop.candidate(i).unwrap()).collect();
            let explicit = Population::from_thetas(&thetas).unwrap();
            let b = evaluate_population(&slow, &explicit, &data, &metric::mse(), 1 << 16)
                .await
                .unwrap();
            // All candidates in one chunk (tiles of up to 12 per worker), then chunks of 2.
            for max_batch in [1 << 16, 2 * 37] {
                let a = evaluate_population(&fast, &pop, &data, &metric::mse(), max_batch)
                    .await
                    .unwrap();
                for (x, y) in a.fitness.iter().zip(&b.fitness) {
                    assert!(
                        (x - y).abs() <= 2e-6 * y.abs().max(1.0),
                        "{dims:?}/{rank:?}/{max_batch}: {x} vs {y}"
                    );
                }
            }
            assert!(b.fitness.iter().any(|&v| v != b.fitness[0]));
        }
    }
}

#[tokio::test]
async fn cross_entropy_and_class_accuracy_match_a_float64_reference() {
    let (p, n, c) = (3usize, 50usize, 7usize);
    let mut z = rows(p * n, c, 9).concat();
    z.iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v *= 1.0 + (i % 13) as f32); // wide logits
    let labels: Vec<usize> = (0..n).map(|i| (i * 5) % c).collect();
    let zt = Tensor::from_vec(z.clone(), (p, n, c), &Device::Cpu).unwrap();
    let yt = Tensor::from_vec(
        labels.iter().map(|&l| l as f32).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap();
    let (pv, yv) = (Value::batched(zt), Value::shared(yt));
    let ce = metric::cross_entropy().score(&pv, &yv, p).unwrap();
    let acc = metric::class_accuracy().score(&pv, &yv, p).unwrap();
    for cand in 0..p {
        let mut want = 0.0f64;
        let mut hits = 0;
        for (row, &y) in z[cand * n * c..(cand + 1) * n * c].chunks(c).zip(&labels) {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            want += lse - row[y] as f64;
            hits += usize::from(row.iter().all(|&v| v <= row[y]));
        }
        want /= n as f64;
        assert!(
            (ce[cand] as f64 - want).abs() < 1e-5 * want.max(1.0),
            "{} vs {want}",
            ce[cand]
        );
        assert_eq!(acc[cand], hits as f32 / n as f32);
    }
    // The same logits stored class-major (the transposed view of [P, C, N], what the tiled
    // layers return) score the same bits, read in place.
    let mut zc = vec![0.0f32; p * n * c];
    for cand in 0..p {
        for r in 0..n {
            for k in 0..c {
                zc[cand * n * c + k * n + r] = z[cand * n * c + r * c + k];
            }
        }
    }
    let view = Tensor::from_vec(zc, (p, c, n), &Device::Cpu)
        .and_then(|t| t.transpose(1, 2))
        .unwrap();
    assert!(!view.is_contiguous());
    let pc = Value::batched(view);
    let ce_cm = metric::cross_entropy().score(&pc, &yv, p).unwrap();
    let acc_cm = metric::class_accuracy().score(&pc, &yv, p).unwrap();
    for cand in 0..p {
        assert_eq!(ce[cand].to_bits(), ce_cm[cand].to_bits());
        assert_eq!(acc[cand], acc_cm[cand]);
    }
    // Labels out of range are a typed error naming the example.
    let bad = Tensor::from_vec(vec![9f32; n], n, &Device::Cpu).unwrap();
    let e = metric::cross_entropy()
        .score(&pv, &Value::shared(bad), p)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let _ = values;
}

/// The class metrics, whose CPU kernels read class-major logits in place.
fn class_metrics() -> [&'static dyn Metric; 2] {
    [&metric::CrossEntropy, &metric::ClassAccuracy]
}

/// A one-function network and `size` candidates around its seeded θ (σ 0.4, generation 1).
fn candidates(f: HyperFn, size: usize, antithetic: bool) -> (Chain, Population) {
    let net = Chain::new(vec![f]);
    let theta = Theta::init(&net, 5, &Device::Cpu).unwrap();
    let pop = Es::default()
        .pop_size(size)
        .sigma(0.4)
        .seed(2)
        .antithetic(antithetic)
        .population(&net, &theta, 1)
        .unwrap();
    (net, pop)
}

/// Class metrics on populations: the tiled forward writes the last layer class-major and the
/// metrics read it in place; every candidate still scores the bits it scores in a chunk of its
/// own (one candidate, or one antithetic pair: row-major, no tiles), for dense and low-rank
/// noise, one layer and two. Dense candidates without antithetic pairs also score those bits
/// evaluated alone from their θ; antithetic pairs computed as `X·Wᵀ ± X·Eᵀ` score them up to
/// rounding.
#[tokio::test]
async fn class_major_population_scores_equal_candidates_scored_alone() {
    let (n, d, c) = (70usize, 9usize, 4usize);
    let x = Tensor::from_vec(rows(n, d, 3).concat(), (n, d), &Device::Cpu).unwrap();
    let y: Vec<f32> = (0..n).map(|i| ((i * 7) % c) as f32).collect();
    let data = Examples::tensors(x, Tensor::from_vec(y, n, &Device::Cpu).unwrap()).unwrap();
    let nets: Vec<(&str, HyperFn)> = vec![
        ("linear", HyperFn::linear("f", d, c, Activation::Identity)),
        (
            "linear r1",
            HyperFn::linear("f", d, c, Activation::Identity).noise_rank(1),
        ),
        (
            "linear r3",
            HyperFn::linear("f", d, c, Activation::Identity).noise_rank(3),
        ),
        (
            "mlp",
            HyperFn::mlp("f", &[d, 6, c], Activation::Tanh, Activation::Identity),
        ),
        (
            "mlp r1",
            HyperFn::mlp("f", &[d, 6, c], Activation::Tanh, Activation::Identity).noise_rank(1),
        ),
        (
            "mlp r2",
            HyperFn::mlp("f", &[d, 6, c], Activation::Tanh, Activation::Identity).noise_rank(2),
        ),
    ];
    for (label, f, antithetic) in nets
        .into_iter()
        .flat_map(|(l, f)| [(l, f.clone(), true), (l, f, false)])
    {
        let dense = !label.contains(" r");
        let (net, pop) = candidates(f, 16, antithetic);
        let label = format!("{label}, antithetic {antithetic}");
        for m in class_metrics() {
            let all = evaluate_population(&net, &pop, &data, m, 1 << 20)
                .await
                .unwrap();
            let one_by_one = evaluate_population(&net, &pop, &data, m, n).await.unwrap();
            for i in 0..pop.size() {
                let (a, b) = (all.fitness[i], one_by_one.fitness[i]);
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{label}, candidate {i}: {a} vs {b}"
                );
                if dense {
                    let alone = evaluate(&net, &pop.candidate(i).unwrap(), &data, m)
                        .await
                        .unwrap();
                    if antithetic {
                        let tol = 1e-6 * alone.abs().max(1.0);
                        assert!((a - alone).abs() <= tol, "{label}, {i}: {a} vs {alone}");
                    } else {
                        assert_eq!(a.to_bits(), alone.to_bits(), "{label}, {i}: {a} vs {alone}");
                    }
                }
            }
            assert!(all.fitness.iter().any(|&v| v != all.fitness[0]), "{label}");
        }
    }
}

/// Antithetic pairs with dense noise are computed together on a shared input, `X·Wᵀ ± X·E_kᵀ`
/// (half the GEMM). A candidate's fitness is then the same bits however the population is cut
/// into chunks (an odd cut keeps pairs whole; a chunk too small for two candidates splits the
/// examples instead), and within rounding of its θ evaluated alone.
#[tokio::test]
async fn antithetic_pairs_score_the_same_bits_however_the_population_is_cut() {
    let (n, d, c) = (53usize, 7usize, 5usize);
    let x = Tensor::from_vec(rows(n, d, 9).concat(), (n, d), &Device::Cpu).unwrap();
    let y: Vec<f32> = (0..n).map(|i| ((i * 3) % c) as f32).collect();
    let data = Examples::tensors(x, Tensor::from_vec(y, n, &Device::Cpu).unwrap()).unwrap();
    let nets = [
        HyperFn::linear("f", d, c, Activation::Identity),
        HyperFn::mlp("f", &[d, 8, c], Activation::Tanh, Activation::Identity),
    ];
    for f in nets {
        let (net, pop) = candidates(f, 22, true);
        for m in class_metrics() {
            let all = evaluate_population(&net, &pop, &data, m, 1 << 20)
                .await
                .unwrap();
            for max in [n, 2 * n, 3 * n, 5 * n + 1, 7 * n] {
                let cut = evaluate_population(&net, &pop, &data, m, max)
                    .await
                    .unwrap();
                assert!(cut.chunks > 1);
                for (i, (a, b)) in all.fitness.iter().zip(&cut.fitness).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "max {max}, candidate {i}: {a} vs {b}"
                    );
                }
            }
            for (i, a) in all.fitness.iter().enumerate() {
                let alone = evaluate(&net, &pop.candidate(i).unwrap(), &data, m)
                    .await
                    .unwrap();
                assert!(
                    (a - alone).abs() <= 1e-6 * alone.abs().max(1.0),
                    "candidate {i}: {a} vs {alone}"
                );
            }
            // The candidates differ.
            assert!(all.fitness.iter().any(|&v| v != all.fitness[0]));
        }
    }
}

/// An elementwise metric as a plain f64 loop over whatever predictions it is given: the mean
/// of `f(prediction, target)`.
struct MeanF64(fn(f64, f64) -> f64);

impl Metric for MeanF64 {
    fn score(&self, preds: &Value, targets: &Value, pop: usize) -> hyperfunc::Result<Vec<f32>> {
        let y: Vec<f32> = targets
            .as_tensor()?
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let z = preds
            .as_tensor()?
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(z.len(), pop * y.len());
        Ok(z.chunks(y.len())
            .map(|c| {
                let s: f64 = c
                    .iter()
                    .zip(&y)
                    .map(|(&a, &b)| (self.0)(f64::from(a), f64::from(b)))
                    .sum();
                (s / y.len() as f64) as f32
            })
            .collect())
    }
}

/// The elementwise metrics (MSE, BCE, accuracy) read the tiled layers' class-major outputs in
/// place: they agree with an f64 loop over the same predictions, and a candidate scores the same
/// bits in a population as in a chunk of its own (and, for dense noise without pairs, as its θ
/// evaluated alone).
#[tokio::test]
async fn elementwise_metrics_read_class_major_outputs_in_place_and_score_the_same_bits_alone() {
    let (n, d, k) = (70usize, 9usize, 4usize);
    let targets: Vec<Vec<f32>> = rows(n, k, 6)
        .into_iter()
        .map(|r| {
            r.into_iter()
                .map(|v| f32::from(u8::from(v > 0.0)))
                .collect()
        })
        .collect();
    let data = Examples::from_rows(&rows(n, d, 5), &targets, &Device::Cpu).unwrap();
    let mse: (&str, &dyn Metric, MeanF64) =
        ("mse", &metric::mse(), MeanF64(|a, b| (a - b) * (a - b)));
    let bce: (&str, &dyn Metric, MeanF64) = (
        "bce",
        &metric::bce(),
        MeanF64(|p, y| -(p.ln() * y + (1.0 - p).ln() * (1.0 - y))),
    );
    let acc: (&str, &dyn Metric, MeanF64) = (
        "accuracy",
        &metric::accuracy(),
        MeanF64(|p, y| f64::from(u8::from((p >= 0.5) == (y >= 0.5)))),
    );
    let nets: Vec<(&str, HyperFn)> = vec![
        ("linear", HyperFn::linear("f", d, k, Activation::Sigmoid)),
        (
            "mlp",
            HyperFn::mlp("f", &[d, 6, k], Activation::Tanh, Activation::Sigmoid),
        ),
        (
            "mlp r1",
            HyperFn::mlp("f", &[d, 6, k], Activation::Tanh, Activation::Sigmoid).noise_rank(1),
        ),
    ];
    for (label, f) in nets {
        let (net, pop) = candidates(f, 16, false);
        for (name, m, reference) in [&mse, &bce, &acc] {
            let all = evaluate_population(&net, &pop, &data, *m, 1 << 20)
                .await
                .unwrap();
            let f64s = evaluate_population(&net, &pop, &data, reference, 1 << 20)
                .await
                .unwrap();
            let one_by_one = evaluate_population(&net, &pop, &data, *m, n).await.unwrap();
            for i in 0..pop.size() {
                let (a, r, b) = (all.fitness[i], f64s.fitness[i], one_by_one.fitness[i]);
                assert!(
                    (a - r).abs() <= 2e-6 * r.abs().max(1e-2),
                    "{label} {name}, {i}: {a} vs {r}"
                );
                assert_eq!(a.to_bits(), b.to_bits(), "{label} {name}, {i}: {a} vs {b}");
                if !label.contains(" r") {
                    let alone = evaluate(&net, &pop.candidate(i).unwrap(), &data, *m)
                        .await
                        .unwrap();
                    assert_eq!(a.to_bits(), alone.to_bits(), "{label} {name}, {i}");
                }
            }
            assert!(
                all.fitness.iter().any(|&v| v != all.fitness[0]),
                "{label} {name}"
            );
        }
    }
    // Predictions that do not line up with the targets are refused with both shapes.
    let z = Tensor::zeros((2, n, k + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    for m in [
        &metric::mse() as &dyn Metric,
        &metric::bce(),
        &metric::accuracy(),
    ] {
        let e = m
            .score(&Value::batched(z.clone()), data.targets(), 2)
            .unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
        assert!(e.to_string().contains(&format!("{}", k + 1)), "{e}");
    }
}
