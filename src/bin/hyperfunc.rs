//! The `hyperfunc` command-line tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hyperfunc::tune::Window;

/// Train compound AI systems without backpropagation.
#[derive(Parser)]
#[command(name = "hyperfunc", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the standard ES benchmark tasks and the machine's matmul peak.
    Bench {
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// A reduced run of a few seconds (smoke test).
        #[arg(long)]
        quick: bool,
        /// Rows (candidates × examples) per batched forward.
        #[arg(long, default_value_t = hyperfunc::es::DEFAULT_MAX_BATCH_SIZE)]
        max_batch_size: usize,
    },
    /// Autotune against an exhaustive sweep on 8 shape keys: quick mode's choice vs the best
    /// (% of its rate, time ratio), two quick runs vs each other, a cache hit's cost.
    BenchAutotune {
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// 2 small keys and short timings (smoke test).
        #[arg(long)]
        quick: bool,
        /// Interleaved rounds of the exhaustive sweep.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// The LLM path: the limiter's overhead per call and, with --url, the request rate achieved
    /// against a server that limits requests per fixed window.
    #[cfg(feature = "llm")]
    BenchLlm {
        /// Base URL of an OpenAI-compatible server (e.g. http://127.0.0.1:4000/v1).
        #[arg(long)]
        url: Option<String>,
        /// API key (the one the server limits).
        #[arg(long, default_value = "")]
        key: String,
        /// Model to call.
        #[arg(long, default_value = "mock-gpt")]
        model: String,
        /// Requests the server allows per window.
        #[arg(long, default_value_t = 3)]
        window_requests: u32,
        /// The server's window, seconds.
        #[arg(long, default_value_t = 5.0)]
        window_secs: f64,
        /// Calls to send at once.
        #[arg(long, default_value_t = 12)]
        calls: u32,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Latency percentiles, error rates and cost per function, call site and model, from a trace
    /// store written by `TraceStore::save`.
    Report {
        /// The SQLite trace store.
        db: std::path::PathBuf,
        /// Only this run (default: every run in the store).
        #[arg(long)]
        run: Option<String>,
        /// Print one JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Tuned calls (`hyperfunc::tune`): what each choice learned.
    Tune {
        #[command(subcommand)]
        command: TuneCommand,
    },
    /// Measures this machine and saves the fastest tensor settings per problem shape;
    /// `optimize` picks them up. Without a subcommand: `tensor` on the benchmark MLP.
    Autotune {
        #[command(subcommand)]
        command: Option<AutotuneCommand>,
        #[command(flatten)]
        args: TensorArgs,
    },
    /// Who spends what where: costs recorded in a ledger (`hyperfunc::tune::Ledger`).
    Cost {
        #[command(subcommand)]
        command: CostCommand,
    },
    /// Trains a built-in task (`xor`, `teacher`) as a run of a run store: resumable with
    /// `--run`, controllable with `hyperfunc runs`.
    Train {
        /// The task.
        task: String,
        #[command(flatten)]
        store: StoreArg,
        /// Continue this run (from its last checkpoint) instead of starting one.
        #[arg(long)]
        run: Option<hyperfunc::runs::RunId>,
        /// The name of a new run (default: the task).
        #[arg(long)]
        name: Option<String>,
        /// Generations (default: the task's).
        #[arg(long)]
        generations: Option<usize>,
        /// Population size.
        #[arg(long)]
        pop: Option<usize>,
        /// Learning rate.
        #[arg(long)]
        lr: Option<f64>,
        /// Noise scale.
        #[arg(long)]
        sigma: Option<f64>,
        /// Run seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Checkpoint every N generations (default: adaptive, at most 2% of the run's time).
        #[arg(long)]
        checkpoint_every: Option<usize>,
        /// Save the final θ here (safetensors).
        #[arg(long)]
        save: Option<std::path::PathBuf>,
    },
    /// The web page of a run store: the runs, live curves, live controls and the analytics
    /// chat (the chat when OPENAI_BASE_URL or OPENAI_API_KEY is set).
    #[cfg(feature = "ui")]
    Ui {
        #[command(flatten)]
        store: StoreArg,
        /// Where to listen; an address other machines can reach needs a token.
        #[arg(long, default_value = "127.0.0.1:8765")]
        addr: std::net::SocketAddr,
        /// The token every request must carry (default: $HYPERFUNC_UI_TOKEN; made up and
        /// printed when --addr is not a loopback address).
        #[arg(long)]
        token: Option<String>,
    },
    /// Compares a candidate run with a baseline run on the same data and exits 1 when the
    /// candidate's mean score dropped by more than --max-drop (for CI pipelines).
    Gate {
        #[command(flatten)]
        store: StoreArg,
        /// The baseline run.
        #[arg(long)]
        baseline: hyperfunc::runs::RunId,
        /// The candidate run (default: the newest other run with such an evaluation).
        #[arg(long)]
        candidate: Option<hyperfunc::runs::RunId>,
        /// The metric, as recorded with `RunStore::record_eval` (higher is better).
        #[arg(long)]
        metric: String,
        /// The largest drop of the mean score tolerated.
        #[arg(long, default_value_t = 0.0)]
        max_drop: f64,
        /// One JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Runs of a run store: list, show, live control, replay, diff, plot.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
        #[command(flatten)]
        store: StoreArg,
    },
    /// The stored LLM calls of a ledger: costly operations, fragments, cache candidates and
    /// breakers, observations; before/after comparisons.
    Llm {
        #[command(subcommand)]
        command: LlmCommand,
    },
}

#[derive(clap::Args)]
struct StoreArg {
    /// The run store directory (default: $HYPERFUNC_RUNS or ./hyperfunc-runs).
    #[arg(long, global = true)]
    store: Option<std::path::PathBuf>,
}

impl StoreArg {
    fn open(&self) -> hyperfunc::Result<hyperfunc::runs::RunStore> {
        let dir = self.store.clone().unwrap_or_else(|| {
            std::env::var_os("HYPERFUNC_RUNS")
                .map(Into::into)
                .unwrap_or_else(|| "hyperfunc-runs".into())
        });
        hyperfunc::runs::RunStore::open(dir)
    }
}

#[derive(Subcommand)]
enum RunsCommand {
    /// Every run: id, name, status, generations, best.
    List {
        /// One JSON document.
        #[arg(long)]
        json: bool,
    },
    /// One run: settings, live values, last generations, events, checkpoints.
    Show {
        /// The run id.
        run: hyperfunc::runs::RunId,
        /// One JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Sets live settings of a running run: `hyperfunc runs set 3 lr=0.05 sigma=0.02`.
    Set {
        /// The run id.
        run: hyperfunc::runs::RunId,
        /// `name=value` pairs (applied together, all or nothing).
        #[arg(required = true)]
        values: Vec<String>,
        /// Apply at the boundary before this generation.
        #[arg(long)]
        at_gen: Option<usize>,
    },
    /// Clears live values (back to the run's settings and schedules).
    Clear {
        /// The run id.
        run: hyperfunc::runs::RunId,
        /// Setting names.
        #[arg(required = true)]
        names: Vec<String>,
        /// Apply at the boundary before this generation.
        #[arg(long)]
        at_gen: Option<usize>,
    },
    /// Pauses at the next generation boundary.
    Pause {
        /// The run id.
        run: hyperfunc::runs::RunId,
    },
    /// Resumes a paused run.
    Resume {
        /// The run id.
        run: hyperfunc::runs::RunId,
    },
    /// Stops at the next boundary (`--now`: cancel the generation in flight).
    Stop {
        /// The run id.
        run: hyperfunc::runs::RunId,
        /// Cancel the generation in flight; the final checkpoint is still written.
        #[arg(long)]
        now: bool,
        /// Stop at the boundary before this generation.
        #[arg(long)]
        at_gen: Option<usize>,
    },
    /// Writes a checkpoint at the next boundary that retention keeps.
    Snapshot {
        /// The run id.
        run: hyperfunc::runs::RunId,
    },
    /// Re-runs a run of a built-in task from its settings and logged commands and checks
    /// that θ comes out bit for bit (exit 1 when it does not).
    Replay {
        /// The run id.
        run: hyperfunc::runs::RunId,
    },
    /// Asks an LLM about the runs (it reads them through typed, read-only tools). The
    /// endpoint comes from OPENAI_BASE_URL / OPENAI_API_KEY; the model from --model, then
    /// ./hyperfunc.json's `analytics_model`, then HYPERFUNC_ANALYTICS_MODEL, then a default.
    #[cfg(feature = "llm")]
    Ask {
        /// The question.
        question: String,
        /// The model.
        #[arg(long)]
        model: Option<String>,
        /// Apply a command the model proposes without asking (it is still checked).
        #[arg(long)]
        yes: bool,
    },
    /// Settings, commands and curves of two runs.
    Diff {
        /// The first run.
        a: hyperfunc::runs::RunId,
        /// The second run.
        b: hyperfunc::runs::RunId,
        /// One JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Curves of fitness, σ and lr (markers where a command applied) as SVG or PNG.
    #[cfg(feature = "plot")]
    Plot {
        /// The runs.
        #[arg(required = true)]
        runs: Vec<hyperfunc::runs::RunId>,
        /// Output file (`.svg` or `.png`).
        #[arg(long, short)]
        out: std::path::PathBuf,
        /// The x axis: `gen`, `evals`, `seconds` or `usd` (LLM dollars, from `Es::llm_client`).
        #[arg(long, default_value = "gen")]
        x: String,
    },
}

#[derive(Subcommand)]
enum AutotuneCommand {
    /// Tune the tile size and rows per batch of a population evaluation.
    Tensor {
        #[command(flatten)]
        args: TensorArgs,
    },
    /// What an OpenAI-compatible endpoint tolerates: model list, declared limits, a latency
    /// model, a concurrency sweep (stops at the first 429 and waits out Retry-After).
    #[cfg(feature = "llm")]
    Endpoint {
        /// Base URL including the version path.
        #[arg(long)]
        endpoint: String,
        /// The model.
        #[arg(long)]
        model: String,
        /// Bearer key (default: OPENAI_API_KEY).
        #[arg(long)]
        key: Option<String>,
        /// Most requests to send (quick 150, --full 2000).
        #[arg(long)]
        max_requests: Option<u64>,
        /// Wall-clock budget (`2m`, `90s`).
        #[arg(long, value_parser = budget)]
        budget: Option<std::time::Duration>,
        /// 2 000 requests and 15 minutes at most.
        #[arg(long)]
        full: bool,
        /// Do not save the result.
        #[arg(long)]
        no_save: bool,
        /// Print JSON instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// `tensor`, then `endpoint` when an endpoint and model are given (or OPENAI_BASE_URL and
    /// OPENAI_MODEL are set).
    #[cfg(feature = "llm")]
    All {
        #[command(flatten)]
        args: TensorArgs,
        /// Base URL of the endpoint.
        #[arg(long)]
        endpoint: Option<String>,
        /// The model.
        #[arg(long)]
        model: Option<String>,
    },
    /// The saved records (all, or those whose key starts with KEY).
    Show {
        /// Key prefix.
        key: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Times each saved record (all, or those whose key starts with KEY) against the default
    /// again; a record 20% below what it promised is marked stale.
    Verify {
        /// Key prefix.
        key: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Removes saved records (all, or those whose key starts with KEY).
    Clear {
        /// Key prefix.
        key: Option<String>,
    },
}

#[derive(clap::Args, Clone)]
struct TensorArgs {
    /// MLP layer sizes, comma-separated (default: the benchmark's).
    #[arg(long, value_delimiter = ',', default_value = "64,32,10")]
    mlp: Vec<usize>,
    /// Population sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256")]
    pop: Vec<usize>,
    /// Examples per evaluation.
    #[arg(long, default_value_t = 256)]
    rows: usize,
    /// Low-rank noise of this rank (dense when absent).
    #[arg(long)]
    rank: Option<usize>,
    /// About 20 s per shape (default).
    #[arg(long, conflicts_with_all = ["normal", "full"])]
    quick: bool,
    /// About a minute per shape.
    #[arg(long, conflicts_with = "full")]
    normal: bool,
    /// Every candidate, minutes per shape.
    #[arg(long)]
    full: bool,
    /// Wall-clock budget per shape (`90s`, `2m`), overriding the mode's.
    #[arg(long, value_parser = budget)]
    budget: Option<std::time::Duration>,
    /// Do not save the result.
    #[arg(long)]
    no_save: bool,
    /// Also write it to ./hyperfunc.autotune.json (to check in).
    #[arg(long)]
    project: bool,
    /// Save even a low-confidence result.
    #[arg(long)]
    force: bool,
    /// Print the records as JSON instead of the report.
    #[arg(long)]
    json: bool,
}

/// A wall-clock budget such as `90s` or `2m` (at least a second).
fn budget(s: &str) -> Result<std::time::Duration, String> {
    hyperfunc::tune::parse_span(s)
        .map(|secs| std::time::Duration::from_secs(secs.max(1) as u64))
        .map_err(|e| e.to_string())
}

fn autotune_tensor(a: &TensorArgs) -> Result<(), Box<dyn std::error::Error>> {
    use hyperfunc::autotune::{tensor, Mode, Store, SystemProfile};
    let mode = if a.full {
        Mode::Full
    } else if a.normal {
        Mode::Normal
    } else {
        Mode::Quick
    };
    let mut opts = tensor::Options::new(mode);
    opts.budget = a.budget;
    let store = Store::default_location();
    let profile = SystemProfile::detect();
    if !a.json {
        println!("{}", profile.to_markdown());
    }
    let mut records = Vec::new();
    for &pop in &a.pop {
        let probe = tensor::MlpProbe::new(&a.mlp, pop, a.rows, a.rank)?;
        eprintln!(
            "autotune: {} ({mode:?}, budget {:?})",
            hyperfunc::autotune::tensor::Probe::key(&probe),
            opts.budget.unwrap_or(mode.budget())
        );
        opts.progress = Some(hyperfunc::autotune::OnProgress::terminal());
        let r = tensor::tune(&probe, &opts)?;
        if !a.json {
            println!("{}", r.to_markdown());
        }
        if !a.no_save {
            match store.save(&r, a.force) {
                Ok(p) => eprintln!("saved {}", p.display()),
                Err(e) => eprintln!("not saved: {e}"),
            }
            if a.project {
                eprintln!("saved {}", store.save_project(&r)?.display());
            }
        }
        records.push(r);
    }
    if a.json {
        println!("{}", serde_json::to_string(&records)?);
    }
    Ok(())
}

#[cfg(feature = "llm")]
#[allow(clippy::too_many_arguments)]
fn autotune_endpoint(
    endpoint: &str,
    model: &str,
    key: Option<String>,
    max_requests: Option<u64>,
    budget: Option<std::time::Duration>,
    full: bool,
    no_save: bool,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    use hyperfunc::autotune::endpoint;
    let key = key.or_else(|| std::env::var("OPENAI_API_KEY").ok());
    let mut probe = endpoint::EndpointProbe::new(endpoint, key.as_deref(), model);
    if full {
        probe = probe.full();
    }
    if let Some(n) = max_requests {
        probe.max_requests = n;
    }
    if let Some(b) = budget {
        probe.budget = b;
    }
    probe.progress = Some(hyperfunc::autotune::OnProgress::terminal());
    let rt = tokio::runtime::Runtime::new()?;
    let r = rt.block_on(endpoint::tune(&probe))?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("{}", r.to_markdown());
    }
    if !no_save {
        let p = hyperfunc::autotune::Store::default_location().save_endpoint(&r)?;
        eprintln!("saved {}", p.display());
    }
    Ok(())
}

#[derive(Subcommand)]
enum CostCommand {
    /// Spend per caller, endpoint, model, label, run, user or day, from the rollups.
    Report {
        /// The ledger file.
        #[arg(long)]
        store: std::path::PathBuf,
        /// Dimensions, comma-separated: caller, endpoint, model, label, run, user, day.
        #[arg(long, default_value = "caller")]
        by: String,
        /// Only the last span (`30d`, `12h`, `2w`) or from a date (`2026-11-01`).
        #[arg(long)]
        since: Option<String>,
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// Also draw a bar chart of the top groups (`.svg` or `.png`).
        #[arg(long)]
        chart: Option<std::path::PathBuf>,
        /// Groups in the chart.
        #[arg(long, default_value_t = 15)]
        top: usize,
    },
    /// Re-prices the stored LLM calls with a JSON price table
    /// (`[{"model", "from": "YYYY-MM-DD", "input", "output", "cache_read"?, "cache_write"?}]`,
    /// dollars per million tokens) and rebuilds the rollups.
    Reprice {
        /// The ledger file.
        #[arg(long)]
        store: std::path::PathBuf,
        /// The price table.
        #[arg(long)]
        prices: std::path::PathBuf,
        /// Only calls from this span or date on.
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Subcommand)]
enum LlmCommand {
    /// Costly operations, latency bottlenecks, frequent fragments, cache candidates and
    /// breakers, unused and unexpected fragments, observations.
    Report {
        /// The ledger file.
        #[arg(long)]
        store: std::path::PathBuf,
        /// Only the last span (`30d`, `12h`) or from a date.
        #[arg(long)]
        since: Option<String>,
        /// The provider's minimum cacheable prefix, tokens.
        #[arg(long, default_value_t = 1024)]
        min_cacheable: u64,
        /// The provider's cache lifetime, seconds.
        #[arg(long, default_value_t = 300.0)]
        cache_lifetime: f64,
        /// JSON price table for the cache saving estimate.
        #[arg(long)]
        prices: Option<std::path::PathBuf>,
        /// Print one JSON document instead of Markdown.
        #[arg(long)]
        json: bool,
    },
    /// Tokens, dollars, latency and quality per call between two windows, with 95% intervals.
    /// A window is `run:ID`, `FROM..TO` (dates) or a span back from now (`24h`).
    Compare {
        /// The ledger file.
        #[arg(long)]
        store: std::path::PathBuf,
        /// The window before the change.
        before: String,
        /// The window after it.
        after: String,
        /// Only this label.
        #[arg(long)]
        label: Option<String>,
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// An offline judge pass over stored answers of several models to the same prompts:
    /// pairwise in both orders, points extracted and matched, unique catches validated; a
    /// per-model ranking with bootstrap intervals and cost per point. The judge is reached
    /// through `OPENAI_BASE_URL` / `OPENAI_API_KEY`; judgements are cached in the ledger file, so
    /// an interrupted pass resumes.
    #[cfg(feature = "llm")]
    Judge {
        /// The ledger file.
        #[arg(long)]
        store: std::path::PathBuf,
        /// The judge model.
        #[arg(long)]
        judge_model: String,
        /// Only answers from this span or date on.
        #[arg(long)]
        since: Option<String>,
        /// Only prompts answered by at least this many models.
        #[arg(long, default_value_t = 2)]
        min_models: usize,
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `30d` → now − 30 days; `2026-11-01` → that day.
fn since(s: Option<&str>) -> Result<Option<i64>, hyperfunc::Error> {
    s.map(hyperfunc::tune::parse_since).transpose()
}

fn ledger(store: &std::path::Path) -> Result<hyperfunc::tune::Ledger, Box<dyn std::error::Error>> {
    if !store.exists() {
        return Err(format!("no ledger at {}", store.display()).into());
    }
    Ok(hyperfunc::tune::Ledger::open(store)?)
}

#[derive(Subcommand)]
enum TuneCommand {
    /// Per label and context: each choice's calls, success rate, mean reward with a 95%
    /// interval, cost, and the current winner.
    Report {
        /// The SQLite tune store.
        #[arg(long)]
        store: std::path::PathBuf,
        /// Only this label.
        #[arg(long)]
        label: Option<String>,
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn runs_command(
    store: &hyperfunc::runs::RunStore,
    command: RunsCommand,
    rt: &tokio::runtime::Runtime,
) -> Result<(), Box<dyn std::error::Error>> {
    use hyperfunc::runs::Action;
    let ctl = |run, at_gen: Option<usize>| {
        let c = store.control(run).source("cli");
        match at_gen {
            Some(g) => c.at_gen(g),
            None => c,
        }
    };
    let sent = |id: i64, what: &str| {
        println!("cmd {id}: {what} (applied at the next generation boundary)")
    };
    match command {
        RunsCommand::List { json } => {
            let runs = store.list()?;
            if json {
                println!("{}", serde_json::to_string(&runs)?);
            } else {
                println!(
                    "{:>4}  {:<16} {:<9} {:>6}  {:>12}  task",
                    "id", "name", "status", "gens", "best"
                );
                for r in runs {
                    println!(
                        "{:>4}  {:<16} {:<9} {:>6}  {:>12}  {}",
                        r.id.0,
                        r.name,
                        r.status,
                        r.generation,
                        r.best.map_or("-".into(), |b| format!("{b:.6}")),
                        r.task.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        RunsCommand::Show { run, json } => {
            let info = store.info(run)?;
            let live = store.live_values(run, usize::MAX)?;
            let gens = store.generations(run)?;
            let events = store.events(run)?;
            let ckpts = store.checkpoints(run)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"run": info, "live": live, "generations": gens,
                        "events": events, "checkpoints": ckpts, "commands": store.commands(run)?})
                );
                return Ok(());
            }
            println!(
                "run {} `{}` ({}) — {}{}",
                info.id,
                info.name,
                info.task.as_deref().unwrap_or("no task"),
                info.status,
                info.stop
                    .as_deref()
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default()
            );
            println!("hyperfunc {} on {}", info.version, info.fingerprint);
            println!("settings: {}", serde_json::to_string(&info.config)?);
            if !live.is_empty() {
                println!("live: {}", serde_json::Value::Object(live));
            }
            println!("{} generations; last:", gens.len());
            for g in gens.iter().rev().take(5).rev() {
                println!(
                    "  gen {:>5}  best {:>12.6}  mean {:>12.6}  sigma {:.4}  lr {:.4}  pop {}",
                    g.gen, g.best, g.mean, g.sigma, g.lr, g.pop_size
                );
            }
            println!("events:");
            for e in &events {
                println!("  [{}] {}", e.kind, e.message);
            }
            println!("checkpoints:");
            for c in &ckpts {
                println!(
                    "  gen {:>5}  {:<8} {:>8} bytes  {}",
                    c.gen,
                    c.kind,
                    c.bytes,
                    c.file.display()
                );
            }
        }
        RunsCommand::Set {
            run,
            values,
            at_gen,
        } => {
            let mut patch = serde_json::Map::new();
            for v in &values {
                let (k, v) = hyperfunc::runs::schema::parse_assignment(v)?;
                patch.insert(k, v);
            }
            let id = ctl(run, at_gen).set_many(patch)?;
            sent(id, &format!("set {}", values.join(" ")));
        }
        RunsCommand::Clear { run, names, at_gen } => {
            let id = ctl(run, at_gen).send(Action::Clear(names.clone()))?;
            sent(id, &format!("clear {}", names.join(" ")));
        }
        RunsCommand::Pause { run } => sent(ctl(run, None).pause()?, "pause"),
        RunsCommand::Resume { run } => sent(ctl(run, None).resume()?, "resume"),
        RunsCommand::Stop { run, now, at_gen } => {
            let c = ctl(run, at_gen);
            if now {
                sent(c.stop_now()?, "stop --now");
            } else {
                sent(c.stop()?, "stop");
            }
        }
        RunsCommand::Snapshot { run } => sent(ctl(run, None).snapshot()?, "snapshot"),
        RunsCommand::Replay { run } => {
            let info = store.info(run)?;
            let task = info.task.clone().ok_or_else(|| {
                format!("run {run} has no built-in task; replay it from Rust with Es::replay")
            })?;
            let t = hyperfunc::runs::task::task(&task)?;
            let es = hyperfunc::Es::default()
                .with_run_config(&info.config)
                .progress(false)
                .store(store.clone())
                .replay(run);
            let report = rt.block_on(es.optimize(&t.system, &t.examples, t.metric.as_ref()))?;
            let same = report.theta.bit_eq(&store.theta(run)?)?;
            println!(
                "{}",
                serde_json::json!({"run": run.0, "generations": report.history.len(), "theta_bit_identical": same})
            );
            if !same {
                return Err(format!("replay of run {run} did not reproduce its θ").into());
            }
        }
        #[cfg(feature = "llm")]
        RunsCommand::Ask {
            question,
            model,
            yes,
        } => {
            use std::io::IsTerminal;
            let cfg = hyperfunc::llm::LlmConfig::from_env()?;
            let analyst = rt.block_on(hyperfunc::runs::ask::Analyst::new(
                store,
                cfg,
                model.as_deref(),
            ))?;
            let (m, source) = analyst.model();
            let est = analyst.estimate(&question)?;
            println!(
                "model {m} ({source}); at most {} requests of ≤ {} completion tokens, first prompt ≈ {} tokens; {}",
                est.max_requests,
                est.max_tokens,
                est.prompt_tokens,
                est.max_usd.map_or("price unknown (no price configured for the model)".into(), |u| format!("≤ ${u:.4}"))
            );
            let a = rt.block_on(analyst.ask(&question))?;
            for c in &a.tool_calls {
                println!("  tool {c}");
            }
            println!("\n{}\n", a.text);
            println!(
                "cost ${:.6} ({} prompt + {} completion tokens); answer {} stored",
                a.cost_usd, a.usage.input_tokens, a.usage.output_tokens, a.id
            );
            if let Some((run, action)) = a.proposal {
                let what = format!("{run}: {action}");
                let confirmed = yes || {
                    if std::io::stdin().is_terminal() {
                        eprint!("proposed for run {what}: apply? [y/N] ");
                        let mut line = String::new();
                        std::io::stdin().read_line(&mut line)?;
                        line.trim().eq_ignore_ascii_case("y")
                    } else {
                        false
                    }
                };
                if confirmed {
                    let id = hyperfunc::runs::ask::apply_proposal(store, run, action)?;
                    println!("proposal applied as cmd {id} (source ask)");
                } else {
                    println!("proposed for run {what}: not applied (--yes applies it)");
                }
            }
        }
        RunsCommand::Diff { a, b, json } => {
            let d = store.diff(a, b)?;
            if json {
                println!("{}", serde_json::to_string(&d)?);
            } else {
                println!("runs {a} and {b}");
                println!(
                    "settings: {}",
                    if d.config.is_empty() {
                        "same".to_string()
                    } else {
                        d.config.join(", ")
                    }
                );
                println!("generations: {} / {}", d.generations.0, d.generations.1);
                println!(
                    "best: {:.6} / {:.6}; last mean: {:.6} / {:.6}",
                    d.best.0, d.best.1, d.last_mean.0, d.last_mean.1
                );
                match d.first_divergence {
                    None => println!("curves: identical bit for bit"),
                    Some(g) => println!("curves: first differ at gen {g}"),
                }
                for (run, cmds) in [(a, &d.commands_a), (b, &d.commands_b)] {
                    for c in cmds {
                        println!("  run {run}: {c}");
                    }
                }
            }
        }
        #[cfg(feature = "plot")]
        RunsCommand::Plot { runs, out, x } => {
            hyperfunc::runs::plot(store, &runs, &x, &out)?;
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // HYPERFUNC_THREADS sets the threads of the matrix kernels (candle and rayon read
    // RAYON_NUM_THREADS). Set before any thread pool exists.
    if let Ok(n) = std::env::var("HYPERFUNC_THREADS") {
        let n: usize = n
            .parse()
            .map_err(|_| format!("HYPERFUNC_THREADS must be a positive integer, got `{n}`"))?;
        if n == 0 {
            return Err("HYPERFUNC_THREADS must be at least 1".into());
        }
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Train {
            task,
            store,
            run,
            name,
            generations,
            pop,
            lr,
            sigma,
            seed,
            checkpoint_every,
            save,
        } => {
            let store = store.open()?;
            let t = hyperfunc::runs::task::task(&task)?;
            let mut es = t.es;
            if let Some(g) = generations {
                es = es.generations(g);
            }
            if let Some(p) = pop {
                es = es.pop_size(p);
            }
            if let Some(v) = lr {
                es = es.lr(v);
            }
            if let Some(v) = sigma {
                es = es.sigma(v);
            }
            if let Some(v) = seed {
                es = es.seed(v);
            }
            let mut es = es.store(store.clone()).run_task(task.clone()).checkpoints(
                hyperfunc::runs::Checkpoints {
                    every: checkpoint_every,
                    ..Default::default()
                },
            );
            let id = match run {
                Some(id) => id,
                None => {
                    let id =
                        store.create_task(name.as_deref().unwrap_or(&task), Some(&task), &es)?;
                    eprintln!("run {id} in {}", store.dir().display());
                    id
                }
            };
            es = es.run(id);
            let report = rt.block_on(es.optimize(&t.system, &t.examples, t.metric.as_ref()))?;
            if let Some(path) = save {
                report.theta.save(path)?;
            }
            println!(
                "{}",
                serde_json::json!({
                    "run": id.0,
                    "task": task,
                    "generations": report.history.len(),
                    "stop": format!("{:?}", report.stop),
                    "stop_detail": report.stop_detail,
                    "final_fitness": report.final_fitness,
                    "seconds": report.seconds,
                })
            );
        }
        Command::Runs { command, store } => runs_command(&store.open()?, command, &rt)?,
        #[cfg(feature = "ui")]
        Command::Ui { store, addr, token } => {
            use rand::Rng;
            let token = token
                .or_else(|| std::env::var("HYPERFUNC_UI_TOKEN").ok())
                .filter(|t| !t.is_empty())
                .or_else(|| {
                    (!addr.ip().is_loopback()).then(|| {
                        rand::rng()
                            .sample_iter(rand::distr::Alphanumeric)
                            .take(32)
                            .map(char::from)
                            .collect()
                    })
                });
            let runs = store.open()?;
            let dir = runs.dir().display().to_string();
            let mut ui = hyperfunc::ui::Ui::new(runs);
            if let Some(t) = token {
                ui = ui.token(t);
            }
            #[cfg(feature = "llm")]
            if ["OPENAI_BASE_URL", "OPENAI_API_KEY"]
                .iter()
                .any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty()))
            {
                ui = ui.llm(hyperfunc::llm::LlmConfig::from_env()?);
            }
            let server = rt.block_on(ui.bind(addr))?;
            println!("{}", server.url());
            use std::io::Write;
            std::io::stdout().flush()?;
            eprintln!("serving the runs of {dir}; Ctrl-C stops");
            rt.block_on(server.serve())?;
        }
        Command::Gate {
            store,
            baseline,
            candidate,
            metric,
            max_drop,
            json,
        } => {
            let store = store.open()?;
            if !(max_drop.is_finite() && max_drop >= 0.0) {
                return Err(format!("--max-drop must be >= 0, got {max_drop}").into());
            }
            let candidate = match candidate {
                Some(c) => c,
                None => store.latest_evaluated(baseline, &metric)?.ok_or_else(|| {
                    format!("no run other than {baseline} has a `{metric}` evaluation; give --candidate")
                })?,
            };
            let c = store.compare(baseline, candidate, &metric)?;
            let regressed = c.regressed(max_drop);
            if json {
                println!(
                    "{}",
                    serde_json::json!({"comparison": c, "max_drop": max_drop, "regressed": regressed})
                );
            } else {
                println!(
                    "{} on {} v{} ({}, {} paired items): baseline run {} {:.4}, candidate run {} {:.4}, diff {:+.4} (95% CI {:+.4} … {:+.4}{})",
                    c.metric, c.dataset.name, c.dataset.version, c.split, c.paired, c.baseline,
                    c.baseline_mean, c.candidate, c.candidate_mean, c.diff, c.ci95.0, c.ci95.1,
                    if c.significant() { ", significant" } else { "" }
                );
            }
            if regressed {
                return Err(format!(
                    "regression: {} dropped {:.4} (more than --max-drop {max_drop}) from run {} to run {}",
                    c.metric, -c.diff, c.baseline, c.candidate
                )
                .into());
            }
        }
        Command::Bench {
            json,
            quick,
            max_batch_size,
        } => {
            let cfg = hyperfunc::bench::BenchConfig {
                quick,
                max_batch_size,
            };
            let report = rt.block_on(hyperfunc::bench::run(&cfg))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", hyperfunc::bench::render(&report));
            }
        }
        Command::BenchAutotune {
            json,
            quick,
            rounds,
        } => {
            use hyperfunc::autotune::bench;
            let min_sample = std::time::Duration::from_millis(if quick { 2 } else { 40 });
            let b = bench::run(&bench::suite(quick), min_sample, rounds)?;
            if json {
                println!("{}", serde_json::to_string(&b)?);
            } else {
                print!("{}", bench::render(&b));
            }
        }
        #[cfg(feature = "llm")]
        Command::BenchLlm {
            url,
            key,
            model,
            window_requests,
            window_secs,
            calls,
            json,
        } => {
            use hyperfunc::llm::bench;
            if !(window_secs.is_finite() && window_secs > 0.0) {
                return Err("--window-secs must be a positive number of seconds".into());
            }
            let limiter_ns_per_call = rt.block_on(bench::limiter_overhead_ns(100_000));
            let rate = match url {
                Some(url) => Some(rt.block_on(bench::rate(
                    &url,
                    &key,
                    &model,
                    calls,
                    window_requests,
                    std::time::Duration::from_secs_f64(window_secs),
                ))?),
                None => None,
            };
            let b = bench::LlmBench {
                limiter_ns_per_call,
                rate,
            };
            if json {
                println!("{}", serde_json::to_string(&b)?);
            } else {
                println!("limiter overhead: {:.0} ns per call", b.limiter_ns_per_call);
                if let Some(r) = &b.rate {
                    println!(
                        "rate: {} calls against {} per {} s (R = {:.1}/min): {:.2} s, ideal {:.1} s",
                        r.calls, r.limit_requests, r.window_s, r.limit_rpm, r.elapsed_s, r.ideal_s
                    );
                    println!(
                        "fraction of R achieved {:.3}; 429s absorbed {}; errors surfaced {}",
                        r.rate_fraction, r.throttled, r.surfaced_errors
                    );
                }
            }
        }
        Command::Report { db, run, json } => {
            if !db.exists() {
                return Err(format!("no trace store at {}", db.display()).into());
            }
            let store = hyperfunc::observe::TraceStore::open(&db)?;
            let report = store.report(run.as_deref())?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.to_markdown());
            }
        }
        Command::Tune {
            command: TuneCommand::Report { store, label, json },
        } => {
            if !store.exists() {
                return Err(format!("no tune store at {}", store.display()).into());
            }
            let report = hyperfunc::tune::Tuner::open(&store)?.report(label.as_deref())?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.to_table());
            }
        }
        Command::Autotune { command, args } => match command {
            None => autotune_tensor(&args)?,
            Some(AutotuneCommand::Tensor { args }) => autotune_tensor(&args)?,
            #[cfg(feature = "llm")]
            Some(AutotuneCommand::Endpoint {
                endpoint,
                model,
                key,
                max_requests,
                budget,
                full,
                no_save,
                json,
            }) => autotune_endpoint(
                &endpoint,
                &model,
                key,
                max_requests,
                budget,
                full,
                no_save,
                json,
            )?,
            #[cfg(feature = "llm")]
            Some(AutotuneCommand::All {
                args,
                endpoint,
                model,
            }) => {
                autotune_tensor(&args)?;
                let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
                match (
                    endpoint.or_else(|| var("OPENAI_BASE_URL")),
                    model.or_else(|| var("OPENAI_MODEL")),
                ) {
                    (Some(e), Some(m)) => autotune_endpoint(
                        &e,
                        &m,
                        None,
                        None,
                        args.budget,
                        args.full,
                        args.no_save,
                        args.json,
                    )?,
                    _ => eprintln!(
                        "no endpoint tuned: give --endpoint and --model (or OPENAI_BASE_URL and \
                         OPENAI_MODEL)"
                    ),
                }
            }
            Some(AutotuneCommand::Show { key, json }) => {
                let store = hyperfunc::autotune::Store::default_location();
                let records: Vec<_> = store
                    .list()
                    .into_iter()
                    .filter(|r| r.key.starts_with(key.as_deref().unwrap_or("")))
                    .collect();
                if json {
                    println!("{}", serde_json::to_string(&records)?);
                } else if records.is_empty() {
                    println!("no autotune records in {}", store.dir.display());
                } else {
                    for r in &records {
                        println!("{}", r.to_markdown());
                    }
                }
            }
            Some(AutotuneCommand::Verify { key, json }) => {
                use hyperfunc::autotune::tensor;
                let store = hyperfunc::autotune::Store::default_location();
                let fp = hyperfunc::autotune::SystemProfile::detect().fingerprint();
                let mut out = Vec::new();
                for r in store.list() {
                    if !r.key.starts_with(key.as_deref().unwrap_or("")) || r.fingerprint != fp {
                        continue;
                    }
                    let Some(probe) = tensor::MlpProbe::from_command(&r.command) else {
                        eprintln!("{}: no built-in probe for `{}`; skipped", r.key, r.command);
                        continue;
                    };
                    let v = tensor::verify(&probe?, &r, 5, std::time::Duration::from_millis(50))?;
                    if v.stale {
                        store.mark_stale(&r.key, &r.fingerprint)?;
                    }
                    if !json {
                        println!(
                            "{}: {} — {:.3} M evals/s now, {:.3} recorded, default {:.3}{}",
                            v.key,
                            v.settings,
                            v.evals_per_sec / 1e6,
                            v.recorded_evals_per_sec / 1e6,
                            v.default_evals_per_sec / 1e6,
                            if v.stale { " — STALE (marked)" } else { "" }
                        );
                    }
                    out.push(v);
                }
                if json {
                    println!("{}", serde_json::to_string(&out)?);
                } else if out.is_empty() {
                    println!(
                        "no record of this machine to verify in {}",
                        store.dir.display()
                    );
                }
            }
            Some(AutotuneCommand::Clear { key }) => {
                let store = hyperfunc::autotune::Store::default_location();
                let n = store.clear(key.as_deref().unwrap_or(""))?;
                println!("removed {n} records from {}", store.dir.display());
            }
        },
        Command::Cost {
            command:
                CostCommand::Report {
                    store,
                    by,
                    since: from,
                    json,
                    chart,
                    top,
                },
        } => {
            let dims = by
                .split(',')
                .filter(|d| !d.trim().is_empty())
                .map(hyperfunc::tune::CostDim::parse)
                .collect::<Result<Vec<_>, _>>()?;
            let report = ledger(&store)?.cost_report(&dims, since(from.as_deref())?)?;
            if let Some(path) = chart {
                draw_chart(&path, &report, top)?;
            }
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.to_table());
            }
        }
        Command::Cost {
            command:
                CostCommand::Reprice {
                    store,
                    prices,
                    since: from,
                },
        } => {
            let table = hyperfunc::tune::PriceTable::load(&prices)?;
            let (n, before, after) = ledger(&store)?.reprice(&table, since(from.as_deref())?)?;
            println!(
                "re-priced {n} calls: ${:.6} → ${:.6}",
                hyperfunc::tune::micros_to_usd(before),
                hyperfunc::tune::micros_to_usd(after)
            );
        }
        Command::Llm {
            command:
                LlmCommand::Report {
                    store,
                    since: from,
                    min_cacheable,
                    cache_lifetime,
                    prices,
                    json,
                },
        } => {
            let l = ledger(&store)?;
            if let Some(p) = prices {
                l.set_prices(hyperfunc::tune::PriceTable::load(&p)?);
            }
            let report = l.llm_report(&hyperfunc::tune::LlmReportOptions {
                since: since(from.as_deref())?,
                min_cacheable_tokens: min_cacheable,
                cache_lifetime_s: cache_lifetime,
                ..Default::default()
            })?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.to_markdown());
            }
        }
        #[cfg(feature = "llm")]
        Command::Llm {
            command:
                LlmCommand::Judge {
                    store,
                    judge_model,
                    since: from,
                    min_models,
                    json,
                },
        } => {
            let items = ledger(&store)?.judge_items(since(from.as_deref())?, min_models)?;
            if items.is_empty() {
                return Err(format!(
                    "no prompt in {} was answered by {min_models} models or more",
                    store.display()
                )
                .into());
            }
            let client = hyperfunc::llm::LlmClient::new(hyperfunc::llm::LlmConfig::from_env()?)?;
            let pass = hyperfunc::tune::judge::JudgePass::new(client, &judge_model, &store)?;
            let rt = tokio::runtime::Runtime::new()?;
            let report = rt.block_on(pass.run(&items))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.to_table());
            }
        }
        Command::Llm {
            command:
                LlmCommand::Compare {
                    store,
                    before,
                    after,
                    label,
                    json,
                },
        } => {
            let (before, after): (Window, Window) = (before.parse()?, after.parse()?);
            let cmp = ledger(&store)?.compare(&before, &after, label.as_deref())?;
            if json {
                println!("{}", serde_json::to_string(&cmp)?);
            } else {
                print!("{}", cmp.to_table());
            }
        }
    }
    Ok(())
}

#[cfg(feature = "plot")]
fn draw_chart(
    path: &std::path::Path,
    report: &hyperfunc::tune::CostReport,
    top: usize,
) -> Result<(), hyperfunc::Error> {
    use hyperfunc::tune::chart::{bar_chart, Bar};
    let bars: Vec<Bar> = report
        .bars(top)
        .into_iter()
        .map(|(label, value)| Bar { label, value })
        .collect();
    let title = format!("Spend by {}", report.by.join(" / "));
    bar_chart(path, &title, "USD", &bars)
}

#[cfg(not(feature = "plot"))]
fn draw_chart(
    _path: &std::path::Path,
    _report: &hyperfunc::tune::CostReport,
    _top: usize,
) -> Result<(), hyperfunc::Error> {
    Err(hyperfunc::Error::InvalidConfig {
        field: "chart".into(),
        reason: "this build has no charts: rebuild with the `plot` feature".into(),
    })
}
