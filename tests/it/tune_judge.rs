//! The offline judge pass against the scripted OpenAI-compatible server: ranking, position-bias
//! ties, unique catches, cost per point, and the cache that lets a pass resume.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hyperfunc::llm::{LlmClient, LlmConfig, ModelConfig, Price};
use hyperfunc::tune::judge::{JudgeItem, JudgePass, JudgeReport, JudgeResponse, UniqueCatch};
use hyperfunc::Error;
use serde_json::{json, Value as Json};

use crate::fake_openai::{self, Fake};

use crate::tune::TempDb;

/// The model tag a response text carries.
fn tag(text: &str) -> &'static str {
    ["STRONG", "WEAK", "MID"]
        .into_iter()
        .find(|t| text.contains(t))
        .unwrap_or("?")
}

/// The scripted judge. `broken` makes the point extraction of WEAK's answer to q1 malformed.
fn judge(req: &Json, broken: &AtomicBool) -> String {
    let user = req["messages"][1]["content"].as_str().unwrap_or_default();
    if let Some(rest) = user.split_once("### Response A\n").map(|x| x.1) {
        let (a, b) = rest.split_once("### Response B\n").unwrap();
        let winner = match (tag(a), tag(b)) {
            // The strong model wins in either position.
            ("STRONG", "WEAK") => "A",
            ("WEAK", "STRONG") => "B",
            // A position-biased judge: always the first one, so the pair is a tie.
            ("STRONG", "MID") | ("MID", "STRONG") => "A",
            ("MID", "WEAK") => "A",
            ("WEAK", "MID") => "B",
            other => panic!("unexpected pair {other:?}"),
        };
        // Some answers come in a code fence.
        return if winner == "B" {
            format!("```json\n{{\"winner\": \"{winner}\"}}\n```")
        } else {
            json!({ "winner": winner }).to_string()
        };
    }
    if let Some(listing) = user.split_once("### Points\n").map(|x| x.1) {
        // Group the numbered points by identical text.
        let mut groups: Vec<(String, Vec<u64>)> = Vec::new();
        for line in listing.lines() {
            let Some((num, rest)) = line.split_once(". [R") else {
                continue;
            };
            let Ok(num) = num.trim().parse::<u64>() else {
                continue;
            };
            let text = rest.split_once("] ").unwrap().1.trim().to_string();
            match groups.iter_mut().find(|g| g.0 == text) {
                Some(g) => g.1.push(num),
                None => groups.push((text, vec![num])),
            }
        }
        let groups: Vec<Vec<u64>> = groups.into_iter().map(|g| g.1).collect();
        return json!(groups).to_string();
    }
    if let Some(point) = user.split_once("### Point\n").map(|x| x.1) {
        return json!({ "valid": point.contains("empty input") }).to_string();
    }
    // Point extraction.
    if broken.load(Ordering::SeqCst) && user.contains("WEAK answer to q1") {
        return "Sorry, I would rather summarise the answer in prose.".into();
    }
    let points: &[&str] = match tag(user) {
        "STRONG" => &["uses a hash map", "handles empty input"],
        "WEAK" => &["uses a hash map", "claims sorting is O(1)"],
        "MID" => &["uses a hash map"],
        other => panic!("unexpected response {other}"),
    };
    json!(points).to_string()
}

async fn scripted(broken: bool) -> (Fake, Arc<AtomicBool>) {
    let flag = Arc::new(AtomicBool::new(broken));
    let f = flag.clone();
    let fake = fake_openai::serve(move |req| judge(req, &f)).await;
    (fake, flag)
}

/// A client on the fake where the judge models cost $1 / $2 per million tokens (the fake
/// reports usage from the lengths of the messages and the answer).
fn client(fake: &Fake) -> LlmClient {
    let price = ModelConfig {
        price: Some(Price::new(1.0, 2.0)),
        ..ModelConfig::default()
    };
    LlmClient::new(
        LlmConfig::new(&fake.base_url)
            .api_key("sk-fake")
            .model("judge", price.clone())
            .model("judge-2", price),
    )
    .unwrap()
}

