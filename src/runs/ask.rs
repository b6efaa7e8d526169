//! Questions about runs, answered by an LLM you choose through typed, read-only tools over the
//! run store (`hyperfunc runs ask "why did run 12 plateau?"`).
//!
//! The model resolves from the request, then the project file `hyperfunc.json`
//! (`{"analytics_model": "…"}`), then `HYPERFUNC_ANALYTICS_MODEL`, then
//! [`DEFAULT_ANALYTICS_MODEL`]; it is checked against the endpoint's `/models` (an unknown id is
//! refused with the closest matches). [`Analyst::estimate`] gives the most the question may cost
//! before anything is sent; the real cost, the model and where it came from are stored with the
//! answer. The model works through a small JSON protocol that any chat model can follow: it
//! asks for a tool (`{"tool": "generations", "args": {"run": 3, "every": 10}}`) or answers
//! (`{"answer": "…", "propose": {"action": "set", "values": {"lr": 0.02}}}`). A proposed
//! command is never applied here: [`apply_proposal`] sends it through the checked [`Control`]
//! path, after the user confirmed.
//!
//! [`Control`]: super::Control

use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

use super::{Action, RunId, RunStore};
use crate::error::{Error, Result};
use crate::llm::{ChatRequest, LlmClient, LlmConfig, Role, Usage};
use crate::util::now_s;

/// The model used when nothing else names one.
pub const DEFAULT_ANALYTICS_MODEL: &str = "gpt-4o-mini";

/// Tool calls allowed per question before the model must answer.
const MAX_ROUNDS: usize = 6;
/// Rows a tool returns at most (longer results are thinned evenly).
const MAX_ROWS: usize = 200;

/// Where the analytics model came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    /// The request (`--model`).
    Request,
    /// The project file `hyperfunc.json`.
    Project,
    /// `HYPERFUNC_ANALYTICS_MODEL`.
    Env,
    /// [`DEFAULT_ANALYTICS_MODEL`].
    Default,
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelSource::Request => "request",
            ModelSource::Project => "project file",
            ModelSource::Env => "HYPERFUNC_ANALYTICS_MODEL",
            ModelSource::Default => "default",
        })
    }
}

/// The analytics model: `request`, else `project_dir/hyperfunc.json`'s `analytics_model`, else
/// `HYPERFUNC_ANALYTICS_MODEL`, else the default.
pub fn resolve_model(request: Option<&str>, project_dir: &Path) -> Result<(String, ModelSource)> {
    if let Some(m) = request.filter(|m| !m.trim().is_empty()) {
        return Ok((m.trim().to_string(), ModelSource::Request));
    }
    let file = project_dir.join("hyperfunc.json");
    if let Ok(text) = std::fs::read_to_string(&file) {
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            Error::config(
                "hyperfunc.json",
                format!("{}: not JSON ({e})", file.display()),
            )
        })?;
        if let Some(m) = v["analytics_model"].as_str().filter(|m| !m.is_empty()) {
            return Ok((m.to_string(), ModelSource::Project));
        }
    }
    if let Ok(m) = std::env::var("HYPERFUNC_ANALYTICS_MODEL") {
        if !m.trim().is_empty() {
            return Ok((m.trim().to_string(), ModelSource::Env));
        }
    }
    Ok((DEFAULT_ANALYTICS_MODEL.to_string(), ModelSource::Default))
}

/// What a question may cost, before it is sent.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Estimate {
    /// Prompt tokens of the first request (estimated from its length).
    pub prompt_tokens: u64,
    /// Requests at most (tool rounds + the answer).
    pub max_requests: usize,
    /// Completion tokens per request at most.
    pub max_tokens: u32,
    /// Dollars at most, when the model has a price in the client's configuration.
    pub max_usd: Option<f64>,
}

/// A model the endpoint serves, for a picker.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelChoice {
    /// Its id.
    pub id: String,
    /// Dollars per million prompt tokens, when known.
    pub input_per_mtok: Option<f64>,
    /// Dollars per million completion tokens, when known.
    pub output_per_mtok: Option<f64>,
    /// What a typical question (3,000 prompt and 500 completion tokens) costs relative to
    /// the cheapest priced model (1.0); `None` without a price.
    pub relative_cost: Option<f64>,
}

