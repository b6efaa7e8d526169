//! OTLP export against real receivers started by `ci/peers.sh`: Arize Phoenix (spans read back
//! over its REST API) and Rotel (a collector that prints every span it receives, with kind and
//! resource). The traced system calls the LiteLLM proxy, so LLM spans carry real GenAI fields.

use std::time::{Duration, Instant};

use hyperfunc::llm::{LlmClient, LlmConfig, ModelConfig, Price};
use hyperfunc::observe::{OtlpConfig, OtlpExporter};
use hyperfunc::prelude::*;
use serde_json::{json, Value as Json};

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| {
        panic!(
            "{k} is not set: start the peers with `eval \"$(ci/peers.sh start | grep '^export ')\"` or run `ci/test`"
        )
    })
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// A traced two-generation optimisation of an LLM knob, plus one failed observation.
async fn traced_run(hub: &Hub) {
    let client = LlmClient::new(
        LlmConfig::new(&env("HYPERFUNC_LLM_URL"))
            .api_key("sk-hf-free")
            .model(
                "mock-gpt",
                ModelConfig {
                    price: Some(Price::new(1.0, 2.0)),
                    ..Default::default()
                },
            ),
    )
    .unwrap();
    let sys = Chain::new(vec![HyperFn::llm("greet", &client, "mock-gpt")]);
    let ex = Examples::json(vec![json!("hi")], vec![json!("")]).unwrap();
    let m = metric::per_example(|p, _| p.as_str().map_or(0.0, |s| s.len() as f32));
    Es::default()
        .pop_size(2)
        .generations(2)
        .progress(false)
        .hub(hub.clone())
        .optimize(&sys, &ex, &m)
        .await
        .unwrap();
    let mut o = hub.observe("strip_fences");
    o.note("model", "mock-gpt");
    o.fail("answer was fenced twice");
}

