//! LLM sampling knobs as learnable θ. A toy "model" (an async hyperfunction, no network) reports
//! the temperature it was called with; the objective prefers 0.5. ES starts from the default 0.7
//! and must end within 0.5 ± 0.02 in 20 generations. Prints one JSON line.

use hyperfunc::prelude::*;
use serde_json::json;

/// Tunes the temperature and returns the demo's JSON summary.
pub async fn run() -> anyhow::Result<serde_json::Value> {
    let toy = HyperFn::io(
        "toy_llm",
        Some(LmParams::spec()),
        |_prompt, p: IoParams| async move {
            let lm = p.lm().map_err(|e| IoError::fatal(e.to_string()))?;
            Ok(json!(lm.temperature))
        },
    );
    let sys = Chain::new(vec![toy]);
    let prompts = (0..4).map(|i| json!(format!("question {i}"))).collect();
    let data = Examples::json(prompts, vec![json!(0.5); 4])?;
    let distance = metric::per_example(|pred, target| {
        (pred.as_f64().unwrap_or(f64::NAN) - target.as_f64().unwrap_or(f64::NAN)).abs() as f32
    });

    let report = Es::default()
        .pop_size(32)
        .sigma(0.1)
        // Plain SGD: a single knob with a sharp optimum; Adam's momentum would overshoot it.
        .sgd(0.0)
        .lr(0.04)
        .lr_schedule(Schedule::Cosine { to: 0.005 })
        .generations(20)
        .seed(7)
        .minimize()
        .optimize(&sys, &data, &distance)
        .await?;

    let raw = report.theta.values("toy_llm")?;
    let decoded = LmParams::spec().decode_values(&raw)?;
    let lm = LmParams::from_slice(&decoded)?;
    Ok(json!({
        "demo": "lm_params",
        "generations": report.history.len(),
        "seconds": report.seconds,
        "start_temperature": LmParams::default().temperature,
        "temperature": lm.temperature,
        "top_p": lm.top_p,
    }))
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("{}", run().await?);
    Ok(())
}
