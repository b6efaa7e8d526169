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
    }
    Ok(())
}
