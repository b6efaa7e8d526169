//! What the run store costs: a generation row, a checkpoint against a generation, the control
//! poll at a boundary, command → applied latency, `runs diff` on 10 000 generations.

use std::time::{Duration, Instant};

use rusqlite::params;
use serde::Serialize;

use super::{checkpoint, Checkpoints, RunStore};
use crate::error::Result;
use crate::util::median;

/// The run store's costs (`hyperfunc bench`).
#[derive(Clone, Debug, Serialize)]
pub struct RunsBench {
    /// Median ms to commit one generation row on its own (what a row costs when it is the
    /// only thing written; rows are normally batched with a checkpoint or every 250 ms).
    pub row_commit_ms: f64,
    /// µs per row when 10 000 rows are written in one transaction.
    pub row_batched_us: f64,
    /// Median ms of a generation of the benchmark's Task A (pop 256, 1 024 examples).
    pub generation_ms: f64,
    /// Median ms of one checkpoint of that task (θ and Adam moments, fsynced, renamed).
    pub checkpoint_ms: f64,
    /// `checkpoint_ms / generation_ms`: the cost of checkpointing every generation (the
    /// default adaptive policy keeps it at 2% or less whatever the generation takes).
    pub checkpoint_share: f64,
    /// Bytes of that checkpoint.
    pub checkpoint_bytes: u64,
    /// θ + two moments, bytes (the checkpoint holds these plus its header).
    pub state_bytes: u64,
    /// Median µs of the control poll at a boundary with nothing pending (done at most every
    /// 10 ms, and at a scheduled command's generation).
    pub poll_us: f64,
    /// The poll's share of a Task A generation when it runs every generation (its upper bound).
    pub control_share: f64,
    /// Median ms from writing `set lr` to its application, on a run whose generations take
    /// well under a millisecond (so this is the latency beyond the next boundary).
    pub command_latency_ms: f64,
    /// Median ms of `RunStore::diff` on two runs of 10 000 generations each.
    pub diff_ms: f64,
    /// Median ms from a generation row committed to the store to its arrival on the web
    /// page's live stream (`hyperfunc ui`, default poll 200 ms); rows reach the store at
    /// least every 250 ms, so a generation shows within their sum. `None` without the `ui`
    /// feature.
    pub ui_stream_ms: Option<f64>,
}

