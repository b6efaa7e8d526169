//! Observation: call records with real times and structure, summaries, ad-hoc observations.

use std::collections::BTreeMap;

use candle_core::Device;
use hyperfunc::observe::{RecordKind, Status};
use hyperfunc::prelude::*;
use serde_json::json;

use crate::common::{xor_data, xor_net};

struct Two {
    a: HyperFn,
    b: HyperFn,
}

impl HyperSystem for Two {
    fn hyperfunctions(&self) -> Vec<HyperFn> {
        vec![self.a.clone(), self.b.clone()]
    }

    async fn run(&self, cx: &Cx, x: Value) -> Result<Value> {
        let h = cx.call(&self.a, x).await?;
        cx.call(&self.b, h).await
    }
}

fn two() -> Two {
    Two {
        a: HyperFn::linear("a", 2, 3, Activation::Tanh),
        b: HyperFn::linear("b", 3, 1, Activation::Sigmoid),
    }
}

#[tokio::test]
async fn an_optimisation_is_recorded_as_run_generations_and_calls() {
    let sys = two();
    let r = Es::default()
        .pop_size(8)
        .generations(3)
        .max_batch_size(16) // 4 candidates × 4 examples per chunk: 2 chunks per generation
        .minimize()
        .progress(false)
        .optimize(&sys, &xor_data(), &metric::bce())
        .await
        .unwrap();
    let recs = r.trace.records();
    let run: Vec<_> = recs.iter().filter(|r| r.kind == RecordKind::Run).collect();
    let gens: Vec<_> = recs
        .iter()
        .filter(|r| r.kind == RecordKind::Generation)
        .collect();
    let calls: Vec<_> = recs
        .iter()
        .filter(|r| r.kind == RecordKind::Tensor)
        .collect();
    assert_eq!(run.len(), 1);
    assert_eq!(gens.len(), 3);
    assert!(gens.iter().all(|g| g.parent == Some(run[0].id)));
    // 2 functions × 2 chunks × 3 generations, plus 2 calls for the final evaluation of θ.
    assert_eq!(calls.len(), 2 * 2 * 3 + 2);
    let evals: Vec<_> = recs
        .iter()
        .filter(|r| r.kind == RecordKind::Evaluation)
        .collect();
    assert_eq!(
        evals.len(),
        3 + 1,
        "one per generation and the final evaluation"
    );
    for g in &gens {
        // run → generation → evaluate → call
        let eval: Vec<_> = evals.iter().filter(|e| e.parent == Some(g.id)).collect();
        assert_eq!(eval.len(), 1);
        assert_eq!(eval[0].candidates, Some((0, 8)));
        let mine: Vec<_> = calls
            .iter()
            .filter(|c| c.parent == Some(eval[0].id))
            .collect();
        assert_eq!(mine.len(), 4);
        assert!(mine.iter().all(|c| c.generation == g.generation));
        // The chunks cover all 8 candidates.
        let mut covered: Vec<(usize, usize)> = mine
            .iter()
            .filter(|c| &*c.name == "a")
            .map(|c| c.candidates.unwrap())
            .collect();
        covered.sort();
        assert_eq!(covered, vec![(0, 4), (4, 8)]);
        // Real times: calls lie inside their generation, and end after they start.
        for c in &mine {
            assert!(c.start_unix_ns >= g.start_unix_ns && c.end_unix_ns <= g.end_unix_ns);
            assert!(c.end_unix_ns >= c.start_unix_ns);
            assert!(
                c.call_site
                    .as_deref()
                    .unwrap()
                    .contains("tests/it/observe.rs"),
                "{:?}",
                c.call_site
            );
        }
    }
    assert!(
        gens.windows(2)
            .all(|w| w[0].end_unix_ns <= w[1].start_unix_ns),
        "generations follow each other"
    );
    assert_eq!(gens[0].attribute("es.failed"), Some(&json!(0)));
    let s = r.trace.summary();
    let a = s.functions.iter().find(|f| f.name == "a").unwrap();
    assert_eq!(a.calls, 7);
    assert!(a.p50_ms <= a.p99_ms && a.min_ms <= a.max_ms);
    assert!(s.to_markdown().contains("| a | 7 | 0 |"));
}

