//! Scorers, the scorer metric through the engine, judgement parsing, and LLM judges against the
//! real LiteLLM proxy (`ci/peers.sh start`; mock models `mock-judge*` in ci/litellm/config.yaml).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use hyperfunc::eval::{
    async_scorer_fn, metric as scorer_metric, parse_judgement, score_all, scorer_fn, text_of, Case,
    ClassificationAccuracy, CompositeScorer, ContainsMatch, ExactMatch, NumericDistance, OwnedCase,
    RegexMatch, ScoreResult, Scorer, SyncScorer, NO_OUTPUT_FEEDBACK,
};
use hyperfunc::prelude::*;
use serde_json::{json, Value as J};

/// Grades one prediction against one expected answer (input `null`).
fn grade(s: &dyn SyncScorer, pred: J, expected: J) -> ScoreResult {
    s.score_sync(Case {
        input: &J::Null,
        pred: &pred,
        expected: &expected,
    })
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() < 1e-5
}

#[test]
fn score_result_clamps_and_maps_nan_to_zero() {
    assert_eq!(ScoreResult::new(-0.5, "x").score, 0.0);
    assert_eq!(ScoreResult::new(2.0, "x").score, 1.0);
    assert_eq!(ScoreResult::new(f32::NAN, "x").score, 0.0);
    let r = ScoreResult::fail("nope").with_details(json!({"k": 1}));
    assert_eq!((r.score, r.feedback.as_str()), (0.0, "nope"));
    assert_eq!(r.details, json!({"k": 1}));
    assert_eq!(ScoreResult::pass(), ScoreResult::new(1.0, ""));
}