fn response(model: &str, id: &str, cost_micros: i64) -> JudgeResponse {
    JudgeResponse {
        model: model.to_lowercase(),
        text: format!("{model} answer to {id}: …"),
        cost_micros,
    }
}

/// Two items answered by three models, and one answered by a single model (skipped).
fn items() -> Vec<JudgeItem> {
    let mut items: Vec<JudgeItem> = [("q1", "Find duplicates in a list."), ("q2", "Dedupe ids.")]
        .into_iter()
        .map(|(id, prompt)| JudgeItem {
            prompt_id: id.into(),
            prompt: prompt.into(),
            responses: vec![
                response("STRONG", id, 3_000),
                response("WEAK", id, 1_000),
                response("MID", id, 2_000),
            ],
        })
        .collect();
    items.push(JudgeItem {
        prompt_id: "q3".into(),
        prompt: "Alone.".into(),
        responses: vec![response("STRONG", "q3", 5_000)],
    });
    items
}

/// Judge calls per two-model-or-more item: 3 pairs × 2 orders, 3 point lists, 1 matching and
/// 2 unique candidates to validate.
const CALLS: u64 = 2 * (6 + 3 + 1 + 2);

/// What the client paid, micro-dollars.
fn pass_cost_micros(client: &LlmClient) -> i64 {
    (client.stats().total.cost_usd * 1e6).round() as i64
}

fn requests(fake: &Fake) -> usize {
    fake.requests.load(Ordering::SeqCst)
}

/// What the script implies, whichever run produced the report.
fn assert_ranking(r: &JudgeReport) {
    let names: Vec<&str> = r.models.iter().map(|m| m.model.as_str()).collect();
    assert_eq!(names, ["strong", "mid", "weak"], "{}", r.to_table());
    let [strong, mid, weak] = [&r.models[0], &r.models[1], &r.models[2]];
    // Per item: strong beats weak in both orders and ties mid (position bias) → 0.75, plus 0.5
    // for its validated unique point; mid ties strong and beats weak → 0.75; weak → 0.
    assert!((strong.score - 1.25).abs() < 1e-12, "{}", strong.score);
    assert!((mid.score - 0.75).abs() < 1e-12, "{}", mid.score);
    assert_eq!(weak.score, 0.0);
    assert_eq!(
        (strong.wins, strong.losses, strong.ties),
        (2, 0, 2),
        "q3 has a single model and is skipped"
    );
    assert_eq!((mid.wins, mid.losses, mid.ties), (2, 0, 2));
    assert_eq!((weak.wins, weak.losses, weak.ties), (0, 4, 0));
    // Every item scores the same, so every bootstrap mean is the score.
    for m in &r.models {
        assert!((m.ci_low - m.score).abs() < 1e-12 && (m.ci_high - m.score).abs() < 1e-12);
    }
    assert_eq!(
        [
            strong.validated_unique,
            mid.validated_unique,
            weak.validated_unique
        ],
        [2, 0, 0],
        "weak's unique point was rejected"
    );
    assert_eq!([strong.points, mid.points, weak.points], [4, 2, 4]);
    assert_eq!(
        [strong.cost_micros, mid.cost_micros, weak.cost_micros],
        [6_000, 4_000, 2_000]
    );
    assert_eq!(strong.cost_per_point_micros, Some(1_500.0));
    assert_eq!(mid.cost_per_point_micros, Some(2_000.0));
    assert_eq!(weak.cost_per_point_micros, Some(500.0));
    let catch = |id: &str, model: &str, point: &str, validated| UniqueCatch {
        prompt_id: id.into(),
        model: model.into(),
        point: point.into(),
        validated,
    };
    assert_eq!(
        r.unique_catches,
        [
            catch("q1", "strong", "handles empty input", true),
            catch("q1", "weak", "claims sorting is O(1)", false),
            catch("q2", "strong", "handles empty input", true),
            catch("q2", "weak", "claims sorting is O(1)", false),
        ]
    );
}