/// Runs the run-store benchmark in a temporary directory.
pub async fn bench(quick: bool) -> Result<RunsBench> {
    let dir = std::env::temp_dir().join(format!("hyperfunc-bench-runs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = RunStore::open(&dir)?;
    let reps = if quick { 5 } else { 20 };

    // Task A: a generation, then a checkpoint of its state.
    let t = super::task::task("teacher")?;
    let es = t.es.clone().pop_size(256).generations(reps).progress(false);
    let report = es
        .optimize(&t.system, &t.examples, t.metric.as_ref())
        .await?;
    let gen_ms: Vec<f64> = report
        .history
        .windows(2)
        .map(|w| (w[1].seconds - w[0].seconds) * 1e3)
        .collect();
    let generation_ms = median(&gen_ms);
    let moments = |th: &crate::Theta| {
        th.iter()
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let state = checkpoint::State {
        theta: report.theta.clone(),
        m: moments(&report.theta),
        v: moments(&report.theta),
        meta: checkpoint::Meta {
            generation: reps,
            ..Default::default()
        },
    };
    let state_bytes = 3 * 4 * report.theta.num_params() as u64;
    let path = dir.join("bench.safetensors");
    let mut ck = Vec::new();
    let mut checkpoint_bytes = 0;
    for _ in 0..reps {
        let t0 = Instant::now();
        checkpoint_bytes = checkpoint::save(&path, &state)?;
        ck.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let checkpoint_ms = median(&ck);

    // Rows: one commit each, then 10 000 in one transaction; a second run for the diff.
    let xor = super::task::task("xor")?;
    let a = store.create("diff-a", &xor.es)?;
    let b = store.create("diff-b", &xor.es.clone().lr(0.2))?;
    let mut conn = store.conn()?;
    let insert = "INSERT OR REPLACE INTO generations(run, gen, best, mean, std, sigma, lr, pop_size, evals, failed, evals_per_sec, seconds)
                  VALUES (?1, ?2, ?3, ?4, 0.1, 0.1, 0.1, 64, ?5, 0, 1e6, ?6)";
    let mut one = Vec::new();
    for g in 0..reps.max(10) {
        let t0 = Instant::now();
        conn.execute(
            insert,
            params![a.0, g as i64, 1.0, 1.0, (g * 64) as i64, g as f64],
        )
        .map_err(|e| store.err(e))?;
        one.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let row_commit_ms = median(&one);
    let n = 10_000usize;
    let t0 = Instant::now();
    for run in [a, b] {
        let tx = conn.transaction().map_err(|e| store.err(e))?;
        {
            let mut st = tx.prepare(insert).map_err(|e| store.err(e))?;
            for g in 0..n {
                let f = 1.0 / (1.0 + g as f64) + if run == b && g > 5000 { 1e-3 } else { 0.0 };
                st.execute(params![run.0, g as i64, f, f, (g * 64) as i64, g as f64])
                    .map_err(|e| store.err(e))?;
            }
        }
        tx.commit().map_err(|e| store.err(e))?;
    }
    let row_batched_us = t0.elapsed().as_secs_f64() * 1e6 / (2 * n) as f64;
    let mut diffs = Vec::new();
    for _ in 0..reps.min(10) {
        let t0 = Instant::now();
        std::hint::black_box(store.diff(a, b)?);
        diffs.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let diff_ms = median(&diffs);

    // The poll at a boundary: pending commands and the control file, nothing there.
    let p = store.create("poll", &xor.es)?;
    let mut polls = Vec::new();
    for _ in 0..(reps * 50) {
        let t0 = Instant::now();
        super::record::ingest_control_file(&store, p)?;
        std::hint::black_box(store.commands_with(&conn, p, "status = 'pending'")?);
        polls.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    let poll_us = median(&polls);

    // Command → applied on a running XOR (generations of ~0.1 ms).
    let mut lat = Vec::new();
    for i in 0..reps.min(10) {
        let es = xor
            .es
            .clone()
            .generations(10_000_000)
            .progress(false)
            .autotune(false)
            .store(store.clone())
            .checkpoints(Checkpoints::default());
        let run = store.create("latency", &es)?;
        let handle = {
            let es = es.clone().run(run);
            let (sys, ex) = (xor.system.clone(), xor.examples.clone());
            tokio::spawn(async move { es.optimize(&sys, &ex, &crate::metric::bce()).await })
        };
        while store.info(run)?.status != "running" {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let ctl = store.control(run).source("bench");
        let t0 = Instant::now();
        let id = ctl.set("lr", 0.05 + 0.001 * i as f64)?;
        loop {
            let done = store
                .commands_with(&conn, run, &format!("id = {id} AND status != 'pending'"))?
                .len();
            if done > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
        ctl.stop()?;
        let _ = handle.await;
    }
    let command_latency_ms = median(&lat);
    #[cfg(feature = "ui")]
    let ui_stream_ms = Some(ui_stream_ms(&store, &conn, insert, reps).await?);
    #[cfg(not(feature = "ui"))]
    let ui_stream_ms = None;
    drop(conn);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(RunsBench {
        row_commit_ms,
        row_batched_us,
        generation_ms,
        checkpoint_ms,
        checkpoint_share: checkpoint_ms / generation_ms,
        checkpoint_bytes,
        state_bytes,
        poll_us,
        control_share: poll_us / 1e3 / generation_ms,
        command_latency_ms,
        diff_ms,
        ui_stream_ms,
    })
}

/// Row committed → row received on `/api/runs/{id}/stream`, read as a browser would (plain
/// HTTP/1.1 on a socket).
#[cfg(feature = "ui")]
async fn ui_stream_ms(
    store: &RunStore,
    conn: &rusqlite::Connection,
    insert: &str,
    reps: usize,
) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = |e: std::io::Error| crate::Error::config("ui", format!("the stream benchmark: {e}"));
    let run = store.create("ui", &crate::Es::default())?;
    let server = crate::ui::Ui::new(store.clone())
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .await?;
    let addr = server.local_addr();
    let serving = tokio::spawn(server.serve());
    let mut sock = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
    let head = format!(
        "GET /api/runs/{}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n",
        run.0
    );
    sock.write_all(head.as_bytes()).await.map_err(io)?;
    let mut seen = String::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut read_until = async |sock: &mut tokio::net::TcpStream, pat: &str| -> Result<()> {
        while !seen.contains(pat) {
            let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf))
                .await
                .map_err(|_| {
                    crate::Error::config("ui", format!("no `{pat}` on the stream in 10 s"))
                })?
                .map_err(io)?;
            if n == 0 {
                return Err(crate::Error::config("ui", "the stream closed"));
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        seen.clear();
        Ok(())
    };
    // The first update (status) comes at once; then one row at a time.
    read_until(&mut sock, "event: update").await?;
    let mut lat = Vec::new();
    for g in 0..reps.max(5) {
        let t0 = Instant::now();
        conn.execute(insert, params![run.0, g as i64, 1.0, 1.0, 64, g as f64])
            .map_err(|e| store.err(e))?;
        read_until(&mut sock, &format!("\"gen\":{g},")).await?;
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    serving.abort();
    Ok(median(&lat))
}
