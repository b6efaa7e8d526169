//! Agent runners: GAME episodes and CHAT conversations over populations.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use hyperfunc::agents::{
    episode_metric, episodes, mean_reward, success_rate, Action, ActionSpace, Environment, Episode,
    EpisodeResult, Game, GridWorld, Step,
};
use hyperfunc::prelude::*;
use serde_json::json;

/// A corridor: action 1 advances (reward 1), 0 stays (reward 0). Terminates on reaching
/// `config.goal`; the environment itself truncates at `config.limit` when set.
struct Corridor {
    pos: usize,
    goal: usize,
    limit: Option<usize>,
    steps: usize,
    seeds: Arc<Mutex<Vec<u64>>>,
}

impl Environment for Corridor {
    fn observation_size(&self) -> usize {
        2
    }
    fn action_space(&self) -> ActionSpace {
        ActionSpace::Discrete(2)
    }
    fn reset(&mut self, seed: u64) -> hyperfunc::Result<Vec<f32>> {
        self.seeds.lock().unwrap().push(seed);
        self.pos = 0;
        self.steps = 0;
        Ok(vec![0.0, seed as f32])
    }
    fn step(&mut self, action: &Action) -> hyperfunc::Result<Step> {
        let advance = *action == Action::Discrete(1);
        self.pos += usize::from(advance);
        self.steps += 1;
        Ok(Step {
            observation: vec![self.pos as f32, 0.0],
            reward: f32::from(u8::from(advance)),
            terminated: self.pos >= self.goal,
            truncated: self.limit.is_some_and(|l| self.steps >= l),
        })
    }
    fn info(&self) -> Json {
        json!({ "pos": self.pos })
    }
}

fn corridor(seeds: Arc<Mutex<Vec<u64>>>) -> impl Fn(&Episode) -> Result<Corridor> + Send + Sync {
    move |ep: &Episode| {
        Ok(Corridor {
            pos: 0,
            goal: ep.config["goal"].as_u64().unwrap_or(3) as usize,
            limit: ep.config["limit"].as_u64().map(|l| l as usize),
            steps: 0,
            seeds: seeds.clone(),
        })
    }
}

/// A policy whose two action scores are its parameter: `[0, 1]` always advances.
fn bias_policy() -> Chain {
    Chain::new(vec![HyperFn::tensor(
        "policy",
        ParamSpec::vector(2).zeros(),
        |x, b| {
            let (p, n, _) = x.dims3()?;
            b.unsqueeze(1)?.broadcast_as((p, n, 2))?.contiguous()
        },
    )])
}

fn bias_theta(b: [f32; 2]) -> Theta {
    Theta::from_tensors([("policy".to_string(), Tensor::new(&b, &Device::Cpu).unwrap())])
}

fn episode_examples(items: &[Episode]) -> Examples {
    let inputs = items
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect::<Vec<_>>();
    Examples::json(inputs.clone(), vec![Json::Null; inputs.len()]).unwrap()
}

/// Collects every candidate's episode results through a metric that records them.
fn recorder(seen: Arc<Mutex<Vec<EpisodeResult>>>) -> impl Metric {
    episode_metric(move |r| {
        seen.lock().unwrap().push(r.clone());
        r.total_reward
    })
}