/// The models `config`'s first endpoint serves (`/models`), each with its price (from
/// `config`, else the endpoint's `/model/info`) and its cost relative to the cheapest.
pub async fn model_choices(config: &LlmConfig) -> Result<Vec<ModelChoice>> {
    let ep = config
        .endpoints
        .first()
        .ok_or_else(|| Error::config("llm", "the client has no endpoint"))?;
    let http = reqwest::Client::new();
    let timeout = std::time::Duration::from_secs(10);
    let key = ep.api_key.as_deref();
    let ids = crate::autotune::endpoint::list_models(&http, &ep.base_url, key, timeout)
        .await?
        .ok_or_else(|| {
            Error::config(
                "llm",
                format!("{} has no /models list to choose from", ep.base_url),
            )
        })?;
    let listed = crate::autotune::endpoint::model_prices(&http, &ep.base_url, key, timeout).await;
    let typical = Usage {
        input_tokens: 3000,
        output_tokens: 500,
        cached_input_tokens: 0,
        reasoning_tokens: 0,
    };
    let mut choices: Vec<(ModelChoice, Option<f64>)> = ids
        .into_iter()
        .map(|id| {
            let price = config
                .models
                .get(&id)
                .and_then(|m| m.price)
                .or_else(|| listed.get(&id).copied());
            let cost = price.map(|p| p.cost(&typical));
            let choice = ModelChoice {
                input_per_mtok: price.map(|p| p.input_per_mtok),
                output_per_mtok: price.map(|p| p.output_per_mtok),
                relative_cost: None,
                id,
            };
            (choice, cost)
        })
        .collect();
    let cheapest = choices
        .iter()
        .filter_map(|c| c.1)
        .filter(|c| *c > 0.0)
        .fold(f64::INFINITY, f64::min);
    for (c, cost) in &mut choices {
        c.relative_cost = cost.filter(|_| cheapest.is_finite()).map(|x| x / cheapest);
    }
    Ok(choices.into_iter().map(|c| c.0).collect())
}

/// A stored answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Answer {
    /// Its id in the store.
    pub id: i64,
    /// The question.
    pub question: String,
    /// The model that answered.
    pub model: String,
    /// Where the model came from.
    pub source: ModelSource,
    /// The answer.
    pub text: String,
    /// A command the model proposes (not applied).
    pub proposal: Option<(RunId, Action)>,
    /// The tools it called, in order (`name args`).
    pub tool_calls: Vec<String>,
    /// Tokens over all requests.
    pub usage: Usage,
    /// Dollars it cost.
    pub cost_usd: f64,
    /// The estimate shown before sending.
    pub estimate: Estimate,
}

/// Answers questions about the runs of a store with one model.
pub struct Analyst {
    store: RunStore,
    client: LlmClient,
    config: LlmConfig,
    model: String,
    source: ModelSource,
    max_tokens: u32,
}

impl Analyst {
    /// Resolves the model (see [`resolve_model`]; the project file is looked for in the
    /// current directory) and checks it against `config`'s first endpoint's `/models` when it
    /// has one.
    ///
    /// A model with no price in `config` takes the one the endpoint lists at `/model/info`
    /// (LiteLLM does), so that the estimate and the recorded cost are in dollars.
    pub async fn new(store: &RunStore, mut config: LlmConfig, model: Option<&str>) -> Result<Self> {
        let (model, source) = resolve_model(model, Path::new("."))?;
        let ep = config
            .endpoints
            .first()
            .ok_or_else(|| Error::config("llm", "the client has no endpoint"))?;
        let http = reqwest::Client::new();
        if let Some(ids) = crate::autotune::endpoint::list_models(
            &http,
            &ep.base_url,
            ep.api_key.as_deref(),
            std::time::Duration::from_secs(10),
        )
        .await?
        {
            if !ids.contains(&model) {
                let close = crate::autotune::endpoint::closest_models(&ids, &model);
                return Err(Error::config(
                    "model",
                    format!(
                        "`{model}` (from the {source}) is not served by {}; closest: {close:?} (of {} models)",
                        ep.base_url,
                        ids.len()
                    ),
                ));
            }
        }
        if config.models.get(&model).and_then(|m| m.price).is_none() {
            let prices = crate::autotune::endpoint::model_prices(
                &http,
                &ep.base_url,
                ep.api_key.as_deref(),
                std::time::Duration::from_secs(10),
            )
            .await;
            if let Some(p) = prices.get(&model) {
                config.models.entry(model.clone()).or_default().price = Some(*p);
            }
        }
        let client =
            LlmClient::new(config.clone()).map_err(|e| Error::config("llm", e.to_string()))?;
        Ok(Self {
            store: store.clone(),
            client,
            config,
            model,
            source,
            max_tokens: 800,
        })
    }

