//! XOR with a 2-4-1 network of two hyperfunctions (tanh hidden layer with low-rank noise, sigmoid
//! output), trained by ES on binary cross-entropy. Prints one JSON line.

use candle_core::{Device, Tensor};
use hyperfunc::prelude::*;

/// The system: two built-in layers composed in ordinary async Rust.
struct Xor {
    hidden: HyperFn,
    output: HyperFn,
}

impl HyperSystem for Xor {
    fn hyperfunctions(&self) -> Vec<HyperFn> {
        vec![self.hidden.clone(), self.output.clone()]
    }

    async fn run(&self, cx: &Cx, x: Value) -> Result<Value> {
        let h = cx.call(&self.hidden, x).await?; // [P, 4, 4]
        cx.call(&self.output, h).await // [P, 4, 1]
    }
}

/// Trains XOR and returns the demo's JSON summary.
pub async fn run() -> anyhow::Result<serde_json::Value> {
    let xor = Xor {
        hidden: HyperFn::linear("hidden", 2, 4, Activation::Tanh).noise_rank(2),
        output: HyperFn::linear("output", 4, 1, Activation::Sigmoid),
    };
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
        .optimize(&xor, &data, &metric::bce())
        .await?;

    let bce = evaluate(&xor, &report.theta, &data, &metric::bce()).await?;
    let accuracy = evaluate(&xor, &report.theta, &data, &metric::accuracy()).await?;
    Ok(serde_json::json!({
        "demo": "xor",
        "generations": report.history.len(),
        "seconds": report.seconds,
        "accuracy": accuracy,
        "bce": bce,
        "params": report.theta.num_params(),
    }))
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("{}", run().await?);
    Ok(())
}