#[tokio::test]
async fn game_terminates_early_truncates_and_resets_with_seed_zero() {
    let seeds = Arc::new(Mutex::new(Vec::new()));
    let game = Game::new(bias_policy(), corridor(seeds.clone()));
    let data = episode_examples(&[
        Episode::new(0).max_steps(10).config(json!({"goal": 3})),
        Episode::new(7).max_steps(2).config(json!({"goal": 5})),
        Episode::new(9)
            .max_steps(10)
            .config(json!({"goal": 8, "limit": 4})),
    ]);
    // Candidate 0 always advances, candidate 1 always stays.
    let pop = Population::from_thetas(&[bias_theta([0.0, 1.0]), bias_theta([1.0, 0.0])]).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = evaluate_population(&game, &pop, &data, &recorder(seen.clone()), 1 << 16)
        .await
        .unwrap();
    assert_eq!(out.fitness.len(), 2);
    let mut reset = seeds.lock().unwrap().clone();
    reset.sort_unstable();
    assert_eq!(
        reset,
        vec![0, 0, 7, 7, 9, 9],
        "one environment per candidate × episode"
    );

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6);
    let (adv, stay) = seen.split_at(3);
    // Seed 0: reaches the goal in 3 steps and stops there (terminated, not truncated).
    assert_eq!(
        (adv[0].seed, adv[0].steps, adv[0].total_reward),
        (0, 3, 3.0)
    );
    assert!(adv[0].terminated && adv[0].done && !adv[0].truncated);
    assert_eq!(adv[0].info, json!({"pos": 3}));
    // max_steps 2 < goal 5: the runner truncates.
    assert_eq!(
        (adv[1].steps, adv[1].terminated, adv[1].truncated),
        (2, false, true)
    );
    // The environment's own limit (4) truncates before max_steps (10).
    assert_eq!(
        (adv[2].steps, adv[2].terminated, adv[2].truncated),
        (4, false, true)
    );
    // The staying candidate never terminates; each episode runs to its own limit.
    let steps: Vec<usize> = stay.iter().map(|r| r.steps).collect();
    assert_eq!(steps, vec![10, 2, 4]);
    assert!(stay
        .iter()
        .all(|r| r.truncated && r.done && r.total_reward == 0.0));
    assert_eq!(out.fitness[0], 3.0);
    assert_eq!(out.fitness[1], 0.0);
}

#[tokio::test]
async fn game_steps_all_candidates_in_one_forward_per_step() {
    let seeds = Arc::new(Mutex::new(Vec::new()));
    let game = Game::new(bias_policy(), corridor(seeds));
    let data = episode_examples(&[
        Episode::new(1).max_steps(6).config(json!({"goal": 2})),
        Episode::new(2).max_steps(6).config(json!({"goal": 4})),
    ]);
    let thetas: Vec<Theta> = (0..8).map(|_| bias_theta([0.0, 1.0])).collect();
    let pop = Population::from_thetas(&thetas).unwrap();
    let out = evaluate_population(&game, &pop, &data, &mean_reward(), 1 << 16)
        .await
        .unwrap();
    // The longest episode needs 4 steps: 4 batched forwards for 8 candidates × 2 episodes.
    assert_eq!(out.forwards, 4);
    assert_eq!(out.chunks, 1);
    assert!(out.fitness.iter().all(|&f| f == 3.0), "{:?}", out.fitness);
    // Chunked into 2 candidates × 2 episodes per forward: the steps differ per chunk only by
    // how long its episodes last, which the control-flow check accepts.
    let out = evaluate_population(&game, &pop, &data, &mean_reward(), 4)
        .await
        .unwrap();
    assert_eq!((out.chunks, out.forwards), (4, 16));
}

#[tokio::test]
async fn async_policy_makes_no_calls_for_finished_episodes() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    // Advances while its parameter is positive; the observation is a JSON array.
    let policy = Chain::new(vec![HyperFn::io(
        "walker",
        Some(ParamSpec::scalar().zeros()),
        move |obs: Json, p: IoParams| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                assert!(obs.is_array());
                Ok(json!(u8::from(p.values()[0] > 0.0)))
            }
        },
    )]);
    let game = Game::new(policy, corridor(Arc::new(Mutex::new(Vec::new())))).json_observations();
    let data = episode_examples(&[
        Episode::new(0).max_steps(5).config(json!({"goal": 1})),
        Episode::new(1).max_steps(5).config(json!({"goal": 3})),
    ]);
    let walker = |v: f32| {
        Theta::from_tensors([(
            "walker".to_string(),
            Tensor::new(&[v], &Device::Cpu).unwrap(),
        )])
    };
    let pop = Population::from_thetas(&[walker(1.0), walker(-1.0)]).unwrap();
    let out = evaluate_population(&game, &pop, &data, &success_rate(), 1 << 16)
        .await
        .unwrap();
    assert_eq!(out.fitness, vec![1.0, 0.0]);
    // Walker: 1 + 3 calls (each episode stops at its goal); stayer: 5 + 5 (max_steps).
    assert_eq!(calls.load(Ordering::SeqCst), 4 + 10);
}

