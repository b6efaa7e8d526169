//! Criterion benches of the engine's hot paths: noise generation, the ES update, population
//! evaluation of built-in layers (materialized dense vs the low-rank fast path), chunking, and the
//! LLM limiter's overhead, and what recording a run in a run store costs.
//! Timings live here, never in tests. `hyperfunc bench --json` gives the headline figures.

use std::hint::black_box;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use hyperfunc::bench::{task_b_data, task_b_population, task_b_system};
use hyperfunc::prelude::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// One 256×256 matrix parameter, dense or low-rank noise.
fn square(rank: Option<usize>) -> Chain {
    let f = HyperFn::linear_no_bias("w", 256, 256, Activation::Identity);
    Chain::new(vec![match rank {
        Some(r) => f.noise_rank(r),
        None => f,
    }])
}

fn noise(c: &mut Criterion) {
    let mut g = c.benchmark_group("noise_256x256_p256");
    for (label, rank) in [("dense", None), ("rank4", Some(4))] {
        let net = square(rank);
        let theta = Theta::init(&net, 0, &Device::Cpu).expect("theta");
        let es = Es::default().pop_size(256);
        g.bench_function(label, |b| {
            b.iter(|| black_box(es.population(&net, &theta, 0).expect("pop")))
        });
    }
    g.finish();
}

