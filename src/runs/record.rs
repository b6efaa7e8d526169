//! What `Es::optimize` does with a run store: open or resume the run, apply commands at each
//! generation boundary, buffer generation rows, write checkpoints, raise alerts, finish.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};
use serde_json::{Map, Value};

use super::checkpoint::{self, Meta, State};
use super::{Action, Checkpoints, Command, RunConfig, RunId, RunStore};
use crate::error::{Error, Result};
use crate::es::{Best, Direction, Es, EsRun, GenerationStats, StopReason};
use crate::util::now_s;

/// Commands are looked for at most this often (a scheduled one is applied at its generation).
const POLL: Duration = Duration::from_millis(10);
/// How often a paused run looks for `resume`.
const PAUSED_POLL: Duration = Duration::from_millis(20);
/// How often `stop --now` is looked for during a generation.
const WATCH: Duration = Duration::from_millis(50);
/// Generation rows reach the store at least this often (live curves).
const FLUSH: Duration = Duration::from_millis(250);
/// Generations without improvement before a plateau alert.
const PLATEAU: usize = 50;
/// Adaptive checkpoints cost at most 1/RATIO of the run's time.
const RATIO: f64 = 50.0;

/// Go on, or stop at this boundary (and why).
/// A run's LLM `(tokens, dollars)`: what earlier sessions spent (`offset`) plus what the
/// clients counted since this session's zero (`base`), given their counters `now`.
pub(crate) fn run_spending(offset: (u64, f64), base: (u64, f64), now: (u64, f64)) -> (u64, f64) {
    (
        offset.0 + now.0.saturating_sub(base.0),
        offset.1 + (now.1 - base.1).max(0.0),
    )
}

/// The live settings that count LLM spending.
const BUDGETS: [&str; 2] = ["max_cost_usd", "max_tokens"];

pub(crate) enum Flow {
    Go,
    Stop(String),
}

/// What a resumed run starts from.
pub(crate) struct Restored {
    pub history: Vec<GenerationStats>,
    pub best: Option<Best>,
    pub since_improved: usize,
}

enum Mode {
    Record,
    /// Re-running a stored run: its applied commands at their boundaries, no writes.
    Replay {
        commands: Vec<Command>,
        stop_at: usize,
    },
}

pub(crate) struct Recorder {
    store: RunStore,
    conn: Connection,
    pub run: RunId,
    dir: PathBuf,
    original: RunConfig,
    direction: Direction,
    live: Map<String, Value>,
    policy: Checkpoints,
    mode: Mode,
    paused: bool,
    last_poll: Option<Instant>,
    next_scheduled: Option<usize>,
    rows: Vec<super::GenRow>,
    last_flush: Instant,
    since_ckpt: Duration,
    ckpt_cost: Option<Duration>,
    best: Option<Best>,
    best_file: Option<(usize, String)>,
    since_improved: usize,
    last_mean: f64,
    snapshot: bool,
    pub seconds_offset: f64,
    /// LLM tokens and dollars of earlier sessions of the run (the last kept row's).
    usage_offset: (u64, f64),
    /// The clients' counters when this session started.
    usage_base: (u64, f64),
    #[cfg(feature = "llm")]
    clients: Vec<crate::llm::LlmClient>,
    evals: u64,
    alerted: HashSet<&'static str>,
    watcher: Option<Watcher>,
    /// Wall seconds of the last generations (the slow-generation alert's yardstick).
    recent: std::collections::VecDeque<f64>,
}

fn gen_row_stats(r: &super::GenRow) -> GenerationStats {
    GenerationStats {
        generation: r.gen,
        best: r.best as f32,
        mean: r.mean as f32,
        std: r.std as f32,
        sigma: r.sigma,
        lr: r.lr,
        failed: r.failed,
        evals_per_sec: r.evals_per_sec,
        seconds: r.seconds,
    }
}

/// `lr 0.1 → 0.05, sigma 0.05 → 0.1 (cleared)`: what going from live values `old` to `new`
/// changes in the effective settings.
fn describe_change(
    original: &RunConfig,
    old: &Map<String, Value>,
    new: &Map<String, Value>,
) -> String {
    let (before, after) = (original.with_live(old).ok(), original.with_live(new).ok());
    let mut keys: Vec<&String> = new.keys().chain(old.keys()).collect();
    keys.sort();
    keys.dedup();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter_map(|k| {
            let a = before.as_ref().and_then(|c| c.get(k));
            let b = after.as_ref().and_then(|c| c.get(k));
            let tag = if new.contains_key(k) {
                ""
            } else {
                " (cleared)"
            };
            (a != b || old.contains_key(k) != new.contains_key(k))
                .then(|| format!("{k} {} → {}{tag}", fmt_value(&a), fmt_value(&b)))
        })
        .collect();
    if diffs.is_empty() {
        "no change".to_string()
    } else {
        diffs.join(", ")
    }
}

