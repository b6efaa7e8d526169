//! `hyperfunc::tune` cost attribution, the LLM call store and tuned races: golden provider
//! usage records priced to the micro-dollar, metered endpoints, rollups that equal the per-call
//! records for every grouping (two handles on one file), re-pricing, the fragment report, before
//! /after comparison, observations joined with calls, and races against the real LiteLLM proxy.

use std::collections::BTreeMap;
use std::time::Duration;

use hyperfunc::llm::{ChatRequest, LlmClient, LlmConfig, ModelConfig, Price, RaceEntry};
use hyperfunc::tune::{
    parse_time, CostDim, Fragment, Ledger, LlmReportOptions, Meter, MeterPrice, ModelPrice, Policy,
    PriceTable, Prompt, RaceOptions, TokenUsage, Tuner, Window,
};
use hyperfunc::Error;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde_json::json;

use crate::common::{cli_err, cli_ok};
use crate::tune::TempDb;

fn litellm_url() -> String {
    std::env::var("HYPERFUNC_LLM_URL")
        .expect("HYPERFUNC_LLM_URL is not set: run the suite with `ci/test`")
}

/// A client on the LiteLLM proxy; mock-gpt and mock-slow cost $1.5 / $6 per million tokens.
fn client() -> LlmClient {
    let price = ModelConfig {
        price: Some(Price::new(1.5, 6.0)),
        max_output_tokens: 1000,
        ..Default::default()
    };
    LlmClient::new(
        LlmConfig::new(&litellm_url())
            .api_key("sk-hf-free")
            .model("mock-gpt", price.clone())
            .model("mock-slow", price),
    )
    .unwrap()
}

#[test]
fn golden_provider_usage_records_price_to_the_micro_dollar() {
    let mut table = PriceTable::new();
    // OpenAI: $2.50 in, $1.25 cached, $10 out per million tokens.
    table
        .add(
            "gpt-4o",
            "2024-08-06",
            ModelPrice::per_mtok(2.5, 10.0)
                .unwrap()
                .cache_read(1.25)
                .unwrap(),
        )
        .unwrap();
    // A reasoning model: reasoning tokens are inside completion_tokens, billed once.
    table
        .add(
            "o3-mini",
            "2025-01-31",
            ModelPrice::per_mtok(1.1, 4.4)
                .unwrap()
                .cache_read(0.55)
                .unwrap(),
        )
        .unwrap();
    // Anthropic: $3 in, $0.30 cache read, $3.75 cache write, $15 out.
    table
        .add(
            "claude-sonnet",
            "2025-02-24",
            ModelPrice::per_mtok(3.0, 15.0)
                .unwrap()
                .cache_read(0.3)
                .unwrap()
                .cache_write(3.75)
                .unwrap(),
        )
        .unwrap();
    let at = parse_time("2025-06-01").unwrap();
    let golden: [(&str, serde_json::Value, bool, TokenUsage, i64); 4] = [
        (
            "gpt-4o",
            json!({"prompt_tokens": 2006, "completion_tokens": 300,
                   "prompt_tokens_details": {"cached_tokens": 1920}}),
            false,
            TokenUsage {
                input: 86,
                cache_read: 1920,
                output: 300,
                ..Default::default()
            },
            // 86·2.5 + 1920·1.25 + 300·10 = 215 + 2400 + 3000
            5615,
        ),
        (
            "o3-mini",
            json!({"prompt_tokens": 1000, "completion_tokens": 1500,
                   "completion_tokens_details": {"reasoning_tokens": 1200}}),
            false,
            TokenUsage {
                input: 1000,
                output: 1500,
                reasoning: 1200,
                ..Default::default()
            },
            // 1000·1.1 + 1500·4.4 = 1100 + 6600 (reasoning not added again)
            7700,
        ),
        (
            "claude-sonnet",
            json!({"input_tokens": 50, "cache_read_input_tokens": 100000,
                   "cache_creation_input_tokens": 0, "output_tokens": 500}),
            true,
            TokenUsage {
                input: 50,
                cache_read: 100_000,
                output: 500,
                ..Default::default()
            },
            // 50·3 + 100000·0.3 + 500·15 = 150 + 30000 + 7500
            37650,
        ),
        (
            "claude-sonnet",
            json!({"input_tokens": 21, "cache_read_input_tokens": 0,
                   "cache_creation_input_tokens": 3333, "output_tokens": 7}),
            true,
            TokenUsage {
                input: 21,
                cache_write: 3333,
                output: 7,
                ..Default::default()
            },
            // 21·3 + 3333·3.75 + 7·15 = 63 + 12498.75 + 105 = 12666.75 → 12667
            12667,
        ),
    ];
    for (model, usage, anthropic, classes, micros) in golden {
        let u = if anthropic {
            TokenUsage::from_anthropic(&usage).unwrap()
        } else {
            TokenUsage::from_openai(&usage).unwrap()
        };
        assert_eq!(u, classes, "{model}: {usage}");
        assert_eq!(table.cost(model, at, &u), Some(micros), "{model}: {usage}");
    }
    // Anthropic's record read as OpenAI's would bill the cache twice: refused.
    let e = TokenUsage::from_openai(
        &json!({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 20}}),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Price { .. }), "{e}");
    assert!(e.to_string().contains("from_anthropic"), "{e}");
    let e = TokenUsage::from_openai(&json!({"prompt_tokens": -3})).unwrap_err();
    assert!(matches!(e, Error::Price { .. }), "{e}");
}

