//! `runs ask`: the analytics model resolved and checked against LiteLLM's `/v1/models`, an
//! answer with its cost stored, a proposal applied only through the checked control path; the
//! tool loop against a scripted model.

use hyperfunc::llm::{LlmConfig, ModelConfig, Price};
use hyperfunc::prelude::*;
use hyperfunc::runs::ask::{apply_proposal, resolve_model, Analyst, ModelSource};
use hyperfunc::runs::{Action, RunId, RunStore};
use serde_json::{json, Value};

use crate::common::{cli_err, cli_ok, xor_data, xor_net};
use crate::fake_openai;

fn litellm_url() -> String {
    std::env::var("HYPERFUNC_LLM_URL")
        .expect("HYPERFUNC_LLM_URL is not set: run the suite with `ci/test`")
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hf-ask-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

async fn store_with_a_run(name: &str) -> RunStore {
    let store = RunStore::open(temp_dir(name)).unwrap();
    Es::default()
        .pop_size(16)
        .generations(60)
        .minimize()
        .progress(false)
        .store(store.clone())
        .optimize(&xor_net(None), &xor_data(), &metric::bce())
        .await
        .unwrap();
    store
}

const PRICE: Price = Price {
    input_per_mtok: 2.0,
    output_per_mtok: 8.0,
    cached_input_per_mtok: None,
};

#[tokio::test]
async fn litellm_answers_are_stored_with_cost_and_proposals_go_through_control() {
    let store = store_with_a_run("litellm").await;
    let cfg = LlmConfig::new(&litellm_url()).api_key("sk-hf-free").model(
        "mock-analyst",
        ModelConfig {
            price: Some(PRICE),
            ..Default::default()
        },
    );
    // An unknown id is refused with the closest ones the server lists.
    let err = Analyst::new(&store, cfg.clone(), Some("mock-analist"))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("not served") && err.contains("mock-analyst"),
        "{err}"
    );

    let analyst = Analyst::new(&store, cfg, Some("mock-analyst"))
        .await
        .unwrap();
    assert_eq!(analyst.model(), ("mock-analyst", ModelSource::Request));
    let est = analyst.estimate("why did run 1 plateau?").unwrap();
    let max = est.max_usd.unwrap();
    let a = analyst.ask("why did run 1 plateau?").await.unwrap();
    assert!(a.text.starts_with("Run 1 stopped improving"), "{}", a.text);
    assert!(
        a.usage.input_tokens > 0 && a.cost_usd > 0.0 && a.cost_usd <= max,
        "{a:?}"
    );
    let expected = PRICE.cost(&a.usage);
    assert!((a.cost_usd - expected).abs() < 1e-12);
    let (run, action) = a.proposal.clone().unwrap();
    assert_eq!(run, RunId(1));
    assert_eq!(
        action,
        Action::Set(serde_json::Map::from_iter([(
            "lr".to_string(),
            json!(0.02)
        )]))
    );
    // The run finished: the proposal is refused by the same checks as any command.
    let refused = apply_proposal(&store, run, action.clone())
        .unwrap_err()
        .to_string();
    assert!(refused.contains("finished"), "{refused}");
    // On a run that can take it, it is written as a command from `ask`.
    let later = store.create("later", &Es::default()).unwrap();
    apply_proposal(&store, later, action).unwrap();
    assert_eq!(store.commands(later).unwrap()[0].source, "ask");

    // The CLI: estimate, answer, cost; --yes applies the proposal (to run 1 here: refused).
    let d = store.dir().to_str().unwrap().to_string();
    let env = [
        ("OPENAI_BASE_URL", litellm_url()),
        ("OPENAI_API_KEY", "sk-hf-free".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = String::from_utf8(cli_ok(
        &[
            "runs",
            "ask",
            "why did run 1 plateau?",
            "--model",
            "mock-analyst",
            "--store",
            &d,
        ],
        &env,
    ))
    .unwrap();
    assert!(
        out.contains("model mock-analyst (request)") && out.contains("Run 1 stopped improving"),
        "{out}"
    );
    assert!(out.contains("not applied"), "{out}");
    let err = cli_err(
        &[
            "runs",
            "ask",
            "why?",
            "--model",
            "mock-analyst",
            "--yes",
            "--store",
            &d,
        ],
        &env,
    );
    assert!(err.contains("finished"), "{err}");
    let unknown = cli_err(
        &["runs", "ask", "why?", "--model", "gpt-nope", "--store", &d],
        &env,
    );
    assert!(unknown.contains("not served"), "{unknown}");
}

#[test]
fn the_model_resolves_from_request_then_project_then_default() {
    let dir = temp_dir("resolve");
    std::fs::create_dir_all(&dir).unwrap();
    assert_eq!(
        resolve_model(Some("m1"), &dir).unwrap(),
        ("m1".to_string(), ModelSource::Request)
    );
    if std::env::var("HYPERFUNC_ANALYTICS_MODEL").is_err() {
        let (m, s) = resolve_model(None, &dir).unwrap();
        assert_eq!(
            (m.as_str(), s),
            (
                hyperfunc::runs::ask::DEFAULT_ANALYTICS_MODEL,
                ModelSource::Default
            )
        );
    }
    std::fs::write(dir.join("hyperfunc.json"), r#"{"analytics_model": "m2"}"#).unwrap();
    assert_eq!(
        resolve_model(None, &dir).unwrap(),
        ("m2".to_string(), ModelSource::Project)
    );
    assert_eq!(
        resolve_model(Some("m1"), &dir).unwrap().1,
        ModelSource::Request
    );
    std::fs::write(dir.join("hyperfunc.json"), "{oops").unwrap();
    assert!(resolve_model(None, &dir)
        .unwrap_err()
        .to_string()
        .contains("not JSON"));
}

#[tokio::test]
async fn the_model_reads_runs_through_tools() {
    let store = store_with_a_run("tools").await;
    // A scripted model: asks for the generations, then answers with what it was given.
    let fake = fake_openai::serve(|req: &Value| {
        let last = req["messages"]
            .as_array()
            .and_then(|m| m.last())
            .map_or(String::new(), |m| {
                m["content"].as_str().unwrap_or_default().to_string()
            });
        match last.strip_prefix("Result of generations: ") {
            Some(result) => {
                let v: Value = serde_json::from_str(result).unwrap_or_default();
                let rows = v["rows"].as_array().map_or(0, |r| r.len());
                json!({"answer": format!("saw {rows} rows, every {}", v["every"])}).to_string()
            }
            None => json!({"tool": "generations", "args": {"run": 1, "every": 10}}).to_string(),
        }
    })
    .await;
    let cfg = LlmConfig::new(&fake.base_url).api_key("sk-fake");
    let analyst = Analyst::new(&store, cfg, Some("scripted")).await.unwrap();
    let a = analyst.ask("how did run 1 go?").await.unwrap();
    assert_eq!(a.text, "saw 6 rows, every 10");
    assert_eq!(a.tool_calls, [r#"generations {"every":10,"run":1}"#]);
    assert_eq!(a.proposal, None);
    assert_eq!(a.estimate.max_usd, None); // no price configured for the model
}
