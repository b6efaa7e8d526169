//! The `cuda` feature on a real GPU: an evaluation there gives the CPU's fitness, ES trains
//! with θ on the GPU, autotune times the GPU as a knob behind its correctness gate, and
//! `optimize` evaluates on the GPU when a saved record says so.
//!
//! Compiled only with `--features cuda` and run only where a GPU is: CI has none. TASKS.md
//! ("GPU checks") gives the command that builds this binary here and runs it on a GPU machine.

use std::time::Duration;

use candle_core::Device;
use hyperfunc::autotune::tensor::{self, MlpProbe, Options, Probe};
use hyperfunc::autotune::{Mode, Store, SystemProfile, TensorDevice, TensorSettings};
use hyperfunc::prelude::*;

use crate::autotune::{run_worker, temp_dir};
use crate::common::{xor_data, xor_net};

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests run where a CUDA GPU is")
}

fn on_gpu(s: TensorSettings, evals: usize) -> TensorSettings {
    TensorSettings {
        device: TensorDevice::Cuda(0),
        max_batch_size: evals,
        ..s
    }
}

/// Relative closeness of two fitness vectors (summation order differs between devices).
fn assert_close(gpu: &[f32], cpu: &[f32], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            (g - c).abs() <= 1e-4 * (1.0 + c.abs()),
            "{what}: candidate {i} has {g} on the GPU, {c} on the CPU"
        );
    }
}

#[test]
fn an_evaluation_on_the_gpu_gives_the_cpus_fitness() {
    for rank in [None, Some(1), Some(4)] {
        let probe = MlpProbe::new(&[16, 32, 10], 64, 96, rank).unwrap();
        let cpu = probe.run(&TensorSettings::default()).unwrap();
        // The fitness differs between candidates, so a GPU path that scored one candidate for
        // all, or the base θ, would fail below.
        let spread = cpu.iter().fold(0f32, |m, f| m.max((f - cpu[0]).abs()));
        assert!(spread > 1e-3, "{rank:?}: {cpu:?}");
        let whole = on_gpu(TensorSettings::default(), probe.evals());
        assert_close(&probe.run(&whole).unwrap(), &cpu, &format!("{rank:?}"));
        // In chunks of 8 candidates, and with the low-rank weights formed per candidate.
        let chunks = TensorSettings {
            max_batch_size: 8 * 96,
            ..whole
        };
        assert_close(&probe.run(&chunks).unwrap(), &cpu, "chunks");
        let formed = TensorSettings {
            low_rank: hyperfunc::autotune::LowRankKernel::Materialize,
            ..whole
        };
        assert_close(&probe.run(&formed).unwrap(), &cpu, "materialized");
    }
}

#[tokio::test]
async fn es_trains_xor_with_theta_on_the_gpu() {
    let dev = gpu();
    let cpu = xor_data();
    let data = Examples::tensors(
        cpu.inputs().as_tensor().unwrap().to_device(&dev).unwrap(),
        cpu.targets().as_tensor().unwrap().to_device(&dev).unwrap(),
    )
    .unwrap();
    for rank in [None, Some(2)] {
        let net = xor_net(rank);
        let report = Es::default()
            .pop_size(64)
            .sigma(0.1)
            .lr(0.1)
            .generations(300)
            .seed(42)
            .minimize()
            .progress(false)
            .device(dev.clone())
            .optimize(&net, &data, &metric::bce())
            .await
            .unwrap();
        for (_, t) in report.theta.iter() {
            assert!(t.device().is_cuda(), "θ stays on the GPU");
        }
        let first = report.history[0].mean;
        assert!(
            report.final_fitness < 0.5 * first,
            "{rank:?}: BCE {first} → {}",
            report.final_fitness
        );
        let acc = evaluate(&net, &report.theta, &data, &metric::accuracy())
            .await
            .unwrap();
        assert_eq!(acc, 1.0, "{rank:?}: XOR solved on the GPU");
    }
}

#[test]
fn autotune_times_the_gpu_as_a_knob_behind_the_correctness_gate() {
    let profile = SystemProfile::detect();
    let gpu_name = profile.gpu.clone().unwrap_or_default();
    assert!(gpu_name.starts_with("cuda:0 "), "{gpu_name:?}");
    for rank in [None, Some(1)] {
        let probe = MlpProbe::new(&[64, 64, 10], 1024, 64, rank).unwrap();
        let mut opts = Options::new(Mode::Quick);
        opts.budget = Some(Duration::from_secs(20));
        let r = tensor::tune(&probe, &opts).unwrap();
        println!("{}", r.to_markdown());
        let timed_on_gpu: Vec<_> = r
            .candidates
            .iter()
            .filter(|c| c.settings.device == TensorDevice::Cuda(0) && c.excluded.is_none())
            .collect();
        assert!(
            !timed_on_gpu.is_empty() && timed_on_gpu.iter().all(|c| c.runs > 0),
            "{rank:?}: {:?}",
            r.candidates
        );
        let rejected: Vec<_> = r
            .candidates
            .iter()
            .filter(|c| c.excluded.as_deref().is_some_and(|w| w.contains("wrong")))
            .collect();
        assert!(rejected.is_empty(), "{rank:?}: {rejected:?}");
    }
}

#[test]
fn optimize_evaluates_on_the_gpu_when_a_saved_record_says_so() {
    let dir = temp_dir("gpu-optimize");
    let store = Store::at(&dir);
    // The worker's shape (MLP 8-4-2, population 16, 16 examples): a record whose setting is the
    // GPU.
    let probe = MlpProbe::new(&[8, 4, 2], 16, 16, None).unwrap();
    let mut opts = Options::new(Mode::Quick);
    opts.budget = Some(Duration::from_secs(3));
    opts.min_sample = Duration::from_millis(2);
    let mut r = tensor::tune(&probe, &opts).unwrap();
    r.settings = on_gpu(TensorSettings::default(), 256);
    r.evals_per_sec = 1.0;
    store.save(&r, true).unwrap();
    let used = run_worker(&dir);
    assert!(used.contains("CUDA 0, 256 rows per batch"), "{used}");
    let _ = std::fs::remove_dir_all(&dir);
}