#[test]
fn price_tables_are_dated_and_checked() {
    let table = PriceTable::from_json(
        r#"[{"model": "m", "from": "2025-01-01", "input": 2.0, "output": 8.0},
            {"model": "m", "from": "2025-06-01", "input": 1.0, "output": 4.0, "cache_read": 0.25}]"#,
    )
    .unwrap();
    let u = TokenUsage {
        input: 1_000_000,
        output: 0,
        ..Default::default()
    };
    assert_eq!(table.cost("m", parse_time("2024-12-31").unwrap(), &u), None);
    assert_eq!(
        table.cost("m", parse_time("2025-03-01").unwrap(), &u),
        Some(2_000_000)
    );
    assert_eq!(
        table.cost("m", parse_time("2025-06-01").unwrap(), &u),
        Some(1_000_000)
    );
    assert_eq!(PriceTable::from_entries(&table.entries()).unwrap(), table);
    for bad in [
        r#"[{"model": "m", "from": "2025-01-01", "input": -1.0, "output": 8.0}]"#,
        r#"[{"model": "m", "from": "2025-02-30", "input": 1.0, "output": 8.0}]"#,
        r#"[{"model": "m", "input": 1.0, "output": 8.0}]"#,
        r#"{"model": "m"}"#,
    ] {
        let e = PriceTable::from_json(bad).unwrap_err();
        assert!(matches!(e, Error::Price { .. }), "{bad}: {e}");
    }
    assert!(ModelPrice::per_mtok(f64::NAN, 1.0).is_err());
}