#[tokio::test]
async fn failing_async_calls_are_recorded_with_error_status() {
    let f = crate::common::picky();
    let sys = Chain::new(vec![f]);
    let theta = Theta::init(&sys, 0, &Device::Cpu).unwrap();
    let pop = Es::default()
        .pop_size(4)
        .population(&sys, &theta, 0)
        .unwrap();
    let data = Examples::json(vec![json!(0), json!(1), json!(2)], vec![json!(1); 3]).unwrap();
    let hub = Hub::new();
    let score = metric::per_example(|p, _| p.as_f64().unwrap_or(0.0) as f32);
    evaluate_population_observed(&sys, &pop, &data, &score, 1 << 16, &hub)
        .await
        .unwrap();
    let all = hub.records();
    let eval: Vec<_> = all
        .iter()
        .filter(|r| r.kind == RecordKind::Evaluation)
        .collect();
    assert_eq!(eval.len(), 1);
    assert_eq!(eval[0].attribute("hyperfunc.failed"), Some(&json!(2)));
    let recs: Vec<_> = all.iter().filter(|r| r.kind == RecordKind::Io).collect();
    assert_eq!(recs.len(), 12, "one record per candidate × example");
    assert!(recs.iter().all(|r| r.parent == Some(eval[0].id)));
    let errors: Vec<_> = recs.iter().filter(|r| r.status == Status::Error).collect();
    assert_eq!(errors.len(), 6);
    assert!(errors.iter().all(|r| r.error_type.as_deref() == Some("io")));
    assert!(errors[0]
        .error_message
        .as_deref()
        .unwrap()
        .contains("negative knob"));
    let ex: Vec<(usize, usize)> = recs.iter().map(|r| r.examples.unwrap()).collect();
    assert!(ex.iter().all(|&(a, b)| b == a + 1 && b <= 3));
    let s = hub.summary();
    let f = s.functions.iter().find(|f| f.name != "evaluate").unwrap();
    assert_eq!((f.calls, f.errors), (12, 6));
    assert!((f.error_rate - 0.5).abs() < 1e-12);
}

#[test]
fn observations_note_attributes_and_aggregate_by_caller_or_key() {
    let hub = Hub::new();
    let session = hub.trace("session");
    for (i, model) in ["gpt", "gpt", "llama"].iter().enumerate() {
        let mut o = hub.observe("strip_fences");
        o.note("model", *model).note("i", i);
        if i == 2 {
            o.fail("no closing fence");
        }
    }
    let sid = session.id();
    drop(session);
    let by_model = hub.count_by("strip_fences", "model");
    assert_eq!(
        by_model,
        BTreeMap::from([("gpt".to_string(), 2), ("llama".to_string(), 1)])
    );
    let by_site = hub.count_by("strip_fences", "call_site");
    assert_eq!(by_site.len(), 1);
    assert!(by_site
        .keys()
        .next()
        .unwrap()
        .contains("tests/it/observe.rs"));
    let recs = hub.records();
    assert!(recs
        .iter()
        .filter(|r| &*r.name == "strip_fences")
        .all(|r| r.parent == Some(sid)));
    assert_eq!(recs.iter().filter(|r| r.status == Status::Error).count(), 1);
    let s = hub.summary();
    let f = s
        .functions
        .iter()
        .find(|f| f.name == "strip_fences")
        .unwrap();
    assert_eq!((f.calls, f.errors), (3, 1));
}

#[test]
fn sampling_capacity_and_switching_off() {
    let hub = Hub::with_capacity(5);
    hub.sample(0.5).unwrap();
    for _ in 0..20 {
        drop(hub.observe("x"));
    }
    assert_eq!(
        hub.summary().functions[0].calls,
        20,
        "aggregates count every call"
    );
    assert_eq!(hub.records().len(), 5);
    assert_eq!(hub.dropped(), 5, "10 sampled, 5 kept");
    assert!(matches!(hub.sample(0.0), Err(Error::InvalidConfig { .. })));
    hub.set_enabled(false);
    drop(hub.observe("y"));
    assert!(hub.summary().functions.iter().all(|f| f.name != "y"));
}

#[tokio::test]
async fn recording_never_changes_results_and_exports_jsonl() {
    let (net, data) = (xor_net(Some(2)), xor_data());
    let es = Es::default()
        .pop_size(8)
        .generations(4)
        .seed(3)
        .minimize()
        .progress(false);
    let on = es
        .clone()
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap();
    let off_hub = Hub::new();
    off_hub.set_enabled(false);
    let off = es
        .hub(off_hub)
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap();
    assert!(on.theta.bit_eq(&off.theta).unwrap());
    assert!(off.trace.records().is_empty());

    let path = std::env::temp_dir().join(format!("hyperfunc-trace-{}.jsonl", std::process::id()));
    on.trace.write_jsonl(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), on.trace.records().len());
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(first["start_unix_ns"].as_u64().unwrap() > 1_700_000_000_000_000_000);
    std::fs::remove_file(&path).unwrap();
    let bad = on
        .trace
        .write_jsonl("/nonexistent-dir/x.jsonl")
        .unwrap_err();
    assert!(matches!(bad, Error::File { .. }), "{bad}");
}