#[tokio::test]
async fn bad_episodes_and_bad_actions_are_typed_errors() {
    let game = Game::new(bias_policy(), corridor(Arc::new(Mutex::new(Vec::new()))));
    let not_episodes = Examples::json(vec![json!("level 1")], vec![Json::Null]).unwrap();
    let theta = bias_theta([0.0, 1.0]);
    let err = evaluate(&game, &theta, &not_episodes, &mean_reward())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Agent { runner, message } if runner == "game" && message.contains("example 0")),
        "{err}"
    );

    // Three scores for an environment of two actions.
    let wide = Chain::new(vec![HyperFn::tensor(
        "policy",
        ParamSpec::vector(3).zeros(),
        |x, b| {
            let (p, n, _) = x.dims3()?;
            b.unsqueeze(1)?.broadcast_as((p, n, 3))?.contiguous()
        },
    )]);
    let game = Game::new(wide, corridor(Arc::new(Mutex::new(Vec::new()))));
    let theta = Theta::from_tensors([(
        "policy".to_string(),
        Tensor::new(&[0f32, 0., 1.], &Device::Cpu).unwrap(),
    )]);
    let err = evaluate(&game, &theta, &episodes(0..2, 5).unwrap(), &mean_reward())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Agent { message, .. } if message.contains("Discrete(2)") && message.contains("3 values")),
        "{err}"
    );
}

#[tokio::test]
async fn gridworld_policy_learns_to_reach_held_out_goals() {
    let policy = GridWorld::mlp_policy(16);
    let game = Game::new(policy, |_| Ok(GridWorld::new(5)));
    let train = episodes(0..64, 20).unwrap();
    let held_out = episodes(5_000..5_100, 20).unwrap();
    let es = Es::default()
        .pop_size(64)
        .sigma(0.1)
        .lr(0.05)
        .generations(120)
        .seed(3)
        .maximize();
    let start = es.start(&game).unwrap().theta().clone();
    let before = evaluate(&game, &start, &held_out, &success_rate())
        .await
        .unwrap();
    let report = es.optimize(&game, &train, &mean_reward()).await.unwrap();
    let after = evaluate(&game, &report.theta, &held_out, &success_rate())
        .await
        .unwrap();
    assert!(
        after >= 0.9 && after > before + 0.3,
        "success {before} → {after}"
    );
}

#[test]
fn gridworld_is_deterministic_per_seed_and_walls_block() {
    let mut a = GridWorld::new(6);
    let mut b = GridWorld::new(6);
    for seed in [0, 1, 99] {
        assert_eq!(a.reset(seed).unwrap(), b.reset(seed).unwrap());
        assert_eq!((a.position(), a.goal()), (b.position(), b.goal()));
        assert_ne!(a.position(), a.goal());
    }
    let starts: std::collections::HashSet<_> = (0..50)
        .map(|s| {
            a.reset(s).unwrap();
            a.position()
        })
        .collect();
    assert!(starts.len() > 10, "seeds spread the starts: {starts:?}");

    // A wall to the right of every start column-0 cell: moving right is blocked.
    let mut g = GridWorld::new(2).walls([(1, 0), (1, 1)]);
    let obs = g.reset(4).unwrap();
    assert_eq!(obs[5], 1.0, "right is blocked: {obs:?}");
    let before = g.position();
    let step = g.step(&Action::Discrete(3)).unwrap();
    assert_eq!(g.position(), before);
    assert!(step.reward < 0.0 && !step.terminated);
    assert!(matches!(
        g.step(&Action::Discrete(9)),
        Err(Error::Agent { .. })
    ));
    let mut full = GridWorld::new(2).walls([(0, 0), (1, 0), (1, 1)]);
    assert!(matches!(full.reset(0), Err(Error::Agent { .. })));
}

