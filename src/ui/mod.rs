//! The local web page of a run store (`hyperfunc ui`; cargo feature `ui`): the runs, their
//! curves live, the live controls, and — with the `llm` feature — the analytics chat.
//!
//! The page is one self-contained HTML file (no scripts or fonts from elsewhere) served with a
//! small JSON API:
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the page |
//! | `GET /api/runs` | every run ([`RunInfo`](crate::runs::RunInfo)) |
//! | `GET /api/runs/{id}` | one run: info, live values, effective config, commands, checkpoints |
//! | `GET /api/runs/{id}/stream` | server-sent events: `update` with new generation rows, events, commands and status |
//! | `POST /api/runs/{id}/control` | a command as a control file writes it (`{"action": "set", "values": {"lr": 0.05}}`); `422` with the reason when it is refused |
//! | `GET /api/settings` | the settings schema (name, kind, live or restart-only, doc) |
//! | `GET /api/models` | the analytics models the endpoint serves, with relative cost (`llm`) |
//! | `POST /api/ask` | `{"question", "model", "send"}`: the estimate, or (`send: true`) the answer (`llm`) |
//!
//! Runs and the page need not share a process: both go through the store, which the stream
//! polls (every 200 ms by default, so a generation shows within half a second of its row
//! reaching the store, and rows reach it at least every 250 ms).
//!
//! **Who may use it.** By default it listens on 127.0.0.1 and answers only requests whose
//! `Host` is this machine (`127.0.0.1`, `localhost`, `[::1]`), which keeps other web pages out
//! through DNS rebinding; commands must be JSON, which a page from another origin cannot send
//! without a preflight the server never grants. Another address requires a token, given as
//! `?token=` once (the page then keeps it in an HTTP-only cookie) or as `Authorization: Bearer`.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> hyperfunc::Result<()> {
//! use hyperfunc::runs::RunStore;
//! use hyperfunc::ui::Ui;
//! let store = RunStore::open("hyperfunc-runs")?;
//! let server = Ui::new(store).bind("127.0.0.1:8765".parse().unwrap()).await?;
//! println!("open {}", server.url());
//! server.serve().await
//! # }
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::runs::schema::{Kind, SETTINGS};
use crate::runs::{Command, RunId, RunStore};

const PAGE: &str = include_str!("page.html");
const COOKIE: &str = "hf_token";
/// Generation rows per stream update at most: a long history comes thinned, evenly.
const MAX_ROWS: usize = 4000;

/// The web page of one run store, before it listens.
pub struct Ui {
    store: RunStore,
    token: Option<String>,
    poll: Duration,
    #[cfg(feature = "llm")]
    llm: Option<crate::llm::LlmConfig>,
}

impl Ui {
    /// The page of `store`: no token, the stream polls every 200 ms, no analytics endpoint.
    pub fn new(store: RunStore) -> Self {
        Self {
            store,
            token: None,
            poll: Duration::from_millis(200),
            #[cfg(feature = "llm")]
            llm: None,
        }
    }

    /// Requires this token of every request (at least 16 characters of `A–Z a–z 0–9 - _`);
    /// needed to listen on anything but a loopback address.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// How often a live stream looks for new rows in the store.
    pub fn poll(mut self, every: Duration) -> Self {
        self.poll = every;
        self
    }

    /// The endpoint of the analytics chat (its `/models` fill the picker).
    #[cfg(feature = "llm")]
    pub fn llm(mut self, config: crate::llm::LlmConfig) -> Self {
        self.llm = Some(config);
        self
    }

