//! The run store: resume after `kill -9`, live control (every channel), replay, fuzzed
//! commands, retention, the CLI.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyperfunc::prelude::*;
use hyperfunc::runs::{Action, Checkpoints, RunId, RunStore};
use hyperfunc::StopReason;
use serde_json::{json, Map, Value};

use crate::common::{cli_err, cli_ok, xor_data, xor_net};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hf-runs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn xor_es(store: &RunStore, generations: usize) -> Es {
    Es::default()
        .pop_size(32)
        .sigma(0.1)
        .lr(0.1)
        .generations(generations)
        .seed(7)
        .minimize()
        .progress(false)
        .autotune(false)
        .store(store.clone())
        .checkpoints(Checkpoints {
            every: Some(1),
            ..Default::default()
        })
}

/// A fresh store in a temporary directory, the XOR settings and a created run.
fn xor_run(name: &str, generations: usize) -> (PathBuf, RunStore, Es, RunId) {
    let dir = temp_dir(name);
    let store = RunStore::open(&dir).unwrap();
    let es = xor_es(&store, generations);
    let run = store.create("xor", &es).unwrap();
    (dir, store, es, run)
}

/// Waits (bounded) until `cond` holds, polling the store's observable state.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::yield_now();
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[tokio::test]
async fn scheduled_commands_apply_at_their_boundary_are_logged_and_replay_bit_for_bit() {
    let (_, store, es, run) = xor_run("schedule", 200);
    let ctl = store.control(run);
    ctl.clone().at_gen(50).set("lr", 0.3).unwrap();
    ctl.clone()
        .at_gen(80)
        .set_many(Map::from_iter([
            ("pop_size".to_string(), json!(16)),
            ("sigma".to_string(), json!(0.05)),
        ]))
        .unwrap();
    ctl.clone().at_gen(120).clear(&["lr"]).unwrap();
    ctl.clone().at_gen(150).stop().unwrap();

    let report = es
        .clone()
        .run(run)
        .optimize(&xor_net(None), &xor_data(), &metric::bce())
        .await
        .unwrap();
    assert_eq!(report.stop, StopReason::Command);
    assert!(report
        .stop_detail
        .as_deref()
        .unwrap()
        .contains("stop (cmd 4 from rust)"));
    assert_eq!(report.history.len(), 150);
    let rows = store.generations(run).unwrap();
    assert_eq!(rows.len(), 150);
    assert_eq!(
        (rows[49].lr, rows[50].lr, rows[119].lr, rows[120].lr),
        (0.1, 0.3, 0.3, 0.1)
    );
    assert_eq!((rows[79].pop_size, rows[80].pop_size), (32, 16));
    assert_eq!((rows[79].sigma, rows[80].sigma), (0.1, 0.05));
    assert_eq!(rows[149].evals, 80 * 32 + 70 * 16);

    let events: Vec<String> = store
        .events(run)
        .unwrap()
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert!(
        events.contains(&"gen 50: lr 0.1 → 0.3 (cmd 1 from rust)".to_string()),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("gen 80: pop_size 32 → 16, sigma 0.1 → 0.05")),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("gen 120: lr 0.3 → 0.1 (cleared)")),
        "{events:#?}"
    );

    // The effective configuration at any generation is the fold of the log.
    let at = |g| store.effective_config(run, g).unwrap();
    assert_eq!(
        (at(49).lr, at(50).lr, at(100).pop_size, at(130).lr),
        (0.1, 0.3, 16, 0.1)
    );
    let info = store.info(run).unwrap();
    assert_eq!((info.status.as_str(), info.generation), ("stopped", 150));

    // Replay: the settings and the logged commands give θ bit for bit.
    let replay = es
        .clone()
        .replay(run)
        .optimize(&xor_net(None), &xor_data(), &metric::bce())
        .await
        .unwrap();
    assert!(replay.theta.bit_eq(&store.theta(run).unwrap()).unwrap());
    assert!(replay.theta.bit_eq(&report.theta).unwrap());
    assert_eq!(replay.run, None);
    // …and a replay that skips a command does not.
    let plain = xor_es(&store, 150)
        .store(RunStore::open(temp_dir("schedule-plain")).unwrap())
        .optimize(&xor_net(None), &xor_data(), &metric::bce())
        .await
        .unwrap();
    assert!(!plain.theta.bit_eq(&report.theta).unwrap());

    // Continuing with other settings is refused with the differences named.
    let err = es
        .clone()
        .seed(8)
        .run(run)
        .optimize(&xor_net(None), &xor_data(), &metric::bce())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("seed: 7 → 8"), "{err}");
}

