//! Every demo reaches its figure (the demos are the files users run).

#[path = "../../demos/affine.rs"]
mod affine;
#[path = "../../demos/lm_params.rs"]
mod lm_params;
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
