//! Batched population evaluation: forwards per chunk, chunking invariance, the low-rank fast path.

use candle_core::Device;
use hyperfunc::prelude::*;
use proptest::prelude::*;

use crate::common::{rows, xor_data, xor_net};

fn regression(n: usize) -> Examples {
    let x = rows(n, 6, 1);
    let y = rows(n, 3, 2);
    Examples::from_rows(&x, &y, &Device::Cpu).unwrap()
}

fn mlp(rank: Option<usize>) -> Chain {
    let f = HyperFn::mlp("mlp", &[6, 8, 3], Activation::Tanh, Activation::Identity);
    let g = HyperFn::tensor("scale", ParamSpec::vector(3).constant(1.0), |x, w| {
        x.broadcast_mul(&w.unsqueeze(1)?)
    });
    Chain::new(vec![
        match rank {
            Some(r) => f.noise_rank(r),
            None => f,
        },
        g,
    ])
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[tokio::test]
async fn one_batched_forward_per_tensor_stage_per_chunk() {
    let (net, data) = (xor_net(Some(2)), xor_data());
    let theta = Theta::init(&net, 0, &Device::Cpu).unwrap();
    let es = Es::default().pop_size(64);
    let pop = es.population(&net, &theta, 0).unwrap();
    let one = evaluate_population(&net, &pop, &data, &metric::bce(), 1 << 16)
        .await
        .unwrap();
    assert_eq!((one.chunks, one.forwards), (1, 2));
    // 32 rows per forward = 8 candidates × 4 examples: 8 chunks, 2 stages each.
    let eight = evaluate_population(&net, &pop, &data, &metric::bce(), 32)
        .await
        .unwrap();
    assert_eq!((eight.chunks, eight.forwards), (8, 16));
    // Fewer rows than examples: chunks of 3 examples, one candidate each.
    let tiny = evaluate_population(&net, &pop, &data, &metric::bce(), 3)
        .await
        .unwrap();
    assert_eq!((tiny.chunks, tiny.forwards), (128, 256));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn chunking_never_changes_fitness(max_batch in 1usize..300, seed in 0u64..1000, rank in prop::option::of(1usize..4)) {
        let (net, data) = (mlp(rank), regression(13));
        let theta = Theta::init(&net, seed, &Device::Cpu).unwrap();
        let pop = Es::default().pop_size(10).seed(seed).population(&net, &theta, 1).unwrap();
        let big = block_on(evaluate_population(&net, &pop, &data, &metric::mse(), 1 << 20)).unwrap();
        let small = block_on(evaluate_population(&net, &pop, &data, &metric::mse(), max_batch)).unwrap();
        for (a, b) in big.fitness.iter().zip(&small.fitness) {
            prop_assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
        }
    }
}

#[tokio::test]
async fn low_rank_fast_path_equals_materialized_candidates() {
    for rank in [1, 2, 5] {
        let (net, data) = (mlp(Some(rank)), regression(17));
        let theta = Theta::init(&net, 4, &Device::Cpu).unwrap();
        let pop = Es::default()
            .pop_size(12)
            .sigma(0.3)
            .seed(11)
            .population(&net, &theta, 3)
            .unwrap();
        let fast = evaluate_population(&net, &pop, &data, &metric::mse(), 1 << 16)
            .await
            .unwrap();
        let thetas: Vec<Theta> = (0..pop.size()).map(|i| pop.candidate(i).unwrap()).collect();
        let explicit = Population::from_thetas(&thetas).unwrap();
        let slow = evaluate_population(&net, &explicit, &data, &metric::mse(), 1 << 16)
            .await
            .unwrap();
        // And one by one, with no population axis at all.
        for (i, t) in thetas.iter().enumerate() {
            let single = evaluate(&net, t, &data, &metric::mse()).await.unwrap();
            assert!((single - slow.fitness[i]).abs() <= 1e-5 * single.max(1.0));
        }
        for (a, b) in fast.fitness.iter().zip(&slow.fitness) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "rank {rank}: {a} vs {b}"
            );
        }
        // The candidates really differ.
        assert!(fast
            .fitness
            .iter()
            .any(|f| (f - fast.fitness[0]).abs() > 1e-4));
    }
}

#[tokio::test]
async fn antithetic_candidates_mirror_each_other() {
    let net = xor_net(None);
    let theta = Theta::init(&net, 0, &Device::Cpu).unwrap();
    let pop = Es::default()
        .pop_size(4)
        .sigma(0.5)
        .population(&net, &theta, 0)
        .unwrap();
    let base = theta.values("hidden.weight").unwrap();
    let plus = pop.candidate(0).unwrap().values("hidden.weight").unwrap();
    let minus = pop.candidate(1).unwrap().values("hidden.weight").unwrap();
    for ((b, p), m) in base.iter().zip(&plus).zip(&minus) {
        assert!((p - b + (m - b)).abs() < 1e-6);
        assert!((p - b).abs() > 0.0);
    }
}