/// A long XOR run (adaptive checkpoints) started in the background, and its store.
fn spawn_xor_run(
    name: &str,
) -> (
    RunStore,
    RunId,
    tokio::task::JoinHandle<hyperfunc::Result<hyperfunc::Report>>,
) {
    let store = RunStore::open(temp_dir(name)).unwrap();
    let es = xor_es(&store, 1_000_000).checkpoints(Checkpoints::default());
    let run = store.create("xor", &es).unwrap();
    let task = tokio::spawn({
        let es = es.clone().run(run);
        async move {
            es.optimize(&xor_net(None), &xor_data(), &metric::bce())
                .await
        }
    });
    (store, run, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_set_resume_and_stop_from_another_task() {
    let (store, run, task) = spawn_xor_run("pause");
    let gens = |s: &RunStore| s.generations(run).unwrap().len();
    wait_for("a few generations", || gens(&store) >= 5);
    let ctl = store.control(run).source("test");
    ctl.pause().unwrap();
    wait_for("the pause", || store.info(run).unwrap().status == "paused");
    ctl.set("lr", 0.02).unwrap();
    ctl.resume().unwrap();
    wait_for("the resume", || {
        store.info(run).unwrap().status == "running"
    });
    let g = store.info(run).unwrap().generation;
    wait_for("more generations", || gens(&store) >= g + 5);
    ctl.stop().unwrap();
    let report = task.await.unwrap().unwrap();
    assert_eq!(report.stop, StopReason::Command);

    let events = store.events(run).unwrap();
    let find = |s: &str| {
        events
            .iter()
            .find(|e| e.message.contains(s))
            .unwrap_or_else(|| panic!("{s}: {events:#?}"))
    };
    let (p, s, r) = (find("paused"), find("lr 0.1 → 0.02"), find("resumed"));
    // No generation ran while paused: set and resume applied at the pause's boundary.
    assert!(p.id < s.id && s.id < r.id);
    assert_eq!(p.gen, r.gen);
    let rows = store.generations(run).unwrap();
    let pg = p.gen.unwrap();
    assert_eq!((rows[pg - 1].lr, rows[pg].lr), (0.1, 0.02));
    assert_eq!(store.info(run).unwrap().status, "stopped");
}

/// Commands sent while the run writes (rows, applied commands, events) all land. Each is one
/// transaction that reads the run, then inserts: begun deferred, it failed at once with
/// "database is locked" whenever the run committed between its read and its insert (about one
/// command in sixty in `hyperfunc bench`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_while_the_run_writes_all_land() {
    let (store, run, task) = spawn_xor_run("busy");
    wait_for("a few generations", || {
        store.generations(run).unwrap().len() >= 5
    });
    let ctl = store.control(run).source("test");
    let n = 300;
    for i in 0..n {
        if let Err(e) = ctl.set("lr", 0.05 + 1e-4 * i as f64) {
            let _ = ctl.stop();
            panic!("command {i} of {n} failed: {e}");
        }
    }
    ctl.stop().unwrap();
    let report = task.await.unwrap().unwrap();
    assert_eq!(report.stop, StopReason::Command);
    let sets = store
        .commands(run)
        .unwrap()
        .into_iter()
        .filter(|c| matches!(c.action, Action::Set(_)))
        .count();
    assert_eq!(sets, n);
}

/// A system whose `hang_at`-th evaluation never finishes.
struct Hang {
    net: Chain,
    calls: AtomicUsize,
    hang_at: usize,
}

impl HyperSystem for Hang {
    fn hyperfunctions(&self) -> Vec<HyperFn> {
        self.net.hyperfunctions()
    }

    async fn run(&self, cx: &Cx, x: Value_) -> Result<Value_> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == self.hang_at {
            std::future::pending::<()>().await;
        }
        self.net.run(cx, x).await
    }
}

