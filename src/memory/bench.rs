//! A throughput and latency benchmark of the SQLite memory store on synthetic entries.
//!
//! Entries are sentences of 8–14 words drawn Zipf-distributed from a 4 000-word vocabulary, so
//! query terms have realistic selectivity (common words match many entries, rare ones few).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;

use super::{Memory, MemoryType, NewEntry, Query};
use crate::error::{Error, Result};

const VOCABULARY: usize = 4_000;
const BATCH: usize = 1_000;
const SYLLABLES: [&str; 24] = [
    "ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fu", "go", "hi", "ja", "ko", "lu",
    "ma", "no", "pi", "ro", "se", "tu", "wa", "zo",
];
const USER: &str = "bench";

/// The benchmark's results (serialisable as JSON).
#[derive(Clone, Debug, Serialize)]
pub struct MemoryBench {
    /// The database file.
    pub path: String,
    /// One result per store size, in the order asked.
    pub sizes: Vec<SizeBench>,
}

/// Insert throughput and retrieval latency at one store size.
#[derive(Clone, Debug, Serialize)]
pub struct SizeBench {
    /// Entries in the store when the queries ran.
    pub entries: usize,
    /// Entries inserted to reach this size (from the previous size).
    pub inserted: usize,
    /// Insert throughput (batches of 1 000 through [`Memory::add_many`]).
    pub inserts_per_s: f64,
    /// Queries run.
    pub queries: usize,
    /// Median retrieval latency.
    pub p50_ms: f64,
    /// 95th percentile retrieval latency.
    pub p95_ms: f64,
    /// Mean retrieval latency.
    pub mean_ms: f64,
    /// Mean number of results per query (limit 5).
    pub mean_hits: f64,
}

struct Words {
    words: Vec<String>,
    cdf: Vec<f64>,
}

impl Words {
    fn new() -> Self {
        let words: Vec<String> = (0..VOCABULARY)
            .map(|i| {
                let n = SYLLABLES.len();
                let mut w = String::new();
                w.push_str(SYLLABLES[i % n]);
                w.push_str(SYLLABLES[(i / n) % n]);
                w.push_str(SYLLABLES[(i / (n * n)) % n]);
                w
            })
            .collect();
        let mut acc = 0.0;
        let cdf = (0..VOCABULARY)
            .map(|r| {
                acc += 1.0 / (r as f64 + 1.0);
                acc
            })
            .collect();
        Self { words, cdf }
    }

    /// A Zipf-distributed word.
    fn zipf(&self, rng: &mut impl Rng) -> &str {
        let total = self.cdf[VOCABULARY - 1];
        let x = rng.random::<f64>() * total;
        let i = self.cdf.partition_point(|c| *c < x).min(VOCABULARY - 1);
        &self.words[i]
    }

    /// A uniformly drawn word (what a query asks about).
    fn uniform(&self, rng: &mut impl Rng) -> &str {
        &self.words[rng.random_range(0..VOCABULARY)]
    }

    fn sentence(&self, rng: &mut impl Rng) -> String {
        let n = rng.random_range(8..=14);
        let mut s = String::from("I");
        for _ in 0..n {
            s.push(' ');
            s.push_str(self.zipf(rng));
        }
        s
    }
}

/// Creates a fresh SQLite file at `path` (an existing one is replaced), grows it to each of
/// `sizes` entries with [`Memory::add_many`] and runs `queries` natural-language retrievals at
/// each size. Runs its own tokio runtime: call it outside async code.
pub fn bench(path: &Path, sizes: &[usize], queries: usize) -> Result<MemoryBench> {
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{suffix}", path.display());
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(Error::File { path: p, source: e });
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::File {
            path: "tokio runtime".into(),
            source: e,
        })?;
    rt.block_on(run(path, sizes, queries))
}

async fn run(path: &Path, sizes: &[usize], queries: usize) -> Result<MemoryBench> {
    let memory = Memory::open(&path.display().to_string()).await?;
    let words = Words::new();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(42);
    let start = SystemTime::now();
    let mut have = 0usize;
    let mut out = Vec::new();
    for &size in sizes {
        let inserted = size.saturating_sub(have);
        let t = Instant::now();
        while have < size {
            let n = BATCH.min(size - have);
            let batch = (0..n)
                .map(|i| {
                    let age = Duration::from_secs(rng.random_range(0..60 * 86_400));
                    NewEntry::new(words.sentence(&mut rng))
                        .kind(MemoryType::ALL[(have + i) % 5])
                        .user(USER)
                        .importance(rng.random_range(0.0..=1.0))
                        .created_at(start - age)
                })
                .collect();
            memory.add_many(batch).await?;
            have += n;
        }
        let insert_s = t.elapsed().as_secs_f64();

        let mut lat = Vec::with_capacity(queries);
        let mut hits = 0usize;
        for _ in 0..queries {
            let text = format!(
                "What do you remember about {} and the {}?",
                words.uniform(&mut rng),
                words.zipf(&mut rng)
            );
            let t = Instant::now();
            hits += memory
                .retrieve(&Query::new(text).user(USER).limit(5))
                .await?
                .len();
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| crate::util::nearest_rank(&lat, p);
        out.push(SizeBench {
            entries: have,
            inserted,
            inserts_per_s: if insert_s > 0.0 {
                inserted as f64 / insert_s
            } else {
                0.0
            },
            queries,
            p50_ms: pct(0.5),
            p95_ms: pct(0.95),
            mean_ms: lat.iter().sum::<f64>() / lat.len().max(1) as f64,
            mean_hits: hits as f64 / queries.max(1) as f64,
        });
    }
    Ok(MemoryBench {
        path: path.display().to_string(),
        sizes: out,
    })
}