#[test]
fn text_of_reads_strings_single_key_objects_and_other_json() {
    assert_eq!(text_of(&json!("  Paris ")), "  Paris ");
    assert_eq!(text_of(&json!({"answer": "Paris"})), "Paris");
    assert_eq!(text_of(&json!({"outer": {"inner": 3}})), "3");
    assert_eq!(text_of(&json!(4.5)), "4.5");
    assert_eq!(text_of(&json!(false)), "false");
    assert_eq!(text_of(&json!([1, "a"])), r#"[1,"a"]"#);
    assert_eq!(text_of(&json!({"a": 1, "b": 2})), r#"{"a":1,"b":2}"#);
    assert_eq!(text_of(&J::Null), "");
}

#[test]
fn exact_match_ignores_case_and_strips_by_default() {
    let m = ExactMatch::new();
    assert_eq!(grade(&m, json!("  PARIS!  "), json!("paris")).score, 1.0);
    assert_eq!(
        grade(&m, json!("New   York."), json!("new york")).score,
        1.0
    );
    assert_eq!(grade(&m, json!({"answer": 42}), json!(42)).score, 1.0);
    assert_eq!(grade(&m, json!(true), json!("True")).score, 1.0);
    let miss = grade(&m, json!("Lyon"), json!("Paris"));
    assert_eq!(miss.score, 0.0);
    assert_eq!(miss.feedback, r#"expected "Paris", got "Lyon""#);
}

#[test]
fn exact_match_case_and_strip_can_be_turned_off() {
    let cs = ExactMatch::new().case_sensitive(true);
    assert_eq!(grade(&cs, json!("paris."), json!("Paris")).score, 0.0);
    assert_eq!(grade(&cs, json!("Paris."), json!("Paris")).score, 1.0);
    let raw = ExactMatch::new().strip(false);
    assert_eq!(grade(&raw, json!("paris "), json!("Paris")).score, 0.0);
    assert_eq!(grade(&raw, json!("paris"), json!("Paris")).score, 1.0);
    let both = ExactMatch::new().case_sensitive(true).strip(false);
    assert_eq!(
        grade(&both, json!("a  b"), json!("a b")).feedback,
        r#"expected "a b", got "a  b""#
    );
}

#[test]
fn numeric_distance_tolerance_linear_falloff_and_unparsable() {
    let m = NumericDistance::new();
    assert_eq!(grade(&m, json!(3), json!(3.0)).score, 1.0);
    assert_eq!(grade(&m, json!("about 42.5 km"), json!(42.5)).score, 1.0);
    assert!(close(grade(&m, json!(3.25), json!(3)).score, 0.75));
    assert_eq!(
        grade(&m, json!(4.5), json!(3)).score,
        0.0,
        "past max_distance"
    );
    assert_eq!(
        grade(&m, json!("-2 degrees"), json!("it was -2")).score,
        1.0
    );

    let m = NumericDistance::new().tolerance(1.0).max_distance(3.0);
    assert_eq!(
        grade(&m, json!(11), json!(10)).score,
        1.0,
        "within tolerance"
    );
    assert!(close(grade(&m, json!(12), json!(10)).score, 0.5));
    assert!(close(grade(&m, json!(7.5), json!(10)).score, 0.25));
    let r = grade(&m, json!(14), json!(10));
    assert_eq!(r.score, 0.0);
    assert!(r.feedback.contains("off by 4"), "{}", r.feedback);
    assert_eq!(r.details["distance"], json!(4.0));

    let r = grade(&m, json!("no idea"), json!(10));
    assert_eq!(r.score, 0.0);
    assert!(
        r.feedback.contains("no number found in the output"),
        "{}",
        r.feedback
    );
    let r = grade(&m, json!(10), json!("unknown"));
    assert_eq!(r.score, 0.0);
    assert!(
        r.feedback
            .contains("no number found in the expected answer"),
        "{}",
        r.feedback
    );
}

#[test]
fn classification_accuracy_normalises_and_rejects_unknown_labels() {
    let m = ClassificationAccuracy::new(&["Positive", "Negative", "Neutral"]);
    assert_eq!(
        grade(&m, json!(" positive. "), json!("Positive")).score,
        1.0
    );
    let wrong = grade(&m, json!("negative"), json!("positive"));
    assert_eq!(wrong.score, 0.0);
    assert_eq!(wrong.feedback, r#"expected "positive", got "negative""#);
    let unknown = grade(&m, json!("happy"), json!("positive"));
    assert_eq!(unknown.score, 0.0);
    assert!(
        unknown.feedback.contains("Positive, Negative, Neutral"),
        "{}",
        unknown.feedback
    );
    // No labels: anything goes, only equality counts.
    let any = ClassificationAccuracy::new(&[]);
    assert_eq!(grade(&any, json!("Happy"), json!("happy")).score, 1.0);
    assert_eq!(grade(&any, json!("sad"), json!("happy")).score, 0.0);
}

#[test]
fn contains_match_single_text_and_arrays() {
    let m = ContainsMatch::new();
    let pred = json!("The capital of  France is PARIS.");
    assert_eq!(grade(&m, pred.clone(), json!("paris")).score, 1.0);
    assert_eq!(grade(&m, pred.clone(), json!("of France")).score, 1.0);
    let r = grade(&m, pred.clone(), json!("Berlin"));
    assert_eq!(r.score, 0.0);
    assert_eq!(r.feedback, r#"missing: "Berlin""#);
    let r = grade(
        &m,
        pred.clone(),
        json!(["capital", "Seine", "paris", "Louvre"]),
    );
    assert!(close(r.score, 0.5));
    assert_eq!(r.feedback, r#"missing: "Seine", "Louvre""#);
    assert_eq!(grade(&m, pred.clone(), json!([])).score, 1.0);
    let cs = ContainsMatch::new().case_sensitive(true);
    assert_eq!(grade(&cs, pred, json!("paris")).score, 0.0);
}

#[test]
fn regex_match_anywhere_full_and_invalid_pattern() {
    let m = RegexMatch::new(r"\d{3}-\d{4}");
    assert_eq!(grade(&m, json!("call 555-1234 now"), J::Null).score, 1.0);
    let r = grade(&m, json!("no phone"), J::Null);
    assert_eq!(r.score, 0.0);
    assert!(r.feedback.contains("does not match"), "{}", r.feedback);
    let full = RegexMatch::new(r"\d{3}-\d{4}|yes").full_match(true);
    assert_eq!(grade(&full, json!("555-1234"), J::Null).score, 1.0);
    assert_eq!(grade(&full, json!("yes"), J::Null).score, 1.0);
    assert_eq!(grade(&full, json!("call 555-1234"), J::Null).score, 0.0);
    assert_eq!(grade(&full, json!("yes!"), J::Null).score, 0.0);

    let bad = RegexMatch::new("(unclosed[");
    for pred in [json!("(unclosed["), json!("anything")] {
        let r = grade(&bad, pred, J::Null);
        assert_eq!(r.score, 0.0);
        assert!(
            r.feedback.starts_with("invalid regex /(unclosed[/"),
            "{}",
            r.feedback
        );
        assert!(r.feedback.contains("unclosed"), "{}", r.feedback);
    }
    // Turning on full matching keeps reporting the user's own compile error.
    let r = grade(&RegexMatch::new("a)").full_match(true), json!("a"), J::Null);
    assert_eq!(r.score, 0.0);
    assert!(r.feedback.contains("invalid regex /a)/"), "{}", r.feedback);
}

async fn score1(s: &dyn Scorer, pred: J, expected: J) -> ScoreResult {
    s.score(Case {
        input: &J::Null,
        pred: &pred,
        expected: &expected,
    })
    .await
    .expect("the scorer does not fail")
}

#[tokio::test]
async fn composite_is_a_normalised_weighted_mean_with_joined_feedback() {
    let c = CompositeScorer::new()
        .add(ExactMatch::new(), 2.0)
        .add(ContainsMatch::new(), 1.0)
        .add(RegexMatch::new("^[A-Z]"), 1.0);
    assert_eq!(Scorer::name(&c), "composite");
    let r = score1(&c, json!("paris, France"), json!("Paris")).await;
    // exact 0 × 0.5 + contains 1 × 0.25 + regex 0 × 0.25
    assert!(close(r.score, 0.25), "{}", r.score);
    assert_eq!(
        r.feedback,
        r#"exact_match: expected "Paris", got "paris, France"; regex_match: output "paris, France" does not match /^[A-Z]/"#
    );
    assert_eq!(
        r.details,
        json!({"components": [
            {"name": "exact_match", "score": 0.0, "weight": 2.0},
            {"name": "contains", "score": 1.0, "weight": 1.0},
            {"name": "regex_match", "score": 0.0, "weight": 1.0},
        ]})
    );
    let all = score1(&c, json!("Paris"), json!("paris")).await;
    assert_eq!((all.score, all.feedback.as_str()), (1.0, ""));
}

#[tokio::test]
async fn composite_with_invalid_weights_scores_zero_and_says_why() {
    let cases = [
        CompositeScorer::new(),
        CompositeScorer::new().add(ExactMatch::new(), 0.0),
        CompositeScorer::new()
            .add(ExactMatch::new(), 2.0)
            .add(ContainsMatch::new(), -1.0),
        CompositeScorer::new().add(ExactMatch::new(), f32::NAN),
        CompositeScorer::new().add(ExactMatch::new(), f32::INFINITY),
    ];
    for c in &cases {
        let r = score1(c, json!("same"), json!("same")).await;
        assert_eq!(r.score, 0.0);
        assert!(r.feedback.starts_with("invalid weights"), "{}", r.feedback);
    }
}

#[tokio::test]
async fn composite_awaits_async_children_and_passes_their_errors_on() {
    let slow_pass = async_scorer_fn("slow", |_c: OwnedCase| async {
        tokio::task::yield_now().await;
        Ok(ScoreResult::new(0.5, "half"))
    });
    let c = CompositeScorer::new()
        .add(slow_pass, 1.0)
        .add(ExactMatch::new(), 1.0);
    let r = score1(&c, json!("a"), json!("a")).await;
    assert!(close(r.score, 0.75));
    assert_eq!(r.feedback, "slow: half");

    let broken = async_scorer_fn("broken", |_c: OwnedCase| async {
        Err(hyperfunc::Error::Io {
            function: "broken".into(),
            message: "down".into(),
            retryable: true,
        })
    });
    let c = CompositeScorer::new().add(broken, 1.0);
    let e = c
        .score(Case {
            input: &J::Null,
            pred: &json!("x"),
            expected: &json!("x"),
        })
        .await
        .unwrap_err();
    assert!(e.is_retryable() && e.to_string().contains("down"), "{e}");
}

#[tokio::test]
async fn score_all_keeps_order_scores_failed_calls_zero_and_checks_lengths() {
    let asked = Arc::new(AtomicUsize::new(0));
    let a = asked.clone();
    let counting = scorer_fn("counting", move |c: Case| {
        a.fetch_add(1, Ordering::SeqCst);
        ScoreResult::new(if c.pred == c.expected { 1.0 } else { 0.0 }, "")
    });
    let inputs = vec![json!(0), json!(1), json!(2), json!(3)];
    let preds = vec![json!("a"), J::Null, json!("x"), json!("d")];
    let expected = vec![json!("a"), json!("b"), json!("c"), json!("d")];
    let out = score_all(&counting, &inputs, &preds, &expected)
        .await
        .unwrap();
    let scores: Vec<f32> = out.iter().map(|r| r.score).collect();
    assert_eq!(scores, vec![1.0, 0.0, 0.0, 1.0]);
    assert_eq!(out[1].feedback, NO_OUTPUT_FEEDBACK);
    assert_eq!(out[1].feedback, "no output (the call failed)");
    assert_eq!(
        asked.load(Ordering::SeqCst),
        3,
        "a failed call is not scored"
    );

    let e = score_all(&counting, &inputs, &preds[..3], &expected)
        .await
        .unwrap_err();
    assert!(
        matches!(e, hyperfunc::Error::ShapeMismatch { ref what, .. } if what == "predictions"),
        "{e}"
    );
    let e = score_all(&counting, &inputs[..1], &preds, &expected)
        .await
        .unwrap_err();
    assert!(matches!(e, hyperfunc::Error::ShapeMismatch { .. }), "{e}");
}

#[tokio::test]
async fn score_all_runs_async_scores_concurrently() {
    // Each case waits until every case has started: only concurrent scoring finishes.
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let rendezvous = async_scorer_fn("rendezvous", move |_c: OwnedCase| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            for _ in 0..1000 {
                if s.load(Ordering::SeqCst) == 5 {
                    return Ok(ScoreResult::pass());
                }
                tokio::task::yield_now().await;
            }
            Ok(ScoreResult::fail("ran alone"))
        }
    });
    let v: Vec<J> = (0..5).map(|i| json!(i)).collect();
    let out = score_all(&rendezvous, &v, &v, &v).await.unwrap();
    assert!(out.iter().all(|r| r.score == 1.0), "{out:?}");
}

/// A system of one parameterless async function that always answers `answer`.
fn fixed(answer: J) -> Chain {
    Chain::new(vec![HyperFn::io("answer", None, move |_x, _p| {
        let a = answer.clone();
        async move { Ok(a) }
    })])
}

fn qa() -> Examples {
    Examples::json(
        vec![json!("capital of France?"), json!("capital of Italy?")],
        vec![json!("Paris"), json!("Rome")],
    )
    .unwrap()
}

#[tokio::test]
async fn scorer_metric_through_evaluate_averages_over_examples() {
    let sys = fixed(json!({"answer": "paris."}));
    let theta = Theta::init(&sys, 0, &Device::Cpu).unwrap();
    let v = evaluate(&sys, &theta, &qa(), &scorer_metric(ExactMatch::new()))
        .await
        .unwrap();
    assert_eq!(v, 0.5);
    let v = evaluate(
        &sys,
        &theta,
        &qa(),
        &scorer_metric(ContainsMatch::new().case_sensitive(true)),
    )
    .await
    .unwrap();
    assert_eq!(v, 0.0);
    // The scorer sees the examples' inputs.
    let saw_inputs = scorer_fn("inputs", |c: Case| {
        ScoreResult::new(if c.input.is_string() { 1.0 } else { 0.0 }, "")
    });
    let v = evaluate(&sys, &theta, &qa(), &scorer_metric(saw_inputs))
        .await
        .unwrap();
    assert_eq!(v, 1.0);
}

/// An async exact-match scorer that yields to the runtime several times before answering.
fn yielding_exact() -> impl Scorer {
    async_scorer_fn("yielding_exact", |c: OwnedCase| async move {
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
        Ok(ExactMatch::new().score_sync(c.as_case()))
    })
}

#[tokio::test(flavor = "current_thread")]
async fn truly_async_scorer_is_awaited_by_the_engine_without_trapping_the_event_loop() {
    // One runtime thread: a metric that blocked on its scorer would never finish here.
    let sys = fixed(json!("Rome"));
    let theta = Theta::init(&sys, 0, &Device::Cpu).unwrap();
    let m = scorer_metric(yielding_exact());
    let v = evaluate(&sys, &theta, &qa(), &m).await.unwrap();
    assert_eq!(v, 0.5);

    // The synchronous path cannot await: it says so with a typed error instead of blocking or
    // returning 0.
    let preds = Value::json(vec![json!("Paris"), json!("Rome")]);
    let e = m.score(&preds, qa().targets(), 2).unwrap_err();
    match &e {
        hyperfunc::Error::InvalidConfig { field, reason } => {
            assert_eq!(field, "metric");
            assert!(reason.contains("yielding_exact"), "{reason}");
            assert!(reason.contains("score_async"), "{reason}");
        }
        other => panic!("expected InvalidConfig, got {other}"),
    }
    // A sync scorer works through the synchronous path too.
    let ok = scorer_metric(ExactMatch::new())
        .score(&preds, qa().targets(), 2)
        .unwrap();
    assert_eq!(ok, vec![1.0, 1.0]);
}

#[test]
fn sync_metric_path_outside_any_runtime_reports_async_scorer() {
    let m = scorer_metric(yielding_exact());
    let preds = Value::json(vec![json!("Paris"), J::Null]);
    assert!(matches!(
        m.score(&preds, qa().targets(), 1),
        Err(hyperfunc::Error::InvalidConfig { .. })
    ));
    // Null predictions (failed calls) score 0 without asking the scorer.
    let v = scorer_metric(ExactMatch::new())
        .score(&preds, qa().targets(), 1)
        .unwrap();
    assert_eq!(v, vec![0.5]);
}

/// A system whose one knob is the answer: each candidate answers its own number.
fn knob() -> Chain {
    Chain::new(vec![HyperFn::io(
        "knob",
        Some(ParamSpec::scalar().zeros()),
        |_x, p: IoParams| async move { Ok(json!(p.values()[0])) },
    )])
}

fn population(sys: &Chain, values: &[f32]) -> Population {
    let base = Theta::init(sys, 0, &Device::Cpu).unwrap();
    let name = base.names().next().unwrap().to_string();
    let shape = base.get(&name).unwrap().shape().clone();
    let thetas: Vec<Theta> = values
        .iter()
        .map(|&v| {
            let mut t = base.clone();
            t.insert(
                name.clone(),
                Tensor::full(v, shape.clone(), &Device::Cpu).unwrap(),
            );
            t
        })
        .collect();
    Population::from_thetas(&thetas).unwrap()
}

#[tokio::test]
async fn scorer_metric_scores_each_candidate_and_a_scorer_error_is_nan() {
    let sys = knob();
    let data = Examples::json(vec![json!(0), json!(1), json!(2)], vec![json!(0); 3]).unwrap();
    let pop = population(&sys, &[0.0, 0.5, 2.0]);
    let m = scorer_metric(NumericDistance::new());
    let out = evaluate_population(&sys, &pop, &data, &m, 1 << 16)
        .await
        .unwrap();
    assert_eq!(out.fitness.len(), 3);
    assert_eq!(out.fitness[0], 1.0);
    assert!(close(out.fitness[1], 0.5), "{:?}", out.fitness);
    assert_eq!(out.fitness[2], 0.0);

    // A scorer that fails on large answers: only that candidate becomes NaN.
    let picky = async_scorer_fn("picky", |c: OwnedCase| async move {
        tokio::task::yield_now().await;
        match c.pred.as_f64() {
            Some(x) if x > 1.0 => Err(hyperfunc::Error::Io {
                function: "picky".into(),
                message: "too large to grade".into(),
                retryable: false,
            }),
            _ => Ok(ScoreResult::pass()),
        }
    });
    let out = evaluate_population(&sys, &pop, &data, &scorer_metric(picky), 1 << 16)
        .await
        .unwrap();
    assert_eq!(out.fitness[..2], [1.0, 1.0]);
    assert!(out.fitness[2].is_nan(), "{:?}", out.fitness);
}

#[tokio::test]
async fn es_optimizes_through_an_async_scorer_metric() {
    // The knob should move towards 1.0: NumericDistance wrapped in an async scorer.
    let target = Examples::json(vec![json!(0); 4], vec![json!(1.0); 4]).unwrap();
    let near_one = async_scorer_fn("near_one", |c: OwnedCase| async move {
        tokio::task::yield_now().await;
        Ok(NumericDistance::new()
            .max_distance(2.0)
            .score_sync(c.as_case()))
    });
    let sys = knob();
    let m = scorer_metric(near_one);
    let start = evaluate(
        &sys,
        &Theta::init(&sys, 0, &Device::Cpu).unwrap(),
        &target,
        &m,
    )
    .await
    .unwrap();
    let report = Es::default()
        .pop_size(16)
        .sigma(0.2)
        .lr(0.1)
        .generations(40)
        .seed(3)
        .maximize()
        .progress(false)
        .optimize(&sys, &target, &m)
        .await
        .unwrap();
    let end = evaluate(&sys, &report.theta, &target, &m).await.unwrap();
    assert!(close(start, 0.5), "{start}");
    assert!(end > 0.8, "ES should approach the target: {start} -> {end}");
}

#[test]
fn parse_judgement_reads_the_asked_format() {
    let (s, fb) = parse_judgement("SCORE: 8\nFEEDBACK: Accurate and concise.", 1.0, 10.0).unwrap();
    assert!(close(s, 7.0 / 9.0), "{s}");
    assert_eq!(fb, "Accurate and concise.");
    let (s, fb) = parse_judgement("FEEDBACK: Good.\nSCORE: 3", 1.0, 5.0).unwrap();
    assert!(close(s, 0.5));
    assert_eq!(fb, "Good.");
    let (s, _) = parse_judgement("  SCORE:10\r\nFEEDBACK: x", 0.0, 10.0).unwrap();
    assert_eq!(s, 1.0);
}

#[test]
fn parse_judgement_fallback_formats() {
    let cases: &[(&str, f32, &str)] = &[
        ("Score: 7/10\nNice work.", 7.0, "Nice work."),
        ("score: 7/10. Nice work.", 7.0, "Nice work."),
        ("**Score:** 7\n\nWell structured.", 7.0, "Well structured."),
        ("**Score**: 7\nFine.", 7.0, "Fine."),
        ("Rating: 7\nSolid.", 7.0, "Solid."),
        ("RATING = 7", 7.0, ""),
        (
            "I give it a score of 7 because it is mostly right.",
            7.0,
            "I give it a score of 7 because it is mostly right.",
        ),
        (
            "I would rate this 7/10 overall. Clear.",
            7.0,
            "I would rate this 7/10 overall. Clear.",
        ),
        (
            "The answer is mostly right.\n7\n",
            7.0,
            "The answer is mostly right.",
        ),
        ("Mostly right.\n**7**", 7.0, "Mostly right."),
    ];
    for (text, raw, feedback) in cases {
        let (s, fb) = parse_judgement(text, 1.0, 10.0)
            .unwrap_or_else(|| panic!("no score found in {text:?}"));
        assert!(close(s, (raw - 1.0) / 9.0), "{text:?}: {s}");
        assert_eq!(&fb, feedback, "{text:?}");
    }
}

#[test]
fn parse_judgement_prefers_the_asked_format_over_fallbacks() {
    let (s, fb) = parse_judgement(
        "Rating: 2 was my first thought.\nSCORE: 9\nFEEDBACK: Changed my mind.",
        1.0,
        10.0,
    )
    .unwrap();
    assert!(close(s, 8.0 / 9.0));
    assert_eq!(fb, "Changed my mind.");
}

#[test]
fn parse_judgement_none_clamping_and_multiline_feedback() {
    assert!(parse_judgement("", 1.0, 10.0).is_none());
    assert!(parse_judgement("No numbers here, sorry.", 1.0, 10.0).is_none());
    assert!(parse_judgement("in 2024 it was fine", 1.0, 10.0).is_none());
    assert!(
        parse_judgement("SCORE: 5", 5.0, 5.0).is_none(),
        "empty scale"
    );
    assert_eq!(parse_judgement("SCORE: 15", 1.0, 10.0).unwrap().0, 1.0);
    assert_eq!(parse_judgement("SCORE: -3", 1.0, 10.0).unwrap().0, 0.0);
    assert_eq!(parse_judgement("SCORE: 0", 1.0, 10.0).unwrap().0, 0.0);
    assert!(close(
        parse_judgement("SCORE: 2.5", 1.0, 4.0).unwrap().0,
        0.5
    ));
    let (_, fb) = parse_judgement(
        "SCORE: 6\nFEEDBACK: First point.\n- second point\n\n  third point  \n",
        1.0,
        10.0,
    )
    .unwrap();
    assert_eq!(fb, "First point.\n- second point\n\n  third point");
    let (_, fb) = parse_judgement("**Feedback:** Lacks detail.\n**Score:** 4", 1.0, 10.0).unwrap();
    assert_eq!(fb, "Lacks detail.");
}

#[cfg(feature = "llm")]
mod judge {
    use super::*;
    use hyperfunc::eval::LlmJudge;
    use hyperfunc::llm::{LlmClient, LlmConfig};

    /// The proxy's base URL; the tests need it running (`ci/test` starts it).
    fn litellm_url() -> String {
        std::env::var("HYPERFUNC_LLM_URL").unwrap_or_else(|_| {
            panic!(
                "HYPERFUNC_LLM_URL is not set: start the real server with `eval \"$(ci/peers.sh start | grep '^export ')\"` \
                 or run the whole suite with `ci/test`"
            )
        })
    }

    fn client() -> LlmClient {
        LlmClient::new(LlmConfig::new(&litellm_url()).api_key("sk-hf-free")).unwrap()
    }

    /// A client that never retries (for the server-error model).
    fn no_retry_client() -> LlmClient {
        let cfg = LlmConfig::new(&litellm_url())
            .api_key("sk-hf-free")
            .with_endpoint(|e| e.max_retries = 0);
        LlmClient::new(cfg).unwrap()
    }

    fn case(pred: &str) -> OwnedCase {
        OwnedCase::new(
            json!("Summarise: the cat sat on the mat all day."),
            json!(pred),
            json!("A cat sat on a mat."),
        )
    }

    #[tokio::test]
    async fn judge_reads_score_and_feedback_from_the_model() {
        let c = client();
        let judge = LlmJudge::summarization(&c, "mock-judge");
        assert_eq!(Scorer::name(&judge), "summarization_judge");
        let r = judge
            .score(case("The cat sat on the mat.").as_case())
            .await
            .unwrap();
        assert!(close(r.score, 7.0 / 9.0), "{r:?}");
        assert_eq!(r.feedback, "Accurate and concise.");
        assert_eq!(
            r.details["reply"],
            json!("SCORE: 8\nFEEDBACK: Accurate and concise.")
        );
        // Every request is labelled with the judge's name.
        let stats = c.stats();
        assert_eq!(stats.by_label["summarization_judge"].calls, 1, "{stats:?}");
    }

    #[tokio::test]
    async fn judge_understands_a_prose_reply_on_its_scale() {
        let c = client();
        let judge = LlmJudge::new(&c, "mock-judge-prose")
            .scale(1, 5)
            .criteria("Is it clear?")
            .name("prose");
        let r = judge.score(case("A cat.").as_case()).await.unwrap();
        assert!(close(r.score, 0.75), "{r:?}");
        assert_eq!(
            r.feedback,
            "I would rate this 4/5 overall. Clear but misses a detail."
        );
    }

    #[tokio::test]
    async fn judge_errors_are_typed_io_errors_naming_the_judge() {
        let c = client();
        let mute = LlmJudge::factual_accuracy(&c, "mock-judge-mute").name("mute");
        let e = mute.score(case("x").as_case()).await.unwrap_err();
        match &e {
            hyperfunc::Error::Io {
                function,
                message,
                retryable,
            } => {
                assert_eq!(function, "mute");
                assert_eq!(message, "no score in judge reply: I cannot grade this.");
                assert!(!retryable);
            }
            other => panic!("expected Error::Io, got {other}"),
        }
        // A server error maps to Error::Io with the client's retry verdict.
        let broken = LlmJudge::new(&no_retry_client(), "mock-error-500").name("broken");
        let e = broken.score(case("x").as_case()).await.unwrap_err();
        assert!(
            matches!(&e, hyperfunc::Error::Io { function, retryable: true, .. } if function == "broken"),
            "{e}"
        );
        // An empty scale is a configuration error, found before any request.
        let flat = LlmJudge::new(&c, "mock-judge").scale(3, 3);
        let e = flat.score(case("x").as_case()).await.unwrap_err();
        assert!(matches!(e, hyperfunc::Error::InvalidConfig { .. }), "{e}");
    }

    #[tokio::test]
    async fn judge_score_batch_grades_every_case_in_order() {
        let c = client();
        let judge = LlmJudge::code_correctness(&c, "mock-judge").include_inputs(false);
        let cases: Vec<OwnedCase> = (0..6).map(|i| case(&format!("answer {i}"))).collect();
        let out = judge.score_batch(&cases).await;
        assert_eq!(out.len(), 6);
        for r in &out {
            let r = r.as_ref().expect("every case is graded");
            assert!(close(r.score, 7.0 / 9.0), "{r:?}");
            assert_eq!(r.feedback, "Accurate and concise.");
        }
        let calls = c.stats().by_label["code_correctness_judge"].calls;
        assert_eq!(calls, 6);
        let mixed = LlmJudge::new(&c, "mock-judge-mute")
            .score_batch(&cases[..2])
            .await;
        assert!(mixed.iter().all(|r| r.is_err()));
    }

    #[tokio::test]
    async fn judge_is_a_metric_for_evaluate_and_its_prompt_holds_the_case() {
        let c = client();
        let judge = LlmJudge::instruction_following(&c, "mock-judge");
        let sys = fixed(json!("Paris"));
        let theta = Theta::init(&sys, 0, &Device::Cpu).unwrap();
        let v = evaluate(&sys, &theta, &qa(), &scorer_metric(judge.clone()))
            .await
            .unwrap();
        assert!(close(v, 7.0 / 9.0), "{v}");

        let req = judge.request(case("The cat sat.").as_case());
        assert_eq!(req.temperature, Some(0.0));
        assert_eq!(req.label.as_deref(), Some("instruction_following_judge"));
        let all: String = req.messages.iter().map(|m| m.content.as_str()).collect();
        for part in [
            "SCORE:",
            "FEEDBACK:",
            "from 1 to 10",
            "the cat sat on the mat all day",
            "A cat sat on a mat.",
            "The cat sat.",
        ] {
            assert!(all.contains(part), "{part:?} missing from {all}");
        }
        let hidden = judge.include_inputs(false).request(case("x").as_case());
        let all: String = hidden.messages.iter().map(|m| m.content.as_str()).collect();
        assert!(!all.contains("all day"), "{all}");
        for j in [
            LlmJudge::conversation_quality(&c, "m"),
            LlmJudge::factual_accuracy(&c, "m"),
        ] {
            assert!(Scorer::name(&j).ends_with("_judge"));
        }
    }
}