/// A minimal `tracing` subscriber that remembers span names and their `function` field.
struct Spans(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

struct FunctionField(Option<String>);

impl tracing::field::Visit for FunctionField {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "function" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl tracing::Subscriber for Spans {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut f = FunctionField(None);
        attrs.record(&mut f);
        let mut v = self.0.lock().unwrap();
        v.push(format!(
            "{}:{}",
            attrs.metadata().name(),
            f.0.unwrap_or_default()
        ));
        tracing::span::Id::from_u64(v.len() as u64)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn calls_emit_tracing_spans_for_users_subscribers() {
    // `tracing` caches per callsite whether any subscriber is interested. Another test thread
    // that reaches the span's callsite first, with no subscriber of its own, can cache "never"
    // and hide the spans from this test's scoped subscriber (it happened in CI, even with the
    // cache rebuilt). So the check runs in a process of its own: this test binary again,
    // filtered to this one test.
    const CHILD: &str = "HYPERFUNC_SPANS_TEST_CHILD";
    if std::env::var_os(CHILD).is_none() {
        let name = "observe::calls_emit_tracing_spans_for_users_subscribers";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sub = Spans(seen.clone());
    tracing::subscriber::with_default(sub, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let sys = two();
        let theta = Theta::init(&sys, 0, &Device::Cpu).unwrap();
        rt.block_on(evaluate(&sys, &theta, &xor_data(), &metric::bce()))
            .unwrap();
    });
    let seen = seen.lock().unwrap();
    assert_eq!(
        *seen,
        vec![
            "hyperfunc.call:a".to_string(),
            "hyperfunc.call:b".to_string()
        ]
    );
}

#[tokio::test]
async fn trace_store_persists_runs_and_reports_them() {
    use hyperfunc::observe::TraceStore;
    let dir = std::env::temp_dir().join(format!("hyperfunc-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("runs.sqlite");
    let sys = two();
    let r = Es::default()
        .pop_size(8)
        .generations(2)
        .minimize()
        .progress(false)
        .optimize(&sys, &xor_data(), &metric::bce())
        .await
        .unwrap();
    for (model, cost, fail) in [
        ("gpt", 0.25, false),
        ("gpt", 0.5, true),
        ("llama", 0.125, false),
    ] {
        let mut o = r.trace.observe("strip_fences");
        o.note("model", model).note("cost", cost);
        if fail {
            o.fail("no fence");
        }
    }
    let store = TraceStore::open(&db).unwrap();
    let saved = store.save("first", &r.trace).unwrap();
    assert_eq!(saved, r.trace.records().len());
    let other = Hub::new();
    drop(other.observe("elsewhere"));
    store.save("second", &other).unwrap();
    drop(store);

    let store = TraceStore::open(&db).unwrap();
    assert_eq!(
        store.runs().unwrap(),
        vec!["first".to_string(), "second".to_string()]
    );
    let rep = store.report(Some("first")).unwrap();
    let a = rep.functions.iter().find(|g| g.key == "a").unwrap();
    let hub_a = r
        .trace
        .summary()
        .functions
        .into_iter()
        .find(|f| f.name == "a")
        .unwrap();
    assert_eq!(a.calls, hub_a.calls);
    assert!(
        rep.functions.iter().all(|g| g.key != "elsewhere"),
        "the run filter holds"
    );
    let gpt = rep.models.iter().find(|g| g.key == "gpt").unwrap();
    assert_eq!((gpt.calls, gpt.errors), (2, 1));
    assert!((gpt.cost - 0.75).abs() < 1e-12);
    assert!(rep
        .call_sites
        .iter()
        .any(|g| g.key.contains("tests/it/observe.rs")));
    assert_eq!(store.report(None).unwrap().runs.len(), 2);

    // The CLI prints the same report.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hyperfunc"))
        .args(["report", db.to_str().unwrap(), "--run", "first", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"].as_array().unwrap().len(), 2);
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_hyperfunc"))
        .args(["report", db.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("| strip_fences | 3 | 1 |"));
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_hyperfunc"))
        .args(["report", dir.join("nope.sqlite").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no trace store"));
    std::fs::remove_dir_all(&dir).unwrap();
}