#[test]
fn meters_record_per_call_per_unit_and_response_prices_and_refuse_bad_input() {
    let ledger = Ledger::in_memory().unwrap();
    let unlocker = Meter::new(
        &ledger,
        "unlocker",
        MeterPrice::per_call_usd(0.0015).unwrap(),
    );
    let pages = Meter::new(
        &ledger,
        "pdf",
        MeterPrice::per_unit_usd("page", 0.0004).unwrap(),
    );
    let search = Meter::new(&ledger, "search", MeterPrice::FromResponse);
    assert_eq!(
        unlocker
            .charge()
            .label("fetch")
            .user("acme")
            .record()
            .unwrap(),
        1500
    );
    assert_eq!(pages.charge().units(12.5).record().unwrap(), 5000);
    assert_eq!(search.charge().usd(0.012_345_6).record().unwrap(), 12_346);
    // Bad input: a typed error, nothing recorded.
    for e in [
        search.charge().record().unwrap_err(),
        search.charge().usd(-0.1).record().unwrap_err(),
        search.charge().usd(f64::NAN).record().unwrap_err(),
        unlocker.charge().usd(0.1).record().unwrap_err(),
        pages.charge().units(f64::INFINITY).record().unwrap_err(),
        pages.charge().units(-1.0).record().unwrap_err(),
    ] {
        assert!(matches!(e, Error::Price { .. }), "{e}");
    }
    assert!(MeterPrice::per_call_usd(-1.0).is_err());
    let r = ledger.cost_report(&[CostDim::Endpoint], None).unwrap();
    assert_eq!(r.total_calls, 3);
    assert_eq!(r.total_micros, 1500 + 5000 + 12_346);
    let by: BTreeMap<String, i64> = r
        .rows
        .iter()
        .map(|l| (l.key[0].clone(), l.micros))
        .collect();
    assert_eq!(by["search"], 12_346);
    // The caller is this file.
    let r = ledger.cost_report(&[CostDim::Caller], None).unwrap();
    assert!(
        r.rows.iter().all(|l| l.key[0].contains("tune_cost.rs")),
        "{r:?}"
    );
}

#[test]
fn rollups_equal_the_per_call_records_for_every_grouping_across_two_handles() {
    let db = TempDb::new("ledger-sums");
    let a = Ledger::open(&db.0).unwrap();
    let b = Ledger::open(&db.0).unwrap();
    let meters: Vec<Meter> = ["unlocker", "browser", "proxy"]
        .iter()
        .enumerate()
        .flat_map(|(i, e)| {
            [
                Meter::new(
                    &a,
                    e,
                    MeterPrice::per_unit_usd("page", 0.000_37 * (i + 1) as f64).unwrap(),
                ),
                Meter::new(
                    &b,
                    e,
                    MeterPrice::per_unit_usd("page", 0.000_37 * (i + 1) as f64).unwrap(),
                ),
            ]
        })
        .collect();
    let mut expected: i64 = 0;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let meters = &meters;
                s.spawn(move || {
                    let mut rng = Xoshiro256PlusPlus::seed_from_u64(t);
                    let mut sum = 0i64;
                    for i in 0..1500 {
                        let m = &meters[2 * rng.random_range(0..3usize) + t as usize];
                        sum += m
                            .charge()
                            .label(["fetch", "crawl"][i % 2])
                            .user(["acme", "globex", "initech"][rng.random_range(0..3usize)])
                            .run(&format!("r{}", i % 4))
                            .call_site(
                                ["a.rs:1", "b.rs:2", "c.rs:3", "d.rs:4"]
                                    [rng.random_range(0..4usize)],
                            )
                            .units(rng.random_range(0.0..40.0))
                            .record()
                            .unwrap();
                    }
                    sum
                })
            })
            .collect();
        for h in handles {
            expected += h.join().unwrap();
        }
    });
    b.flush().unwrap();
    for dims in [
        vec![],
        vec![CostDim::Caller],
        vec![CostDim::Endpoint],
        vec![CostDim::Label],
        vec![CostDim::Run],
        vec![CostDim::User],
        vec![CostDim::Day],
        vec![CostDim::Caller, CostDim::Endpoint, CostDim::User],
    ] {
        let rollup = a.cost_report(&dims, None).unwrap();
        let calls = a.cost_by_calls(&dims, None).unwrap();
        assert_eq!(rollup.total_micros, expected, "{dims:?}");
        assert_eq!(rollup.total_calls, 3000, "{dims:?}");
        let key = |r: &hyperfunc::tune::CostReport| {
            r.rows
                .iter()
                .map(|l| (l.key.clone(), (l.calls, l.micros)))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(key(&rollup), key(&calls), "{dims:?}");
    }
    // The ledger reopened sees the same.
    drop((a, b, meters));
    let c = Ledger::open(&db.0).unwrap();
    assert_eq!(c.cost_report(&[], None).unwrap().total_micros, expected);
}