    /// The model and where it came from.
    pub fn model(&self) -> (&str, ModelSource) {
        (&self.model, self.source)
    }

    fn first_request(&self, question: &str) -> Result<ChatRequest> {
        let runs: Vec<Value> = self
            .store
            .list()?
            .iter()
            .take(20)
            .map(|r| json!({"id": r.id.0, "name": r.name, "status": r.status, "generation": r.generation, "best": r.best}))
            .collect();
        Ok(ChatRequest::new(&self.model)
            .system(SYSTEM)
            .user(format!(
                "Runs (newest first): {}\n\nQuestion: {question}",
                Value::from(runs)
            ))
            .max_tokens(self.max_tokens)
            .temperature(0.0)
            .label("runs.ask")
            .no_cache())
    }

    /// The most `question` may cost.
    pub fn estimate(&self, question: &str) -> Result<Estimate> {
        let req = self.first_request(question)?;
        let prompt_tokens = u64::from(req.prompt_tokens_estimate());
        let max_requests = MAX_ROUNDS + 1;
        // Each round resends the conversation, which grows by a tool result (at most
        // MAX_ROWS rows, about 40 tokens each) and a reply.
        let growth = (MAX_ROWS as u64) * 40 + u64::from(self.max_tokens);
        let prompt_total: u64 = (0..max_requests as u64)
            .map(|i| prompt_tokens + i * growth)
            .sum();
        let max_usd = self
            .config
            .models
            .get(&self.model)
            .and_then(|m| m.price)
            .map(|p| {
                p.cost(&Usage {
                    input_tokens: prompt_total,
                    output_tokens: max_requests as u64 * u64::from(self.max_tokens),
                    cached_input_tokens: 0,
                    reasoning_tokens: 0,
                })
            });
        Ok(Estimate {
            prompt_tokens,
            max_requests,
            max_tokens: self.max_tokens,
            max_usd,
        })
    }

