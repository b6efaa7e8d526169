//! `hyperfunc ui`: the page in real headless Chromium (driven over WebDriver by chromedriver)
//! shows a curve point after a generation and applies a control set on the page; the HTTP
//! API's access rules, validation and analytics routes against LiteLLM.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use hyperfunc::llm::LlmConfig;
use hyperfunc::prelude::*;
use hyperfunc::runs::{Checkpoints, RunId, RunStore};
use hyperfunc::ui::Ui;
use hyperfunc::StopReason;
use serde_json::{json, Value};

use crate::common::{xor_data, xor_net};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hf-ui-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn xor_es(store: &RunStore) -> Es {
    Es::default()
        .pop_size(32)
        .sigma(0.1)
        .lr(0.1)
        .generations(100_000_000)
        .seed(7)
        .minimize()
        .progress(false)
        .autotune(false)
        .store(store.clone())
        .checkpoints(Checkpoints::default())
}

/// Serves `ui` on a free loopback port from its own thread (the run in the test's runtime
/// computes generations on its workers); its URL and the handle that stops it.
async fn serve(ui: Ui) -> (String, hyperfunc::ui::Running) {
    let server = ui.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let running = server.spawn().unwrap();
    (running.url().to_string(), running)
}

/// `GET url` as JSON.
async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// Polls `cond` until it holds (bounded): the page and the run are other processes' state.
async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while !cond().await {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A chromedriver child on a free port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        let bin = std::env::var("HYPERFUNC_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(&bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start `{bin}` ({e}): install Debian's chromium and chromium-driver (ci/peers.sh does), or set HYPERFUNC_CHROMEDRIVER")
            });
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        wait_until("chromedriver to listen", || async {
            http.get(format!("{}/status", driver.url))
                .send()
                .await
                .is_ok()
        })
        .await;
        driver
    }

    async fn browser(&self, profile: &std::path::Path) -> Browser {
        let chromium =
            std::env::var("HYPERFUNC_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1300,1100",
                format!("--user-data-dir={}", profile.display()),
            ]},
        }}});
        let http = reqwest::Client::new();
        let v: Value = http
            .post(format!("{}/session", self.url))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        Browser {
            http,
            base: format!("{}/session/{id}", self.url),
        }
    }
}

/// One WebDriver session (the W3C protocol, JSON over HTTP).
struct Browser {
    http: reqwest::Client,
    base: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        if v["value"].get("error").is_some() {
            panic!("WebDriver {path}: {}", v["value"]);
        }
        v["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    /// Runs `script` in the page (`return …` gives its value).
    async fn js(&self, script: &str) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": []}))
            .await
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.post(&format!("/element/{e}/click"), json!({})).await;
    }

    /// Clears the field and types `text` into it, key by key.
    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.post(&format!("/element/{e}/clear"), json!({})).await;
        self.post(&format!("/element/{e}/value"), json!({ "text": text }))
            .await;
    }

    async fn text(&self, css: &str) -> String {
        let css = serde_json::to_string(css).unwrap();
        self.js(&format!(
            "const e = document.querySelector({css}); return e ? e.textContent : null;"
        ))
        .await
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    async fn select(&self, css: &str, value: &str) {
        let (css, value) = (
            serde_json::to_string(css).unwrap(),
            serde_json::to_string(value).unwrap(),
        );
        self.js(&format!(
            "const s = document.querySelector({css}); s.value = {value}; s.dispatchEvent(new Event('change')); return s.value;"
        ))
        .await;
    }

    /// Ends the session (closing Chromium); dropping the browser does the same.
    async fn quit(self) {
        drop(self);
    }
}