#[test]
fn a_corrupt_ledger_file_is_refused_and_left_untouched() {
    let db = TempDb::new("ledger-corrupt");
    let junk = b"this is not a database, but somebody's notes".repeat(200);
    std::fs::write(&db.0, &junk).unwrap();
    let e = Ledger::open(&db.0).unwrap_err();
    assert!(matches!(e, Error::TuneStore { .. }), "{e}");
    assert_eq!(std::fs::read(&db.0).unwrap(), junk);
    let e = Ledger::in_memory()
        .unwrap()
        .quality(12345, 0.5)
        .unwrap_err();
    assert!(matches!(e, Error::TuneCall { .. }), "{e}");
    let e = Ledger::in_memory()
        .unwrap()
        .quality(1, f64::NAN)
        .unwrap_err();
    assert!(matches!(e, Error::TuneValue { .. }), "{e}");
}

#[tokio::test]
async fn llm_calls_are_stored_with_fragments_and_the_report_finds_cache_candidates() {
    let ledger = Ledger::in_memory().unwrap();
    let c = client();
    c.attach_ledger(&ledger);
    let rules = Fragment::new("rules", "Answer briefly and politely. ".repeat(200));
    let style = Fragment::new("style", "Use British spelling.");
    let never = Fragment::new("legacy-footer", "This footer is no longer used.");
    ledger.declare(&[&rules, &style, &never]).unwrap();
    for i in 0..4 {
        let question = Fragment::varying("question", format!("Question number {i}?"));
        let prompt = Prompt::new().with(&question).with(&rules);
        let r = c
            .chat(
                ChatRequest::new("mock-gpt")
                    .system_prompt(&prompt)
                    .user_prompt(&Prompt::new().with(&style))
                    .label("answer")
                    .temperature(0.7),
            )
            .await
            .unwrap();
        assert_eq!(r.text, "Hello from the mock.");
    }
    // A caller whose varying fragment sits in front of the long stable one.
    for i in 0..3 {
        let today = Fragment::varying("today", format!("Today is day {i}."));
        c.chat(
            ChatRequest::new("mock-gpt")
                .caller("breaker.rs:7")
                .system_prompt(&Prompt::new().with(&today))
                .user_prompt(&Prompt::new().with(&rules))
                .temperature(0.7),
        )
        .await
        .unwrap();
    }
    let calls = ledger.llm_calls(None).unwrap();
    assert_eq!(calls.len(), 7);
    let first = &calls[0];
    assert!(
        first.system.starts_with("Answer briefly"),
        "stable fragment first"
    );
    assert!(first.system.ends_with("Question number 0?"));
    assert_eq!(first.prompt, "Use British spelling.");
    assert!(first.who.caller.contains("tune_cost.rs"), "{:?}", first.who);
    assert_eq!(first.who.label, "answer");
    assert!(first.usage.input > 0 && first.usage.output > 0);
    // Priced with the client's configured price, to the micro-dollar.
    let price = ModelPrice::per_mtok(1.5, 6.0).unwrap();
    assert_eq!(first.micros, price.cost(&first.usage));

    let report = ledger
        .llm_report(&LlmReportOptions {
            min_cacheable_tokens: 512,
            ..Default::default()
        })
        .unwrap();
    let rules_use = report.fragments.iter().find(|f| f.name == "rules").unwrap();
    assert_eq!(rules_use.sends, 7, "sent on every call");
    assert_eq!(rules_use.callers, 2);
    assert_eq!(report.unused_fragments, vec!["legacy-footer".to_string()]);
    let cand = report
        .cache_candidates
        .iter()
        .find(|c| c.caller.contains("tune_cost.rs"))
        .expect("the stable prefix is a cache candidate");
    assert_eq!(cand.prefix, vec!["rules".to_string()]);
    assert_eq!(cand.calls, 4);
    assert_eq!(cand.within_lifetime, 3);
    assert_eq!(
        report.cache_breakers.len(),
        1,
        "{:?}",
        report.cache_breakers
    );
    let br = &report.cache_breakers[0];
    assert_eq!(
        (br.caller.as_str(), br.varying.as_str(), br.variants),
        ("breaker.rs:7", "today", 3)
    );
    assert_eq!(br.stable_after, vec!["rules".to_string()]);
    assert!(report.to_markdown().contains("move it after them"));
    assert_eq!(report.calls, 7);
    assert_eq!(report.costly.iter().map(|o| o.calls).sum::<u64>(), 7);
}