mod chat {
    use super::*;
    use hyperfunc::agents::{chat_metric, Chat, ChatMemory, ChatResult, Conversation, Reply};
    use hyperfunc::memory::{Memory, NewEntry};

    /// A chat system with one knob `k` per candidate: answers questions with its memory
    /// context, says goodbye (done) to "bye", and otherwise notes the message with its knob.
    fn bot(calls: Arc<AtomicUsize>) -> Chain {
        Chain::new(vec![HyperFn::io(
            "bot",
            Some(ParamSpec::scalar().zeros()),
            move |input: Json, p: IoParams| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    let msg = input["message"].as_str().unwrap_or_default().to_string();
                    let k = p.values()[0];
                    let turn = input["turn"].as_u64().unwrap_or(99);
                    assert_eq!(
                        input["history"].as_array().map(Vec::len),
                        Some(turn as usize)
                    );
                    let reply = if msg.contains("bye") {
                        Reply::new("bye").done()
                    } else if msg.ends_with('?') {
                        Reply::new(input["memory_context"].as_str().unwrap_or_default())
                    } else {
                        Reply::new(format!("noted k={k}: {msg}"))
                    };
                    Ok(reply.state(json!({ "turn": turn })).to_json())
                }
            },
        )])
    }

    fn knobs(values: &[f32]) -> Population {
        let thetas: Vec<Theta> = values
            .iter()
            .map(|&v| {
                Theta::from_tensors([("bot".to_string(), Tensor::new(&[v], &Device::Cpu).unwrap())])
            })
            .collect();
        Population::from_thetas(&thetas).unwrap()
    }

    fn recorder(seen: Arc<Mutex<Vec<ChatResult>>>) -> impl Metric {
        chat_metric(move |r, _| {
            seen.lock().unwrap().push(r.clone());
            r.turns as f32
        })
    }

    #[tokio::test]
    async fn chat_stops_on_done_truncates_and_skips_finished_conversations() {
        let calls = Arc::new(AtomicUsize::new(0));
        let chat = Chat::new(bot(calls.clone()));
        let data = Conversation::examples(vec![
            (
                Conversation::new(["hello", "bye", "never sent"]),
                Json::Null,
            ),
            (
                Conversation::new(["a", "b", "c", "d"]).max_turns(2),
                Json::Null,
            ),
            (Conversation::new(["only one"]), Json::Null),
        ])
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = evaluate_population(
            &chat,
            &knobs(&[1.0, 2.0]),
            &data,
            &recorder(seen.clone()),
            1 << 16,
        )
        .await
        .unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 6);
        // Per candidate: 2 turns then done; 2 of 4 (max_turns); 1 of 1.
        for (c, rs) in seen.chunks(3).enumerate() {
            assert_eq!((rs[0].turns, rs[0].done, rs[0].truncated), (2, true, false));
            assert_eq!(rs[0].last_reply(), "bye");
            assert_eq!((rs[1].turns, rs[1].done, rs[1].truncated), (2, false, true));
            assert_eq!((rs[2].turns, rs[2].done, rs[2].truncated), (1, false, true));
            let k = c + 1;
            assert_eq!(rs[1].messages[1].assistant, format!("noted k={k}: b"));
            assert_eq!(rs[1].state, json!({"turn": 1}));
        }
        assert_eq!(out.fitness, vec![5.0 / 3.0, 5.0 / 3.0]);
        // 5 turns per candidate; nothing is sent for ended conversations.
        assert_eq!(calls.load(Ordering::SeqCst), 10);
    }

    #[tokio::test]
    async fn chat_memory_retrieves_context_and_isolates_candidates() {
        let memory = Memory::open(":memory:").await.unwrap();
        memory
            .add(NewEntry::new("I'm building a FastAPI project").user("ada"))
            .await
            .unwrap();
        memory
            .add(NewEntry::new("My project is a Django site").user("bob"))
            .await
            .unwrap();
        let chat = Chat::new(bot(Arc::new(AtomicUsize::new(0)))).memory(memory.clone());
        let data = Conversation::examples(vec![(
            Conversation::new([
                "my code word is swordfish",
                "What project am I working on?",
                "what is my code word?",
            ])
            .user("ada"),
            Json::Null,
        )])
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        evaluate_population(
            &chat,
            &knobs(&[1.0, 2.0]),
            &data,
            &recorder(seen.clone()),
            1 << 16,
        )
        .await
        .unwrap();
        let seen = seen.lock().unwrap().clone();
        for (c, r) in seen.iter().enumerate() {
            let (own, other) = if c == 0 {
                ("k=1", "k=2")
            } else {
                ("k=2", "k=1")
            };
            let project = &r.messages[1].assistant;
            assert!(project.contains("FastAPI"), "{project}");
            assert!(
                !project.contains("Django"),
                "another user's memory: {project}"
            );
            let code = &r.messages[2].assistant;
            assert!(code.contains("swordfish") && code.contains(own), "{code}");
            assert!(
                !code.contains(other),
                "candidate {c} saw another candidate's turn: {code}"
            );
        }
        // The scratch memories of the evaluation are gone; the users' own are untouched.
        assert_eq!(memory.count(None).await.unwrap(), 2);
        assert_eq!(memory.count(Some("ada")).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn persistent_chat_memory_keeps_turns_for_one_theta_and_refuses_a_population() {
        let memory = Memory::open(":memory:").await.unwrap();
        let chat = Chat::new(bot(Arc::new(AtomicUsize::new(0))))
            .memory_mode(memory.clone(), ChatMemory::Persistent);
        let data = Conversation::examples(vec![(
            Conversation::new(["I like green tea", "what do I like?"]).user("cy"),
            Json::Null,
        )])
        .unwrap();
        let err = evaluate_population(
            &chat,
            &knobs(&[1.0, 2.0]),
            &data,
            &chat_metric(|_, _| 0.0),
            1 << 16,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, Error::Agent { message, .. } if message.contains("Chat::memory")),
            "{err}"
        );
        assert_eq!(memory.count(None).await.unwrap(), 0);

        let seen = Arc::new(Mutex::new(Vec::new()));
        evaluate_population(
            &chat,
            &knobs(&[1.0]),
            &data,
            &recorder(seen.clone()),
            1 << 16,
        )
        .await
        .unwrap();
        assert!(seen.lock().unwrap()[0].messages[1]
            .assistant
            .contains("green tea"));
        assert_eq!(
            memory.count(Some("cy")).await.unwrap(),
            2,
            "both turns kept"
        );
    }

    #[tokio::test]
    async fn a_chat_system_that_returns_no_reply_fails_its_candidate() {
        let chat = Chat::new(Chain::new(vec![HyperFn::io(
            "mute",
            Some(ParamSpec::scalar().zeros()),
            |_input: Json, p: IoParams| async move {
                if p.values()[0] > 0.0 {
                    Ok(json!(42))
                } else {
                    Ok(json!("fine"))
                }
            },
        )]));
        let data =
            Conversation::examples(vec![(Conversation::new(["hi", "again"]), Json::Null)]).unwrap();
        let pop = Population::from_thetas(&[
            Theta::from_tensors([(
                "mute".to_string(),
                Tensor::new(&[1f32], &Device::Cpu).unwrap(),
            )]),
            Theta::from_tensors([(
                "mute".to_string(),
                Tensor::new(&[-1f32], &Device::Cpu).unwrap(),
            )]),
        ])
        .unwrap();
        let out = evaluate_population(
            &chat,
            &pop,
            &data,
            &chat_metric(|r, _| r.turns as f32),
            1 << 16,
        )
        .await
        .unwrap();
        assert!(out.fitness[0].is_nan(), "{:?}", out.fitness);
        assert_eq!(out.fitness[1], 2.0);

        let bad = Examples::json(vec![json!({"turns": 3})], vec![Json::Null]).unwrap();
        let err = evaluate(
            &chat,
            &pop.candidate(1).unwrap(),
            &bad,
            &chat_metric(|_, _| 0.0),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, Error::Agent { runner, .. } if runner == "chat"),
            "{err}"
        );
    }
}
