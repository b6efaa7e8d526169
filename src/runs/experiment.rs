//! Datasets with versions, evaluations of runs on them, and comparisons of a run with a
//! baseline run on the same dataset — with a paired 95% interval — for CI gates
//! (`hyperfunc gate --baseline RUN --metric accuracy --max-drop 0.01`).

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{RunId, RunStore};
use crate::error::{Error, Result};
use crate::eval::Dataset;
use crate::util::now_s;

/// A stored version of a dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DatasetVersion {
    /// The dataset's name.
    pub name: String,
    /// 1, 2, … — a new one each time the content changes.
    pub version: u32,
    /// Its content hash.
    pub hash: String,
    /// Its number of items.
    pub items: usize,
}

/// One run evaluated on one dataset version and split, with one metric.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evaluation {
    /// The run.
    pub run: RunId,
    /// The dataset version.
    pub dataset: DatasetVersion,
    /// The split's name (`test`, `val`, `all`…).
    pub split: String,
    /// The metric's name.
    pub metric: String,
    /// Score per item id.
    pub scores: BTreeMap<String, f64>,
    /// The mean score.
    pub mean: f64,
}

/// A candidate run against a baseline on the same items.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    /// The baseline's evaluation (without per-item scores).
    pub baseline: RunId,
    /// The candidate.
    pub candidate: RunId,
    /// The metric.
    pub metric: String,
    /// The dataset both were evaluated on.
    pub dataset: DatasetVersion,
    /// The split.
    pub split: String,
    /// Items scored in both.
    pub paired: usize,
    /// Baseline mean on the paired items.
    pub baseline_mean: f64,
    /// Candidate mean on the paired items.
    pub candidate_mean: f64,
    /// `candidate_mean − baseline_mean`.
    pub diff: f64,
    /// 95% interval of the mean paired difference (t interval; a point when fewer than 2).
    pub ci95: (f64, f64),
}

impl Comparison {
    /// Whether the candidate dropped by more than `max_drop` (higher scores are better).
    pub fn regressed(&self, max_drop: f64) -> bool {
        self.diff < -max_drop
    }

    /// Whether the interval excludes 0.
    pub fn significant(&self) -> bool {
        self.ci95.0 > 0.0 || self.ci95.1 < 0.0
    }
}

/// Two-sided 97.5% Student t quantile for `df` degrees of freedom.
fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        d if d <= 30 => T[d - 1],
        d if d <= 60 => 2.000 + (2.042 - 2.000) * (60 - d) as f64 / 30.0,
        d if d <= 120 => 1.980 + (2.000 - 1.980) * (120 - d) as f64 / 60.0,
        _ => 1.960,
    }
}

