//! Prompt learning: signatures, the tolerant parser, Predict, the optimizer and joint runs.
//!
//! The optimizer tests need a model whose answers depend on the instruction in a scripted way,
//! which no real server can give: they run the scripted OpenAI-compatible server of
//! `fake_openai` (real HTTP, real client).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyperfunc::eval::{ExactMatch, ScoreResult};
use hyperfunc::llm::{LlmClient, LlmConfig};
use hyperfunc::prelude::*;
use hyperfunc::prompt::{
    parse_fields, FieldType, HasSignature, JointOptimizer, JointStop, JsonMode,
    NoOpPromptOptimizer, Predict, PromptLearningOptimizer, PromptOptimizer, PromptStop, Signature,
    Validation,
};
use serde_json::{json, Value as Json};

use crate::fake_openai;

const CAPITALS: [(&str, &str); 10] = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
];

fn capitals(range: std::ops::Range<usize>) -> Examples {
    let (x, y): (Vec<Json>, Vec<Json>) = CAPITALS[range]
        .iter()
        .map(|(c, a)| {
            (
                json!({ "question": format!("What is the capital of {c}?") }),
                json!(a),
            )
        })
        .unzip();
    Examples::json(x, y).unwrap()
}

fn qa_signature() -> Signature {
    Signature::new("Answer the question.")
        .input("question", "a question about geography")
        .output("answer", "the answer, one word")
}