#[tokio::test]
async fn compare_shows_the_token_drop_after_a_prompt_is_shortened() {
    // The LiteLLM mock reports the same usage for every prompt; the scripted server counts.
    let fake = crate::fake_openai::serve(|_| "Fine.".to_string()).await;
    let db = TempDb::new("ledger-compare");
    let ledger = Ledger::open(&db.0).unwrap();
    let c = LlmClient::new(LlmConfig::new(&fake.base_url).model(
        "mock-gpt",
        ModelConfig {
            price: Some(Price::new(1.5, 6.0)),
            ..Default::default()
        },
    ))
    .unwrap();
    c.attach_ledger(&ledger);
    let long = "Please think about the question carefully and answer it. ".repeat(40);
    for (run, text) in [("before", long.as_str()), ("after", "Answer briefly.")] {
        for i in 0..5 {
            let r = c
                .chat(
                    ChatRequest::new("mock-gpt")
                        .system(text)
                        .user(format!("Question {i}"))
                        .run(run)
                        .temperature(0.7),
                )
                .await
                .unwrap();
            assert!(r.usage.input_tokens > 0);
        }
    }
    for call in ledger.llm_calls(None).unwrap() {
        ledger
            .quality(call.id, if call.who.run == "after" { 0.9 } else { 0.8 })
            .unwrap();
    }
    let cmp = ledger
        .compare(
            &Window::Run("before".into()),
            &Window::Run("after".into()),
            None,
        )
        .unwrap();
    assert_eq!((cmp.before_calls, cmp.after_calls), (5, 5));
    let tokens = cmp.delta("prompt_tokens").unwrap();
    assert!(tokens.delta < -300.0, "{tokens:?}");
    assert!(tokens.significant(), "{tokens:?}");
    let usd = cmp.delta("usd").unwrap();
    assert!(usd.delta < 0.0 && cmp.after_usd < cmp.before_usd, "{usd:?}");
    let q = cmp.delta("quality").unwrap();
    assert!((q.delta - 0.1).abs() < 1e-9, "{q:?}");
    assert!(cmp.to_table().contains("prompt_tokens *"));

    // The same from the CLI.
    ledger.flush().unwrap();
    let store = db.0.to_str().unwrap();
    let out = cli_ok(
        &[
            "llm",
            "compare",
            "--store",
            store,
            "run:before",
            "run:after",
            "--json",
        ],
        &[],
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let d = v["deltas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["metric"] == "prompt_tokens")
        .unwrap();
    assert_eq!(d["delta"].as_f64().unwrap(), tokens.delta, "{v}");
    let out = cli_ok(&["llm", "report", "--store", store], &[]);
    assert!(String::from_utf8_lossy(&out).contains("10 calls"));
    let bad = cli_err(
        &["llm", "compare", "--store", store, "yesterday", "run:after"],
        &[],
    );
    assert!(bad.contains("run:ID"));
}

#[tokio::test]
async fn repricing_rewrites_calls_and_rollups_together() {
    let ledger = Ledger::in_memory().unwrap();
    let c = client();
    c.attach_ledger(&ledger);
    for i in 0..3 {
        c.chat(
            ChatRequest::new("mock-gpt")
                .user(format!("hi {i}"))
                .temperature(0.7),
        )
        .await
        .unwrap();
    }
    let before = ledger
        .cost_report(&[CostDim::Model], None)
        .unwrap()
        .total_micros;
    let mut table = PriceTable::new();
    table
        .add(
            "mock-gpt",
            "2020-01-01",
            ModelPrice::per_mtok(15.0, 60.0).unwrap(),
        )
        .unwrap();
    let (n, old, new) = ledger.reprice(&table, None).unwrap();
    assert_eq!(n, 3);
    assert_eq!(old, before);
    assert!(new >= 9 * old, "ten times the price: {old} → {new}");
    let calls = ledger.llm_calls(None).unwrap();
    let per_call: i64 = calls.iter().map(|c| c.micros).sum();
    assert_eq!(per_call, new);
    assert_eq!(
        ledger
            .cost_report(&[CostDim::Model], None)
            .unwrap()
            .total_micros,
        new
    );
    assert_eq!(
        ledger
            .cost_by_calls(&[CostDim::Model], None)
            .unwrap()
            .total_micros,
        new
    );
    for call in &calls {
        assert_eq!(
            call.micros,
            table.cost("mock-gpt", call.ts as i64, &call.usage).unwrap()
        );
    }
}

#[tokio::test]
async fn a_tuned_race_records_winner_losers_and_the_cancelled_call_cost() {
    let ledger = Ledger::in_memory().unwrap();
    let tuner = Tuner::in_memory().unwrap().seed(3);
    let c = client();
    c.attach_ledger(&ledger);
    // Both race at once; the slow one (1.5 s) is still running when the fast one answers.
    let race = tuner
        .tune("greet")
        .choices(["mock-slow", "mock-gpt"])
        .race(
            &c,
            ChatRequest::new("").user("Say hello.").temperature(0.7),
            RaceOptions::top_k(2),
            |r| !r.text.is_empty(),
        )
        .await
        .unwrap();
    assert_eq!(race.winner, "mock-gpt");
    assert_eq!(race.entrants.len(), 2);
    let by: BTreeMap<&str, &hyperfunc::llm::Entrant> = race
        .entrants
        .iter()
        .map(|e| (e.model.as_str(), e))
        .collect();
    assert_eq!(by["mock-slow"].entry, RaceEntry::Cancelled);
    assert!(by["mock-slow"].cost_estimated && by["mock-slow"].cost_usd > 0.0);
    assert!(!by["mock-gpt"].cost_estimated && by["mock-gpt"].cost_usd > 0.0);
    assert_eq!(race.outcomes.len(), 2);
    let report = tuner.report(Some("greet")).unwrap();
    let g = &report.groups[0];
    let calls: u64 = g.choices.iter().map(|c| c.calls).sum();
    assert_eq!(calls, 2);
    let slow = g.choices.iter().find(|c| c.choice == "mock-slow").unwrap();
    assert_eq!(slow.mean_reward, Some(0.0));
    let winner = g.choices.iter().find(|c| c.choice == "mock-gpt").unwrap();
    assert_eq!(winner.mean_reward, Some(1.0));
    // The ledger holds the cancelled call at its estimated cost.
    let stored = ledger.llm_calls(None).unwrap();
    let cancelled: Vec<_> = stored.iter().filter(|c| c.source == "cancelled").collect();
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].model, "mock-slow");
    assert!(cancelled[0].micros > 0);
    assert_eq!(c.stats().race_wins["greet"]["mock-gpt"], 1);

    // A frozen first choice with a long hedge: the second never launches.
    let race = tuner
        .tune("greet2")
        .choices(["mock-slow", "mock-gpt"])
        .policy(Policy::Fixed("mock-gpt".into()))
        .race(
            &c,
            ChatRequest::new("").user("Say hello.").temperature(0.7),
            RaceOptions::top_k(2).hedge(Duration::from_secs(60)),
            |r| !r.text.is_empty(),
        )
        .await
        .unwrap();
    assert_eq!(race.winner, "mock-gpt");
    assert_eq!(race.entrants[1].entry, RaceEntry::NotLaunched);
    assert_eq!(race.outcomes.len(), 1);

    // A failing first choice (no retries): the next one launches at once, without waiting for
    // the hedge delay, and wins.
    let c = LlmClient::new(
        LlmConfig::new(&litellm_url())
            .api_key("sk-hf-free")
            .with_endpoint(|e| e.max_retries = 0),
    )
    .unwrap();
    let race = tuner
        .tune("greet4")
        .choices(["mock-error-500", "mock-gpt"])
        .policy(Policy::Fixed("mock-error-500".into()))
        .race(
            &c,
            ChatRequest::new("").user("Say hello.").temperature(0.7),
            RaceOptions::top_k(2).hedge(Duration::from_secs(60)),
            |r| !r.text.is_empty(),
        )
        .await
        .unwrap();
    assert_eq!(race.winner, "mock-gpt");
    assert!(
        matches!(race.entrants[0].entry, RaceEntry::Failed { .. }),
        "{:?}",
        race.entrants
    );
    assert_eq!(race.outcomes.len(), 2);
    let e = tuner
        .tune("greet3")
        .choices(["mock-gpt"])
        .race(&c, ChatRequest::new(""), RaceOptions::top_k(0), |_| true)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::TuneConfig { .. }), "{e}");
}

