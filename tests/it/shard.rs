//! Workers that split a generation's pairs and share only fitness reach a single process's θ
//! bit for bit (the Rust side of distributed ES).

use candle_core::Device;
use hyperfunc::prelude::*;

use crate::common::rows;

fn net(rank: Option<usize>) -> HyperFn {
    let f = HyperFn::mlp("mlp", &[16, 12, 4], Activation::Tanh, Activation::Identity);
    match rank {
        Some(r) => f.noise_rank(r),
        None => f,
    }
}

fn data() -> Examples {
    let x = rows(48, 16, 1);
    let y: Vec<Vec<f32>> = (0..48u8).map(|i| vec![f32::from(i % 4)]).collect();
    Examples::from_rows(&x, &y, &Device::Cpu).unwrap()
}

fn es(max_batch_size: usize) -> Es {
    Es::default()
        .pop_size(40)
        .sigma(0.05)
        .lr(0.05)
        .generations(6)
        .seed(11)
        .minimize()
        .progress(false)
        .autotune(false)
        .max_batch_size(max_batch_size)
}

/// Pairs `0..n` cut at uneven points, handed to two workers in turn.
fn chunks(n: usize) -> Vec<std::ops::Range<usize>> {
    let cuts = [0, 3, 4, 11, 13, n];
    cuts.windows(2).map(|w| w[0]..w[1]).collect()
}

#[tokio::test]
async fn two_workers_splitting_pairs_reach_the_single_process_theta_bit_for_bit() {
    let data = data();
    let m = metric::cross_entropy();
    for rank in [None, Some(1), Some(3)] {
        let sys = Chain::new(vec![net(rank)]);
        // A small batch size makes the single process cut the population into other chunks.
        let single = es(96).optimize(&sys, &data, &m).await.unwrap();
        let mut workers = [es(4096).start(&sys).unwrap(), es(4096).start(&sys).unwrap()];
        let mut log = Vec::new();
        for _ in 0..6 {
            let mut fitness = Vec::new();
            for (i, r) in chunks(workers[0].pairs()).into_iter().enumerate() {
                let w = &mut workers[i % 2];
                fitness.extend(w.evaluate_pairs(&sys, &data, &m, r).await.unwrap());
            }
            assert_eq!(fitness.len(), 40);
            for w in &mut workers {
                w.tell_all(&fitness).unwrap();
            }
            assert_eq!(
                workers[0].theta_hash().unwrap(),
                workers[1].theta_hash().unwrap()
            );
            log.push(fitness);
        }
        assert!(
            workers[0].theta().bit_eq(&single.theta).unwrap(),
            "rank {rank:?}: the workers' θ differs from the single process's"
        );
        // The fitness each generation saw is the single process's (its best per generation).
        let best: Vec<f32> = log
            .iter()
            .map(|f| f.iter().copied().fold(f32::INFINITY, f32::min))
            .collect();
        let single_best: Vec<f32> = single.history.iter().map(|h| h.best).collect();
        assert_eq!(best, single_best, "rank {rank:?}");
    }
}

#[tokio::test]
async fn a_worker_restarted_from_a_checkpoint_replays_to_the_same_theta() {
    let (sys, data, m) = (
        Chain::new(vec![net(Some(2))]),
        data(),
        metric::cross_entropy(),
    );
    let mut w = es(4096).start(&sys).unwrap();
    let mut log = Vec::new();
    let mut saved = None;
    for g in 0..6 {
        if g == 2 {
            saved = Some(w.checkpoint().unwrap());
        }
        let n = w.pairs();
        let f = w.evaluate_pairs(&sys, &data, &m, 0..n).await.unwrap();
        w.tell(&f).unwrap();
        log.push(f);
    }
    let mut fresh = es(4096).start(&sys).unwrap();
    assert_ne!(fresh.theta_hash().unwrap(), w.theta_hash().unwrap());
    fresh.restore_checkpoint(&saved.unwrap()).unwrap();
    assert_eq!(fresh.generation(), 2);
    fresh.replay(&log[2..]).unwrap();
    assert_eq!(fresh.generation(), 6);
    assert_eq!(fresh.theta_hash().unwrap(), w.theta_hash().unwrap());
    assert!(fresh.theta().bit_eq(w.theta()).unwrap());
    // Replayed from the start, the same.
    let mut from_zero = es(4096).start(&sys).unwrap();
    from_zero.replay(&log).unwrap();
    assert!(from_zero.theta().bit_eq(w.theta()).unwrap());
}

#[tokio::test]
async fn bad_ranges_and_bytes_are_typed_errors_that_change_nothing() {
    let (sys, data, m) = (Chain::new(vec![net(None)]), data(), metric::cross_entropy());
    let mut w = es(4096).start(&sys).unwrap();
    let before = w.theta_hash().unwrap();
    for r in [3..3, 5..21, 19..25] {
        let e = w.evaluate_pairs(&sys, &data, &m, r).await.unwrap_err();
        assert!(e.to_string().contains("0..20"), "{e}");
    }
    let e = w.restore_checkpoint(b"not a checkpoint").unwrap_err();
    assert!(e.to_string().contains("EsRun::checkpoint"), "{e}");
    // Another system's checkpoint does not fit.
    let other = Chain::new(vec![HyperFn::linear("lin", 16, 4, Activation::Identity)]);
    let bytes = es(4096).start(&other).unwrap().checkpoint().unwrap();
    assert!(w.restore_checkpoint(&bytes).is_err());
    assert_eq!(w.theta_hash().unwrap(), before);
    assert_eq!(w.generation(), 0);
}
