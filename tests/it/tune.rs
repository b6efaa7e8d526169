//! `hyperfunc::tune`: bandit choices learned from scripted rewards, the SQLite state shared
//! across restarts and connections, per-context priors, change detection, cost-aware
//! objectives and typed errors.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use hyperfunc::tune::{ChangeDetection, Objective, Outcome, Policy, Tuner};
use hyperfunc::Error;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rand_xoshiro::Xoshiro256PlusPlus;

/// A SQLite file in the temp dir, removed (with its WAL files) on drop.
pub(crate) struct TempDb(pub(crate) PathBuf);

impl TempDb {
    pub(crate) fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Self(std::env::temp_dir().join(format!(
            "tune-{name}-{}-{nanos}-{}.sqlite",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", self.0.display()));
        }
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

/// Runs `n` tuned calls; `reward(i, choice)` scripts the environment. Returns the picks.
fn simulate(
    tuner: &Tuner,
    label: &str,
    context: &str,
    policy: Option<Policy>,
    choices: &[&str],
    n: usize,
    mut reward: impl FnMut(usize, &str) -> (f64, Option<f64>),
) -> Vec<String> {
    block_on(async {
        let mut picks = Vec::with_capacity(n);
        for i in 0..n {
            let mut call = tuner
                .tune(label)
                .choices(choices.iter().copied())
                .context(context);
            if let Some(p) = &policy {
                call = call.policy(p.clone());
            }
            let (name, outcome) = call
                .run(|c| async move { Ok::<_, Error>(c.name().to_string()) })
                .await
                .unwrap();
            let (r, cost) = reward(i, &name);
            outcome.reward(r).unwrap();
            if let Some(c) = cost {
                outcome.cost(c).unwrap();
            }
            picks.push(name);
        }
        picks
    })
}

fn share(picks: &[String], name: &str) -> f64 {
    picks.iter().filter(|p| *p == name).count() as f64 / picks.len() as f64
}

fn bernoulli(rng: &mut Xoshiro256PlusPlus, p: f64) -> f64 {
    if rng.random::<f64>() < p {
        1.0
    } else {
        0.0
    }
}

const ARMS: [&str; 3] = ["a", "b", "c"];

fn p_of(name: &str) -> f64 {
    match name {
        "a" => 0.3,
        "b" => 0.5,
        _ => 0.7,
    }
}

#[test]
fn thompson_converges_to_the_best_arm_on_binary_rewards() {
    let tuner = Tuner::in_memory().unwrap().seed(1);
    let mut env = Xoshiro256PlusPlus::seed_from_u64(11);
    let picks = simulate(&tuner, "bin", "", None, &ARMS, 2000, |_, c| {
        (bernoulli(&mut env, p_of(c)), None)
    });
    let s = share(&picks[1500..], "c");
    assert!(s >= 0.8, "share of the best arm in the last 500 calls: {s}");
    let report = tuner.report(Some("bin")).unwrap();
    assert_eq!(report.groups[0].winner.as_deref(), Some("c"));
}

#[test]
fn thompson_converges_to_the_best_arm_on_continuous_rewards() {
    let tuner = Tuner::in_memory().unwrap().seed(2);
    let mut env = Xoshiro256PlusPlus::seed_from_u64(12);
    let noise = Normal::new(0.0, 0.1).unwrap();
    let picks = simulate(&tuner, "cont", "", None, &ARMS, 2000, |_, c| {
        (p_of(c) + noise.sample(&mut env), None)
    });
    let s = share(&picks[1500..], "c");
    assert!(s >= 0.8, "share of the best arm in the last 500 calls: {s}");
}

#[test]
fn ucb1_and_epsilon_greedy_find_the_best_arm() {
    for policy in [Policy::Ucb1, Policy::EpsilonGreedy(0.1)] {
        let tuner = Tuner::in_memory().unwrap().seed(3);
        let mut env = Xoshiro256PlusPlus::seed_from_u64(13);
        let picks = simulate(
            &tuner,
            "p",
            "",
            Some(policy.clone()),
            &ARMS,
            2000,
            |_, c| (bernoulli(&mut env, p_of(c)), None),
        );
        let s = share(&picks[1500..], "c");
        assert!(s >= 0.8, "{policy:?}: share of the best arm {s}");
        let calls = tuner.calls(Some("p")).unwrap();
        assert!(calls.iter().all(|c| c.policy == policy.name()));
        assert!(calls
            .iter()
            .all(|c| matches!(c.probability, Some(p) if p > 0.0 && p <= 1.0)));
    }
}

#[test]
fn fixed_always_picks_its_choice_with_probability_one() {
    let tuner = Tuner::in_memory().unwrap().seed(4);
    let picks = simulate(
        &tuner,
        "ab",
        "",
        Some(Policy::Fixed("b".into())),
        &ARMS,
        200,
        |_, _| (1.0, None),
    );
    assert!(picks.iter().all(|p| p == "b"));
    let calls = tuner.calls(Some("ab")).unwrap();
    assert_eq!(calls.len(), 200);
    assert!(calls.iter().all(|c| c.probability == Some(1.0)));
}

#[test]
fn thompson_decision_probabilities_are_in_the_unit_interval() {
    let tuner = Tuner::in_memory().unwrap().seed(5);
    let mut env = Xoshiro256PlusPlus::seed_from_u64(15);
    simulate(&tuner, "prob", "", None, &ARMS, 300, |_, c| {
        (bernoulli(&mut env, p_of(c)), None)
    });
    let calls = tuner.calls(Some("prob")).unwrap();
    assert_eq!(calls.len(), 300);
    assert!(calls
        .iter()
        .all(|c| matches!(c.probability, Some(p) if p > 0.0 && p <= 1.0)));
    // Once the posterior has settled, the favourite's decisions are likely, not certain.
    let late: Vec<f64> = calls[200..]
        .iter()
        .filter(|c| c.choice == "c")
        .filter_map(|c| c.probability)
        .collect();
    let mean = late.iter().sum::<f64>() / late.len() as f64;
    assert!(mean > 0.5, "mean probability of the favourite {mean}");
}

#[test]
fn state_survives_a_restart_and_late_rewards_find_written_calls() {
    let db = TempDb::new("restart");
    let pending_id;
    let before = {
        let tuner = Tuner::open(&db.0).unwrap().seed(6);
        let mut env = Xoshiro256PlusPlus::seed_from_u64(16);
        simulate(&tuner, "r", "ctx", None, &ARMS, 300, |_, c| {
            (bernoulli(&mut env, p_of(c)), Some(0.002))
        });
        // One call whose reward comes after the restart.
        let (_, outcome): ((), Outcome) = block_on(
            tuner
                .tune("r")
                .choices(ARMS)
                .context("ctx")
                .run(|_| async { Ok::<_, Error>(()) }),
        )
        .unwrap();
        pending_id = outcome.id();
        tuner.report(None).unwrap()
    };
    let tuner = Tuner::open(&db.0).unwrap();
    let after = tuner.report(None).unwrap();
    assert_eq!(
        serde_json::to_value(&before).unwrap(),
        serde_json::to_value(&after).unwrap()
    );
    let calls: u64 = after.groups[0].choices.iter().map(|c| c.calls).sum();
    assert_eq!(calls, 301);
    let total_cost: f64 = after.groups[0]
        .choices
        .iter()
        .map(|c| c.total_cost_usd)
        .sum();
    assert!((total_cost - 0.6).abs() < 1e-9, "{total_cost}");

    tuner.reward(pending_id, 1.0).unwrap();
    let rewards: f64 = tuner.report(None).unwrap().groups[0]
        .choices
        .iter()
        .map(|c| c.rewards)
        .sum();
    assert_eq!(rewards, 301.0);
    assert!(matches!(
        tuner.reward(pending_id, 1.0),
        Err(Error::TuneCall { .. })
    ));
}

#[test]
fn two_connections_on_one_file_lose_no_update() {
    let db = TempDb::new("shared");
    // Create the schema once so both threads start from an existing file.
    drop(Tuner::open(&db.0).unwrap());
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let path = db.0.clone();
            std::thread::spawn(move || {
                let tuner = Tuner::open(&path)
                    .unwrap()
                    .seed(100 + t)
                    .batch_size(64)
                    .change_detection(None);
                simulate(&tuner, "shared", "", None, &ARMS, 2000, |i, _| {
                    (if i % 2 == 0 { 1.0 } else { 0.0 }, Some(0.5))
                });
                tuner.flush().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let tuner = Tuner::open(&db.0).unwrap();
    let report = tuner.report(Some("shared")).unwrap();
    let g = &report.groups[0];
    let calls: u64 = g.choices.iter().map(|c| c.calls).sum();
    let rewards: f64 = g.choices.iter().map(|c| c.rewards).sum();
    let cost: f64 = g.choices.iter().map(|c| c.total_cost_usd).sum();
    let reward_sum: f64 = g
        .choices
        .iter()
        .map(|c| c.mean_reward.unwrap_or(0.0) * c.rewards)
        .sum();
    assert_eq!(calls, 4000);
    assert_eq!(rewards, 4000.0);
    assert_eq!(cost, 2000.0);
    assert!((reward_sum - 2000.0).abs() < 1e-6, "{reward_sum}");
    assert_eq!(tuner.calls(Some("shared")).unwrap().len(), 4000);
}

#[test]
fn a_new_context_starts_from_the_pooled_prior_and_then_diverges() {
    let tuner = Tuner::in_memory().unwrap().seed(7);
    let mut env = Xoshiro256PlusPlus::seed_from_u64(17);
    let names = ["x", "y"];
    // Elsewhere x is the better choice.
    simulate(&tuner, "route", "old", None, &names, 1000, |_, c| {
        (bernoulli(&mut env, if c == "x" { 0.8 } else { 0.3 }), None)
    });
    // In the new context the truth is reversed.
    let picks = simulate(&tuner, "route", "new", None, &names, 1000, |_, c| {
        (bernoulli(&mut env, if c == "x" { 0.2 } else { 0.8 }), None)
    });
    let first = share(&picks[..5], "x");
    assert!(first >= 0.6, "share of x in the first picks: {first}");
    let last = share(&picks[700..], "y");
    assert!(last >= 0.8, "share of y in the last 300 picks: {last}");

    // Without pooling the first picks are not drawn to x.
    let control = Tuner::in_memory()
        .unwrap()
        .seed(7)
        .prior_strength(0.0)
        .unwrap();
    let mut env = Xoshiro256PlusPlus::seed_from_u64(17);
    simulate(&control, "route", "old", None, &names, 1000, |_, c| {
        (bernoulli(&mut env, if c == "x" { 0.8 } else { 0.3 }), None)
    });
    let picks = simulate(&control, "route", "new", None, &names, 5, |_, c| {
        (bernoulli(&mut env, if c == "x" { 0.2 } else { 0.8 }), None)
    });
    assert!(share(&picks[..2], "x") <= 0.5, "{picks:?}");

    let report = tuner.report(Some("route")).unwrap();
    assert_eq!(
        report.group("route", "old").unwrap().winner.as_deref(),
        Some("x")
    );
    assert_eq!(
        report.group("route", "new").unwrap().winner.as_deref(),
        Some("y")
    );
}

#[test]
fn change_detection_resets_only_the_arm_that_changed() {
    let tuner = Tuner::in_memory().unwrap().seed(8);
    let mut env = Xoshiro256PlusPlus::seed_from_u64(18);
    let names = ["A", "B", "C"];
    let picks = simulate(&tuner, "drift", "", None, &names, 2000, |i, c| {
        let p = match c {
            "A" if i < 1000 => 0.8,
            "A" => 0.2,
            "B" => 0.5,
            _ => 0.3,
        };
        (bernoulli(&mut env, p), None)
    });
    assert!(share(&picks[700..1000], "A") >= 0.8);
    let s = share(&picks[1700..], "B");
    assert!(s >= 0.8, "share of B in the last 300 calls: {s}");
    let report = tuner.report(Some("drift")).unwrap();
    let a = report.choice("drift", "", "A").unwrap();
    let b = report.choice("drift", "", "B").unwrap();
    let c = report.choice("drift", "", "C").unwrap();
    assert!(a.resets >= 1);
    assert!(a.rewards < a.calls as f64);
    assert_eq!((b.resets, c.resets), (0, 0));
    assert_eq!(b.rewards, b.calls as f64);
    assert_eq!(c.rewards, c.calls as f64);
    assert_eq!(report.groups[0].winner.as_deref(), Some("B"));
}

#[test]
fn change_detection_off_keeps_the_stale_winner_longer() {
    let tuner = Tuner::in_memory().unwrap().seed(8).change_detection(None);
    let mut env = Xoshiro256PlusPlus::seed_from_u64(18);
    let picks = simulate(&tuner, "drift", "", None, &["A", "B", "C"], 1300, |i, c| {
        let p = match c {
            "A" if i < 1000 => 0.8,
            "A" => 0.2,
            "B" => 0.5,
            _ => 0.3,
        };
        (bernoulli(&mut env, p), None)
    });
    // 300 calls after the change, the undetected drift still favours A.
    assert!(share(&picks[1000..1300], "A") > 0.5);
    let report = tuner.report(Some("drift")).unwrap();
    assert!(report.groups[0].choices.iter().all(|c| c.resets == 0));
}

#[test]
fn cost_aware_objective_prefers_the_cheap_arm_and_ignores_irrelevant_ones() {
    let db = TempDb::new("cost");
    let tuner = Tuner::open(&db.0)
        .unwrap()
        .seed(9)
        .objective(Objective::QualityMinusCost {
            lambda_per_usd: 2.0,
        });
    let noise = Normal::new(0.0, 0.05).unwrap();
    let mut env = Xoshiro256PlusPlus::seed_from_u64(19);
    let env_of = |c: &str| match c {
        "big" => (0.75, 0.05),
        "small" => (0.70, 0.001),
        _ => (0.30, 0.0001),
    };
    let mut run = |label: &str, names: &[&str]| {
        simulate(&tuner, label, "", None, names, 1500, |_, c| {
            let (q, cost) = env_of(c);
            (q + noise.sample(&mut env), Some(cost))
        })
    };
    let two = run("two", &["big", "small"]);
    let three = run("three", &["big", "small", "tiny"]);
    assert!(share(&two[1000..], "small") >= 0.8);
    assert!(share(&three[1000..], "small") >= 0.8);
    let report = tuner.report(None).unwrap();
    assert_eq!(
        report.group("two", "").unwrap().winner.as_deref(),
        Some("small")
    );
    assert_eq!(
        report.group("three", "").unwrap().winner.as_deref(),
        Some("small")
    );
    drop(tuner);

    // On quality alone the expensive arm is better: the cost term is what decided.
    let quality = Tuner::open(&db.0).unwrap();
    let report = quality.report(Some("two")).unwrap();
    assert_eq!(report.groups[0].winner.as_deref(), Some("big"));
    // A cap below the big arm's mean cost rules it out.
    let capped = Tuner::open(&db.0)
        .unwrap()
        .objective(Objective::BestQualityWithCostCap { max_mean_usd: 0.01 });
    let report = capped.report(Some("two")).unwrap();
    assert_eq!(report.groups[0].winner.as_deref(), Some("small"));
}

#[test]
fn bad_inputs_give_typed_errors() {
    let tuner = Tuner::in_memory().unwrap().seed(10);
    let (_, outcome) = block_on(
        tuner
            .tune("bad")
            .choices(["a", "b"])
            .run(|_| async { Ok::<_, Error>(()) }),
    )
    .unwrap();
    assert!(matches!(
        outcome.reward(f64::NAN),
        Err(Error::TuneValue { what: "reward", .. })
    ));
    assert!(matches!(
        outcome.reward(f64::INFINITY),
        Err(Error::TuneValue { what: "reward", .. })
    ));
    assert!(matches!(
        outcome.cost(-0.01),
        Err(Error::TuneValue { what: "cost", .. })
    ));
    assert!(matches!(
        outcome.cost(f64::NAN),
        Err(Error::TuneValue { what: "cost", .. })
    ));
    // The rejected values left the call open.
    outcome.reward(0.5).unwrap();
    outcome.cost(0.01).unwrap();
    assert!(matches!(outcome.reward(0.5), Err(Error::TuneCall { .. })));
    assert!(matches!(outcome.cost(0.01), Err(Error::TuneCall { .. })));
    assert!(matches!(
        tuner.reward(hyperfunc::tune::CallId(42), 1.0),
        Err(Error::TuneCall { call_id: 42, .. })
    ));

    let empty = block_on(
        tuner
            .tune("bad")
            .choices(Vec::<String>::new())
            .run(|_| async { Ok::<_, Error>(()) }),
    );
    assert!(matches!(empty, Err(Error::TuneConfig { .. })));
    let twice = block_on(
        tuner
            .tune("bad")
            .choices(["a", "a"])
            .run(|_| async { Ok::<_, Error>(()) }),
    );
    assert!(matches!(twice, Err(Error::TuneConfig { .. })));
    let unknown = block_on(
        tuner
            .tune("bad")
            .choices(["a", "b"])
            .policy(Policy::Fixed("zzz".into()))
            .run(|_| async { Ok::<_, Error>(()) }),
    );
    match unknown {
        Err(Error::TuneUnknownChoice {
            choice, choices, ..
        }) => {
            assert_eq!(choice, "zzz");
            assert_eq!(choices, ["a", "b"]);
        }
        other => panic!("expected TuneUnknownChoice, got {other:?}"),
    }
    let eps = block_on(
        tuner
            .tune("bad")
            .choices(["a", "b"])
            .policy(Policy::EpsilonGreedy(1.5))
            .run(|_| async { Ok::<_, Error>(()) }),
    );
    assert!(matches!(eps, Err(Error::TuneConfig { .. })));
    assert!(matches!(
        Tuner::in_memory().unwrap().prior_strength(f64::NAN),
        Err(Error::TuneConfig { .. })
    ));
    // None of the rejected calls was recorded.
    assert_eq!(tuner.calls(Some("bad")).unwrap().len(), 1);
}

#[test]
fn a_failing_call_is_recorded_as_reward_zero() {
    let tuner = Tuner::in_memory().unwrap().seed(11);
    let r = block_on(tuner.tune("fails").choices(["only"]).run(|_| async {
        Err::<(), _>(Error::InvalidConfig {
            field: "model".into(),
            reason: "boom".into(),
        })
    }));
    assert!(matches!(r, Err(Error::InvalidConfig { .. })));
    let c = &tuner.report(Some("fails")).unwrap().groups[0].choices[0];
    assert_eq!((c.calls, c.errors, c.rewards), (1, 1, 1.0));
    assert_eq!(c.mean_reward, Some(0.0));
    assert_eq!(c.success_rate, Some(0.0));
    let calls = tuner.calls(Some("fails")).unwrap();
    assert!(calls[0].error.as_deref().unwrap().contains("boom"));
}

#[test]
fn a_corrupt_store_file_is_a_typed_error_and_stays_untouched() {
    let db = TempDb::new("corrupt");
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&db.0, &garbage).unwrap();
    match Tuner::open(&db.0) {
        Err(Error::TuneStore { path, reason }) => {
            assert_eq!(path, db.0.display().to_string());
            assert!(reason.contains("untouched"), "{reason}");
        }
        other => panic!("expected TuneStore, got {other:?}"),
    }
    assert_eq!(std::fs::read(&db.0).unwrap(), garbage);
    assert!(!PathBuf::from(format!("{}-wal", db.0.display())).exists());
}

#[test]
fn the_call_site_is_recorded() {
    let tuner = Tuner::in_memory().unwrap();
    let (line, call) = (line!(), tuner.tune("site").choices(["a"]));
    assert_eq!(call.caller().line(), line);
    let (_, outcome) = block_on(call.run(|_| async { Ok::<_, Error>(()) })).unwrap();
    assert!(
        outcome.caller().file().ends_with("tests/it/tune.rs"),
        "{}",
        outcome.caller()
    );
    assert_eq!(outcome.caller().line(), line);
    let calls = tuner.calls(Some("site")).unwrap();
    assert!(
        calls[0]
            .caller
            .ends_with(&format!("tests/it/tune.rs:{line}")),
        "{}",
        calls[0].caller
    );
    // A binding names its own caller (Python: file:function:line).
    block_on(
        tuner
            .tune("site")
            .choices(["a"])
            .call_site("app.py:classify:12")
            .run(|_| async { Ok::<_, Error>(()) }),
    )
    .unwrap();
    assert_eq!(
        tuner.calls(Some("site")).unwrap()[1].caller,
        "app.py:classify:12"
    );
}

#[test]
fn the_report_renders_a_table() {
    let tuner = Tuner::in_memory().unwrap().seed(12);
    let mut env = Xoshiro256PlusPlus::seed_from_u64(20);
    simulate(&tuner, "tbl", "kind", None, &ARMS, 200, |_, c| {
        (bernoulli(&mut env, p_of(c)), Some(0.001))
    });
    let report = tuner.report(None).unwrap();
    let table = report.to_table();
    assert!(table.contains("tbl [kind]: winner "), "{table}");
    for c in ARMS {
        assert!(
            table.lines().any(|l| l.trim_start().starts_with(c)),
            "{table}"
        );
    }
    let ch = report.choice("tbl", "kind", "c").unwrap();
    let (lo, hi) = ch.ci95.unwrap();
    let m = ch.mean_reward.unwrap();
    assert!(lo < m && m < hi && lo >= 0.0 && hi <= 1.0, "{lo} {m} {hi}");
    let _: ChangeDetection = ChangeDetection::default();
}

/// The environment variable that turns [`two_process_worker`] into a writer on that file.
const CHILD_DB: &str = "HYPERFUNC_TUNE_CHILD_DB";

/// Run by [`two_processes_on_one_file_lose_no_update`] in a child process of this test binary;
/// does nothing in a normal test run.
#[test]
fn two_process_worker() {
    let Ok(path) = std::env::var(CHILD_DB) else {
        return;
    };
    let seed = std::process::id() as u64;
    let tuner = Tuner::open(&path)
        .unwrap()
        .seed(seed)
        .batch_size(100)
        .change_detection(None);
    simulate(&tuner, "procs", "", None, &ARMS, 2000, |i, _| {
        (if i % 4 == 0 { 0.0 } else { 1.0 }, None)
    });
    tuner.flush().unwrap();
}

#[test]
fn two_processes_on_one_file_lose_no_update() {
    let db = TempDb::new("procs");
    drop(Tuner::open(&db.0).unwrap());
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| {
            std::process::Command::new(&exe)
                .args(["--exact", "tune::two_process_worker", "--test-threads=1"])
                .env(CHILD_DB, &db.0)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let tuner = Tuner::open(&db.0).unwrap();
    let g = &tuner.report(Some("procs")).unwrap().groups[0];
    let calls: u64 = g.choices.iter().map(|c| c.calls).sum();
    let rewards: f64 = g.choices.iter().map(|c| c.rewards).sum();
    assert_eq!(calls, 4000);
    assert_eq!(rewards, 4000.0);
    assert_eq!(tuner.calls(Some("procs")).unwrap().len(), 4000);
}

#[test]
fn regret_simulation_reports_every_policy_and_the_change_test_helps() {
    let r = hyperfunc::tune::sim::regret_simulation(2000, 2).unwrap();
    assert_eq!(r.scenarios.len(), 2);
    assert_eq!(r.scenarios[0].policies.len(), 4);
    assert_eq!(r.scenarios[1].policies.len(), 2);
    for s in &r.scenarios {
        for p in &s.policies {
            // Regret is at most the largest gap per call.
            assert!(
                p.mean_regret >= 0.0 && p.mean_regret <= 0.6 * 2000.0,
                "{p:?}"
            );
        }
    }
    let changing = &r.scenarios[1].policies;
    assert!(
        changing[0].mean_regret < changing[1].mean_regret,
        "with change test {:?} vs without {:?}",
        changing[0],
        changing[1]
    );
    assert!(hyperfunc::tune::sim::regret_simulation(0, 1).is_err());
}

#[test]
fn the_cli_prints_the_tune_report() {
    let db = TempDb::new("cli");
    {
        let tuner = Tuner::open(&db.0).unwrap().seed(13);
        let mut env = Xoshiro256PlusPlus::seed_from_u64(21);
        simulate(&tuner, "cli", "kind", None, &ARMS, 400, |_, c| {
            (bernoulli(&mut env, p_of(c)), Some(0.01))
        });
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hyperfunc"))
        .args([
            "tune",
            "report",
            "--store",
            db.0.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: hyperfunc::tune::TuneReport = serde_json::from_slice(&out.stdout).unwrap();
    let g = report.group("cli", "kind").unwrap();
    assert_eq!(g.winner.as_deref(), Some("c"));
    assert_eq!(g.choices.iter().map(|c| c.calls).sum::<u64>(), 400);

    let table = std::process::Command::new(env!("CARGO_BIN_EXE_hyperfunc"))
        .args([
            "tune",
            "report",
            "--store",
            db.0.to_str().unwrap(),
            "--label",
            "cli",
        ])
        .output()
        .unwrap();
    assert!(table.status.success());
    assert!(String::from_utf8_lossy(&table.stdout).contains("cli [kind]: winner c"));

    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_hyperfunc"))
        .args(["tune", "report", "--store", "/nonexistent/tune.sqlite"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no tune store"));
}