fn fmt_value(v: &Option<Value>) -> String {
    match v {
        None | Some(Value::Null) => "none".into(),
        Some(v) => v.to_string(),
    }
}

impl Recorder {
    /// Opens run `run` (or creates one) for `es` and restores its last checkpoint into `er`.
    pub(crate) fn open(
        store: &RunStore,
        es: &Es,
        run: Option<RunId>,
        name: &str,
        task: Option<&str>,
        er: &mut EsRun,
    ) -> Result<(Self, Restored)> {
        let run = match run {
            Some(r) => r,
            None => store.create_task(name, task, es)?,
        };
        let mut rec = Self::new(store, es, run, Mode::Record)?;
        let restored = rec.restore(er)?;
        Ok((rec, restored))
    }

    /// A recorder that replays run `run`'s commands and writes nothing.
    pub(crate) fn replay(store: &RunStore, es: &Es, run: RunId) -> Result<Self> {
        let probe = Self::new(store, es, run, Mode::Record)?;
        let mut commands = store.commands_with(&probe.conn, run, "status = 'applied'")?;
        commands.sort_by_key(|c| (c.applied_gen, c.id));
        let stop_at = store
            .checkpoints(run)?
            .last()
            .map(|c| c.gen)
            .ok_or_else(|| Error::RunStore {
                path: store.run_dir(run).display().to_string(),
                reason: format!("run {run} has no checkpoint to compare a replay with"),
            })?;
        Ok(Self {
            mode: Mode::Replay { commands, stop_at },
            ..probe
        })
    }

