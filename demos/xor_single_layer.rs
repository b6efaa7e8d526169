//! The control for the XOR demo: one linear layer cannot separate XOR, whatever ES does.
//! Same data, budget and seed as `xor`; accuracy stays below 1.0. Prints one JSON line.

use candle_core::{Device, Tensor};
use hyperfunc::prelude::*;

/// Trains a single sigmoid layer on XOR and returns the demo's JSON summary.
pub async fn run() -> anyhow::Result<serde_json::Value> {
    let net = Chain::new(vec![HyperFn::linear("single", 2, 1, Activation::Sigmoid)]);
    let x = Tensor::new(&[[0f32, 0.], [0., 1.], [1., 0.], [1., 1.]], &Device::Cpu)?;
    let y = Tensor::new(&[[0f32], [1.], [1.], [0.]], &Device::Cpu)?;
    let data = Examples::tensors(x, y)?;

    let report = Es::default()
        .pop_size(64)
        .sigma(0.1)
        .lr(0.1)
        .generations(300)
        .seed(42)
        .minimize()
        .optimize(&net, &data, &metric::bce())
        .await?;

    let bce = evaluate(&net, &report.theta, &data, &metric::bce()).await?;
    let accuracy = evaluate(&net, &report.theta, &data, &metric::accuracy()).await?;
    Ok(serde_json::json!({
        "demo": "xor_single_layer",
        "generations": report.history.len(),
        "seconds": report.seconds,
        "accuracy": accuracy,
        "bce": bce,
    }))
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("{}", run().await?);
    Ok(())
}
