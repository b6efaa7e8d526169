//! The LLM path against a real OpenAI-compatible server: the LiteLLM proxy that `ci/peers.sh
//! start` runs on 127.0.0.1 with mock models and per-key limits (see ci/litellm/).
//!
//! Keys: `sk-hf-free` (no limit), `sk-hf-rpm3` / `sk-hf-rpm3-b` (3 requests per 5 s window, one
//! key per test so tests running at once do not share a window).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hyperfunc::llm::{
    Budget, ChatRequest, EndpointConfig, LlmClient, LlmConfig, LlmError, LlmOptions, ModelConfig,
    Price, RaceEntry,
};
use hyperfunc::prelude::*;
use hyperfunc::StopReason;
use serde_json::json;

use crate::fake_openai;

/// The proxy's base URL; the tests need it running (`ci/test` starts it).
fn litellm_url() -> String {
    std::env::var("HYPERFUNC_LLM_URL").unwrap_or_else(|_| {
        panic!(
            "HYPERFUNC_LLM_URL is not set: start the real server with `eval \"$(ci/peers.sh start | grep '^export ')\"` \
             or run the whole suite with `ci/test`"
        )
    })
}

const PRICE: Price = Price {
    input_per_mtok: 1.5,
    output_per_mtok: 6.0,
    cached_input_per_mtok: None,
};

fn config(key: &str, edit: impl FnOnce(&mut EndpointConfig)) -> LlmConfig {
    LlmConfig::new(&litellm_url())
        .api_key(key)
        .with_endpoint(edit)
        .model(
            "mock-gpt",
            ModelConfig {
                price: Some(PRICE),
                max_output_tokens: 1000,
                ..Default::default()
            },
        )
}

fn client(key: &str, edit: impl FnOnce(&mut EndpointConfig)) -> LlmClient {
    LlmClient::new(config(key, edit)).unwrap()
}

fn hello(model: &str) -> ChatRequest {
    ChatRequest::new(model).user("Say hello.").temperature(0.7)
}

#[tokio::test]
async fn concurrent_calls_complete_and_record_usage_and_cost() {
    let c = client("sk-hf-free", |_| {});
    let calls =
        (0..16).map(|i| c.chat(hello("mock-gpt").label(if i % 2 == 0 { "even" } else { "odd" })));
    let out = futures::future::join_all(calls).await;
    let mut expected_cost = 0.0;
    for r in &out {
        let r = r.as_ref().expect("every call answers");
        assert_eq!(r.text, "Hello from the mock.");
        assert!(
            r.usage.input_tokens > 0 && r.usage.output_tokens > 0,
            "{r:?}"
        );
        let cost = (r.usage.input_tokens as f64 * 1.5 + r.usage.output_tokens as f64 * 6.0) / 1e6;
        assert!(
            (r.cost_usd - cost).abs() < 1e-15,
            "{} vs {cost}",
            r.cost_usd
        );
        assert!(!r.cached && r.attempts == 1);
        expected_cost += cost;
    }
    let s = c.stats();
    assert_eq!(s.total.calls, 16);
    assert_eq!(s.total.requests, 16);
    assert_eq!(s.total.errors, 0);
    assert!((s.total.cost_usd - expected_cost).abs() < 1e-12);
    assert_eq!(s.by_label["even"].calls, 8);
    assert_eq!(s.by_model["mock-gpt"].calls, 16);
    let total_in: u64 = out
        .iter()
        .map(|r| r.as_ref().unwrap().usage.input_tokens)
        .sum();
    assert_eq!(s.total.input_tokens, total_in);
    assert!(s.to_markdown().contains("| mock-gpt | 16 | 16 |"));
}

