//! Two composed 2×2 linear maps (custom tensor bodies, no bias) learn a rotation by 60° scaled by
//! 2.5. The MSE starts above 4 and must fall below 1e-3. Prints one JSON line.

use candle_core::Device;
use hyperfunc::prelude::*;

/// A 2×2 map written as a tensor body over the population: x [P, N, 2], w [P, 2, 2].
fn map(name: &str) -> HyperFn {
    HyperFn::tensor(name, ParamSpec::matrix(2, 2), |x, w| x.matmul(&w.t()?))
}

/// The 64 training points and their images under the target map.
fn data() -> anyhow::Result<Examples> {
    let (s, a) = (2.5f32, std::f32::consts::FRAC_PI_3);
    let m = [[s * a.cos(), -s * a.sin()], [s * a.sin(), s * a.cos()]];
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for i in 0..64 {
        let t = i as f32 * 0.618_034 * std::f32::consts::TAU;
        let r = 0.5 + (i % 8) as f32 * 0.25;
        let p = [r * t.cos(), r * t.sin()];
        xs.push(p.to_vec());
        ys.push(vec![
            m[0][0] * p[0] + m[0][1] * p[1],
            m[1][0] * p[0] + m[1][1] * p[1],
        ]);
    }
    Ok(Examples::from_rows(&xs, &ys, &Device::Cpu)?)
}

/// Trains the two maps and returns the demo's JSON summary.
pub async fn run() -> anyhow::Result<serde_json::Value> {
    let net = Chain::new(vec![map("first"), map("second")]);
    let data = data()?;
    let initial = evaluate(
        &net,
        &Theta::init(&net, 3, &Device::Cpu)?,
        &data,
        &metric::mse(),
    )
    .await?;

    let report = Es::default()
        .pop_size(32)
        .sigma(0.05)
        .lr(0.05)
        .generations(200)
        .seed(3)
        .minimize()
        .target(1e-4)
        .optimize(&net, &data, &metric::mse())
        .await?;

    let mse = evaluate(&net, &report.theta, &data, &metric::mse()).await?;
    Ok(serde_json::json!({
        "demo": "affine",
        "generations": report.history.len(),
        "seconds": report.seconds,
        "initial_mse": initial,
        "mse": mse,
    }))
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("{}", run().await?);
    Ok(())
}
