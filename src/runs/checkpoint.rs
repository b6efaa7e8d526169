//! Checkpoint files: θ and the optimiser's moments as safetensors, the rest of the state as JSON
//! in its metadata. Written to a temporary file, fsynced, renamed over, and the directory
//! fsynced, so a crash at any moment leaves either the old file or the new one — never half.
//! Noise is never stored: it is regenerated from the seed.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::theta::Theta;

const META_KEY: &str = "hyperfunc.checkpoint";

/// Everything besides θ and the moments that a resumed run needs to go on bit for bit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Meta {
    /// Generations completed.
    pub generation: usize,
    /// Update steps taken (Adam's bias correction).
    pub steps: i32,
    /// Generations since the best fitness last improved.
    pub since_improved: usize,
    /// Best fitness so far and its generation, with the file holding its θ.
    pub best: Option<(f32, usize, String)>,
    /// Live overrides in force.
    pub live: Map<String, Value>,
    /// Prompts of θ.
    pub prompts: BTreeMap<String, String>,
    /// Wall seconds the run had taken.
    pub seconds: f64,
}

/// The state a checkpoint holds.
pub(crate) struct State {
    pub theta: Theta,
    pub m: BTreeMap<String, Tensor>,
    pub v: BTreeMap<String, Tensor>,
    pub meta: Meta,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::File {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, directory fsync.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(io(&tmp))?;
    commit(&tmp, path)
}

/// Makes the finished file `tmp` durable as `path`: fsync, rename over, directory fsync.
fn commit(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(tmp))?;
    std::fs::rename(tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        // A directory fsync makes the rename durable; not every platform can open a directory.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Serialises a checkpoint; the bytes written.
pub(crate) fn save(path: &Path, state: &State) -> Result<u64> {
    let bytes = encode(state).map_err(|reason| Error::RunStore {
        path: path.display().to_string(),
        reason,
    })?;
    write_atomic(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// A checkpoint as bytes (safetensors: θ, the moments, the rest as JSON metadata).
pub(crate) fn encode(state: &State) -> std::result::Result<Vec<u8>, String> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (prefix, map) in [
        ("theta/", state.theta.iter().collect::<Vec<_>>()),
        ("m/", state.m.iter().map(|(k, t)| (k.as_str(), t)).collect()),
        ("v/", state.v.iter().map(|(k, t)| (k.as_str(), t)).collect()),
    ] {
        for (name, t) in map {
            let t = t.contiguous().map_err(|e| format!("{name}: {e}"))?;
            tensors.push((format!("{prefix}{name}"), t));
        }
    }
    let mut meta = state.meta.clone();
    meta.prompts = state
        .theta
        .prompts()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let json = serde_json::to_string(&meta).map_err(|e| e.to_string())?;
    let info = HashMap::from([(META_KEY.to_string(), json)]);
    safetensors::serialize(tensors, Some(info))
        .map_err(|e| format!("could not serialise the checkpoint: {e}"))
}

/// Reads a checkpoint onto `device`.
pub(crate) fn load(path: &Path, device: &Device) -> Result<State> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    decode(&bytes, device).map_err(|reason| Error::RunStore {
        path: path.display().to_string(),
        reason,
    })
}

/// Reads checkpoint bytes written by [`encode`] onto `device`.
pub(crate) fn decode(bytes: &[u8], device: &Device) -> std::result::Result<State, String> {
    let map = candle_core::safetensors::load_buffer(bytes, device)
        .map_err(|e| format!("not a readable checkpoint: {e}"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("not a readable checkpoint: {e}"))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| "no hyperfunc checkpoint metadata".to_string())?;
    let meta: Meta = serde_json::from_str(json).map_err(|e| format!("checkpoint metadata: {e}"))?;
    let (mut theta, mut m, mut v) = (Theta::default(), BTreeMap::new(), BTreeMap::new());
    for (name, t) in map {
        if let Some(n) = name.strip_prefix("theta/") {
            theta.insert(n, t);
        } else if let Some(n) = name.strip_prefix("m/") {
            m.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("v/") {
            v.insert(n.to_string(), t);
        }
    }
    for (k, p) in &meta.prompts {
        theta.set_prompt(k.clone(), p.clone());
    }
    Ok(State { theta, m, v, meta })
}

/// Saves θ atomically (the best candidate's file).
pub(crate) fn save_theta(path: &Path, theta: &Theta) -> Result<()> {
    let tmp = path.with_extension("part");
    theta.save(&tmp)?;
    commit(&tmp, path)
}