fn system_text(req: &Json) -> String {
    req["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn user_text(req: &Json) -> String {
    req["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Whether the request is the prompt optimizer's meta-prompt.
fn is_meta(req: &Json) -> bool {
    user_text(req).contains("<current>")
}

/// The capital for a question, or "unknown".
fn capital_in(question: &str) -> &'static str {
    CAPITALS
        .iter()
        .find(|(c, _)| question.contains(c))
        .map_or("unknown", |(_, a)| a)
}

/// A scripted QA model: with `MAGIC` in the instruction it answers every question; with `WORSE`
/// it answers none; with `TRAINONLY` only the first six countries; otherwise only France. It
/// replies in JSON when asked for JSON and in `answer: …` lines otherwise. Meta-prompts get the
/// scripted proposals in order (the last one repeats); their texts are kept.
struct Script {
    proposals: Vec<&'static str>,
    metas: Mutex<Vec<String>>,
    meta_count: AtomicUsize,
}

impl Script {
    fn new(proposals: Vec<&'static str>) -> Arc<Self> {
        Arc::new(Self {
            proposals,
            metas: Mutex::new(Vec::new()),
            meta_count: AtomicUsize::new(0),
        })
    }

    fn answer(&self, req: &Json) -> String {
        if is_meta(req) {
            self.metas.lock().unwrap().push(user_text(req));
            let i = self.meta_count.fetch_add(1, Ordering::SeqCst);
            let p = self.proposals[i.min(self.proposals.len() - 1)];
            return format!("Here is a better one.\n<instruction>{p}</instruction>");
        }
        let (sys, user) = (system_text(req), user_text(req));
        let right = capital_in(&user);
        let train_six = CAPITALS[..6].iter().any(|(c, _)| user.contains(c));
        let answer = if sys.contains("MAGIC") {
            right
        } else if sys.contains("WORSE") {
            "I don't know"
        } else if sys.contains("TRAINONLY") {
            if train_six {
                right
            } else {
                "Atlantis"
            }
        } else if user.contains("France") {
            right
        } else {
            "Atlantis"
        };
        if req.get("response_format").is_some() {
            json!({ "answer": answer }).to_string()
        } else {
            format!("Sure!\nAnswer: {answer}")
        }
    }
}

async fn scripted(script: &Arc<Script>) -> (LlmClient, fake_openai::Fake) {
    let s = script.clone();
    let fake = fake_openai::serve(move |req| s.answer(req)).await;
    let client = LlmClient::new(LlmConfig::new(&fake.base_url).api_key("sk-fake")).unwrap();
    (client, fake)
}

fn qa_system(client: &LlmClient) -> Chain {
    Chain::new(vec![Predict::new(qa_signature(), "scripted")
        .learn_params(false)
        .build("qa", client)
        .unwrap()])
}

#[tokio::test]
async fn prompt_learning_lifts_the_metric_to_one_through_accepted_rewrites() {
    let script = Script::new(vec![
        "Answer in one word. WORSE",
        "Name the capital city asked about. MAGIC",
    ]);
    let (client, _fake) = scripted(&script).await;
    let sys = qa_system(&client);
    let data = capitals(0..10);
    let theta = Theta::init(&sys, 0, &candle_core::Device::Cpu).unwrap();
    let hub = Hub::new();
    let report = PromptLearningOptimizer::new(&client, "scripted")
        .max_iterations(5)
        .validation(Validation::Split(0.3))
        .seed(1)
        .hub(hub.clone())
        .optimize_prompts(&sys, &theta, &data, &ExactMatch::new())
        .await
        .unwrap();
    // The run and every meta-prompt call are recorded, the calls under the run.
    let records = hub.records();
    let run = records
        .iter()
        .find(|r| &*r.name == "prompt_learning")
        .expect("a prompt_learning record");
    assert_eq!(
        run.attribute("prompt_learning.final_score"),
        Some(&json!(1.0))
    );
    let proposes: Vec<_> = records
        .iter()
        .filter(|r| &*r.name == "prompt_learning.propose")
        .collect();
    assert_eq!(proposes.len(), 2);
    assert!(proposes.iter().all(|r| r.parent == Some(run.id)
        && r.attribute("gen_ai.request.model") == Some(&json!("scripted"))));
    assert!(report.initial_score < 0.5, "{}", report.to_markdown());
    assert_eq!(report.final_score, 1.0, "{}", report.to_markdown());
    assert_eq!(report.judged_on, "validation");
    assert_eq!(
        report.stop,
        PromptStop::NoFeedback,
        "{}",
        report.to_markdown()
    );
    // The worse rewrite was tried and rejected, then the right one accepted.
    let rejected: Vec<_> = report.rejected().collect();
    assert_eq!(rejected.len(), 1, "{}", report.to_markdown());
    assert!(rejected[0].prompt.contains("WORSE"));
    assert!(rejected[0].score <= rejected[0].baseline);
    let kept: Vec<_> = report
        .history
        .iter()
        .filter(|c| c.accepted && c.iteration > 0)
        .collect();
    assert_eq!(kept.len(), 1);
    assert!(kept[0].prompt.contains("MAGIC") && kept[0].score == 1.0);
    assert_eq!(report.meta_calls, 2);
    // The learned prompt is in θ, and evaluate uses it on every example.
    assert!(report.theta.prompt("qa").unwrap().contains("MAGIC"));
    let m = hyperfunc::eval::metric(ExactMatch::new());
    assert_eq!(evaluate(&sys, &report.theta, &data, &m).await.unwrap(), 1.0);
    assert!(evaluate(&sys, &theta, &data, &m).await.unwrap() < 0.5);
    // The meta-prompt showed the instruction, the fields, failures with feedback, and — the
    // second time — the rejected attempt.
    let metas = script.metas.lock().unwrap().clone();
    assert!(metas[0].contains("Answer the question."));
    assert!(metas[0].contains("`answer` (text)"));
    assert!(metas[0].contains("Expected: ") && metas[0].contains("Got: Atlantis"));
    assert!(!metas[0].contains("WORSE"));
    assert!(metas[1].contains("WORSE"), "{}", metas[1]);
}

#[tokio::test]
async fn a_rewrite_that_only_helps_the_training_examples_is_rejected() {
    let script = Script::new(vec!["Answer. TRAINONLY"]);
    let (client, _fake) = scripted(&script).await;
    let sys = qa_system(&client);
    let (train, val) = (capitals(0..6), capitals(6..10));
    let theta = Theta::init(&sys, 0, &candle_core::Device::Cpu).unwrap();
    let held_out = PromptLearningOptimizer::new(&client, "scripted")
        .max_iterations(2)
        .validation(Validation::Examples(val.clone()))
        .optimize_prompts(&sys, &theta, &train, &ExactMatch::new())
        .await
        .unwrap();
    assert_eq!(held_out.final_score, held_out.initial_score);
    assert_eq!(held_out.rejected().count(), 2, "{}", held_out.to_markdown());
    assert_eq!(held_out.theta.prompt("qa"), Some("Answer the question."));
    // Judged on the training examples instead, the same rewrite would have been kept.
    let train_only = PromptLearningOptimizer::new(&client, "scripted")
        .max_iterations(2)
        .validation(Validation::TrainOnly)
        .optimize_prompts(&sys, &theta, &train, &ExactMatch::new())
        .await
        .unwrap();
    assert_eq!(train_only.judged_on, "train");
    assert_eq!(train_only.final_score, 1.0);
    assert!(train_only.theta.prompt("qa").unwrap().contains("TRAINONLY"));
}

#[tokio::test]
async fn custom_feedback_reaches_the_meta_prompt_and_noop_changes_nothing() {
    let script = Script::new(vec!["still wrong"]);
    let (client, _fake) = scripted(&script).await;
    let sys = qa_system(&client);
    let data = capitals(0..6);
    let theta = Theta::init(&sys, 0, &candle_core::Device::Cpu).unwrap();
    let report = PromptLearningOptimizer::new(&client, "scripted")
        .max_iterations(1)
        .validation(Validation::TrainOnly)
        .feedback_fn(|_, pred, expected, r: &ScoreResult| {
            format!("CUSTOM: wanted {expected}, said {pred}, scored {}", r.score)
        })
        .optimize_prompts(&sys, &theta, &data, &ExactMatch::new())
        .await
        .unwrap();
    assert_eq!(report.iterations, 1);
    assert!(script.metas.lock().unwrap()[0].contains("CUSTOM: wanted"));
    let noop = NoOpPromptOptimizer
        .optimize_prompts(&sys, &theta, &data, &ExactMatch::new())
        .await
        .unwrap();
    assert_eq!(noop.stop, PromptStop::Nothing);
    assert!(noop.history.is_empty());
    assert!(noop.theta.bit_eq(&theta).unwrap());
    assert_eq!(noop.final_score, 1.0 / 6.0);
}

#[tokio::test]
async fn a_frozen_prompt_is_left_alone() {
    let script = Script::new(vec!["MAGIC"]);
    let (client, _fake) = scripted(&script).await;
    let f = Predict::new(qa_signature(), "scripted")
        .learn_prompt(false)
        .learn_params(false)
        .build("qa", &client)
        .unwrap();
    assert!(!f.prompt_learnable());
    assert!(f.params().is_empty());
    let sys = Chain::new(vec![f]);
    let theta = Theta::init(&sys, 0, &candle_core::Device::Cpu).unwrap();
    let report = PromptLearningOptimizer::new(&client, "scripted")
        .validation(Validation::TrainOnly)
        .optimize_prompts(&sys, &theta, &capitals(0..4), &ExactMatch::new())
        .await
        .unwrap();
    assert_eq!(report.stop, PromptStop::Nothing);
    assert_eq!(report.meta_calls, 0);
}

#[tokio::test]
async fn joint_optimisation_alternates_prompt_rounds_with_es_under_one_budget() {
    let script = Script::new(vec!["Name the capital. MAGIC"]);
    let (client, fake) = scripted(&script).await;
    let sys = Chain::new(vec![HyperFn::predict(
        "qa",
        &client,
        "scripted",
        qa_signature(),
    )
    .unwrap()]);
    assert_eq!(sys.hyperfunctions()[0].param_names(), vec!["qa"]);
    let data = capitals(0..6);
    let joint = |client: &LlmClient, calls: u64| {
        JointOptimizer::new(
            Es::default().pop_size(4).seed(2).progress(false),
            PromptLearningOptimizer::new(client, "scripted").validation(Validation::TrainOnly),
        )
        .rounds(2)
        .generations_per_round(2)
        .max_llm_calls(calls)
        .track(client)
    };
    let report = joint(&client, 10_000)
        .optimize(&sys, &data, &ExactMatch::new())
        .await
        .unwrap();
    assert_eq!(report.stop, JointStop::Rounds, "{}", report.to_markdown());
    assert_eq!(report.rounds.len(), 2);
    assert_eq!(report.generations, 4);
    assert!(report.initial_score < 0.5);
    assert_eq!(report.final_score, 1.0, "{}", report.to_markdown());
    assert_eq!(report.accepted_prompts(), 1);
    assert!(report.rounds[0].prompts.is_some() && report.rounds[0].generations.len() == 2);
    assert!(report.theta.prompt("qa").unwrap().contains("MAGIC"));
    assert!(report.llm_calls > 0);
    // Every candidate of a generation after the accepted rewrite scores 1.
    assert_eq!(report.rounds[1].generations[0].best, 1.0);
    // A small request budget ends the run early, between phases (a fresh client: the first
    // one's cache would answer everything without a request).
    let before = fake.requests.load(Ordering::SeqCst);
    let fresh = LlmClient::new(LlmConfig::new(&fake.base_url).api_key("sk-fake")).unwrap();
    let sys = Chain::new(vec![HyperFn::predict(
        "qa",
        &fresh,
        "scripted",
        qa_signature(),
    )
    .unwrap()]);
    let short = joint(&fresh, 3)
        .optimize(&sys, &data, &ExactMatch::new())
        .await
        .unwrap();
    assert_eq!(short.stop, JointStop::LlmCalls, "{}", short.to_markdown());
    assert!(short.generations < 4);
    assert!(fake.requests.load(Ordering::SeqCst) > before);
}

#[tokio::test]
async fn predict_falls_back_to_plain_text_when_json_mode_is_refused() {
    let refused = Arc::new(AtomicUsize::new(0));
    let r = refused.clone();
    let fake = fake_openai::serve_status(move |req| {
        if req.get("response_format").is_some() {
            r.fetch_add(1, Ordering::SeqCst);
            return Err((400, "response_format is not supported by this model".into()));
        }
        Ok("Here you go:\n**Answer**: Paris\nConfidence: 0.9".into())
    })
    .await;
    let client = LlmClient::new(LlmConfig::new(&fake.base_url).api_key("sk-fake")).unwrap();
    let sig = qa_signature().output_typed("confidence", "0 to 1", FieldType::Number);
    let f = Predict::new(sig, "scripted")
        .learn_params(false)
        .cache(false)
        .build("qa", &client)
        .unwrap();
    let sys = Chain::new(vec![f]);
    let theta = Theta::init(&sys, 0, &candle_core::Device::Cpu).unwrap();
    let data = capitals(0..3);
    let out = std::sync::Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    let m = metric::per_example(move |p, _| {
        o.lock().unwrap().push(p.clone());
        1.0
    });
    evaluate(&sys, &theta, &data, &m).await.unwrap();
    let outs = out.lock().unwrap().clone();
    assert_eq!(outs.len(), 3);
    assert!(outs
        .iter()
        .all(|p| *p == json!({"answer": "Paris", "confidence": 0.9})));
    assert_eq!(
        refused.load(Ordering::SeqCst),
        1,
        "asked for JSON once, then stopped asking"
    );
}

#[tokio::test]
async fn an_unreadable_reply_is_a_typed_parse_error_that_fails_the_candidate() {
    let fake = fake_openai::serve(|_| "I would rather not say.".to_string()).await;
    let client = LlmClient::new(LlmConfig::new(&fake.base_url).api_key("sk-fake")).unwrap();
    let sig = qa_signature().output_typed("confidence", "0 to 1", FieldType::Number);
    let sys = Chain::new(vec![Predict::new(sig, "scripted")
        .json(JsonMode::Never)
        .build("qa", &client)
        .unwrap()]);
    let theta = Theta::init(&sys, 0, &candle_core::Device::Cpu).unwrap();
    let m = hyperfunc::eval::metric(ExactMatch::new());
    let err = evaluate(&sys, &theta, &capitals(0..2), &m)
        .await
        .unwrap_err();
    match &err {
        Error::Parse {
            function,
            message,
            output,
        } => {
            assert_eq!(function, "qa");
            assert!(message.contains("`answer`") && message.contains("`confidence`"));
            assert_eq!(output, "I would rather not say.");
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
    // In a population, the failure counts against the candidate (NaN fitness, counted failed).
    let pop = Population::center(theta);
    let ev = evaluate_population(&sys, &pop, &capitals(0..2), &m, usize::MAX)
        .await
        .unwrap();
    assert!(ev.fitness[0].is_nan());
    assert_eq!(ev.failed, 1);
}

#[tokio::test]
async fn predict_sends_the_instruction_from_theta_and_the_inputs_in_order() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let fake = fake_openai::serve(move |req| {
        s.lock().unwrap().push(req.clone());
        json!({"answer": "x"}).to_string()
    })
    .await;
    let client = LlmClient::new(LlmConfig::new(&fake.base_url).api_key("sk-fake")).unwrap();
    let sig = Signature::new("Use the context.")
        .input("question", "")
        .input("context", "")
        .output("answer", "");
    let sys = Chain::new(vec![HyperFn::predict("qa", &client, "m", sig).unwrap()]);
    let theta = Theta::init(&sys, 0, &candle_core::Device::Cpu)
        .unwrap()
        .with_prompt("qa", "A learned instruction.");
    let data = Examples::json(
        vec![json!({"context": "C", "question": "Q"})],
        vec![json!("x")],
    )
    .unwrap();
    let m = hyperfunc::eval::metric(ExactMatch::new());
    assert_eq!(evaluate(&sys, &theta, &data, &m).await.unwrap(), 1.0);
    let req = seen.lock().unwrap()[0].clone();
    assert!(system_text(&req).starts_with("A learned instruction.\n"));
    assert_eq!(user_text(&req), "question: Q\ncontext: C");
    assert_eq!(req["response_format"]["type"], "json_object");
    // θ's learned temperature is sent (the LmParams default 0.7).
    assert!((req["temperature"].as_f64().unwrap() - 0.7).abs() < 1e-3);
    // A prompt for a function the system does not have is refused, naming it.
    let bad = Theta::init(&sys, 0, &candle_core::Device::Cpu)
        .unwrap()
        .with_prompt("qq", "x");
    let e = evaluate(&sys, &bad, &data, &m).await.unwrap_err();
    assert!(
        e.to_string().contains("`qq`") && e.to_string().contains("qa"),
        "{e}"
    );
}

/// Decide whether a customer message is a complaint.
#[derive(hyperfunc::Signature)]
#[allow(dead_code)]
struct Triage {
    #[input(desc = "the customer's message")]
    message: String,
    #[input(desc = "earlier messages", name = "history")]
    past: Vec<String>,
    #[output(desc = "true for a complaint")]
    complaint: bool,
    #[output(desc = "how sure, 0 to 1")]
    confidence: f64,
    #[output]
    tags: Vec<String>,
}

#[test]
fn derived_signatures_keep_declaration_order_and_types() {
    let sig = Triage::signature();
    assert_eq!(
        sig.instruction(),
        "Decide whether a customer message is a complaint."
    );
    let names = |f: &[hyperfunc::prompt::Field]| -> Vec<String> {
        f.iter().map(|f| f.name.clone()).collect()
    };
    assert_eq!(names(sig.inputs()), ["message", "history"]);
    assert_eq!(names(sig.outputs()), ["complaint", "confidence", "tags"]);
    let types: Vec<_> = sig.outputs().iter().map(|f| f.ty).collect();
    assert_eq!(types, [FieldType::Bool, FieldType::Number, FieldType::List]);
    assert_eq!(sig.inputs()[1].ty, FieldType::List);
    assert_eq!(sig.outputs()[0].desc, "true for a complaint");
    // The builder gives the same signature.
    let built = Signature::new("Decide whether a customer message is a complaint.")
        .input("message", "the customer's message")
        .input_typed("history", "earlier messages", FieldType::List)
        .output_typed("complaint", "true for a complaint", FieldType::Bool)
        .output_typed("confidence", "how sure, 0 to 1", FieldType::Number)
        .output_typed("tags", "", FieldType::List);
    assert_eq!(built, sig);
}

#[test]
fn rendering_is_byte_identical_across_runs_and_follows_declaration_order() {
    // Fields named so that any sorted or hashed order would differ from declaration order.
    let make = || {
        Signature::new("Do it.")
            .input("zeta", "last letter")
            .input("alpha", "first letter")
            .input("mu", "middle")
            .output("yes", "")
            .output("b", "")
    };
    let input = json!({"mu": 2, "alpha": "a", "zeta": [1, 2]});
    let first = (
        make().render_system("Do it."),
        make().render_user(&input).unwrap(),
    );
    for _ in 0..50 {
        assert_eq!(
            first,
            (
                make().render_system("Do it."),
                make().render_user(&input).unwrap()
            )
        );
    }
    assert_eq!(first.1, "zeta: [1,2]\nalpha: a\nmu: 2");
    let (z, a, m) = (
        first.0.find("`zeta`").unwrap(),
        first.0.find("`alpha`").unwrap(),
        first.0.find("`mu`").unwrap(),
    );
    assert!(z < a && a < m);
    assert!(first
        .0
        .contains("exactly these keys, in this order: \"yes\", \"b\""));
    // A missing input field is an error naming it; a bare value fits a one-input signature.
    let e = make().render_user(&json!({"zeta": 1})).unwrap_err();
    assert!(
        e.to_string().contains("alpha") && e.to_string().contains("mu"),
        "{e}"
    );
    assert_eq!(
        qa_signature().render_user(&json!("Why?")).unwrap(),
        "question: Why?"
    );
    assert!(Signature::new("no outputs")
        .input("a", "")
        .validate()
        .is_err());
    assert!(Signature::new("twice")
        .input("a", "")
        .output("a", "")
        .validate()
        .is_err());
}

#[test]
fn the_parser_reads_fences_prose_and_labelled_lines_and_names_what_is_missing() {
    let sig = Signature::new("t")
        .output("answer", "")
        .output_typed("confidence", "", FieldType::Number)
        .output_typed("sure", "", FieldType::Bool)
        .output_typed("items", "", FieldType::List);
    let o = sig.outputs();
    let want = json!({"answer": "Paris", "confidence": 0.5, "sure": true, "items": ["a", "b"]});
    // Whole JSON, fenced JSON, JSON inside prose (with a brace in a string).
    let cases = [
        r#"{"answer": "Paris", "confidence": 0.5, "sure": true, "items": ["a", "b"]}"#.to_string(),
        "Result:\n```json\n{\"answer\": \"Paris\", \"confidence\": \"0.5\", \"sure\": \"yes\", \"items\": \"a, b\"}\n```\nDone.".to_string(),
        r#"I think {"note": "}"} then {"Answer": "Paris", "confidence": 0.5, "sure": true, "items": ["a","b"]} ok"#.to_string(),
        "- **Answer:** Paris\n- Confidence: about 0.5\n- sure = true\n- items:\n  - a\n  - b".to_string(),
    ];
    for c in &cases {
        assert_eq!(parse_fields(c, o).unwrap(), want, "{c}");
    }
    // A multi-line value runs to the next label.
    let two = Signature::new("t")
        .output("reasoning", "")
        .output("answer", "");
    let p = parse_fields("Reasoning: first\nsecond line\nAnswer: 42", two.outputs()).unwrap();
    assert_eq!(
        p,
        json!({"reasoning": "first\nsecond line", "answer": "42"})
    );
    // Missing fields are named; a wrong type is named.
    let e = parse_fields("Answer: Paris", o).unwrap_err();
    assert!(e.message.contains("`confidence`") && e.message.contains("`items`"));
    assert!(!e.message.contains("`answer`"));
    let e = parse_fields(
        r#"{"answer": "x", "confidence": "high", "sure": true, "items": []}"#,
        o,
    )
    .unwrap_err();
    assert!(
        e.message.contains("`confidence` should be number"),
        "{}",
        e.message
    );
    // One text output takes a bare reply, fences stripped.
    let one = qa_signature();
    assert_eq!(
        parse_fields("```\nParis\n```", one.outputs()).unwrap(),
        json!({"answer": "Paris"})
    );
    assert!(parse_fields("   ", one.outputs()).is_err());
}

#[test]
fn theta_prompts_survive_save_and_load() {
    let client = LlmClient::new(LlmConfig::new("http://127.0.0.1:9/v1")).unwrap();
    let sys = Chain::new(vec![
        HyperFn::predict("qa", &client, "m", qa_signature()).unwrap()
    ]);
    let theta = Theta::init(&sys, 0, &candle_core::Device::Cpu).unwrap();
    assert_eq!(theta.prompt("qa"), Some("Answer the question."));
    let learned = theta.clone().with_prompt("qa", "Be brief.\nÜnïcode ok.");
    let path = std::env::temp_dir().join(format!("hf-prompt-{}.safetensors", std::process::id()));
    learned.save(&path).unwrap();
    let back = Theta::load(&path, &candle_core::Device::Cpu).unwrap();
    std::fs::remove_file(&path).ok();
    assert!(back.bit_eq(&learned).unwrap());
    assert!(!back.bit_eq(&theta).unwrap());
    assert_eq!(back.prompt("qa"), Some("Be brief.\nÜnïcode ok."));
}