#[tokio::test]
async fn limiter_adapts_to_a_429ing_server_and_surfaces_no_error() {
    // 7 calls at once against 3 requests per 5 s: the first window refuses 4, the limiter blocks
    // for Retry-After and halves its window; nothing reaches the caller but answers.
    let c = client("sk-hf-rpm3", |e| {
        e.max_retries = 8;
        e.backoff_base_ms = 10; // were Retry-After ignored, retries would hammer the server
    });
    let out = futures::future::join_all((0..7).map(|_| c.chat(hello("mock-gpt")))).await;
    for r in &out {
        assert_eq!(
            r.as_ref().expect("no 429 surfaces").text,
            "Hello from the mock."
        );
    }
    let s = c.stats();
    assert!(s.total.throttled >= 1, "the server did limit: {s:?}");
    // Honouring Retry-After costs at most one 429 per waiting request per window: 4 + 1 on a
    // fresh key (a window left over from an earlier run adds a few). Ignoring it, with a 10 ms
    // backoff and 8 retries, would mean ~8 per waiting request and calls failing.
    assert!(s.total.throttled <= 12, "Retry-After was honoured: {s:?}");
    assert_eq!(s.total.requests, 7 + s.total.throttled, "{s:?}");
    let ep = &s.endpoints["default"];
    assert!(
        ep.decreases >= 1 && ep.window < 32.0,
        "AIMD lowered the window: {s:?}"
    );
}

#[tokio::test]
async fn retry_after_is_honoured_few_429s_per_throttled_call() {
    let c = client("sk-hf-rpm3-b", |e| {
        e.backoff_base_ms = 10;
    });
    let mut attempts = Vec::new();
    // Seven calls in a row cannot fit in two 3-request windows without a wait.
    for _ in 0..7 {
        attempts.push(c.chat(hello("mock-gpt")).await.expect("answers").attempts);
    }
    // Waiting out Retry-After, a refused call is answered on its next attempt, or on the one
    // after when the server's window turned late (seen under load). Ignoring Retry-After with
    // a 10 ms backoff would burn all 6 retries inside one window and fail the call.
    assert!(
        attempts.iter().all(|&a| (1..=3).contains(&a)),
        "{attempts:?}"
    );
    assert!(attempts.iter().any(|&a| a > 1), "{attempts:?}");
    let refused: u32 = attempts.iter().map(|a| a - 1).sum();
    assert_eq!(c.stats().total.throttled, u64::from(refused));
}

