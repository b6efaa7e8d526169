//! Every demo reaches its figure (the demos are the files users run).

#[path = "../../demos/affine.rs"]
mod affine;
#[path = "../../demos/cost.rs"]
mod cost;
#[path = "../../demos/lm_params.rs"]
mod lm_params;
#[cfg(feature = "llm")]
#[path = "../../demos/prompt_qa.rs"]
mod prompt_qa;
#[path = "../../demos/xor.rs"]
mod xor;
#[path = "../../demos/xor_single_layer.rs"]
mod xor_single_layer;

fn f(v: &serde_json::Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("demo JSON lacks `{key}`: {v}"))
}

#[tokio::test]
async fn xor_reaches_full_accuracy_and_low_bce() {
    let v = xor::run().await.unwrap();
    assert_eq!(v["demo"], "xor");
    assert_eq!(f(&v, "accuracy"), 1.0, "{v}");
    assert!(f(&v, "bce") < 0.05, "{v}");
    assert!(f(&v, "generations") <= 300.0);
}

#[tokio::test]
async fn one_layer_cannot_solve_xor() {
    let v = xor_single_layer::run().await.unwrap();
    assert!(f(&v, "accuracy") < 1.0, "{v}");
}

#[tokio::test]
async fn affine_maps_learn_rotation_and_scale() {
    let v = affine::run().await.unwrap();
    assert!(f(&v, "initial_mse") > 4.0, "{v}");
    assert!(f(&v, "mse") < 1e-3, "{v}");
    assert!(f(&v, "generations") <= 200.0);
}

#[tokio::test]
async fn lm_params_pull_temperature_to_target() {
    let v = lm_params::run().await.unwrap();
    assert!((f(&v, "start_temperature") - 0.7).abs() < 1e-6);
    assert!((f(&v, "temperature") - 0.5).abs() <= 0.02, "{v}");
    assert!(f(&v, "generations") <= 20.0);
}

#[cfg(feature = "llm")]
#[tokio::test]
async fn prompt_qa_explains_itself_without_an_endpoint() {
    let v = prompt_qa::run_with(None).await.unwrap();
    assert_eq!(v["demo"], "prompt_qa");
    assert_eq!(v["skipped"], "no endpoint configured");
}

#[cfg(feature = "llm")]
#[tokio::test]
async fn prompt_qa_runs_against_the_real_server() {
    // LiteLLM's mock `mock-qa` always answers {"answer": "8"} (right for 2 of 12 questions);
    // the meta model `mock-gpt` proposes its fixed text, which cannot score better.
    let url = std::env::var("HYPERFUNC_LLM_URL")
        .unwrap_or_else(|_| panic!("HYPERFUNC_LLM_URL is not set: run the suite with `ci/test`"));
    let v = prompt_qa::run_with(Some(prompt_qa::Endpoint {
        url,
        key: "sk-hf-free".into(),
        model: "mock-qa".into(),
        meta_model: "mock-gpt".into(),
    }))
    .await
    .unwrap();
    assert_eq!(v["demo"], "prompt_qa");
    let initial = f(&v, "initial_score");
    assert!(initial < 0.5, "{v}");
    assert_eq!(f(&v, "final_score"), initial, "{v}");
    assert!(f(&v, "rejected") >= 1.0, "{v}");
    assert_eq!(v["prompt"], "Answer the question.");
    assert!(f(&v, "llm_requests") > 12.0, "{v}");
}

#[tokio::test]
async fn the_cost_demo_and_the_cli_cost_report_agree() {
    let v = cost::run().await.unwrap();
    assert_eq!(v["calls"], 19_500, "{v}");
    assert_eq!(v["top_caller"], "crawler/prices.rs:88", "{v}");
    // 12 000 unlocker calls at $0.0015, exactly.
    assert_eq!(f(&v, "top_caller_usd"), 18.0, "{v}");
    let chart = std::env::temp_dir().join(format!("hyperfunc-spend-{}.svg", std::process::id()));
    let ledger = v["ledger"].as_str().unwrap();
    let report = [
        "cost", "report", "--store", ledger, "--by", "endpoint", "--since", "30d",
    ];
    let out = crate::common::cli_ok(
        &[&report[..], &["--json", "--chart", chart.to_str().unwrap()]].concat(),
        &[],
    );
    let r: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(r["total_calls"], 19_500, "{r}");
    assert_eq!(
        r["total_micros"].as_i64().unwrap(),
        (f(&v, "total_usd") * 1e6).round() as i64,
        "{r}"
    );
    assert_eq!(r["rows"][0]["key"][0], "unlocker", "{r}");
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("pdf-to-text"),
        "{svg}"
    );
    let _ = std::fs::remove_file(&chart);
    // A dimension that does not exist: a clear error, non-zero exit.
    let bad = crate::common::cli_err(
        &["cost", "report", "--store", ledger, "--by", "customer"],
        &[],
    );
    assert!(bad.contains("unknown dimension `customer`"));
}