    /// Listens on `addr` (port 0: any free port). Refused: a non-loopback address without a
    /// token, or a token too short or with characters a cookie cannot carry.
    pub async fn bind(self, addr: SocketAddr) -> Result<Server> {
        if let Some(t) = &self.token {
            let ok_chars = t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if t.len() < 16 || !ok_chars {
                return Err(Error::config(
                    "token",
                    "use at least 16 characters of A-Z a-z 0-9 - _ (or let `hyperfunc ui` make one)",
                ));
            }
        } else if !addr.ip().is_loopback() {
            return Err(Error::config(
                "addr",
                format!(
                    "{addr} is reachable from other machines: serving it needs a token \
                     (--token, or HYPERFUNC_UI_TOKEN); 127.0.0.1 needs none"
                ),
            ));
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::config("addr", format!("cannot listen on {addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::config("addr", e.to_string()))?;
        let url = match &self.token {
            Some(t) => format!("http://{local}/?token={t}"),
            None => format!("http://{local}/"),
        };
        let app = Arc::new(App {
            store: self.store,
            token: self.token,
            poll: self.poll,
            #[cfg(feature = "llm")]
            llm: self.llm,
        });
        Ok(Server {
            listener,
            local,
            url,
            router: router(app),
        })
    }
}

/// A bound page: [`Server::serve`] answers requests until the task is dropped.
pub struct Server {
    listener: tokio::net::TcpListener,
    local: SocketAddr,
    url: String,
    router: Router,
}

impl Server {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The page's address, with the token when there is one.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Answers requests (until the future is dropped or the listener fails).
    pub async fn serve(self) -> Result<()> {
        axum::serve(self.listener, self.router)
            .await
            .map_err(|e| Error::config("ui", format!("the server stopped: {e}")))
    }

    /// Serves from a thread of its own (with its own single-threaded runtime), so that busy
    /// tasks of the caller's runtime — an optimisation computing a generation in the same
    /// process — never hold up the page; it stops when the handle is dropped.
    pub fn spawn(self) -> Result<Running> {
        let err = |e: std::io::Error| Error::config("ui", format!("cannot start the server: {e}"));
        let listener = self.listener.into_std().map_err(err)?;
        let router = self.router;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hyperfunc-ui".into())
            .spawn(move || -> std::io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    tokio::select! {
                        r = axum::serve(listener, router) => r,
                        _ = stopped => Ok(()),
                    }
                })
            })
            .map_err(err)?;
        Ok(Running {
            local: self.local,
            url: self.url,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// A page served from its own thread ([`Server::spawn`]); dropping it stops the server and
/// closes its connections.
pub struct Running {
    local: SocketAddr,
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Running {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The page's address, with the token when there is one.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct App {
    store: RunStore,
    token: Option<String>,
    poll: Duration,
    #[cfg(feature = "llm")]
    llm: Option<crate::llm::LlmConfig>,
}

fn router(app: Arc<App>) -> Router {
    let r = Router::new()
        .route("/", get(page))
        .route("/api/runs", get(runs))
        .route("/api/runs/{id}", get(run))
        .route("/api/runs/{id}/stream", get(stream))
        .route("/api/runs/{id}/control", post(control))
        .route("/api/settings", get(settings));
    #[cfg(feature = "llm")]
    let r = r
        .route("/api/models", get(chat::models))
        .route("/api/ask", post(chat::ask));
    r.with_state(app)
}

type Reply<T> = std::result::Result<T, Response>;

fn api_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn from_error(e: Error) -> Response {
    let status = match &e {
        Error::RunNotFound { .. } => StatusCode::NOT_FOUND,
        Error::RunCommand { .. } | Error::InvalidConfig { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    api_error(status, e.to_string())
}

/// Runs store work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Reply<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| api_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(from_error)
}

/// Compares without an early exit, so that timing tells nothing about the token.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    matches!(name, "127.0.0.1" | "localhost" | "::1")
}

/// A request the page may answer: from this machine when there is no token, else carrying it.
struct Allowed;

impl FromRequestParts<Arc<App>> for Allowed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Reply<Self> {
        let header = |name| {
            parts
                .headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .unwrap_or("")
        };
        match &app.token {
            None => {
                let host = header(header::HOST);
                if loopback_host(host) {
                    Ok(Allowed)
                } else {
                    Err(api_error(
                        StatusCode::FORBIDDEN,
                        format!("Host `{host}` is not this machine: without a token the page answers only to 127.0.0.1, localhost and [::1]"),
                    ))
                }
            }
            Some(token) => {
                let bearer = header(header::AUTHORIZATION)
                    .strip_prefix("Bearer ")
                    .unwrap_or("");
                let cookie = header(header::COOKIE)
                    .split(';')
                    .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
                    .any(|c| same(c, token));
                let query = parts
                    .uri
                    .query()
                    .unwrap_or("")
                    .split('&')
                    .filter_map(|kv| kv.strip_prefix("token="))
                    .any(|t| same(t, token));
                if same(bearer, token) || cookie || query {
                    Ok(Allowed)
                } else {
                    Err(api_error(
                        StatusCode::UNAUTHORIZED,
                        "this page needs its token: open the address `hyperfunc ui` printed (…/?token=…) or send Authorization: Bearer TOKEN",
                    ))
                }
            }
        }
    }
}

async fn page(
    _: Allowed,
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut r = Html(PAGE).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let (Some(t), Some(_)) = (&app.token, q.get("token")) {
        let cookie = format!("{COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/");
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            h.insert(header::SET_COOKIE, v);
        }
    }
    r
}

async fn runs(_: Allowed, State(app): State<Arc<App>>) -> Reply<Json<Value>> {
    let store = app.store.clone();
    let list = blocking(move || store.list()).await?;
    Ok(Json(json!(list)))
}

async fn run(_: Allowed, State(app): State<Arc<App>>, Path(id): Path<i64>) -> Reply<Json<Value>> {
    let store = app.store.clone();
    let run = RunId(id);
    blocking(move || {
        let info = store.info(run)?;
        Ok(Json(json!({
            "info": info,
            "live": store.live_values(run, usize::MAX)?,
            "effective": store.effective_config(run, usize::MAX)?,
            "commands": commands_json(&store.commands(run)?),
            "checkpoints": store.checkpoints(run)?,
        })))
    })
    .await
}

/// Commands with their action as a control file writes it.
fn commands_json(commands: &[Command]) -> Value {
    commands
        .iter()
        .map(|c| {
            json!({
                "id": c.id, "source": c.source, "action": c.action.to_json(),
                "text": c.action.to_string(), "at_gen": c.at_gen, "status": c.status,
                "applied_gen": c.applied_gen, "reason": c.reason,
            })
        })
        .collect()
}

/// What a live stream has sent so far.
#[derive(Clone, Default)]
struct Cursor {
    next_gen: usize,
    last_event: i64,
    commands: Option<Value>,
    status: Option<Value>,
}

impl Cursor {
    /// What changed since the last update, if anything.
    fn poll(&mut self, store: &RunStore, run: RunId) -> Result<Option<Value>> {
        // The status first: a run writes its last rows before it ends, so an update that
        // says the run ended also carries its last rows.
        let info = store.info(run)?;
        let gens = store.generations_thinned(run, self.next_gen, MAX_ROWS)?;
        let events = store.events_after(run, self.last_event)?;
        let status = json!({
            "status": info.status, "stop": info.stop, "generation": info.generation, "best": info.best,
        });
        let commands = commands_json(&store.commands(run)?);
        let mut update = serde_json::Map::new();
        if let Some(last) = gens.last() {
            self.next_gen = last.gen + 1;
            update.insert("gens".into(), json!(gens));
        }
        if let Some(last) = events.last() {
            self.last_event = last.id;
            update.insert("events".into(), json!(events));
        }
        if self.commands.as_ref() != Some(&commands) {
            update.insert("commands".into(), commands.clone());
            self.commands = Some(commands);
        }
        if self.status.as_ref() != Some(&status) {
            update.insert("status".into(), status.clone());
            self.status = Some(status);
        }
        Ok((!update.is_empty()).then_some(Value::Object(update)))
    }
}

async fn stream(
    _: Allowed,
    State(app): State<Arc<App>>,
    Path(id): Path<i64>,
) -> Reply<Sse<impl Stream<Item = std::result::Result<SseEvent, Infallible>>>> {
    let run = RunId(id);
    let store = app.store.clone();
    blocking({
        let store = store.clone();
        move || store.info(run)
    })
    .await?;
    let poll = app.poll;
    let events =
        futures::stream::unfold(Some((store, Cursor::default())), move |state| async move {
            let (store, cursor) = state?;
            let mut cursor = cursor;
            loop {
                let polled = {
                    let (store, mut cursor) = (store.clone(), cursor.clone());
                    tokio::task::spawn_blocking(move || {
                        cursor.poll(&store, run).map(|u| (u, cursor))
                    })
                    .await
                };
                match polled {
                    Ok(Ok((Some(update), next))) => {
                        let ev = SseEvent::default().event("update").data(update.to_string());
                        return Some((Ok(ev), Some((store, next))));
                    }
                    Ok(Ok((None, next))) => cursor = next,
                    Ok(Err(e)) => {
                        let ev = SseEvent::default().event("failure").data(e.to_string());
                        return Some((Ok(ev), None));
                    }
                    Err(e) => {
                        let ev = SseEvent::default().event("failure").data(e.to_string());
                        return Some((Ok(ev), None));
                    }
                }
                // The store is a file other processes write: looking again is how a change
                // is seen.
                tokio::time::sleep(poll).await;
            }
        });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

async fn control(
    _: Allowed,
    State(app): State<Arc<App>>,
    Path(id): Path<i64>,
    Json(body): Json<Value>,
) -> Reply<Json<Value>> {
    let store = app.store.clone();
    let ids = blocking(move || {
        store
            .control(RunId(id))
            .source("web")
            .send_json(&body.to_string())
    })
    .await?;
    Ok(Json(json!({ "ids": ids })))
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Positive => "positive",
        Kind::NonNegative => "non_negative",
        Kind::Fraction => "fraction",
        Kind::Count => "count",
        Kind::OptionalCount => "optional_count",
        Kind::OptionalNumber => "optional_number",
        Kind::OptionalAmount => "optional_amount",
        Kind::RestartOnly => "restart_only",
    }
}

async fn settings(_: Allowed) -> Json<Value> {
    Json(
        SETTINGS
            .iter()
            .map(|s| {
                json!({
                    "name": s.name, "kind": kind_name(s.kind),
                    "live": s.kind != Kind::RestartOnly, "doc": s.doc,
                })
            })
            .collect(),
    )
}

#[cfg(feature = "llm")]
mod chat {
    //! The analytics chat: the model picker and questions.

    use super::*;
    use crate::runs::ask::{self, Analyst};

    fn no_endpoint() -> Response {
        api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no LLM endpoint: start `hyperfunc ui` with OPENAI_BASE_URL (and OPENAI_API_KEY) set",
        )
    }

    pub(super) async fn models(_: Allowed, State(app): State<Arc<App>>) -> Reply<Json<Value>> {
        let cfg = app.llm.clone().ok_or_else(no_endpoint)?;
        let (model, source) =
            ask::resolve_model(None, std::path::Path::new(".")).map_err(from_error)?;
        let choices = ask::model_choices(&cfg).await.map_err(from_error)?;
        Ok(Json(json!({
            "default": model, "source": source.to_string(), "models": choices,
        })))
    }

    #[derive(serde::Deserialize)]
    pub(super) struct Question {
        question: String,
        model: Option<String>,
        #[serde(default)]
        send: bool,
    }

    pub(super) async fn ask(
        _: Allowed,
        State(app): State<Arc<App>>,
        Json(q): Json<Question>,
    ) -> Reply<Json<Value>> {
        let cfg = app.llm.clone().ok_or_else(no_endpoint)?;
        if q.question.trim().is_empty() {
            return Err(api_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "ask a question about the runs first",
            ));
        }
        let model = q.model.as_deref().filter(|m| !m.is_empty());
        let analyst = Analyst::new(&app.store, cfg, model)
            .await
            .map_err(from_error)?;
        let estimate = analyst.estimate(&q.question).map_err(from_error)?;
        let (m, source) = analyst.model();
        let head = json!({"model": m, "source": source.to_string(), "estimate": estimate});
        if !q.send {
            return Ok(Json(head));
        }
        let a = analyst.ask(&q.question).await.map_err(from_error)?;
        Ok(Json(json!({
            "model": a.model, "source": a.source.to_string(), "estimate": a.estimate,
            "id": a.id, "answer": a.text, "tool_calls": a.tool_calls,
            "input_tokens": a.usage.input_tokens, "output_tokens": a.usage.output_tokens,
            "cost_usd": a.cost_usd,
            "proposal": a.proposal.map(|(run, action)| json!({
                "run": run.0, "command": action.to_json(), "text": action.to_string(),
            })),
        })))
    }
}
