//! The `hyperfunc` command-line tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    }
    Ok(())
}