    /// Answers `question` (tools called as the model asks, at most six), stores and returns
    /// the answer with its real cost.
    pub async fn ask(&self, question: &str) -> Result<Answer> {
        let estimate = self.estimate(question)?;
        let mut req = self.first_request(question)?;
        let mut usage = Usage::default();
        let mut cost = 0.0;
        let mut calls = Vec::new();
        let mut told_to_answer = false;
        let (text, proposal) = loop {
            let resp = self
                .client
                .chat(req.clone())
                .await
                .map_err(|e| Error::config("llm", e.to_string()))?;
            usage.input_tokens += resp.usage.input_tokens;
            usage.output_tokens += resp.usage.output_tokens;
            usage.cached_input_tokens += resp.usage.cached_input_tokens;
            cost += resp.cost_usd;
            let reply = resp.json().ok();
            match reply.as_ref().and_then(|v| v["tool"].as_str()) {
                Some(tool) if calls.len() < MAX_ROUNDS => {
                    let args = reply.as_ref().map_or(Value::Null, |v| v["args"].clone());
                    calls.push(format!("{tool} {args}"));
                    let result = self
                        .tool(tool, &args)
                        .unwrap_or_else(|e| json!({"error": e.to_string()}));
                    req = req
                        .message(Role::Assistant, resp.text.clone())
                        .message(Role::User, format!("Result of {tool}: {result}"));
                }
                // Out of tool rounds: told once to answer, then its reply is the answer.
                Some(_) if !told_to_answer => {
                    told_to_answer = true;
                    req = req.message(Role::Assistant, resp.text.clone()).message(
                        Role::User,
                        "No more tools: answer now with {\"answer\": …}.",
                    );
                }
                Some(_) => break (resp.text.clone(), None),
                None => {
                    let text = reply
                        .as_ref()
                        .and_then(|v| v["answer"].as_str().map(str::to_string))
                        .unwrap_or_else(|| resp.text.trim().to_string());
                    let proposal = reply.as_ref().and_then(|v| proposal_of(v, &self.store));
                    break (text, proposal);
                }
            }
        };
        let conn = self.store.conn()?;
        conn.execute(
            "INSERT INTO answers(question, model, source, answer, proposal, tool_calls, input_tokens, output_tokens, cost_usd, estimate_usd, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            rusqlite::params![
                question,
                self.model,
                self.source.to_string(),
                text,
                proposal.as_ref().map(|(r, a)| json!({"run": r.0, "action": a}).to_string()),
                serde_json::to_string(&calls).unwrap_or_default(),
                usage.input_tokens as i64,
                usage.output_tokens as i64,
                cost,
                estimate.max_usd,
                now_s()
            ],
        )
        .map_err(|e| self.store.err(e))?;
        Ok(Answer {
            id: conn.last_insert_rowid(),
            question: question.into(),
            model: self.model.clone(),
            source: self.source,
            text,
            proposal,
            tool_calls: calls,
            usage,
            cost_usd: cost,
            estimate,
        })
    }

    /// One read-only tool.
    fn tool(&self, name: &str, args: &Value) -> Result<Value> {
        let s = &self.store;
        let run = |k: &str| -> Result<RunId> {
            args[k]
                .as_i64()
                .map(RunId)
                .ok_or_else(|| Error::config(k, format!("`{k}` must be a run id, got {}", args[k])))
        };
        Ok(match name {
            "runs" => js(&s.list()?),
            "run" => {
                let r = run("run")?;
                json!({"info": s.info(r)?, "live": s.live_values(r, usize::MAX)?, "checkpoints": s.checkpoints(r)?.len()})
            }
            "generations" => {
                let rows = s.generations(run("run")?)?;
                let from = args["from"].as_u64().unwrap_or(0) as usize;
                let to_g = args["to"].as_u64().map_or(usize::MAX, |t| t as usize);
                let picked: Vec<_> = rows.into_iter().filter(|r| r.gen >= from && r.gen <= to_g).collect();
                let every = args["every"]
                    .as_u64()
                    .map_or(1, |e| e.max(1) as usize)
                    .max(picked.len().div_ceil(MAX_ROWS));
                let thinned: Vec<_> = picked.into_iter().step_by(every).collect();
                json!({"every": every, "rows": thinned})
            }
            "events" => {
                let ev = s.events(run("run")?)?;
                let n = ev.len();
                json!(ev.into_iter().skip(n.saturating_sub(MAX_ROWS)).collect::<Vec<_>>())
            }
            "commands" => js(&s.commands(run("run")?)?),
            "diff" => js(&s.diff(run("a")?, run("b")?)?),
            "config_at" => js(&s.effective_config(run("run")?, args["gen"].as_u64().unwrap_or(u64::MAX) as usize)?),
            other => {
                return Err(Error::config(
                    "tool",
                    format!("unknown tool `{other}`; tools: runs, run, generations, events, commands, diff, config_at"),
                ))
            }
        })
    }
}

fn js<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// A proposal in an answer (`{"propose": {"run": 3, "action": "set", "values": {…}}}`).
fn proposal_of(v: &Value, store: &RunStore) -> Option<(RunId, Action)> {
    let p = &v["propose"];
    let run = RunId(
        p["run"]
            .as_i64()
            .or_else(|| store.list().ok()?.first().map(|r| r.id.0))?,
    );
    let name = p["action"].as_str()?;
    let payload = match name {
        "set" => Some(p["values"].to_string()),
        "clear" => Some(p["names"].to_string()),
        _ => None,
    };
    Action::from_row(name, payload.as_deref())
        .ok()
        .map(|a| (run, a))
}

/// Applies a proposed command through the checked control path (source `ask`); call it only
/// after the user confirmed.
pub fn apply_proposal(store: &RunStore, run: RunId, action: Action) -> Result<i64> {
    store.control(run).source("ask").send(action)
}

const SYSTEM: &str = "You answer questions about evolution-strategies optimisation runs stored \
by hyperfunc. Reply with exactly one JSON object and nothing else. To look at the data, ask for \
one tool: {\"tool\": NAME, \"args\": {...}}. Tools: runs {} (every run); run {\"run\": ID} \
(settings, status, live values); generations {\"run\": ID, \"from\": G, \"to\": G, \"every\": N} \
(per generation: best, mean, std, sigma, lr, pop_size, evals, failed, seconds); events {\"run\": ID} \
(commands applied, resumes, alerts); commands {\"run\": ID}; diff {\"a\": ID, \"b\": ID}; \
config_at {\"run\": ID, \"gen\": G}. When you know, answer: {\"answer\": TEXT} and, only if a \
change of a live setting (lr, sigma, pop_size, generations, patience, target, weight_decay, \
max_failure_rate, max_batch_size) would help, add \"propose\": {\"run\": ID, \"action\": \"set\", \
\"values\": {...}}. Base every claim on tool results; say so when the data cannot tell.";