type Value_ = hyperfunc::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_now_cancels_the_generation_in_flight_and_still_checkpoints() {
    let dir = temp_dir("stopnow");
    let store = RunStore::open(&dir).unwrap();
    let es = xor_es(&store, 100);
    let run = store.create("hang", &es).unwrap();
    let sys = Hang {
        net: xor_net(None),
        calls: AtomicUsize::new(0),
        hang_at: 3,
    };
    let task = tokio::spawn({
        let es = es.clone().run(run);
        async move { es.optimize(&sys, &xor_data(), &metric::bce()).await }
    });
    wait_for("three generations", || {
        store.generations(run).unwrap().len() == 3
    });
    // The hung generation is reported (10 times the recent median, at least 1 s).
    wait_for("the slow-generation alert", || {
        store
            .events(run)
            .unwrap()
            .iter()
            .any(|e| e.kind == "alert" && e.message.starts_with("gen 3: no generation for 1.0 s"))
    });
    store.control(run).source("cli").stop_now().unwrap();
    let report = task.await.unwrap().unwrap();
    assert_eq!(report.stop, StopReason::Command);
    assert!(report.stop_detail.unwrap().contains("stop --now"));
    assert!(report.final_fitness.is_nan());
    let ckpt = store.checkpoints(run).unwrap().pop().unwrap();
    assert_eq!((ckpt.gen, ckpt.kind.as_str()), (3, "final"));
    let events = store.events(run).unwrap();
    assert!(events
        .last()
        .unwrap()
        .message
        .starts_with("stopped at gen 3: stop --now"));
    let cmds = store.commands(run).unwrap();
    assert_eq!(
        (cmds[0].status.as_str(), cmds[0].applied_gen),
        ("applied", Some(3))
    );
    assert!(store.theta(run).unwrap().bit_eq(&report.theta).unwrap());
}

#[tokio::test]
async fn control_file_is_applied_or_kept_with_its_error() {
    let (_, store, es, run) = xor_run("file", 20);
    let rd = store.run_dir(run);
    // A refused file: nothing of it is written, and the file is kept with the reason.
    let bad = r#"[{"action": "set", "values": {"lr": 0.2}}, {"action": "set", "values": {"pop_size": 33}}]"#;
    std::fs::write(rd.join("control.json"), bad).unwrap();
    es.clone()
        .generations(1)
        .run(run)
        .optimize(&xor_net(None), &xor_data(), &metric::bce())
        .await
        .unwrap_err();
    // Other settings than the run's: refused before anything ran, the file untouched.
    assert!(rd.join("control.json").exists());

    let run2 = store.create("xor", &es).unwrap();
    let rd = store.run_dir(run2);
    std::fs::write(rd.join("control.json"), bad).unwrap();
    let report = es
        .clone()
        .run(run2)
        .optimize(&xor_net(None), &xor_data(), &metric::bce())
        .await
        .unwrap();
    assert!(report.history.iter().all(|s| s.lr == 0.1));
    assert_eq!(
        std::fs::read_to_string(rd.join("control.rejected.json")).unwrap(),
        bad
    );
    let why = std::fs::read_to_string(rd.join("control.error.txt")).unwrap();
    assert!(why.contains("even"), "{why}");
    assert!(store.commands(run2).unwrap().is_empty());

    let run3 = store.create("xor", &es).unwrap();
    let rd = store.run_dir(run3);
    std::fs::write(
        rd.join("control.json"),
        r#"{"action": "set", "values": {"lr": 0.2}, "at_gen": 5}"#,
    )
    .unwrap();
    let report = es
        .clone()
        .run(run3)
        .optimize(&xor_net(None), &xor_data(), &metric::bce())
        .await
        .unwrap();
    assert_eq!((report.history[4].lr, report.history[5].lr), (0.1, 0.2));
    let cmds = store.commands(run3).unwrap();
    assert_eq!(
        (cmds[0].source.as_str(), cmds[0].applied_gen),
        ("file", Some(5))
    );
    assert!(rd
        .join(format!("control.{}.done.json", cmds[0].id))
        .exists());
}

/// A small deterministic generator for the fuzz.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.next() as usize % v.len()]
    }
}