/// Polls Phoenix until it holds `want` spans of the trace (spans land shortly after export).
async fn phoenix_spans(project: &str, trace: &str, want: usize) -> Vec<Json> {
    let url = format!(
        "{}/v1/projects/{project}/spans?trace_id={trace}&limit=1000",
        env("HYPERFUNC_PHOENIX_URL")
    );
    let http = reqwest::Client::new();
    let t0 = Instant::now();
    loop {
        if let Ok(r) = http.get(&url).send().await {
            if r.status().is_success() {
                let v: Json = r.json().await.unwrap();
                let spans = v["data"].as_array().cloned().unwrap_or_default();
                if spans.len() >= want {
                    return spans;
                }
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "Phoenix never held {want} spans of trace {trace} in project {project}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn by_name<'a>(spans: &'a [Json], name: &str) -> Vec<&'a Json> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

fn id(s: &Json) -> &str {
    s["context"]["span_id"].as_str().unwrap_or_default()
}

async fn export_to_phoenix(cfg: OtlpConfig, project: &str) {
    let hub = Hub::new();
    let otlp =
        OtlpExporter::start(cfg.resource_attr("openinference.project.name", project)).unwrap();
    otlp.attach(&hub);
    traced_run(&hub).await;
    otlp.flush().await.unwrap();
    let records = hub.records().len();
    let st = otlp.stats();
    assert_eq!(
        (st.exported as usize, st.dropped, st.failed),
        (records, 0, 0)
    );

    let spans = phoenix_spans(project, &hub.trace_id(), records).await;
    assert_eq!(spans.len(), records);
    let dump = || serde_json::to_string_pretty(&spans[0]).unwrap();
    let run = by_name(&spans, "es.optimize");
    assert_eq!(run.len(), 1, "{}", dump());
    let gens = by_name(&spans, "es.generation");
    assert_eq!(gens.len(), 2);
    let evals = by_name(&spans, "evaluate");
    assert_eq!(evals.len(), 3, "two generations and the final evaluation");
    let chats = by_name(&spans, "chat mock-gpt");
    assert_eq!(chats.len(), 2 * 2 + 1);
    // run → generation → evaluate → call
    for g in &gens {
        assert_eq!(g["parent_id"], json!(id(run[0])), "{g}");
    }
    for c in &chats {
        let parent = c["parent_id"].as_str().unwrap();
        let e = evals
            .iter()
            .find(|e| id(e) == parent)
            .expect("a chat's parent is an evaluate span");
        let ep = e["parent_id"].as_str().unwrap();
        assert!(gens.iter().any(|g| id(g) == ep) || ep == id(run[0]), "{e}");
        assert_eq!(
            c["attributes"]["gen_ai.request.model"],
            json!("mock-gpt"),
            "{c}"
        );
        assert_eq!(c["attributes"]["gen_ai.operation.name"], json!("chat"));
        assert!(
            c["attributes"]["gen_ai.usage.input_tokens"].as_i64() > Some(0),
            "{c}"
        );
        assert!(
            c["attributes"]["gen_ai.usage.output_tokens"].as_i64() > Some(0),
            "{c}"
        );
        assert_eq!(
            c["attributes"]["gen_ai.response.finish_reasons"],
            json!(["stop"]),
            "{c}"
        );
        assert!(c["start_time"].as_str() <= c["end_time"].as_str(), "{c}");
    }
    // Generations start one after the other.
    let mut starts: Vec<(i64, String)> = gens
        .iter()
        .map(|g| {
            (
                g["attributes"]["hyperfunc.generation"].as_i64().unwrap(),
                g["start_time"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    starts.sort();
    assert!(starts[0].1 < starts[1].1, "{starts:?}");
    // The failed observation: error status and an exception event.
    let failed = by_name(&spans, "strip_fences");
    assert_eq!(failed.len(), 1);
    let f = failed[0];
    assert_eq!(f["status_code"], json!("ERROR"), "{f}");
    let ev = f["events"].as_array().expect("events");
    assert!(
        ev.iter().any(|e| e["name"] == "exception"
            && e["attributes"]["exception.message"] == "answer was fenced twice"),
        "{f}"
    );
}

#[tokio::test]
async fn a_traced_run_lands_in_phoenix_over_grpc() {
    export_to_phoenix(
        OtlpConfig::grpc(&env("HYPERFUNC_PHOENIX_GRPC")),
        &unique("hf-grpc"),
    )
    .await;
}

#[tokio::test]
async fn a_traced_run_lands_in_phoenix_over_http() {
    let base = env("HYPERFUNC_PHOENIX_URL");
    // `phoenix` routes to a project; the helper then points it at a fresh one (the key is replaced).
    export_to_phoenix(OtlpConfig::phoenix(&base, "default"), &unique("hf-http")).await;
}

/// Rotel's output from the first batch of `service` on (a batch prints its resource first).
fn rotel_section(service: &str) -> String {
    let log = std::fs::read_to_string(env("HYPERFUNC_ROTEL_LOG")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    match lines.iter().position(|l| l.contains(service)) {
        Some(i) => lines[i.saturating_sub(4)..].join("\n"),
        None => String::new(),
    }
}

/// Waits until Rotel has printed every needle for `service` (it prints what it received
/// shortly after acknowledging it).
async fn rotel_output(service: &str, needles: &[&str]) -> String {
    let t0 = Instant::now();
    loop {
        let out = rotel_section(service);
        if needles.iter().all(|n| out.contains(n)) || t0.elapsed() > Duration::from_secs(30) {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn rotel_sees_span_kind_resource_and_typed_attributes_over_both_transports() {
    for (cfg, tag) in [
        (OtlpConfig::grpc(&env("HYPERFUNC_ROTEL_GRPC")), "grpc"),
        (
            OtlpConfig::http(&format!("{}/v1/traces", env("HYPERFUNC_ROTEL_HTTP"))),
            "http",
        ),
    ] {
        let service = unique(&format!("hf-rotel-{tag}"));
        let hub = Hub::new();
        let otlp = OtlpExporter::start(
            cfg.service_name(&service)
                .resource_attr("deployment.environment", "ci"),
        )
        .unwrap();
        otlp.attach(&hub);
        traced_run(&hub).await;
        otlp.flush().await.unwrap();
        assert_eq!(otlp.stats().failed, 0, "{:?}", otlp.last_error());
        let trace = hub.trace_id();
        let needles = [
            trace.as_str(),
            "Name           : chat mock-gpt",
            "Name           : es.optimize",
            "SPAN_KIND_CLIENT",
            "SPAN_KIND_INTERNAL",
            "gen_ai.usage.input_tokens: Int(",
            "deployment.environment: Str(ci)",
        ];
        let out = rotel_output(&service, &needles).await;
        for n in needles {
            assert!(
                out.contains(n),
                "{tag}: `{n}` missing from Rotel's output:\n{out}"
            );
        }
    }
}

#[tokio::test]
async fn an_unreachable_collector_never_blocks_and_reports_the_failure() {
    let hub = Hub::new();
    // Nothing listens on this port: the export fails, the traced work does not notice.
    let mut cfg = OtlpConfig::http("http://127.0.0.1:9/v1/traces");
    cfg.timeout = Duration::from_millis(500);
    let otlp = OtlpExporter::start(cfg).unwrap();
    otlp.attach(&hub);
    {
        let _o = hub.observe("work");
    }
    let e = otlp.flush().await.unwrap_err();
    assert!(e.to_string().contains("not accepted"), "{e}");
    assert_eq!(otlp.stats().failed, 1);
    assert_eq!(hub.records().len(), 1, "the hub keeps its records");
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_instead_of_blocking() {
    let hub = Hub::new();
    let mut cfg = OtlpConfig::http("http://127.0.0.1:9/v1/traces");
    cfg.queue_capacity = 4;
    cfg.timeout = Duration::from_millis(200);
    let otlp = OtlpExporter::start(cfg).unwrap();
    otlp.attach(&hub);
    for _ in 0..1000 {
        let _o = hub.observe("burst");
    }
    let st = otlp.stats();
    assert!(st.dropped > 0, "{st:?}");
    assert_eq!(
        hub.summary().functions[0].calls,
        1000,
        "aggregates see every record"
    );
}