    fn new(store: &RunStore, es: &Es, run: RunId, mode: Mode) -> Result<Self> {
        let conn = store.conn()?;
        let info = store.info_with(&conn, run)?;
        let given = es.run_config();
        let diff = info.config.diff(&given);
        if !diff.is_empty() {
            return Err(Error::RunConfigMismatch {
                run: run.0,
                fields: diff
                    .iter()
                    .map(|(k, a, b)| format!("{k}: {a} → {b}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(Self {
            store: store.clone(),
            conn,
            run,
            dir: store.run_dir(run),
            direction: info.config.direction,
            original: info.config,
            live: Map::new(),
            policy: es.checkpoint_policy(),
            mode,
            paused: false,
            last_poll: None,
            next_scheduled: None,
            rows: Vec::new(),
            last_flush: Instant::now(),
            since_ckpt: Duration::ZERO,
            ckpt_cost: None,
            best: None,
            best_file: None,
            since_improved: 0,
            last_mean: f64::NAN,
            snapshot: false,
            seconds_offset: 0.0,
            usage_offset: (0, 0.0),
            usage_base: (0, 0.0),
            #[cfg(feature = "llm")]
            clients: es.llm_clients().to_vec(),
            evals: 0,
            alerted: HashSet::new(),
            watcher: None,
            recent: std::collections::VecDeque::new(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        self.store.err(e)
    }

    fn event(&self, gen: Option<usize>, kind: &str, message: &str) -> Result<()> {
        if matches!(self.mode, Mode::Replay { .. }) {
            return Ok(());
        }
        self.conn
            .prepare_cached(
                "INSERT INTO events(run, gen, at, kind, message) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    self.run.0,
                    gen.map(|g| g as i64),
                    now_s(),
                    kind,
                    message
                ])
            })
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn status(&self, status: &str, stop: Option<&str>) -> Result<()> {
        self.conn
            .execute(
                "UPDATE runs SET status = ?2, stop = COALESCE(?3, stop), updated_at = ?4 WHERE id = ?1",
                params![self.run.0, status, stop, now_s()],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Loads the newest readable checkpoint into `er`; drops what came after it.
    fn restore(&mut self, er: &mut EsRun) -> Result<Restored> {
        let mut ckpts = self.store.checkpoints(self.run)?;
        let mut state = None;
        while let Some(c) = ckpts.pop() {
            match checkpoint::load(&c.file, er.device()) {
                Ok(s) => {
                    state = Some(s);
                    break;
                }
                Err(e) => self.event(
                    Some(c.gen),
                    "alert",
                    &format!(
                        "checkpoint at gen {} unreadable ({e}); trying an older one",
                        c.gen
                    ),
                )?,
            }
        }
        let g0 = state.as_ref().map_or(0, |s| s.meta.generation);
        let tx = self.conn.transaction().map_err(|e| self.store.err(e))?;
        let dropped = tx
            .execute(
                "DELETE FROM generations WHERE run = ?1 AND gen >= ?2",
                params![self.run.0, g0 as i64],
            )
            .map_err(|e| self.store.err(e))?;
        tx.execute(
            "DELETE FROM checkpoints WHERE run = ?1 AND gen > ?2",
            params![self.run.0, g0 as i64],
        )
        .map_err(|e| self.store.err(e))?;
        // Commands applied after the checkpoint are applied again at the same boundary.
        tx.execute(
            "UPDATE commands SET status = 'pending', at_gen = applied_gen, applied_gen = NULL, reason = NULL
             WHERE run = ?1 AND status IN ('applied', 'rejected') AND applied_gen >= ?2",
            params![self.run.0, g0 as i64],
        )
        .map_err(|e| self.store.err(e))?;
        tx.commit().map_err(|e| self.store.err(e))?;
        let rows = self.store.generations(self.run)?;
        self.evals = rows.last().map_or(0, |r| r.evals);
        self.usage_offset = rows
            .last()
            .map_or((0, 0.0), |r| (r.tokens.unwrap_or(0), r.usd.unwrap_or(0.0)));
        let history: Vec<GenerationStats> = rows.iter().map(gen_row_stats).collect();
        let mut restored = Restored {
            history,
            best: None,
            since_improved: 0,
        };
        let was = self.store.info_with(&self.conn, self.run)?.status;
        if let Some(s) = state {
            let meta = s.meta.clone();
            self.live = meta.live.clone();
            self.seconds_offset = meta.seconds;
            er.restore(s.theta, s.m, s.v, meta.steps, meta.generation);
            er.set_live(&self.original, &self.live)
                .map_err(|reason| Error::RunCommand {
                    run: self.run.0,
                    reason,
                })?;
            if let Some((fitness, generation, file)) = meta.best {
                let theta = crate::theta::Theta::load(self.dir.join(&file), er.device())?;
                self.best_file = Some((generation, file));
                restored.best = Some(Best {
                    theta,
                    fitness,
                    generation,
                });
            }
            restored.since_improved = meta.since_improved;
            self.best = restored.best.clone();
            self.since_improved = meta.since_improved;
            self.event(
                Some(g0),
                "resume",
                &format!(
                    "resumed from the checkpoint at gen {g0} (was {was}; {dropped} later generation rows dropped and redone)"
                ),
            )?;
        } else if was == "created" {
            self.event(Some(0), "start", "started")?;
        } else {
            self.event(Some(0), "resume", &format!("no checkpoint: restarted from gen 0 (was {was}; {dropped} generation rows dropped)"))?;
        }
        self.clean_files()?;
        self.status("running", None)?;
        Ok(restored)
    }

    /// Removes files no checkpoint row refers to (a write a crash interrupted).
    fn clean_files(&self) -> Result<()> {
        let keep: HashSet<String> = self
            .conn
            .prepare("SELECT file, best_file FROM checkpoints WHERE run = ?1")
            .and_then(|mut s| {
                s.query_map([self.run.0], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| self.err(e))?
            .into_iter()
            .flat_map(|(a, b)| std::iter::once(a).chain(b))
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let ours = name.starts_with("gen-") || name.starts_with("best-");
            if ours && !keep.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    /// At the boundary before generation `er.generation()`: the control file, pending commands,
    /// a pause.
    pub(crate) async fn boundary(&mut self, er: &mut EsRun) -> Result<Flow> {
        let g = er.generation();
        if let Mode::Replay { commands, stop_at } = &self.mode {
            if g >= *stop_at {
                return Ok(Flow::Stop(format!("replay reached gen {stop_at}")));
            }
            let now: Vec<Command> = commands
                .iter()
                .filter(|c| c.applied_gen == Some(g))
                .cloned()
                .collect();
            for c in now {
                if matches!(c.action, Action::Stop | Action::StopNow) {
                    return Ok(Flow::Stop(format!("replayed stop (cmd {})", c.id)));
                }
                if !c.action.apply_live(&mut self.live) {
                    continue;
                }
                er.set_live(&self.original, &self.live)
                    .map_err(|reason| Error::RunCommand {
                        run: self.run.0,
                        reason,
                    })?;
            }
            return Ok(Flow::Go);
        }
        let due = self.last_poll.is_none_or(|t| t.elapsed() >= POLL)
            || self.next_scheduled.is_some_and(|s| s <= g);
        if !due {
            return Ok(Flow::Go);
        }
        loop {
            ingest_control_file(&self.store, self.run)?;
            let flow = self.apply_pending(er)?;
            self.last_poll = Some(Instant::now());
            if self.snapshot {
                self.snapshot = false;
                self.checkpoint(er, "snapshot")?;
            }
            if matches!(flow, Flow::Stop(_)) || !self.paused {
                return Ok(flow);
            }
            tokio::time::sleep(PAUSED_POLL).await;
        }
    }

    /// Applies due pending commands in order, each all or nothing, in one transaction.
    fn apply_pending(&mut self, er: &mut EsRun) -> Result<Flow> {
        let g = er.generation();
        let pending = self
            .store
            .commands_with(&self.conn, self.run, "status = 'pending'")?;
        self.next_scheduled = None;
        if pending.is_empty() {
            return Ok(Flow::Go);
        }
        let mut flow = Flow::Go;
        let mut out: Vec<(i64, &str, Option<String>, String, &str)> = Vec::new();
        let was_paused = self.paused;
        for c in pending {
            if let Some(at) = c.at_gen.filter(|&a| a > g) {
                self.next_scheduled = Some(self.next_scheduled.map_or(at, |s| s.min(at)));
                continue;
            }
            let from = format!("cmd {} from {}", c.id, c.source);
            if let Some(why) = c.reason.clone().filter(|_| c.status == "rejected") {
                out.push((
                    c.id,
                    "rejected",
                    Some(why.clone()),
                    format!("gen {g}: rejected ({from}): {why}"),
                    "rejected",
                ));
                continue;
            }
            let result: std::result::Result<String, String> = match &c.action {
                Action::Set(m)
                    if self.client_usage().is_none()
                        && BUDGETS.iter().any(|k| m.get(*k).is_some_and(|v| !v.is_null())) =>
                {
                    Err("the run follows no LLM client, so a budget would count nothing: give each client the system calls to Es::llm_client when the run starts".to_string())
                }
                Action::Set(_) | Action::Clear(_) => {
                    let mut new = self.live.clone();
                    c.action.apply_live(&mut new);
                    er.set_live(&self.original, &new).map(|()| {
                        let what = describe_change(&self.original, &self.live, &new);
                        self.live = new;
                        what
                    })
                }
                Action::Pause => {
                    self.paused = true;
                    Ok("paused".into())
                }
                Action::Resume => {
                    self.paused = false;
                    Ok("resumed".into())
                }
                Action::Stop => {
                    flow = Flow::Stop(format!("stop ({from})"));
                    Ok("stop at this boundary".into())
                }
                Action::StopNow => {
                    flow = Flow::Stop(format!("stop --now ({from})"));
                    Ok("stop now".into())
                }
                Action::Snapshot => {
                    self.snapshot = true;
                    Ok("snapshot".into())
                }
            };
            match result {
                Ok(what) => out.push((
                    c.id,
                    "applied",
                    None,
                    format!("gen {g}: {what} ({from})"),
                    "command",
                )),
                Err(why) => out.push((
                    c.id,
                    "rejected",
                    Some(why.clone()),
                    format!("gen {g}: rejected ({from}): {why}"),
                    "rejected",
                )),
            }
            if matches!(flow, Flow::Stop(_)) {
                break;
            }
        }
        let tx = self.conn.transaction().map_err(|e| self.store.err(e))?;
        for (id, status, reason, message, kind) in &out {
            tx.execute(
                "UPDATE commands SET status = ?2, applied_gen = ?3, reason = ?4 WHERE id = ?1",
                params![id, status, g as i64, reason],
            )
            .map_err(|e| self.store.err(e))?;
            tx.execute(
                "INSERT INTO events(run, gen, at, kind, message) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![self.run.0, g as i64, now_s(), kind, message],
            )
            .map_err(|e| self.store.err(e))?;
        }
        tx.commit().map_err(|e| self.store.err(e))?;
        for (_, _, _, message, kind) in &out {
            if *kind == "rejected" {
                eprintln!("run {}: {message}", self.run);
            }
        }
        if was_paused != self.paused {
            self.status(if self.paused { "paused" } else { "running" }, None)?;
        }
        Ok(flow)
    }

    /// Tokens and dollars the clients have counted so far (this process).
    #[cfg(feature = "llm")]
    fn client_usage(&self) -> Option<(u64, f64)> {
        if self.clients.is_empty() {
            return None;
        }
        Some(crate::llm::usage_of(&self.clients))
    }

    #[cfg(not(feature = "llm"))]
    fn client_usage(&self) -> Option<(u64, f64)> {
        None
    }

    /// LLM tokens and dollars that earlier sessions of the run spent.
    pub(crate) fn usage_offset(&self) -> (u64, f64) {
        self.usage_offset
    }

    /// Takes the clients' counters as this session's zero.
    pub(crate) fn start_usage(&mut self) {
        self.usage_base = self.client_usage().unwrap_or((0, 0.0));
    }

    /// Puts the run's LLM usage so far into the newest row (then the budget alert).
    fn count_usage(&mut self, er: &EsRun, g: usize) -> Result<()> {
        let Some((tokens, usd)) = self.client_usage() else {
            return Ok(());
        };
        let spent = run_spending(self.usage_offset, self.usage_base, (tokens, usd));
        if let Some(row) = self.rows.last_mut() {
            row.tokens = Some(spent.0);
            row.usd = Some(spent.1);
        }
        self.budget_alert(er, g, spent)
    }

    /// Alerts once when the run's budget or a client's is 90% spent.
    #[cfg(feature = "llm")]
    fn budget_alert(&mut self, er: &EsRun, g: usize, (tokens, usd): (u64, f64)) -> Result<()> {
        let run = match er.settings().budgets() {
            (_, Some(max)) if usd >= 0.9 * max => Some(format!(
                "${usd:.4} of the run's ${max:.4} budget (max_cost_usd)"
            )),
            (Some(max), _) if tokens as f64 >= 0.9 * max as f64 => Some(format!(
                "{tokens} of the run's {max} tokens budget (max_tokens)"
            )),
            _ => None,
        };
        let nearly = run.or_else(|| {
            self.clients.iter().find_map(|c| {
                let b = c.config().budget;
                if b.max_cost_usd.is_none() && b.max_requests.is_none() {
                    return None;
                }
                let s = c.total();
                match (b.max_cost_usd, b.max_requests) {
                    (Some(max), _) if s.cost_usd >= 0.9 * max => {
                        Some(format!("${:.4} of the ${max:.4} budget", s.cost_usd))
                    }
                    (_, Some(max)) if s.requests as f64 >= 0.9 * max as f64 => {
                        Some(format!("{} of the {max} requests budget", s.requests))
                    }
                    _ => None,
                }
            })
        });
        if let Some(what) = nearly {
            self.alert(
                "budget",
                g,
                &format!(
                    "gen {g}: LLM budget nearly spent: {what} (the run stops when it is spent)"
                ),
            )?;
        }
        Ok(())
    }

    #[cfg(not(feature = "llm"))]
    fn budget_alert(&mut self, _er: &EsRun, _g: usize, _spent: (u64, f64)) -> Result<()> {
        Ok(())
    }

    /// After a generation was told: its row (buffered), alerts, a checkpoint when due.
    pub(crate) fn generation(
        &mut self,
        er: &EsRun,
        stats: &GenerationStats,
        best: &Option<Best>,
        since_improved: usize,
        took: Duration,
    ) -> Result<()> {
        if matches!(self.mode, Mode::Replay { .. }) {
            return Ok(());
        }
        let pop = er.pop_size();
        self.evals += pop as u64;
        let finite = |x: f32| f64::from(x);
        self.rows.push(super::GenRow {
            gen: stats.generation,
            best: finite(stats.best),
            mean: finite(stats.mean),
            std: finite(stats.std),
            sigma: stats.sigma,
            lr: stats.lr,
            pop_size: pop,
            evals: self.evals,
            failed: stats.failed,
            evals_per_sec: stats.evals_per_sec,
            seconds: stats.seconds + self.seconds_offset,
            tokens: None,
            usd: None,
        });
        self.count_usage(er, stats.generation)?;
        self.last_mean = f64::from(stats.mean);
        if best.as_ref().map(|b| b.generation) != self.best.as_ref().map(|b| b.generation) {
            self.best = best.clone();
        }
        self.since_improved = since_improved;
        let g = stats.generation;
        if stats.failed > 0 && !stats.best.is_nan() {
            self.alert(
                "nonfinite",
                g,
                &format!(
                    "gen {g}: {} of {pop} candidates failed or gave a non-finite fitness",
                    stats.failed
                ),
            )?;
        } else if stats.best.is_nan() {
            self.alert(
                "nonfinite",
                g,
                &format!("gen {g}: every candidate failed or gave a non-finite fitness"),
            )?;
        }
        if since_improved == PLATEAU {
            self.alert_again(
                "plateau",
                g,
                &format!("gen {g}: no improvement for {PLATEAU} generations"),
            )?;
        }
        self.since_ckpt += took;
        if self.recent.len() == 20 {
            self.recent.pop_front();
        }
        self.recent.push_back(took.as_secs_f64());
        let due = match self.policy.every {
            Some(n) => er.generation().is_multiple_of(n.max(1)),
            None => self
                .ckpt_cost
                .is_none_or(|c| self.since_ckpt.as_secs_f64() >= RATIO * c.as_secs_f64()),
        };
        if due {
            self.checkpoint(er, "auto")?;
        } else if self.last_flush.elapsed() >= FLUSH {
            let tx = self.conn.transaction().map_err(|e| self.store.err(e))?;
            flush(&tx, self.run, &mut self.rows, &self.best).map_err(|e| self.store.err(e))?;
            tx.commit().map_err(|e| self.store.err(e))?;
            self.last_flush = Instant::now();
        }
        Ok(())
    }

    fn alert(&mut self, kind: &'static str, g: usize, message: &str) -> Result<()> {
        if self.alerted.insert(kind) {
            eprintln!("run {} alert: {message}", self.run);
            self.event(Some(g), "alert", message)?;
        }
        Ok(())
    }

    fn alert_again(&mut self, kind: &'static str, g: usize, message: &str) -> Result<()> {
        self.alerted.remove(kind);
        self.alert(kind, g, message)
    }

    /// Writes a checkpoint of the state after `er.generation()` generations.
    fn checkpoint(&mut self, er: &EsRun, kind: &str) -> Result<()> {
        if matches!(self.mode, Mode::Replay { .. }) {
            return Ok(());
        }
        let t0 = Instant::now();
        let g = er.generation();
        if let Some(b) = &self.best {
            if self
                .best_file
                .as_ref()
                .is_none_or(|(bg, _)| *bg != b.generation)
            {
                let name = format!("best-{:08}.safetensors", b.generation);
                checkpoint::save_theta(&self.dir.join(&name), &b.theta)?;
                self.best_file = Some((b.generation, name));
            }
        }
        let (steps, m, v) = er.moments();
        let state = State {
            theta: er.theta().clone(),
            m,
            v,
            meta: Meta {
                generation: g,
                steps,
                since_improved: self.since_improved,
                best: self
                    .best
                    .as_ref()
                    .zip(self.best_file.as_ref())
                    .map(|(b, (_, f))| (b.fitness, b.generation, f.clone())),
                live: self.live.clone(),
                prompts: Default::default(),
                seconds: self.rows.last().map_or(self.seconds_offset, |r| r.seconds),
            },
        };
        let file = format!("gen-{g:08}.safetensors");
        let bytes = checkpoint::save(&self.dir.join(&file), &state)?;
        let score = self.last_mean.is_finite().then_some(self.last_mean);
        let tx = self.conn.transaction().map_err(|e| self.store.err(e))?;
        flush(&tx, self.run, &mut self.rows, &self.best).map_err(|e| self.store.err(e))?;
        tx.execute(
            "INSERT INTO checkpoints(run, gen, file, bytes, score, kind, best_file, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(run, gen) DO UPDATE SET file = excluded.file, bytes = excluded.bytes,
               score = excluded.score, best_file = excluded.best_file,
               kind = CASE WHEN kind = 'auto' THEN excluded.kind ELSE kind END",
            params![
                self.run.0,
                g as i64,
                file,
                bytes as i64,
                score,
                kind,
                self.best_file.as_ref().map(|b| b.1.clone()),
                now_s()
            ],
        )
        .map_err(|e| self.store.err(e))?;
        // Retention: the newest `keep_last` periodic checkpoints, and the best one.
        let order = match self.direction {
            Direction::Maximize => "DESC",
            Direction::Minimize => "ASC",
        };
        let best_keep = if self.policy.keep_best {
            format!("UNION SELECT gen FROM (SELECT gen FROM checkpoints WHERE run = ?1 AND kind = 'auto' AND score IS NOT NULL ORDER BY score {order} LIMIT 1)")
        } else {
            String::new()
        };
        tx.execute(
            &format!(
                "DELETE FROM checkpoints WHERE run = ?1 AND kind = 'auto' AND gen NOT IN (
                   SELECT gen FROM (SELECT gen FROM checkpoints WHERE run = ?1 AND kind = 'auto' ORDER BY gen DESC LIMIT ?2)
                   {best_keep})"
            ),
            params![self.run.0, self.policy.keep_last.max(1) as i64],
        )
        .map_err(|e| self.store.err(e))?;
        tx.commit().map_err(|e| self.store.err(e))?;
        self.clean_files()?;
        self.last_flush = Instant::now();
        self.since_ckpt = Duration::ZERO;
        self.ckpt_cost = Some(t0.elapsed());
        if kind != "auto" {
            self.event(
                Some(g),
                "checkpoint",
                &format!("{kind} checkpoint at gen {g} ({bytes} bytes)"),
            )?;
        }
        Ok(())
    }

    /// The end of a run: rows, the final checkpoint, the final event and status.
    pub(crate) fn finish(
        &mut self,
        er: &EsRun,
        stop: StopReason,
        detail: Option<&str>,
    ) -> Result<()> {
        if matches!(self.mode, Mode::Replay { .. }) {
            return Ok(());
        }
        let detail = detail.unwrap_or_default();
        let (status, why) = match stop {
            StopReason::Command => ("stopped", detail.to_string()),
            StopReason::Signal => ("stopped", format!("signal: {detail}")),
            StopReason::Budget => ("stopped", format!("budget: {detail}")),
            StopReason::Generations => ("finished", "generation limit".to_string()),
            StopReason::Target => ("finished", "target reached".to_string()),
            StopReason::Patience => ("finished", "patience ran out".to_string()),
        };
        let g = er.generation();
        self.conn
            .execute(
                "UPDATE commands SET status = 'applied', applied_gen = ?2 WHERE run = ?1 AND status = 'pending' AND action = 'stop_now' AND (at_gen IS NULL OR at_gen <= ?2)",
                params![self.run.0, g as i64],
            )
            .map_err(|e| self.err(e))?;
        self.checkpoint(er, "final")?;
        self.event(Some(g), "finish", &format!("{status} at gen {g}: {why}"))?;
        self.status(status, Some(&why))
    }

    /// A run that ended with an error: its rows and the reason (its checkpoints stay).
    pub(crate) fn failed(&mut self, g: usize, e: &Error) {
        if matches!(self.mode, Mode::Replay { .. }) {
            return;
        }
        let msg = e.to_string();
        if let Ok(tx) = self.conn.transaction() {
            let _ = flush(&tx, self.run, &mut self.rows, &self.best);
            let _ = tx.commit();
        }
        let _ = self.event(Some(g), "finish", &format!("failed at gen {g}: {msg}"));
        let _ = self.status("failed", Some(&msg));
    }

    pub(crate) fn is_replay(&self) -> bool {
        matches!(self.mode, Mode::Replay { .. })
    }

    /// The watcher for `stop --now` during the next generation (give it back with
    /// [`Recorder::put_watcher`]); opened once per run. It also raises the slow-generation
    /// alert: a generation that takes 10 times the median of the last ones (at least 1 s).
    pub(crate) fn take_watcher(&mut self) -> Result<Option<Watcher>> {
        if matches!(self.mode, Mode::Replay { .. }) {
            return Ok(None);
        }
        let expected = (self.recent.len() >= 3).then(|| {
            let v: Vec<f64> = self.recent.iter().copied().collect();
            Duration::from_secs_f64((10.0 * crate::util::median(&v)).max(1.0))
        });
        let mut w = match self.watcher.take() {
            Some(w) => w,
            None => Watcher {
                conn: self.store.conn()?,
                store: self.store.clone(),
                run: self.run,
                expected: None,
            },
        };
        w.expected = expected;
        Ok(Some(w))
    }

    pub(crate) fn put_watcher(&mut self, w: Watcher) {
        self.watcher = Some(w);
    }
}

fn flush(
    tx: &rusqlite::Transaction<'_>,
    run: RunId,
    rows: &mut Vec<super::GenRow>,
    best: &Option<Best>,
) -> rusqlite::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    {
        let mut st = tx.prepare_cached(
            "INSERT OR REPLACE INTO generations(run, gen, best, mean, std, sigma, lr, pop_size, evals, failed, evals_per_sec, seconds, tokens, usd)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        )?;
        let fin = |x: f64| x.is_finite().then_some(x);
        for r in rows.iter() {
            st.execute(params![
                run.0,
                r.gen as i64,
                fin(r.best),
                fin(r.mean),
                fin(r.std),
                r.sigma,
                r.lr,
                r.pop_size as i64,
                r.evals as i64,
                r.failed as i64,
                fin(r.evals_per_sec),
                r.seconds,
                r.tokens.map(|t| t as i64),
                r.usd
            ])?;
        }
    }
    let last = rows.last().map_or(0, |r| r.gen + 1);
    tx.execute(
        "UPDATE runs SET generation = ?2, best = ?3, updated_at = ?4 WHERE id = ?1",
        params![
            run.0,
            last as i64,
            best.as_ref().map(|b| f64::from(b.fitness)),
            now_s()
        ],
    )?;
    rows.clear();
    Ok(())
}

/// Reads `run-<id>/control.json` if present: its commands are written (all or none) and the
/// file renamed to `control.<first id>.done.json`; a refused file becomes
/// `control.rejected.json` with the reason in `control.error.txt`. Nothing is lost.
pub(crate) fn ingest_control_file(store: &RunStore, run: RunId) -> Result<()> {
    let dir = store.run_dir(run);
    let path = dir.join("control.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let io = |p: &std::path::Path| {
        let p = p.display().to_string();
        move |source| Error::File { path: p, source }
    };
    match store.control(run).source("file").send_json(&text) {
        Ok(ids) => {
            let done = dir.join(format!(
                "control.{}.done.json",
                ids.first().copied().unwrap_or(0)
            ));
            std::fs::rename(&path, &done).map_err(io(&path))?;
        }
        Err(e) => {
            std::fs::rename(&path, dir.join("control.rejected.json")).map_err(io(&path))?;
            std::fs::write(dir.join("control.error.txt"), format!("{e}\n")).map_err(io(&dir))?;
            eprintln!("run {run}: control.json refused: {e}");
        }
    }
    Ok(())
}

/// Looks for `stop --now` while a generation runs (it owns its connection, so the
/// optimisation's future stays `Send`).
pub(crate) struct Watcher {
    conn: Connection,
    store: RunStore,
    run: RunId,
    /// Longer than this, the generation is reported slow (once).
    expected: Option<Duration>,
}

impl Watcher {
    /// Resolves when a `stop_now` command is pending for the run.
    pub(crate) async fn stop_now(&mut self, gen: usize) -> String {
        let started = Instant::now();
        let mut slow_reported = false;
        loop {
            tokio::time::sleep(WATCH).await;
            if let Some(limit) = self
                .expected
                .filter(|l| !slow_reported && started.elapsed() > *l)
            {
                slow_reported = true;
                let message = format!(
                    "gen {gen}: no generation for {:.1} s (10 times the recent median)",
                    limit.as_secs_f64()
                );
                eprintln!("run {} alert: {message}", self.run);
                let _ = self.conn.execute(
                    "INSERT INTO events(run, gen, at, kind, message) VALUES (?1, ?2, ?3, 'alert', ?4)",
                    params![self.run.0, gen as i64, now_s(), message],
                );
            }
            let _ = ingest_control_file(&self.store, self.run);
            let found: Option<(i64, String)> = self
                .conn
                .prepare_cached("SELECT id, source FROM commands WHERE run = ?1 AND status = 'pending' AND action = 'stop_now' AND (at_gen IS NULL OR at_gen <= ?2) ORDER BY id LIMIT 1")
                .and_then(|mut s| {
                    let mut rows = s.query(params![self.run.0, gen as i64])?;
                    match rows.next()? {
                        Some(r) => Ok(Some((r.get(0)?, r.get(1)?))),
                        None => Ok(None),
                    }
                })
                .unwrap_or(None);
            if let Some((id, source)) = found {
                return format!("stop --now (cmd {id} from {source})");
            }
        }
    }
}