#[tokio::test]
async fn a_429_without_retry_after_backs_off_and_surfaces_after_the_retries() {
    let c = client("sk-hf-free", |e| {
        e.max_retries = 2;
        e.backoff_base_ms = 5;
    });
    let e = c.chat(hello("mock-gpt-429")).await.unwrap_err();
    assert!(
        matches!(
            e,
            LlmError::Http {
                status: 429,
                attempts: 3,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(c.stats().total.throttled, 3);
    assert_eq!(e.error_type(), "429");
}

#[tokio::test]
async fn server_errors_are_retried_and_client_errors_are_not() {
    let c = client("sk-hf-free", |e| {
        e.max_retries = 2;
        e.backoff_base_ms = 5;
    });
    let e = c.chat(hello("mock-error-500")).await.unwrap_err();
    assert!(
        matches!(
            e,
            LlmError::Http {
                status: 500,
                attempts: 3,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(c.stats().total.retries, 2);

    let e = c.chat(hello("no-such-model")).await.unwrap_err();
    assert!(
        matches!(
            e,
            LlmError::Http {
                status: 400,
                attempts: 1,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("Invalid model name"), "{e}");

    let bad = client("sk-not-a-key", |_| {});
    let e = bad.chat(hello("mock-gpt")).await.unwrap_err();
    assert!(
        matches!(
            e,
            LlmError::Http {
                status: 401,
                attempts: 1,
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_timeout_cancels_the_request_and_frees_its_slot() {
    let c = client("sk-hf-free", |e| {
        e.max_retries = 0;
        e.max_concurrency = 1;
    });
    let e = c
        .chat(hello("mock-slow").timeout(Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert!(matches!(e, LlmError::Timeout { attempts: 1, .. }), "{e:?}");
    assert!(e.is_retryable());
    // With one slot, a leaked slot would block this call forever.
    let next = tokio::time::timeout(Duration::from_secs(30), c.chat(hello("mock-gpt"))).await;
    assert_eq!(
        next.expect("slot was freed").unwrap().text,
        "Hello from the mock."
    );
}

#[tokio::test]
async fn identical_deterministic_requests_are_paid_for_once() {
    let dir = tempdir();
    let path = dir.join("cache.sqlite");
    let c = LlmClient::new(config("sk-hf-free", |_| {}).cache(&path)).unwrap();
    let req = ChatRequest::new("mock-gpt")
        .user("cache me")
        .temperature(0.0);
    let a = c.chat(req.clone()).await.unwrap();
    let b = c.chat(req.clone()).await.unwrap();
    assert!(!a.cached && b.cached);
    assert_eq!(a.text, b.text);
    assert_eq!(b.cost_usd, 0.0);
    let s = c.stats();
    assert_eq!(
        (s.total.requests, s.total.cache_hits, s.total.cache_misses),
        (1, 1, 1)
    );

    // Concurrent identical requests: one HTTP request between them.
    let req2 = ChatRequest::new("mock-gpt")
        .user("together")
        .seed(7)
        .temperature(0.9);
    let out = futures::future::join_all((0..5).map(|_| c.chat(req2.clone()))).await;
    assert!(out.iter().all(|r| r.is_ok()));
    assert_eq!(c.stats().total.requests, 2);

    // Across runs: a new client on the same file sends nothing.
    let c2 = LlmClient::new(config("sk-hf-free", |_| {}).cache(&path)).unwrap();
    assert!(c2.chat(req).await.unwrap().cached);
    assert_eq!(c2.stats().total.requests, 0);
    assert_eq!(c2.cache_len().unwrap(), 2);

    // Sampling without a seed, or an explicit opt-out, is never cached.
    let hot = ChatRequest::new("mock-gpt")
        .user("cache me")
        .temperature(0.8);
    c2.chat(hot.clone()).await.unwrap();
    c2.chat(hot).await.unwrap();
    let opt_out = ChatRequest::new("mock-gpt")
        .user("cache me")
        .temperature(0.0)
        .no_cache();
    c2.chat(opt_out).await.unwrap();
    assert_eq!(c2.stats().total.requests, 3);
}

#[tokio::test]
async fn race_returns_the_fastest_model_and_cancels_the_rest() {
    let c = client("sk-hf-free", |e| {
        e.max_retries = 1;
        e.backoff_base_ms = 5;
    });
    let r = c
        .race(
            &["mock-slow", "mock-gpt"],
            hello("ignored"),
            "greeter",
            |_| true,
        )
        .await
        .unwrap();
    assert_eq!(r.winner, "mock-gpt");
    assert_eq!(r.response.text, "Hello from the mock.");
    assert_eq!(r.entrants[0].model, "mock-slow");
    assert_eq!(r.entrants[0].entry, RaceEntry::Cancelled);
    assert!(r.entrants[0].cost_estimated);
    assert!(matches!(r.entrants[1].entry, RaceEntry::Won { cost_usd } if cost_usd > 0.0));
    assert_eq!(c.stats().race_wins["greeter"]["mock-gpt"], 1);

    // An answer judged invalid does not win: the slow model does.
    let r = c
        .race(
            &["mock-slow", "mock-gpt"],
            hello("ignored"),
            "greeter",
            |a| a.text.starts_with("Slow"),
        )
        .await
        .unwrap();
    assert_eq!(r.winner, "mock-slow");
    assert!(matches!(r.entrants[1].entry, RaceEntry::Invalid { .. }));

    let e = c
        .race(
            &["mock-error-500", "no-such-model"],
            hello("x"),
            "greeter",
            |_| true,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, LlmError::RaceLost { ref errors } if errors.len() == 2),
        "{e:?}"
    );
}

#[tokio::test]
async fn streaming_yields_the_text_and_counts_usage() {
    let c = client("sk-hf-free", |_| {});
    let mut s = c.chat_stream(hello("mock-gpt")).await.unwrap();
    let mut text = String::new();
    while let Some(piece) = s.next().await {
        text.push_str(&piece.unwrap());
    }
    assert_eq!(text, "Hello from the mock.");
    assert!(c.stats().total.output_tokens > 0);
}

#[tokio::test]
async fn json_answers_parse() {
    let c = client("sk-hf-free", |_| {});
    let r = c.chat(hello("mock-json").json()).await.unwrap();
    assert_eq!(r.json().unwrap()["answer"], json!(42));
    let e = c.chat(hello("mock-gpt")).await.unwrap().json().unwrap_err();
    assert!(matches!(e, LlmError::Decode { .. }));
}

#[tokio::test]
async fn llm_hyperfunction_records_genai_attributes_and_errors() {
    let c = client("sk-hf-free", |_| {});
    let good = HyperFn::llm("greet", &c, "mock-gpt").prompt("You greet people.");
    let bad = HyperFn::llm_with("broken", &c, LlmOptions::new("no-such-model"));
    let hub = Hub::new();
    let sys = Chain::new(vec![good]);
    let theta = Theta::init(&sys, 0, &candle_core::Device::Cpu).unwrap();
    let ex = Examples::json(
        vec![json!("Ada"), json!("Alan")],
        vec![json!(""), json!("")],
    )
    .unwrap();
    let m = metric::per_example(|p, _| {
        if p == &json!("Hello from the mock.") {
            1.0
        } else {
            0.0
        }
    });
    let score =
        evaluate_population_observed(&sys, &Population::center(theta), &ex, &m, 1 << 16, &hub)
            .await
            .unwrap();
    assert_eq!(score.fitness, vec![1.0]);
    let recs: Vec<_> = hub
        .records()
        .into_iter()
        .filter(|r| &*r.name == "greet")
        .collect();
    assert_eq!(recs.len(), 2);
    for r in &recs {
        assert_eq!(r.attribute("gen_ai.operation.name"), Some(&json!("chat")));
        assert_eq!(
            r.attribute("gen_ai.request.model"),
            Some(&json!("mock-gpt"))
        );
        assert_eq!(r.attribute("gen_ai.provider.name"), Some(&json!("openai")));
        assert_eq!(
            r.attribute("gen_ai.request.temperature")
                .and_then(|v| v.as_f64())
                .map(|t| (t * 100.0).round()),
            Some(70.0)
        );
        assert_eq!(r.attribute("gen_ai.request.max_tokens"), Some(&json!(250)));
        assert_eq!(
            r.attribute("gen_ai.response.finish_reasons"),
            Some(&json!(["stop"]))
        );
        assert!(
            r.attribute("gen_ai.usage.output_tokens")
                .and_then(|v| v.as_u64())
                > Some(0)
        );
        assert!(r.attribute("cost").and_then(|v| v.as_f64()) > Some(0.0));
    }
    assert_eq!(c.stats().by_label["greet"].calls, 2);
    let sum = hub.summary();
    let greet = sum.functions.iter().find(|f| f.name == "greet").unwrap();
    let st = c.stats();
    assert_eq!(greet.output_tokens, st.by_label["greet"].output_tokens);
    assert!((greet.cost - st.by_label["greet"].cost_usd).abs() < 1e-12 && greet.cost > 0.0);
    assert_eq!(sum.models.len(), 1);
    assert_eq!(sum.models[0].model, "mock-gpt");
    assert_eq!(sum.models[0].calls, 2);
    assert!((sum.total_cost - greet.cost).abs() < 1e-12);
    assert!(sum.to_markdown().contains("| mock-gpt | 2 | 0 |"));

    let sys = Chain::new(vec![bad]);
    let theta = Theta::init(&sys, 0, &candle_core::Device::Cpu).unwrap();
    let hub = Hub::new();
    let e = evaluate_population_observed(&sys, &Population::center(theta), &ex, &m, 1 << 16, &hub)
        .await;
    let first = match e {
        Ok(ev) => ev.first_error.expect("the failure is reported"),
        Err(e) => e,
    };
    assert!(first.to_string().contains("HTTP 400"), "{first}");
    let r = hub
        .records()
        .into_iter()
        .find(|r| &*r.name == "broken")
        .unwrap();
    assert_eq!(r.attribute("error.type"), Some(&json!("400")));
}

#[tokio::test]
async fn names_from_one_factory_are_unique() {
    let c = client("sk-hf-free", |_| {});
    let make = |c: &LlmClient| HyperFn::llm(&c.unique_name("judge"), c, "mock-gpt");
    let (a, b) = (make(&c), make(&c));
    assert_eq!(a.name(), "judge");
    assert_eq!(b.name(), "judge#2");
    let sys = Chain::new(vec![a, b]);
    assert!(Theta::init(&sys, 0, &candle_core::Device::Cpu).is_ok());
}

#[tokio::test]
async fn a_spent_dollar_budget_stops_optimisation_cleanly() {
    let c = LlmClient::new(config("sk-hf-free", |_| {}).budget(Budget {
        max_cost_usd: Some(1e-9),
        max_requests: None,
    }))
    .unwrap();
    let f = HyperFn::llm("greet", &c, "mock-gpt");
    let sys = Chain::new(vec![f]);
    let ex = Examples::json(vec![json!("hi")], vec![json!("")]).unwrap();
    let m = metric::per_example(|_, _| 1.0);
    let report = Es::default()
        .pop_size(4)
        .generations(5)
        .progress(false)
        .stop_on(c.stop_signal())
        .optimize(&sys, &ex, &m)
        .await
        .unwrap();
    assert_eq!(report.stop, StopReason::Signal);
    // The first generation's calls all started within budget and crossed it: it is kept, and
    // nothing more is sent.
    assert_eq!(report.history.len(), 1);
    assert_eq!(c.stats().total.requests, 4);
    assert!(report.stop_detail.unwrap().contains("cost budget"));
    assert!(report.final_fitness.is_nan());
    let e = c.chat(hello("mock-gpt")).await.unwrap_err();
    assert!(matches!(e, LlmError::CostBudget { .. }), "{e:?}");
}

/// A fresh run store, a config whose every call is paid for (no cache), one example and a
/// constant metric: the setting of the tests that count a run's LLM spending.
fn paid_runs(
    name: &str,
) -> (
    std::path::PathBuf,
    hyperfunc::runs::RunStore,
    LlmConfig,
    Examples,
    impl Metric,
) {
    let dir = std::env::temp_dir().join(format!("hf-llm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = hyperfunc::runs::RunStore::open(&dir).unwrap();
    let mut cfg = config("sk-hf-free", |_| {});
    cfg.no_cache = true;
    let ex = Examples::json(vec![json!("hi")], vec![json!("")]).unwrap();
    (dir, store, cfg, ex, metric::per_example(|_, _| 1.0))
}

#[tokio::test]
async fn run_rows_carry_llm_tokens_and_dollars_and_warn_before_the_budget_stops_it() {
    let (dir, store, cfg, ex, m) = paid_runs("usage");
    let es = Es::default()
        .pop_size(4)
        .generations(3)
        .progress(false)
        .store(store.clone());

    let c = LlmClient::new(cfg.clone()).unwrap();
    let sys = Chain::new(vec![HyperFn::llm("greet", &c, "mock-gpt")]);
    let report = es
        .clone()
        .llm_client(&c)
        .optimize(&sys, &ex, &m)
        .await
        .unwrap();
    let rows = store.generations(report.run.unwrap()).unwrap();
    assert_eq!(rows.len(), 3);
    // Each generation pays for its four calls; the client's total also has the final
    // evaluation of θ, after the last row.
    let total = c.stats().total;
    let last = rows.last().unwrap();
    let (tokens, usd) = (last.tokens.unwrap(), last.usd.unwrap());
    let per_gen_tokens = rows[0].tokens.unwrap();
    assert!(per_gen_tokens > 0);
    assert_eq!(tokens, 3 * per_gen_tokens, "{rows:#?}");
    let after = total.input_tokens + total.output_tokens - tokens;
    assert!(
        after > 0 && after < per_gen_tokens,
        "{after} tokens after the last row"
    );
    assert!(
        usd > 0.0 && usd < total.cost_usd,
        "{usd} of {}",
        total.cost_usd
    );

    // A budget of ten generations' worth: an alert once 90% is spent, then the stop.
    let per_gen = usd / 3.0;
    let c = LlmClient::new(cfg.budget(Budget {
        max_cost_usd: Some(per_gen * 10.0),
        max_requests: None,
    }))
    .unwrap();
    let sys = Chain::new(vec![HyperFn::llm("greet", &c, "mock-gpt")]);
    let report = es
        .clone()
        .generations(100)
        .llm_client(&c)
        .optimize(&sys, &ex, &m)
        .await
        .unwrap();
    assert_eq!(report.stop, StopReason::Signal);
    let run = report.run.unwrap();
    let events = store.events(run).unwrap();
    let alert = events
        .iter()
        .find(|e| e.message.contains("budget nearly spent"))
        .unwrap_or_else(|| panic!("{events:#?}"));
    let kept = store.generations(run).unwrap();
    assert!(
        alert.gen.unwrap() < kept.len(),
        "{alert:?}, {} rows",
        kept.len()
    );
    assert!((9..=12).contains(&kept.len()), "{} rows", kept.len());

    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_run_budget_is_a_live_setting_that_stops_the_run_where_it_is_spent() {
    let (dir, store, cfg, ex, m) = paid_runs("budget");
    let c = LlmClient::new(cfg).unwrap();
    let sys = Chain::new(vec![HyperFn::llm("greet", &c, "mock-gpt")]);
    let es = Es::default()
        .pop_size(4)
        .generations(1000)
        .progress(false)
        .store(store.clone())
        .llm_client(&c);

    // What one generation costs (the mock answers the same every time).
    let probe = es
        .clone()
        .generations(2)
        .optimize(&sys, &ex, &m)
        .await
        .unwrap();
    let rows = store.generations(probe.run.unwrap()).unwrap();
    let per_gen = rows[0].usd.unwrap();
    assert!(per_gen > 0.0 && rows[1].tokens == Some(2 * rows[0].tokens.unwrap()));

    // A budget far away at the start, lowered live at gen 2 to five and a half generations'
    // worth: the run stops at the first boundary where it is spent, after the sixth.
    let es = es.max_cost_usd(1000.0);
    let run = store.create("budget", &es).unwrap();
    let ctl = store.control(run).source("test");
    ctl.clone()
        .at_gen(2)
        .set("max_cost_usd", per_gen * 5.5)
        .unwrap();
    let before = c.total().cost_usd;
    let report = es.clone().run(run).optimize(&sys, &ex, &m).await.unwrap();
    assert_eq!(report.stop, StopReason::Budget);
    let detail = report.stop_detail.clone().unwrap();
    assert!(detail.contains("max_cost_usd"), "{detail}");
    let rows = store.generations(run).unwrap();
    assert_eq!(rows.len(), 6, "{rows:#?}");
    let spent = rows.last().unwrap().usd.unwrap();
    assert!(spent >= per_gen * 5.5 && spent < per_gen * 6.5, "{spent}");
    let events = store.events(run).unwrap();
    let said = |p: &dyn Fn(&str) -> bool| events.iter().any(|e| p(&e.message));
    assert!(
        said(&|m| m.starts_with("gen 2: max_cost_usd 1000.0 →") && m.contains("(cmd 1 from test)")),
        "{events:#?}"
    );
    assert!(
        said(&|m| m.contains("budget nearly spent") && m.contains("max_cost_usd")),
        "{events:#?}"
    );
    let info = store.info(run).unwrap();
    assert_eq!(info.status, "stopped");
    assert!(info.stop.unwrap().starts_with("budget: "));
    assert_eq!(
        store
            .effective_config(run, usize::MAX)
            .unwrap()
            .max_cost_usd,
        Some(per_gen * 5.5)
    );
    // The final θ is not evaluated again: nothing is spent after the last row.
    let after = c.total().cost_usd - before;
    assert!((after - spent).abs() < per_gen * 1e-6, "{after} vs {spent}");

    // A token budget stops it the same way; set to none live, the run goes on. (Clearing it
    // would bring back the starting budget.)
    let es = Es::default()
        .pop_size(4)
        .generations(8)
        .progress(false)
        .store(store.clone())
        .llm_client(&c)
        .max_tokens(rows[0].tokens.unwrap() * 3);
    let run = store.create("tokens", &es).unwrap();
    store
        .control(run)
        .at_gen(1)
        .set("max_tokens", serde_json::Value::Null)
        .unwrap();
    let report = es.clone().run(run).optimize(&sys, &ex, &m).await.unwrap();
    assert_eq!(report.stop, StopReason::Generations);
    let es = es.max_tokens(rows[0].tokens.unwrap() * 3);
    let report = es.optimize(&sys, &ex, &m).await.unwrap();
    assert_eq!(report.stop, StopReason::Budget);
    assert_eq!(report.history.len(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn optimize_tunes_lm_params_through_an_llm_hyperfunction() {
    // A scripted model whose answer is a score of the sampling knobs (best at t=0.2, top_p=0.9).
    let seen = Arc::new(Mutex::new(Vec::<f64>::new()));
    let s = seen.clone();
    let fake = fake_openai::serve(move |req| {
        let t = req["temperature"].as_f64().unwrap_or(1.0);
        let p = req["top_p"].as_f64().unwrap_or(1.0);
        s.lock().unwrap().push(t);
        format!("{}", -(t - 0.2).powi(2) - (p - 0.9).powi(2))
    })
    .await;
    let mut cfg = LlmConfig::new(&fake.base_url).api_key("sk-fake");
    cfg.no_cache = true; // every candidate's request reaches the server, to count them
    let c = LlmClient::new(cfg).unwrap();
    let f = HyperFn::llm("tuned", &c, "scripted");
    let sys = Chain::new(vec![f]);
    let ex = Examples::json(vec![json!("score me")], vec![json!(null)]).unwrap();
    let m = metric::per_example(|p, _| p.as_str().and_then(|s| s.parse().ok()).unwrap_or(f32::NAN));
    let report = Es::default()
        .pop_size(16)
        .generations(25)
        .lr(0.1)
        .seed(3)
        .progress(false)
        .optimize(&sys, &ex, &m)
        .await
        .unwrap();
    let first = report.history[0].mean;
    assert!(
        report.final_fitness > first,
        "{} ≤ {first}",
        report.final_fitness
    );
    // The last request is the final evaluation of the mean θ.
    let t = *seen.lock().unwrap().last().unwrap();
    assert!(
        (t - 0.2).abs() < 0.25,
        "temperature moved from 0.7 towards 0.2: {t}"
    );
    assert_eq!(
        fake.requests.load(std::sync::atomic::Ordering::SeqCst),
        16 * 25 + 1,
        "one request per candidate per generation, plus the final evaluation"
    );
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "hyperfunc-llm-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}