#[tokio::test]
async fn observations_join_the_llm_calls_by_model_and_label() {
    let ledger = Ledger::in_memory().unwrap();
    let hub = hyperfunc::observe::Hub::new();
    ledger.attach(&hub);
    let c = client();
    c.attach_ledger(&ledger);
    for (label, n) in [("summarise", 4), ("classify", 2)] {
        for i in 0..n {
            let r = c
                .chat(
                    ChatRequest::new("mock-gpt")
                        .user(format!("{label} {i}"))
                        .label(label)
                        .temperature(0.7),
                )
                .await
                .unwrap();
            // Only `summarise` answers need their fences stripped (scripted here).
            if label == "summarise" && i % 2 == 0 {
                let mut o = hub.observe("strip_fences");
                o.note("model", r.model.clone()).note("label", label);
            }
        }
    }
    let report = ledger.llm_report(&LlmReportOptions::default()).unwrap();
    let by_label = report
        .observations
        .iter()
        .find(|o| o.by == "label" && o.key == "summarise")
        .unwrap();
    assert_eq!((by_label.count, by_label.llm_calls), (2, 4));
    assert_eq!(by_label.rate, Some(0.5));
    assert!(report
        .quiet_labels
        .contains(&("strip_fences".to_string(), "classify".to_string())));
    let by_model = report
        .observations
        .iter()
        .find(|o| o.by == "model")
        .unwrap();
    assert_eq!(by_model.count, 2);
}