impl RunStore {
    /// Stores `dataset` as a new version of its name when its content changed; the version.
    pub fn put_dataset(&self, dataset: &Dataset) -> Result<DatasetVersion> {
        let conn = self.conn()?;
        let hash = dataset.hash();
        let last: Option<(u32, String)> = conn
            .query_row(
                "SELECT version, hash FROM datasets WHERE name = ?1 ORDER BY version DESC LIMIT 1",
                [dataset.name()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let version = match &last {
            Some((v, h)) if *h == hash => *v,
            Some((v, _)) => v + 1,
            None => 1,
        };
        if last.as_ref().is_none_or(|(_, h)| *h != hash) {
            let body = serde_json::to_string(dataset.items()).map_err(|e| Error::RunStore {
                path: self.dir.display().to_string(),
                reason: e.to_string(),
            })?;
            conn.execute(
                "INSERT INTO datasets(name, version, hash, items, body, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![dataset.name(), version, hash, dataset.len() as i64, body, now_s()],
            )
            .map_err(|e| self.err(e))?;
        }
        Ok(DatasetVersion {
            name: dataset.name().to_string(),
            version,
            hash,
            items: dataset.len(),
        })
    }

    /// A stored dataset: `version` or the newest.
    pub fn dataset(&self, name: &str, version: Option<u32>) -> Result<(Dataset, DatasetVersion)> {
        let conn = self.conn()?;
        let row: Option<(u32, String, i64, String)> = conn
            .query_row(
                "SELECT version, hash, items, body FROM datasets WHERE name = ?1 AND (?2 IS NULL OR version = ?2)
                 ORDER BY version DESC LIMIT 1",
                params![name, version],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let (v, hash, n, body) = row.ok_or_else(|| {
            Error::config(
                "dataset",
                format!(
                    "no dataset `{name}`{} in {}; store it with RunStore::put_dataset",
                    version.map(|v| format!(" version {v}")).unwrap_or_default(),
                    self.dir.display()
                ),
            )
        })?;
        let items = serde_json::from_str(&body).map_err(|e| Error::RunStore {
            path: self.dir.display().to_string(),
            reason: format!("dataset `{name}` version {v}: {e}"),
        })?;
        Ok((
            Dataset::new(name, items)?,
            DatasetVersion {
                name: name.into(),
                version: v,
                hash,
                items: n as usize,
            },
        ))
    }

    /// Records run `run`'s scores (per item id, each in any fixed range where higher is
    /// better) on a dataset version's `split` under `metric`; replaces an earlier record of the
    /// same run, dataset version, split and metric.
    pub fn record_eval(
        &self,
        run: RunId,
        dataset: &DatasetVersion,
        split: &str,
        metric: &str,
        scores: &[(String, f64)],
    ) -> Result<Evaluation> {
        let conn = self.conn()?;
        self.info_with(&conn, run)?;
        if scores.is_empty() {
            return Err(Error::config("scores", "nothing to record: no scores"));
        }
        if let Some((id, s)) = scores.iter().find(|(_, s)| !s.is_finite()) {
            return Err(Error::config(
                "scores",
                format!("item `{id}` has a non-finite score {s}; score failures as 0"),
            ));
        }
        let map: BTreeMap<String, f64> = scores.iter().cloned().collect();
        if map.len() != scores.len() {
            return Err(Error::config("scores", "an item id is scored twice"));
        }
        let mean = map.values().sum::<f64>() / map.len() as f64;
        let body = serde_json::to_string(&map).unwrap_or_default();
        conn.execute(
            "INSERT OR REPLACE INTO evaluations(run, dataset, version, hash, split, metric, n, mean, scores, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![run.0, dataset.name, dataset.version, dataset.hash, split, metric, map.len() as i64, mean, body, now_s()],
        )
        .map_err(|e| self.err(e))?;
        Ok(Evaluation {
            run,
            dataset: dataset.clone(),
            split: split.into(),
            metric: metric.into(),
            scores: map,
            mean,
        })
    }

    /// Run `run`'s evaluations under `metric`, newest first.
    pub fn evaluations(&self, run: RunId, metric: &str) -> Result<Vec<Evaluation>> {
        let conn = self.conn()?;
        self.info_with(&conn, run)?;
        let rows = self.rows(&conn, "SELECT e.dataset, e.version, e.hash, e.split, e.scores, e.mean, d.items FROM evaluations e
                 LEFT JOIN datasets d ON d.name = e.dataset AND d.version = e.version
                 WHERE e.run = ?1 AND e.metric = ?2 ORDER BY e.created_at DESC", params![run.0, metric], |r| {
                let scores: String = r.get(4)?;
                Ok(Evaluation {
                    run,
                    dataset: DatasetVersion {
                        name: r.get(0)?,
                        version: r.get(1)?,
                        hash: r.get(2)?,
                        items: r.get::<_, Option<i64>>(6)?.unwrap_or(0) as usize,
                    },
                    split: r.get(3)?,
                    metric: metric.into(),
                    scores: serde_json::from_str(&scores).unwrap_or_default(),
                    mean: r.get(5)?,
                })
            })?;
        Ok(rows)
    }

    /// Compares `candidate` with `baseline` under `metric` on the newest evaluation of the
    /// baseline and the candidate's evaluation of the same dataset content and split; the
    /// difference is over the items both scored.
    pub fn compare(&self, baseline: RunId, candidate: RunId, metric: &str) -> Result<Comparison> {
        let base = self.evaluations(baseline, metric)?;
        let b = base.first().ok_or_else(|| {
            Error::config(
                "baseline",
                format!("run {baseline} has no `{metric}` evaluation; record one with RunStore::record_eval"),
            )
        })?;
        let cand = self.evaluations(candidate, metric)?;
        let c = cand
            .iter()
            .find(|c| c.dataset.hash == b.dataset.hash && c.split == b.split)
            .ok_or_else(|| {
                Error::config(
                    "candidate",
                    format!(
                        "run {candidate} has no `{metric}` evaluation on the baseline's data ({} version {}, hash {}, split {}){}",
                        b.dataset.name,
                        b.dataset.version,
                        b.dataset.hash,
                        b.split,
                        if cand.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "; it has {}",
                                cand.iter()
                                    .map(|c| format!("{} v{} {}", c.dataset.name, c.dataset.version, c.split))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        }
                    ),
                )
            })?;
        let pairs: Vec<(f64, f64)> = b
            .scores
            .iter()
            .filter_map(|(id, x)| c.scores.get(id).map(|y| (*x, *y)))
            .collect();
        if pairs.is_empty() {
            return Err(Error::config(
                "candidate",
                "the two evaluations share no item",
            ));
        }
        let n = pairs.len() as f64;
        let (bm, cm) = (
            pairs.iter().map(|p| p.0).sum::<f64>() / n,
            pairs.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let d: Vec<f64> = pairs.iter().map(|(x, y)| y - x).collect();
        let dm = cm - bm;
        let ci95 = if d.len() < 2 {
            (dm, dm)
        } else {
            let var = d.iter().map(|v| (v - dm).powi(2)).sum::<f64>() / (n - 1.0);
            let h = t975(d.len() - 1) * (var / n).sqrt();
            (dm - h, dm + h)
        };
        Ok(Comparison {
            baseline,
            candidate,
            metric: metric.into(),
            dataset: b.dataset.clone(),
            split: b.split.clone(),
            paired: pairs.len(),
            baseline_mean: bm,
            candidate_mean: cm,
            diff: dm,
            ci95,
        })
    }

    /// The newest run other than `baseline` with a `metric` evaluation.
    pub fn latest_evaluated(&self, baseline: RunId, metric: &str) -> Result<Option<RunId>> {
        let conn = self.conn()?;
        conn.query_row(
            "SELECT run FROM evaluations WHERE metric = ?1 AND run != ?2 ORDER BY created_at DESC, run DESC LIMIT 1",
            params![metric, baseline.0],
            |r| r.get(0).map(RunId),
        )
        .optional()
        .map_err(|e| self.err(e))
    }
}