#[tokio::test]
async fn fuzzed_commands_leave_a_valid_config_and_never_apply_in_part() {
    let (dir, store, es, run) = xor_run("fuzz", 30);
    let ctl = store.control(run).source("fuzz");
    let names = [
        "lr",
        "sigma",
        "pop_size",
        "generations",
        "patience",
        "target",
        "weight_decay",
        "max_failure_rate",
        "max_batch_size",
        "max_cost_usd",
        "max_tokens",
        "seed",
        "antithetic",
        "lrr",
        "",
        "shaping",
    ];
    let values = [
        json!(0.05),
        json!(-1.0),
        json!(0),
        json!(64),
        json!(33),
        json!(2.5),
        json!("fast"),
        json!(null),
        json!(true),
        json!([1]),
        json!(1e308),
        json!(0.5),
        json!(40),
        json!(1),
    ];
    let mut rng = Lcg(12345);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..2000 {
        let mut patch = Map::new();
        for _ in 0..=(rng.next() % 3) {
            patch.insert(rng.pick(&names).to_string(), rng.pick(&values).clone());
        }
        let before = store.live_values(run, usize::MAX).unwrap();
        match ctl.set_many(patch.clone()) {
            Ok(_) => accepted += 1,
            Err(e) => {
                refused += 1;
                assert!(matches!(e, hyperfunc::Error::RunCommand { .. }), "{e}");
                // Nothing of a refused patch was written.
                let cmds = store.commands(run).unwrap();
                assert_eq!(cmds.len(), accepted);
                assert_eq!(before, store.live_values(run, usize::MAX).unwrap());
            }
        }
    }
    assert!(
        accepted > 100 && refused > 100,
        "{accepted} accepted, {refused} refused"
    );
    // Commands that bypassed the writer's checks (another tool writing the table) are
    // refused when applied, whole.
    let conn = rusqlite::Connection::open(dir.join("runs.sqlite")).unwrap();
    for patch in [
        r#"{"lr": 0.07, "pop_size": 31}"#,
        r#"{"sigma": "wide"}"#,
        r#"{"seed": 1}"#,
        r#"{"max_cost_usd": -1}"#,
    ] {
        conn.execute(
            "INSERT INTO commands(run, created_at, source, action, patch) VALUES (?1, 0, 'raw', 'set', ?2)",
            rusqlite::params![run.0, patch],
        )
        .unwrap();
    }
    let result = es
        .clone()
        .run(run)
        .optimize(&xor_net(None), &xor_data(), &metric::bce())
        .await;
    let cmds = store.commands(run).unwrap();
    let raw: Vec<_> = cmds.iter().filter(|c| c.source == "raw").collect();
    assert!(
        raw.iter()
            .all(|c| c.status == "rejected" && c.reason.is_some()),
        "{raw:#?}"
    );
    // The lr of the refused {lr, pop_size} patch was not applied either. (A fuzzed lr of
    // 1e308 may blow θ up: the run then fails with a typed error and says so.)
    match result {
        Ok(report) => assert!(report.history.iter().all(|s| s.lr != 0.07)),
        Err(e) => {
            assert!(matches!(e, hyperfunc::Error::TooManyFailures { .. }), "{e}");
            assert_eq!(store.info(run).unwrap().status, "failed");
        }
    }
    assert!(store.generations(run).unwrap().iter().all(|s| s.lr != 0.07));
    let effective = store.effective_config(run, usize::MAX).unwrap();
    Es::default()
        .with_run_config(&effective)
        .validate()
        .unwrap();
    assert!(cmds.iter().all(|c| c.status != "pending"));
}