fn update(c: &mut Criterion) {
    let mut g = c.benchmark_group("es_update_256x256_p256");
    for (label, rank) in [("dense", None), ("rank4", Some(4))] {
        let net = square(rank);
        let fitness: Vec<f32> = (0..256).map(|i| ((i * 37) % 256) as f32).collect();
        g.bench_function(label, |b| {
            b.iter_batched(
                || {
                    let mut run = Es::default().pop_size(256).start(&net).expect("start");
                    run.ask().expect("ask");
                    run
                },
                |mut run| black_box(run.tell(&fitness).expect("tell")),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn evaluation(c: &mut Criterion) {
    let rt = rt();
    let data = task_b_data();
    let ce = metric::cross_entropy();
    let mut g = c.benchmark_group("mlp_64_32_10_eval_n256");
    for pop in [64usize, 256] {
        for (label, low_rank, pairs) in [
            ("dense_materialized", false, false),
            ("dense_pairs", false, true),
            ("low_rank_fast_path", true, false),
        ] {
            let (net, theta, examples) = task_b_system(&data, low_rank).expect("system");
            // Task B's dense candidates are materialized by definition; `dense_pairs` is the
            // same noise as ES samples it, antithetic pairs sharing `X·W₁ᵀ`.
            let population = if pairs {
                Es::default()
                    .pop_size(pop)
                    .sigma(0.05)
                    .seed(11)
                    .population(&net, &theta, 0)
            } else {
                task_b_population(&net, &theta, pop, low_rank)
            }
            .expect("population");
            g.bench_with_input(BenchmarkId::new(label, pop), &pop, |b, _| {
                b.iter(|| {
                    rt.block_on(evaluate_population(
                        &net,
                        &population,
                        &examples,
                        &ce,
                        1 << 16,
                    ))
                    .expect("eval")
                })
            });
        }
    }
    g.finish();

    // A single Linear layer, shared input: dense noise in antithetic pairs (`X·Wᵀ` shared, one
    // GEMM column block per pair), dense noise without pairs (every candidate materialized), and
    // low-rank.
    let mut g = c.benchmark_group("linear_64x64_eval_n256_p256");
    let x = Tensor::from_vec(
        hyperfunc::bench::SplitMix64Normals::new(3).normals(256 * 64),
        (256, 64),
        &Device::Cpu,
    )
    .expect("x");
    let y = Tensor::zeros((256, 64), candle_core::DType::F32, &Device::Cpu).expect("y");
    let examples = Examples::tensors(x, y).expect("examples");
    for (label, rank, pairs) in [
        ("dense", None, true),
        ("dense_no_pairs", None, false),
        ("rank2", Some(2), true),
    ] {
        let f = HyperFn::linear("lin", 64, 64, Activation::Tanh);
        let net = Chain::new(vec![match rank {
            Some(r) => f.noise_rank(r),
            None => f,
        }]);
        let theta = Theta::init(&net, 0, &Device::Cpu).expect("theta");
        let pop = Es::default()
            .pop_size(256)
            .antithetic(pairs)
            .population(&net, &theta, 0)
            .expect("pop");
        g.bench_function(label, |b| {
            b.iter(|| {
                rt.block_on(evaluate_population(
                    &net,
                    &pop,
                    &examples,
                    &metric::mse(),
                    1 << 16,
                ))
                .expect("eval")
            })
        });
    }
    g.finish();
}

fn metrics(c: &mut Criterion) {
    // Softmax cross-entropy over P × N × C logits (Task A's shape per generation).
    let (p, n, k) = (256usize, 1024usize, 10usize);
    let z = hyperfunc::bench::SplitMix64Normals::new(1).normals(p * n * k);
    let z = Value::batched(Tensor::from_vec(z, (p, n, k), &Device::Cpu).expect("z"));
    let y: Vec<f32> = (0..n).map(|i| (i % k) as f32).collect();
    let y = Value::shared(Tensor::from_vec(y, n, &Device::Cpu).expect("y"));
    let mut g = c.benchmark_group("metric_p256_n1024_c10");
    g.bench_function("cross_entropy", |b| {
        b.iter(|| metric::cross_entropy().score(&z, &y, p).expect("ce"))
    });
    g.bench_function("class_accuracy", |b| {
        b.iter(|| metric::class_accuracy().score(&z, &y, p).expect("acc"))
    });
    g.finish();
}

fn chunking(c: &mut Criterion) {
    let rt = rt();
    let data = task_b_data();
    let ce = metric::cross_entropy();
    let (net, theta, examples) = task_b_system(&data, true).expect("system");
    let population = task_b_population(&net, &theta, 256, true).expect("population");
    let mut g = c.benchmark_group("chunking_mlp_p256_n256");
    for rows in [2048usize, 8192, 16384, 65536] {
        g.bench_with_input(BenchmarkId::from_parameter(rows), &rows, |b, &rows| {
            b.iter(|| {
                rt.block_on(evaluate_population(&net, &population, &examples, &ce, rows))
                    .expect("eval")
            })
        });
    }
    g.finish();
}

/// The LLM limiter's bookkeeping per call (acquire, success, release), uncontended.
/// XOR for 200 generations, without and with a run store (rows, adaptive checkpoints, the
/// control poll): what recording a run costs end to end.
fn runs(c: &mut Criterion) {
    let rt = rt();
    let t = hyperfunc::runs::task::task("xor").expect("xor");
    let dir = std::env::temp_dir().join(format!("hyperfunc-criterion-runs-{}", std::process::id()));
    let store = hyperfunc::runs::RunStore::open(&dir).expect("store");
    let es =
        t.es.clone()
            .generations(200)
            .progress(false)
            .autotune(false);
    let mut g = c.benchmark_group("runs_xor_200_generations");
    g.bench_function("no_store", |b| {
        b.iter(|| rt.block_on(es.optimize(&t.system, &t.examples, t.metric.as_ref())))
    });
    let recorded = es.clone().store(store.clone());
    g.bench_function("run_store", |b| {
        b.iter(|| rt.block_on(recorded.optimize(&t.system, &t.examples, t.metric.as_ref())))
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(feature = "llm")]
fn llm_limiter(c: &mut Criterion) {
    let rt = rt();
    c.bench_function("llm_limiter_1000_calls", |b| {
        b.iter(|| rt.block_on(hyperfunc::llm::bench::limiter_overhead_ns(black_box(1000))))
    });
}

#[cfg(not(feature = "llm"))]
fn llm_limiter(_: &mut Criterion) {}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = noise, update, evaluation, metrics, chunking, runs, llm_limiter
}
criterion_main!(benches);