#[tokio::test]
async fn judge_items_gather_several_models_answers_to_one_prompt() {
    let fake =
        crate::fake_openai::serve(|req| format!("answer of {}", req["model"].as_str().unwrap()))
            .await;
    let ledger = Ledger::in_memory().unwrap();
    let c = LlmClient::new(LlmConfig::new(&fake.base_url)).unwrap();
    c.attach_ledger(&ledger);
    for model in ["m-a", "m-b", "m-a"] {
        c.chat(
            ChatRequest::new(model)
                .system("Be brief.")
                .user("Why is the sky blue?")
                .temperature(0.7),
        )
        .await
        .unwrap();
    }
    c.chat(
        ChatRequest::new("m-a")
            .user("Only one model saw this.")
            .temperature(0.7),
    )
    .await
    .unwrap();
    let items = ledger.judge_items(None, 2).unwrap();
    assert_eq!(items.len(), 1);
    let item = &items[0];
    assert_eq!(item.prompt, "Be brief.\n\nWhy is the sky blue?");
    let answers: Vec<(&str, &str)> = item
        .responses
        .iter()
        .map(|r| (r.model.as_str(), r.text.as_str()))
        .collect();
    assert_eq!(
        answers,
        vec![("m-a", "answer of m-a"), ("m-b", "answer of m-b")]
    );
    assert!(ledger.judge_items(None, 3).unwrap().is_empty());
}