#[tokio::test]
async fn retention_keeps_the_last_and_the_best_and_files_match() {
    let dir = temp_dir("retention");
    let store = RunStore::open(&dir).unwrap();
    let es = xor_es(&store, 40).checkpoints(Checkpoints {
        every: Some(2),
        keep_last: 2,
        keep_best: true,
    });
    let run = store.create("xor", &es).unwrap();
    store.control(run).at_gen(10).snapshot().unwrap();
    es.clone()
        .run(run)
        .optimize(&xor_net(None), &xor_data(), &metric::bce())
        .await
        .unwrap();
    let ck = store.checkpoints(run).unwrap();
    let kinds: Vec<(usize, &str)> = ck.iter().map(|c| (c.gen, c.kind.as_str())).collect();
    assert!(
        kinds.contains(&(10, "snapshot")) && kinds.contains(&(40, "final")),
        "{kinds:?}"
    );
    assert!(
        ck.iter().filter(|c| c.kind == "auto").count() <= 3,
        "{kinds:?}"
    );
    let mut on_disk: Vec<String> = std::fs::read_dir(store.run_dir(run))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    on_disk.sort();
    let listed: Vec<String> = ck
        .iter()
        .map(|c| c.file.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert_eq!(on_disk, listed);
    // Size: θ + two moments + at most 4 KiB.
    let theta_bytes = 4 * (2 * 4 + 4 + 4 + 1) as u64;
    assert!(
        ck.iter().all(|c| c.bytes <= 3 * theta_bytes + 4096),
        "{ck:?}"
    );
}

fn kill_and_resume_round(dir: &str, seed_ms: u64, after: usize) -> (bool, usize) {
    let store = RunStore::open(dir).unwrap();
    let run = RunId(1);
    // Each round's process must get as far as a generation of its own (so it has resumed and
    // recorded that) before it is killed: a fast build can have passed `after` already.
    let target = after.max(store.generations(run).map_or(0, |g| g.len()) + 1);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hyperfunc"))
        .args([
            "train",
            "teacher",
            "--store",
            dir,
            "--run",
            "1",
            "--generations",
            "40",
            "--checkpoint-every",
            "1",
        ])
        .env("HYPERFUNC_AUTOTUNE", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if store.generations(run).map(|g| g.len()).unwrap_or(0) >= target {
            break;
        }
        if child.try_wait().unwrap().is_some() || t.elapsed() > Duration::from_secs(60) {
            return (false, 0);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    // A moment chosen by the round's seed: inside a generation or a checkpoint write.
    std::thread::sleep(Duration::from_micros(seed_ms * 7919 % 12_000));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let tmp_left = std::fs::read_dir(store.run_dir(run))
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp"));
    // The store is readable and holds nothing past its last checkpoint but at most the
    // generation whose checkpoint the kill interrupted.
    let rows = store.generations(run).unwrap().len();
    let last = store.checkpoints(run).unwrap().last().map_or(0, |c| c.gen);
    assert!(rows <= last + 1, "{rows} rows, last checkpoint at {last}");
    (tmp_left, last)
}

#[test]
fn kill_9_at_random_moments_then_resume_is_bit_identical() {
    let root = temp_dir("kill");
    std::fs::create_dir_all(&root).unwrap();
    let (a, b) = (root.join("a"), root.join("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let env = [("HYPERFUNC_AUTOTUNE", "0")];
    let reference = root.join("ref.safetensors");
    cli_ok(
        &[
            "train",
            "teacher",
            "--store",
            a,
            "--generations",
            "40",
            "--checkpoint-every",
            "1",
            "--save",
            reference.to_str().unwrap(),
        ],
        &env,
    );
    // The run to kill: created, then killed and resumed several times.
    let store = RunStore::open(b).unwrap();
    let es = hyperfunc::runs::task::task("teacher")
        .unwrap()
        .es
        .generations(40);
    store.create_task("teacher", Some("teacher"), &es).unwrap();
    let mut during_write = 0;
    let mut progress = Vec::new();
    for (round, after) in [1usize, 4, 8, 12, 17, 22, 27, 33].into_iter().enumerate() {
        let (tmp, last) = kill_and_resume_round(b, round as u64 * 5 + 3, after);
        during_write += usize::from(tmp);
        progress.push(last);
    }
    // The states a kill inside a checkpoint write leaves, made on purpose: a half-written
    // temporary file, and a complete file whose row was never committed. Both are ignored
    // (and removed) by the resume.
    let rd = store.run_dir(RunId(1));
    let last = store.checkpoints(RunId(1)).unwrap().pop().unwrap();
    std::fs::write(
        rd.join(format!("gen-{:08}.safetensors.tmp", last.gen + 1)),
        b"\x00\x01half",
    )
    .unwrap();
    let orphan = rd.join(format!("gen-{:08}.safetensors", last.gen + 1));
    std::fs::copy(&last.file, &orphan).unwrap();
    eprintln!(
        "kills left a half-written checkpoint {during_write} times; checkpoints at {progress:?}"
    );
    let out = root.join("out.safetensors");
    cli_ok(
        &[
            "train",
            "teacher",
            "--store",
            b,
            "--run",
            "1",
            "--generations",
            "40",
            "--checkpoint-every",
            "1",
            "--save",
            out.to_str().unwrap(),
        ],
        &env,
    );
    let dev = candle_core::Device::Cpu;
    let (x, y) = (
        Theta::load(&reference, &dev).unwrap(),
        Theta::load(&out, &dev).unwrap(),
    );
    assert!(
        x.bit_eq(&y).unwrap(),
        "the resumed θ differs from the uninterrupted one"
    );
    assert!(
        !orphan.exists()
            || store
                .checkpoints(RunId(1))
                .unwrap()
                .iter()
                .any(|c| c.file == orphan)
    );
    let events = store.events(RunId(1)).unwrap();
    assert!(
        events.iter().filter(|e| e.kind == "resume").count() >= 8,
        "{events:#?}"
    );
    // The curves match bit for bit too.
    let ra = RunStore::open(a).unwrap().generations(RunId(1)).unwrap();
    let rb = store.generations(RunId(1)).unwrap();
    assert_eq!(ra.len(), 40);
    assert!(
        ra.iter()
            .zip(&rb)
            .all(|(p, q)| p.best.to_bits() == q.best.to_bits()
                && p.mean.to_bits() == q.mean.to_bits())
    );
}

#[test]
fn cli_controls_lists_diffs_and_plots() {
    let root = temp_dir("cli");
    let d = root.to_str().unwrap();
    cli_ok(&["train", "xor", "--store", d, "--generations", "30"], &[]);
    cli_ok(
        &[
            "train",
            "xor",
            "--store",
            d,
            "--generations",
            "30",
            "--lr",
            "0.2",
        ],
        &[],
    );
    let list: Value =
        serde_json::from_slice(&cli_ok(&["runs", "list", "--store", d, "--json"], &[])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let diff: Value = serde_json::from_slice(&cli_ok(
        &["runs", "diff", "1", "2", "--store", d, "--json"],
        &[],
    ))
    .unwrap();
    assert_eq!(diff["config"], json!(["lr: 0.1 → 0.2"]));
    assert!(diff["first_divergence"].is_number());
    // A finished run takes no commands; an unknown run is named.
    assert!(cli_err(&["runs", "set", "1", "lr=0.05", "--store", d], &[]).contains("finished"));
    assert!(cli_err(&["runs", "show", "9", "--store", d], &[]).contains("runs [1, 2]"));
    // Commands to a created run are checked as they are written.
    let store = RunStore::open(&root).unwrap();
    let run = store.create("later", &Es::default()).unwrap();
    let r = run.to_string();
    let err = cli_err(&["runs", "set", &r, "pop_size=63", "--store", d], &[]);
    assert!(err.contains("odd") || err.contains("even"), "{err}");
    assert!(cli_err(&["runs", "set", &r, "lr", "--store", d], &[]).contains("name=value"));
    let ok = String::from_utf8(cli_ok(
        &[
            "runs",
            "set",
            &r,
            "lr=0.05",
            "sigma=0.2",
            "--at-gen",
            "4",
            "--store",
            d,
        ],
        &[],
    ))
    .unwrap();
    assert!(ok.starts_with("cmd "), "{ok}");
    cli_ok(&["runs", "stop", &r, "--now", "--store", d], &[]);
    let cmds = store.commands(run).unwrap();
    assert_eq!(cmds.len(), 2);
    assert_eq!(cmds[0].at_gen, Some(4));
    assert_eq!(cmds[1].action, Action::StopNow);
    let replay: Value =
        serde_json::from_slice(&cli_ok(&["runs", "replay", "2", "--store", d], &[])).unwrap();
    assert_eq!(replay["theta_bit_identical"], json!(true));
    let show = String::from_utf8(cli_ok(&["runs", "show", "2", "--store", d], &[])).unwrap();
    assert!(
        show.contains("finished: generation limit") && show.contains("final"),
        "{show}"
    );
    #[cfg(feature = "plot")]
    {
        let svg = root.join("curves.svg");
        cli_ok(
            &[
                "runs",
                "plot",
                "1",
                "2",
                "--out",
                svg.to_str().unwrap(),
                "--store",
                d,
            ],
            &[],
        );
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("run 2 best"),
            "{}",
            &text[..200]
        );
        let err = cli_err(
            &[
                "runs", "plot", "1", "--out", "x.svg", "--x", "dollars", "--store", d,
            ],
            &[],
        );
        assert!(err.contains("gen, evals, seconds or usd"), "{err}");
        let err = cli_err(
            &[
                "runs", "plot", "1", "--out", "x.svg", "--x", "usd", "--store", d,
            ],
            &[],
        );
        assert!(err.contains("recorded no LLM dollars"), "{err}");
    }
}

fn qa() -> hyperfunc::eval::Dataset {
    hyperfunc::eval::Dataset::from_jsonl(
        "qa",
        &(0..40)
            .map(|i| {
                format!(
                    r#"{{"id": "q{i}", "input": {i}, "expected": {}, "tags": [{}]}}"#,
                    i * 2,
                    if i % 4 == 0 { r#""hard""# } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap()
}

#[test]
fn datasets_version_split_and_gate_a_regression() {
    use hyperfunc::eval::{Dataset, Split};
    let root = temp_dir("gate");
    let store = RunStore::open(&root).unwrap();
    let ds = qa();
    let v1 = store.put_dataset(&ds).unwrap();
    assert_eq!((v1.version, v1.items), (1, 40));
    assert_eq!(store.put_dataset(&ds).unwrap(), v1); // same content, same version
    let mut items = ds.items().to_vec();
    items[3].expected = json!(7);
    let v2 = store
        .put_dataset(&Dataset::new("qa", items).unwrap())
        .unwrap();
    assert_eq!(v2.version, 2);
    assert_ne!(v2.hash, v1.hash);
    let (back, bv) = store.dataset("qa", Some(1)).unwrap();
    assert_eq!((back.hash(), bv), (ds.hash(), v1.clone()));
    // Splits partition the items; tags filter.
    let parts: Vec<usize> = [Split::Train, Split::Val, Split::Test]
        .iter()
        .map(|&s| ds.split(s, (0.5, 0.25, 0.25), 3).len())
        .collect();
    assert_eq!(parts.iter().sum::<usize>(), 40);
    assert!(parts.iter().all(|&n| n > 0), "{parts:?}");
    assert_eq!(ds.with_tags(&["hard"]).len(), 10);
    assert_eq!(ds.without_tags(&["hard"]).len(), 30);
    let bad =
        Dataset::from_jsonl("x", "{\"input\": 1}\n{\"input\": 2, \"expected\": 3}").unwrap_err();
    assert!(bad.to_string().contains("line 1"), "{bad}");

    // Three runs scored on all of v1: a baseline, one as good, one worse.
    let es = Es::default();
    let runs: Vec<RunId> = (0..3)
        .map(|i| store.create(&format!("r{i}"), &es).unwrap())
        .collect();
    let test = ds.clone();
    let score = |k: usize| -> Vec<(String, f64)> {
        test.items()
            .iter()
            .enumerate()
            .map(|(j, it)| (it.id.clone(), if j % 10 < k { 0.0 } else { 1.0 }))
            .collect()
    };
    store
        .record_eval(runs[0], &v1, "all", "accuracy", &score(1))
        .unwrap();
    store
        .record_eval(runs[1], &v1, "all", "accuracy", &score(1))
        .unwrap();
    let d = root.to_str().unwrap();
    let (b, c1) = (runs[0].to_string(), runs[1].to_string());
    let out = String::from_utf8(cli_ok(
        &[
            "gate",
            "--store",
            d,
            "--baseline",
            &b,
            "--candidate",
            &c1,
            "--metric",
            "accuracy",
            "--max-drop",
            "0.01",
        ],
        &[],
    ))
    .unwrap();
    assert!(out.contains("diff +0.0000"), "{out}");
    store
        .record_eval(runs[2], &v1, "all", "accuracy", &score(4))
        .unwrap();
    // Default candidate: the newest evaluated run, which regressed.
    let err = cli_err(
        &[
            "gate",
            "--store",
            d,
            "--baseline",
            &b,
            "--metric",
            "accuracy",
            "--max-drop",
            "0.01",
        ],
        &[],
    );
    assert!(err.contains("regression: accuracy dropped"), "{err}");
    let cmp = store.compare(runs[0], runs[2], "accuracy").unwrap();
    assert!(
        cmp.diff < -0.2 && cmp.ci95.1 < 0.0 && cmp.significant(),
        "{cmp:?}"
    );
    assert_eq!(cmp.paired, test.len());
    // A candidate scored on other data is refused, naming both.
    store
        .record_eval(runs[1], &v2, "all", "f1", &score(0))
        .unwrap();
    store
        .record_eval(runs[0], &v1, "all", "f1", &score(0))
        .unwrap();
    let err = store
        .compare(runs[0], runs[1], "f1")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("qa v2 all") && err.contains("version 1"),
        "{err}"
    );
    assert!(store
        .record_eval(runs[0], &v1, "all", "accuracy", &[("q1".into(), f64::NAN)])
        .unwrap_err()
        .to_string()
        .contains("non-finite"));
}

#[tokio::test]
async fn trajectories_come_from_the_trace() {
    use hyperfunc::eval::Trajectory;
    use hyperfunc::{IoError, IoParams};
    let search = HyperFn::io("search", None, |x: Value, _p: IoParams| async move {
        Ok::<_, IoError>(json!({"q": x}))
    });
    let answer = HyperFn::io("answer", None, |x: Value, _p: IoParams| async move {
        Ok::<_, IoError>(x["q"].clone())
    });
    let net = Chain::new(vec![search, answer]);
    let data =
        hyperfunc::Examples::json(vec![json!("a"), json!("b")], vec![json!("a"), json!("c")])
            .unwrap();
    let hub = Hub::new();
    let metric = hyperfunc::eval::metric(hyperfunc::eval::ExactMatch::new());
    let theta = hyperfunc::Theta::init(&net, 0, &candle_core::Device::Cpu).unwrap();
    let pop = hyperfunc::Population::center(theta);
    hyperfunc::evaluate_population_observed(&net, &pop, &data, &metric, 1 << 18, &hub)
        .await
        .unwrap();
    let records = hub.records();
    let t = Trajectory::from_records(&records, None, 0, 1);
    let names: Vec<&str> = t.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["search", "answer"]);
    let s = t.score(&["search", "calc", "answer"], &json!("c"), &json!("b"));
    assert!(!s.exact_match);
    assert_eq!(
        (s.precision, s.recall, s.tool_efficiency),
        (1.0, 2.0 / 3.0, 1.0)
    );
    assert!(Trajectory::from_records(&records, Some(0), 0, 1)
        .steps
        .is_empty());
}

#[tokio::test]
async fn examples_per_eval_is_reproducible_and_settable_live() {
    let data = crate::common::xor_data();
    let net = xor_net(None);
    let es = Es::default()
        .pop_size(16)
        .generations(20)
        .seed(5)
        .minimize()
        .progress(false);
    let a = es
        .clone()
        .examples_per_eval(2)
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap();
    let b = es
        .clone()
        .examples_per_eval(2)
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap();
    let all = es
        .clone()
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap();
    assert!(a.theta.bit_eq(&b.theta).unwrap());
    assert!(!a.theta.bit_eq(&all.theta).unwrap());
    assert!(es.clone().examples_per_eval(0).validate().is_err());

    let (_, store, es, run) = xor_run("subset", 30);
    store
        .control(run)
        .at_gen(10)
        .set("examples_per_eval", 2)
        .unwrap();
    let r = es
        .clone()
        .run(run)
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap();
    let events: Vec<String> = store
        .events(run)
        .unwrap()
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("gen 10: examples_per_eval none → 2")),
        "{events:#?}"
    );
    assert_eq!(
        store.effective_config(run, 10).unwrap().examples_per_eval,
        Some(2)
    );
    let replay = es
        .replay(run)
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap();
    assert!(replay.theta.bit_eq(&r.theta).unwrap());
}

#[tokio::test]
async fn a_budget_needs_an_llm_client_to_count_and_is_refused_live_without_one() {
    let (dir, store, es, run) = xor_run("budget", 12);
    let (net, data) = (xor_net(None), xor_data());
    // Given at the start with nothing to count: refused before anything runs.
    let e = es
        .clone()
        .run(run)
        .max_cost_usd(1.0)
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap_err();
    assert!(
        matches!(e, hyperfunc::Error::InvalidConfig { .. })
            && e.to_string().contains("Es::llm_client"),
        "{e}"
    );
    assert!(es.clone().max_cost_usd(-1.0).validate().is_err());
    assert!(es.clone().max_cost_usd(f64::NAN).validate().is_err());
    // Written: type and range are checked at once (the writer cannot see the run's clients).
    let ctl = store.control(run).source("test");
    for (k, v) in [("max_cost_usd", json!(-1)), ("max_tokens", json!(0))] {
        let e = ctl.clone().set(k, v.clone()).unwrap_err();
        assert!(e.to_string().contains(k), "{k}={v}: {e}");
    }
    let id = ctl.clone().at_gen(5).set("max_cost_usd", 2.5).unwrap();
    let report = es
        .clone()
        .run(run)
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap();
    // Applied: refused whole, with the reason, and the run goes on.
    assert_eq!(report.stop, StopReason::Generations);
    assert_eq!(report.history.len(), 12);
    let cmd = store
        .commands(run)
        .unwrap()
        .into_iter()
        .find(|c| c.id == id)
        .unwrap();
    assert_eq!(cmd.status, "rejected");
    assert!(
        cmd.reason.as_deref().unwrap().contains("no LLM client"),
        "{cmd:?}"
    );
    let events = store.events(run).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.message.starts_with("gen 5: rejected") && e.message.contains("LLM client")),
        "{events:#?}"
    );
    assert_eq!(
        store
            .effective_config(run, usize::MAX)
            .unwrap()
            .max_cost_usd,
        None
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn long_histories_come_thinned_evenly_with_the_last_row() {
    let (dir, store, es, run) = xor_run("thin", 250);
    es.run(run)
        .optimize(&xor_net(None), &xor_data(), &metric::bce())
        .await
        .unwrap();
    let all = store.generations(run).unwrap();
    assert_eq!(all.len(), 250);
    // No LLM client given to the run: no usage in its rows.
    assert!(all.iter().all(|r| r.tokens.is_none() && r.usd.is_none()));
    let thin = store.generations_thinned(run, 0, 100).unwrap();
    assert!(thin.len() <= 101, "{} rows", thin.len());
    assert_eq!((thin[0].gen, thin.last().unwrap().gen), (0, 249));
    let gaps: Vec<usize> = thin.windows(2).map(|w| w[1].gen - w[0].gen).collect();
    let even = &gaps[..gaps.len() - 1];
    assert!(even.iter().all(|g| *g == 3), "{gaps:?}");
    for r in &thin {
        assert_eq!(r, &all[r.gen]);
    }
    assert_eq!(
        store.generations_thinned(run, 200, 1000).unwrap(),
        all[200..]
    );
    assert_eq!(store.generations_from(run, 240).unwrap(), all[240..]);
    let _ = std::fs::remove_dir_all(&dir);
}
