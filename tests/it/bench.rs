//! The benchmark tasks are bit-identical to the reference definitions, and the runner runs.

use hyperfunc::bench::{task_a_data, task_b_data, SplitMix64Normals};
use sha2::{Digest, Sha256};

fn sha_f32(v: &[f32]) -> String {
    let mut h = Sha256::new();
    v.iter().for_each(|x| h.update(x.to_le_bytes()));
    format!("{:x}", h.finalize())
}

#[test]
fn task_data_matches_the_reference_fingerprint() {
    // From shared/peer-benches/fingerprint.json (written by tasks.py).
    let first = SplitMix64Normals::new(42).normals(4);
    assert_eq!(
        first,
        vec![0.414_719_76, 0.652_681_23, -0.891_886_23, 1.326_833_6]
    );
    let a = task_a_data();
    assert_eq!(
        sha_f32(&a.w_teacher),
        "bb52cb17c4794d1e41b2816bbb879e3abb28af6f2887c7e74c92aef6a59b2a2c"
    );
    assert_eq!(
        sha_f32(&a.x_train),
        "cfe4acc69581484386662dd0866ba3f727ed97f8d4870a4eb22202ed4761a0f2"
    );
    assert_eq!(
        sha_f32(&a.x_test),
        "88c821e7b8fefff81ac963b5db7ac207df22b7c42d657d374aa8bfa347301fc4"
    );
    let mut h = Sha256::new();
    a.y_train
        .iter()
        .for_each(|&y| h.update((y as i64).to_le_bytes()));
    assert_eq!(
        format!("{:x}", h.finalize()),
        "370c7e1597913ca810dd18ac60f9f61af7c6f0d6837bbfb3ca15b248dc701120"
    );
    let b = task_b_data();
    assert_eq!(
        sha_f32(&b.theta0),
        "754600ab3c75542c1639b1c3bad7c2039e8ce20cde7b50276342f06754335842"
    );
    assert_eq!(
        sha_f32(&b.x),
        "5259cff4d368ef6dce5a92ca98f1d91557743b590edae0fd314c0db1657ab3f0"
    );
}

#[test]
fn bench_command_prints_one_json_document() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hyperfunc"))
        .args(["bench", "--quick", "--json"])
        .output()
        .expect("run hyperfunc bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert!(v["peak_gflops"].as_f64().unwrap() > 0.0);
    assert!(v["machine"]["cores"].as_u64().unwrap() >= 1);
    assert_eq!(v["task_a"].as_array().unwrap().len(), 2);
    assert_eq!(v["task_b"].as_array().unwrap().len(), 6);
    for row in v["task_b"].as_array().unwrap() {
        assert!(row["evals_per_sec"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert!(v["observe"]["ns_per_record"].as_f64().unwrap() > 0.0);
    assert!(v["observe"]["eval_time_ratio"].as_f64().unwrap() > 0.0);
    assert_eq!(v["gridworld"]["pop"], 256);
    assert!(v["gridworld"]["episodes_per_sec"].as_f64().unwrap() > 0.0);
    assert!(
        v["gridworld"]["steps_per_sec"].as_f64().unwrap()
            >= v["gridworld"]["episodes_per_sec"].as_f64().unwrap()
    );
    let mem = &v["memory"]["sizes"][0];
    assert_eq!(mem["entries"], 2000);
    assert!(mem["inserts_per_s"].as_f64().unwrap() > 0.0, "{mem}");
    assert!(
        mem["p95_ms"].as_f64().unwrap() >= mem["p50_ms"].as_f64().unwrap(),
        "{mem}"
    );
    let tune = &v["tune"];
    assert!(
        tune["ns_per_call_p99"].as_f64().unwrap() >= tune["ns_per_call_p50"].as_f64().unwrap(),
        "{tune}"
    );
    assert_eq!(
        tune["regret"]["scenarios"].as_array().unwrap().len(),
        2,
        "{tune}"
    );
    assert_eq!(tune["shared_store"]["lost"], 0, "{tune}");
    assert!(
        v["autotune"]["hit_ms"].as_f64().unwrap() > 0.0,
        "{}",
        v["autotune"]
    );
    assert_eq!(tune["ledger"]["calls"], 20_000, "{tune}");
    assert!(
        tune["ledger"]["report_ms"].as_f64().unwrap() > 0.0,
        "{tune}"
    );
    // Task A learns even in the quick run: better than chance (0.1) on the test set.
    assert!(
        v["task_a"][0]["test_acc"].as_f64().unwrap() > 0.2,
        "{}",
        v["task_a"][0]
    );

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_hyperfunc"))
        .args(["bench", "--quick"])
        .env("HYPERFUNC_THREADS", "zero")
        .output()
        .expect("run hyperfunc bench");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("HYPERFUNC_THREADS"));
}