#[tokio::test]
async fn ranks_models_and_a_second_run_reads_only_the_cache() {
    let db = TempDb::new("rank");
    let (fake, _) = scripted(false).await;
    let first_client = client(&fake);
    let pass = JudgePass::new(first_client.clone(), "judge", &db.0)
        .unwrap()
        .bootstrap(200)
        .seed(3);
    let first = pass.run(&items()).await.unwrap();
    assert_ranking(&first);
    assert_eq!((first.judge_calls, first.cached_judgements), (CALLS, 0));
    assert_eq!(requests(&fake), CALLS as usize);
    let paid = pass_cost_micros(&first_client);
    assert!(first.judge_cost_micros > 0);
    assert!(
        (first.judge_cost_micros - paid).abs() <= CALLS as i64,
        "{} vs {paid}: rounded per call",
        first.judge_cost_micros
    );

    let table = first.to_table();
    assert!(table.contains("| 1 | strong | 1.250 |"), "{table}");
    assert!(table.contains("2 validated of 4"), "{table}");
    let v = serde_json::to_value(&first).unwrap();
    assert_eq!(v["models"][0]["model"], "strong");

    // A new pass (new client) on the same cache file sends nothing and ranks the same.
    let again = JudgePass::new(client(&fake), "judge", &db.0)
        .unwrap()
        .bootstrap(200)
        .seed(3)
        .run(&items())
        .await
        .unwrap();
    assert_eq!(requests(&fake), CALLS as usize, "no new HTTP request");
    assert_eq!((again.judge_calls, again.cached_judgements), (0, CALLS));
    assert_eq!(again.models, first.models);
    assert_eq!(again.unique_catches, first.unique_catches);
    assert_eq!(
        again.judge_cost_micros, first.judge_cost_micros,
        "cached judgements count at what they cost"
    );

    // The judge model is part of the key: another judge is asked everything again.
    let other = JudgePass::new(client(&fake), "judge-2", &db.0)
        .unwrap()
        .run(&items())
        .await
        .unwrap();
    assert_eq!((other.judge_calls, other.cached_judgements), (CALLS, 0));
    assert_eq!(requests(&fake), 2 * CALLS as usize);
}

#[tokio::test]
async fn a_malformed_answer_fails_and_the_pass_resumes_with_the_missing_calls() {
    let db = TempDb::new("resume");
    let (fake, broken) = scripted(true).await;
    let pass = JudgePass::new(client(&fake), "judge", &db.0).unwrap();
    let err = pass.run(&items()).await.unwrap_err();
    match &err {
        Error::Io {
            function,
            message,
            retryable,
        } => {
            assert_eq!(function, "judge");
            assert!(!retryable);
            assert!(
                message.contains("points of weak's response to prompt `q1`"),
                "{message}"
            );
            assert!(message.contains("malformed"), "{message}");
        }
        other => panic!("expected Error::Io, got {other:?}"),
    }
    // Everything that did not depend on the malformed answer was asked: all of q2, and q1's
    // pairs and points; q1's matching and its two validations were not.
    let sent = requests(&fake);
    assert_eq!(sent, CALLS as usize - 3);

    // Fixed: only the malformed call and the ones that needed it are sent.
    broken.store(false, Ordering::SeqCst);
    let report = pass.run(&items()).await.unwrap();
    assert_eq!(requests(&fake), sent + 4);
    assert_eq!(
        (report.judge_calls, report.cached_judgements),
        (4, CALLS - 4)
    );
    assert_ranking(&report);

    // The resumed pass reports what an uninterrupted pass does.
    let clean_db = TempDb::new("resume-clean");
    let clean = JudgePass::new(client(&fake), "judge", &clean_db.0)
        .unwrap()
        .run(&items())
        .await
        .unwrap();
    assert_eq!(clean.judge_calls, CALLS);
    assert_eq!(report.models, clean.models);
    assert_eq!(report.unique_catches, clean.unique_catches);
    assert_eq!(report.judge_cost_micros, clean.judge_cost_micros);
}

#[tokio::test]
async fn unique_weight_must_be_finite() {
    let db = TempDb::new("weight");
    let (fake, _) = scripted(false).await;
    let err = JudgePass::new(client(&fake), "judge", &db.0)
        .unwrap()
        .unique_weight(f64::NAN)
        .run(&items())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    assert_eq!(requests(&fake), 0);
}