/// Ends the session when a test fails too, so that chromedriver closes its Chromium (a plain
/// blocking request: `Drop` cannot await).
impl Drop for Browser {
    fn drop(&mut self) {
        use std::io::{Read, Write};
        let Some(rest) = self.base.strip_prefix("http://") else {
            return;
        };
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if let Ok(mut s) = std::net::TcpStream::connect(host) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let req = format!(
                "DELETE {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = s.write_all(req.as_bytes());
            let _ = s.read_to_end(&mut Vec::new());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_draws_live_curves_and_applies_controls_set_on_it() {
    let dir = temp_dir("browser");
    let store = RunStore::open(&dir).unwrap();
    // Benchmark Task A (generations of milliseconds, unlike XOR's tens of microseconds): the
    // run must outlast the browser's steps by far, however loaded the machine.
    let task = hyperfunc::runs::task::task("teacher").unwrap();
    let es = task
        .es
        .clone()
        .lr(0.1)
        .generations(100_000_000)
        .progress(false)
        .autotune(false)
        .store(store.clone())
        .checkpoints(Checkpoints::default());
    let run = store.create("web", &es).unwrap();
    // The run in a thread and runtime of its own, as if in another process: its generations
    // compute on its workers, not on those driving the browser.
    let (done, training) = tokio::sync::oneshot::channel();
    std::thread::spawn({
        let es = es.clone().run(run);
        move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let report =
                rt.block_on(es.optimize(&task.system, &task.examples, task.metric.as_ref()));
            let _ = done.send(report);
        }
    });
    let (url, server) = serve(Ui::new(store.clone()).poll(Duration::from_millis(50))).await;
    let driver = Driver::start().await;
    let page = driver.browser(&dir.join("chromium-profile")).await;
    page.goto(&url).await;

    // The run is listed; opening it streams its curves.
    let row = format!("tr[data-run=\"{run}\"]");
    wait_until("the run in the list", || async {
        page.text(&row).await.contains("web")
    })
    .await;
    page.click(&row).await;
    let last_gen = || async {
        page.js("return +document.getElementById('chart-fitness').dataset.lastGen")
            .await
            .as_i64()
            .unwrap()
    };
    // A generation that ends after the page is open shows up as a point.
    let shown = last_gen().await;
    wait_until("a new generation in the store", || async {
        store.info(run).unwrap().generation as i64 > shown + 1
    })
    .await;
    let written = store.generations(run).unwrap().last().unwrap().gen as i64;
    wait_until("the curve to reach the store's last generation", || async {
        last_gen().await >= written
    })
    .await;
    let points: i64 = page
        .js("return +document.getElementById('chart-fitness').dataset.points")
        .await
        .as_i64()
        .unwrap();
    assert!(points > shown.max(0), "{points} points");
    let polyline = page
        .js("return document.querySelector('#chart-fitness polyline.best').getAttribute('points')")
        .await;
    assert!(polyline.as_str().unwrap().split(' ').count() >= 2);

    // Pause from the page.
    page.click("#pause").await;
    wait_until("the run to pause", || async {
        store.info(run).unwrap().status == "paused"
    })
    .await;
    wait_until("the page to show it", || async {
        page.text("#run-status").await.starts_with("paused")
    })
    .await;

    // A value the page can tell is wrong is flagged inline and never sent…
    let commands = store.commands(run).unwrap().len();
    page.select("#set-name", "lr").await;
    page.type_into("#set-value", "-1").await;
    assert!(
        page.text("#control-error").await.contains("greater than 0"),
        "{}",
        page.text("#control-error").await
    );
    page.click("#set-btn").await;
    // …and one only the engine's rules refuse comes back from the server, inline, unwritten.
    page.select("#set-name", "pop_size").await;
    page.type_into("#set-value", "63").await;
    page.click("#set-btn").await;
    wait_until("the server's refusal on the page", || async {
        page.text("#control-error").await.contains("even")
    })
    .await;
    let invalid = page
        .js("return document.getElementById('set-value').getAttribute('aria-invalid')")
        .await;
    assert_eq!(invalid, json!("true"));
    assert_eq!(store.commands(run).unwrap().len(), commands);

    // lr set on the page, applied at the paused boundary once resumed, and logged.
    page.select("#set-name", "lr").await;
    page.type_into("#set-value", "0.02").await;
    page.click("#set-btn").await;
    wait_until("the page to confirm the command", || async {
        page.text("#control-ok").await.contains("written")
    })
    .await;
    let cmd = store.commands(run).unwrap().last().unwrap().clone();
    // A paused run applies commands at its boundary (the next generation runs with them).
    assert_eq!(cmd.source, "web");
    page.click("#resume").await;
    let logged = format!("lr 0.1 → 0.02 (cmd {} from web)", cmd.id);
    wait_until("the applied command in the run's log", || async {
        store
            .events(run)
            .unwrap()
            .iter()
            .any(|e| e.message.contains(&logged))
    })
    .await;
    wait_until("the page's event log and command table", || async {
        page.text("#events").await.contains(&logged)
            && page
                .js(&format!(
                    "const r = document.querySelector('tr[data-command=\"{}\"]'); return r && r.dataset.status;",
                    cmd.id
                ))
                .await
                == json!("applied")
    })
    .await;
    let applied = store.commands(run).unwrap();
    let applied_gen = applied
        .iter()
        .find(|c| c.id == cmd.id)
        .unwrap()
        .applied_gen
        .unwrap();
    wait_until("a generation with the new lr", || async {
        store.info(run).unwrap().generation > applied_gen + 1
    })
    .await;
    let rows = store.generations(run).unwrap();
    assert_eq!(
        (rows[applied_gen - 1].lr, rows[applied_gen].lr),
        (0.1, 0.02)
    );
    // The marker of the applied command is drawn on the curves.
    wait_until("the command's marker", || async {
        page.js("return document.querySelectorAll('#chart-lr line.mark').length")
            .await
            .as_u64()
            .unwrap()
            >= 1
    })
    .await;

    page.click("#stop").await;
    let report = tokio::time::timeout(Duration::from_secs(60), training)
        .await
        .expect("the run stops within 60 s of Stop on the page")
        .unwrap()
        .unwrap();
    assert_eq!(report.stop, StopReason::Command);
    wait_until("the page to show the stop", || async {
        page.text("#run-status").await.starts_with("stopped")
    })
    .await;
    // A finished run refuses commands, and the page says why.
    page.click("#snapshot").await;
    wait_until("the refusal", || async {
        page.text("#control-error")
            .await
            .contains("nothing to control")
    })
    .await;
    page.quit().await;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn other_addresses_need_a_token_and_requests_carry_it() {
    let dir = temp_dir("token");
    let store = RunStore::open(&dir).unwrap();
    let run = store.create("r", &xor_es(&store)).unwrap();

    let err = Ui::new(store.clone())
        .bind("0.0.0.0:0".parse().unwrap())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("needs a token"), "{err}");
    let err = Ui::new(store.clone())
        .token("short")
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("16 characters"), "{err}");

    let token = "tok-0123456789abcdef";
    let (url, server) = serve(Ui::new(store.clone()).token(token)).await;
    assert!(url.ends_with(&format!("/?token={token}")), "{url}");
    let base = url.split("/?").next().unwrap().to_string();
    let http = reqwest::Client::new();
    let status = |r: reqwest::Response| r.status().as_u16();
    let runs = format!("{base}/api/runs");
    assert_eq!(status(http.get(&runs).send().await.unwrap()), 401);
    assert_eq!(
        status(
            http.get(&runs)
                .bearer_auth("tok-wrong-wrong-wrong")
                .send()
                .await
                .unwrap()
        ),
        401
    );
    assert_eq!(
        status(http.get(&runs).bearer_auth(token).send().await.unwrap()),
        200
    );
    // Opening the printed address sets the cookie the page's own requests then carry.
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap();
    let r = http.get(&runs).header("cookie", pair).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let list: Value = r.json().await.unwrap();
    assert_eq!(list[0]["id"], json!(run.0));
    drop(server);

    // Without a token: only this machine's names as Host (no DNS rebinding).
    let (url, server) = serve(Ui::new(store.clone())).await;
    let runs = format!("{url}api/runs");
    assert_eq!(status(http.get(&runs).send().await.unwrap()), 200);
    let r = http
        .get(&runs)
        .header("host", "attacker.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // Commands: JSON only (a cross-site form cannot send it), checked, refused unwritten.
    let control = format!("{url}api/runs/{run}/control");
    let r = http
        .post(&control)
        .header("content-type", "text/plain")
        .body(r#"{"action":"pause"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let r = http
        .post(&control)
        .json(&json!({"action": "set", "values": {"sigma": "big"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("sigma"), "{body}");
    assert!(store.commands(run).unwrap().is_empty());
    let r = http
        .post(&control)
        .json(&json!({"action": "set", "values": {"lr": 0.05}, "at_gen": 40}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let cmds = store.commands(run).unwrap();
    assert_eq!(
        (cmds.len(), cmds[0].source.as_str(), cmds[0].at_gen),
        (1, "web", Some(40))
    );
    let r = http.get(format!("{url}api/runs/999")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let detail = get_json(&http, &format!("{url}api/runs/{run}")).await;
    assert_eq!(
        detail["commands"][0]["action"],
        json!({"action": "set", "values": {"lr": 0.05}})
    );
    let settings = get_json(&http, &format!("{url}api/settings")).await;
    let seed = settings
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "seed")
        .unwrap();
    assert_eq!(seed["live"], json!(false));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The data of the next server-sent event (a block ending in a blank line).
async fn next_update<S, B, E>(body: &mut S, text: &mut String) -> Value
where
    S: futures::Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Debug,
{
    use futures::StreamExt;
    loop {
        if let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                return serde_json::from_str(data).unwrap();
            }
            continue;
        }
        let chunk = body.next().await.expect("the stream ended").unwrap();
        text.push_str(std::str::from_utf8(chunk.as_ref()).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_sends_each_row_once_in_order_and_the_commands() {
    let dir = temp_dir("stream");
    let store = RunStore::open(&dir).unwrap();
    let es = xor_es(&store);
    let run = store.create("s", &es).unwrap();
    let training = tokio::spawn({
        let es = es.clone().run(run);
        async move {
            es.optimize(&xor_net(None), &xor_data(), &metric::bce())
                .await
        }
    });
    let (url, server) = serve(Ui::new(store.clone()).poll(Duration::from_millis(20))).await;
    let r = reqwest::get(format!("{url}api/runs/{run}/stream"))
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut body = Box::pin(r.bytes_stream());
    let mut text = String::new();
    // Rows arrive once each, in order, across many updates; with no gap unless an update
    // had more new rows than the stream sends at once (a fast run between two polls), and
    // then thinned but still ending with the newest row.
    let mut seen = 0;
    let mut next = 0;
    let mut thinned = false;
    let mut updates = 0;
    let mut stop_sent = false;
    let mut stop_listed = false;
    let mut stopped = false;
    while !(stop_listed && stopped) {
        let u = next_update(&mut body, &mut text).await;
        updates += 1;
        for row in u["gens"].as_array().into_iter().flatten() {
            let gen = row["gen"].as_u64().unwrap() as usize;
            assert!(
                gen >= next,
                "row {gen} after row {}: once, in order",
                next - 1
            );
            thinned |= gen > next;
            next = gen + 1;
            seen += 1;
        }
        if let Some(c) = u["commands"].as_array() {
            stop_listed |= c.iter().any(|c| c["action"] == json!({"action": "stop"}));
        }
        if let Some(s) = u["status"].as_object() {
            stopped = s["status"] == "stopped";
        }
        if seen >= 10 && !stop_sent {
            store.control(run).source("test").stop().unwrap();
            stop_sent = true;
        }
    }
    assert!(updates >= 2 && seen >= 10, "{updates} updates, {seen} rows");
    let report = tokio::time::timeout(Duration::from_secs(60), training)
        .await
        .expect("the run stops within 60 s")
        .unwrap()
        .unwrap();
    assert_eq!(report.stop, StopReason::Command);
    let rows = store.generations(run).unwrap().len();
    assert_eq!(next, rows, "the stream ends with the run's last row");
    if !thinned {
        assert_eq!(seen, rows);
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_chat_lists_models_with_relative_cost_and_answers() {
    let url = std::env::var("HYPERFUNC_LLM_URL")
        .expect("HYPERFUNC_LLM_URL is not set: run the suite with `ci/test`");
    let dir = temp_dir("chat");
    let store = RunStore::open(&dir).unwrap();
    let es = xor_es(&store).generations(30);
    let run = store.create("c", &es).unwrap();
    assert_eq!(run, RunId(1), "the mock analyst proposes for run 1");
    es.run(run)
        .optimize(&xor_net(None), &xor_data(), &metric::bce())
        .await
        .unwrap();
    let cfg = LlmConfig::new(&url).api_key("sk-hf-free");
    let (base, server) = serve(Ui::new(store.clone()).llm(cfg)).await;
    let http = reqwest::Client::new();
    let models = get_json(&http, &format!("{base}api/models")).await;
    let find = |id: &str| {
        models["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("{id} in {models}"))
            .clone()
    };
    // LiteLLM's /model/info prices (ci/litellm/config.yaml): mock-analyst costs 4× mock-gpt
    // on a typical question; unpriced models say so.
    assert_eq!(find("mock-gpt")["relative_cost"], json!(1.0));
    assert_eq!(find("mock-analyst")["relative_cost"], json!(4.0));
    assert_eq!(find("mock-json")["relative_cost"], Value::Null);

    let ask = |send: bool| {
        http.post(format!("{base}api/ask"))
            .json(&json!({"question": "why did run 1 plateau?", "model": "mock-analyst", "send": send}))
            .send()
    };
    let est: Value = ask(false).await.unwrap().json().await.unwrap();
    assert!(est["estimate"]["max_usd"].as_f64().unwrap() > 0.0, "{est}");
    assert!(
        est.get("answer").is_none(),
        "an estimate sends nothing: {est}"
    );
    let a: Value = ask(true).await.unwrap().json().await.unwrap();
    assert!(
        a["answer"].as_str().unwrap().contains("stopped improving"),
        "{a}"
    );
    assert!(a["cost_usd"].as_f64().unwrap() > 0.0, "{a}");
    assert!(a["id"].as_i64().unwrap() >= 1);
    // The proposal comes back as a command the page can send (after the user confirms).
    assert_eq!(a["proposal"]["run"], json!(1));
    assert_eq!(
        a["proposal"]["command"],
        json!({"action": "set", "values": {"lr": 0.02}})
    );
    let r = http
        .post(format!("{base}api/ask"))
        .json(&json!({"question": "?", "model": "mock-analist"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("mock-analyst"),
        "{body}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
