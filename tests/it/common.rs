//! Shared helpers for the integration tests.

use candle_core::{Device, Tensor};
use hyperfunc::prelude::*;

/// The four XOR examples.
pub fn xor_data() -> Examples {
    let x = Tensor::new(&[[0f32, 0.], [0., 1.], [1., 0.], [1., 1.]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[[0f32], [1.], [1.], [0.]], &Device::Cpu).unwrap();
    Examples::tensors(x, y).unwrap()
}

/// A 2-4-1 network as a chain of two built-in layers.
pub fn xor_net(rank: Option<usize>) -> Chain {
    let hidden = HyperFn::linear("hidden", 2, 4, Activation::Tanh);
    let output = HyperFn::linear("output", 4, 1, Activation::Sigmoid);
    match rank {
        Some(r) => Chain::new(vec![hidden.noise_rank(r), output.noise_rank(r)]),
        None => Chain::new(vec![hidden, output]),
    }
}

/// `n` pseudo-random rows of width `d` (deterministic).
pub fn rows(n: usize, d: usize, salt: u64) -> Vec<Vec<f32>> {
    (0..n)
        .map(|i| {
            (0..d)
                .map(|j| {
                    let h = (i as u64 * 2654435761 + j as u64 * 40503 + salt * 97)
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect()
        })
        .collect()
}

/// Flattened f32 values of a tensor.
pub fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// An async function with one knob (starting at 0) that fails for candidates whose knob went
/// negative and otherwise returns the knob.
pub fn picky() -> HyperFn {
    HyperFn::io(
        "picky",
        Some(ParamSpec::scalar().zeros()),
        |_x, p: IoParams| async move {
            if p.values()[0] < 0.0 {
                Err(IoError::fatal("negative knob"))
            } else {
                Ok(serde_json::json!(p.values()[0]))
            }
        },
    )
}

/// Runs the `hyperfunc` binary with `args` and the extra environment `envs`.
pub fn cli(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hyperfunc"))
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap()
}

/// The stdout of [`cli`], which must have succeeded (its stderr is shown when not).
pub fn cli_ok(args: &[&str], envs: &[(&str, &str)]) -> Vec<u8> {
    let out = cli(args, envs);
    assert!(
        out.status.success(),
        "hyperfunc {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The stderr of [`cli`], which must have failed.
pub fn cli_err(args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = cli(args, envs);
    assert!(!out.status.success(), "hyperfunc {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}
