//! Batched kernels of the built-in dense layers, including the low-rank fast path.
//!
//! For `θ_p = W + A_p·B_pᵀ` (σ/√r and the antithetic sign already folded into `A_p`) the layer
//! computes `X·Wᵀ` once for the whole chunk and adds `(X·B_p)·A_pᵀ` per candidate, so the perturbed
//! matrix is never formed. With a shared input the per-candidate factors are folded into one GEMM
//! (`X · [B_1 … B_P]`), which keeps the matrix kernels large.
//!
//! Antithetic pairs with dense noise, `W ± E_k`, share the same way on a shared input: `X·Wᵀ`
//! once, `X·E_kᵀ` once per pair, and the pair's outputs are their sum and difference. That halves
//! the GEMM of a first layer (a candidate's values differ from `X·(W ± E_k)ᵀ` by rounding only,
//! and do not depend on how the population is cut: chunks and tiles keep pairs whole).

use candle_core::Tensor;

use crate::error::{Error, Result, TensorContext};
use crate::function::Layer;
use crate::kernels::{self, with_slice, Mat};
use crate::population::ParamChunk;
use crate::system::lock;

/// A layer's input on the CPU path.
#[derive(Clone, Copy)]
enum LayerIn<'a> {
    /// A tensor: the network's input, or the output of a layer that wrote no per-candidate rows.
    Act(&'a Act),
    /// The layer before's per-candidate output in a tile's [`Scratch`]: `[pc, n, inp]`
    /// row-major, or class-major `[pc, inp, n]` when `cm`.
    Scratch { data: &'a [f32], n: usize, cm: bool },
}

/// Two buffers of one worker thread for the activations between a tile's layers, taken for a
/// tile and put back after it (a tile on the same thread in between, when a worker steals work
/// while waiting, gets fresh ones). Every kernel path writes its whole output before it reads
/// any of it, so what a buffer held before is never seen.
struct Scratch {
    bufs: [Vec<f32>; 2],
}

thread_local! {
    static SCRATCH: std::cell::Cell<[Vec<f32>; 2]> = const {
        std::cell::Cell::new([Vec::new(), Vec::new()])
    };
}

impl Scratch {
    /// Buffers larger than this (floats) are freed after their tile instead of kept.
    const KEEP: usize = 4 << 20;

    fn take() -> Scratch {
        Scratch {
            bufs: SCRATCH.try_with(std::cell::Cell::take).unwrap_or_default(),
        }
    }

    /// `len` floats of `buf` from its first 64-byte boundary (a cache line: the kernels' vector
    /// loads never straddle two), grown when needed. Debug builds fill them with NaN, so that a
    /// kernel path reading before it writes fails the tests.
    fn slice(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
        let need = len + kernels::LINE_FLOATS;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let at = kernels::line_start(buf.as_ptr());
        let s = &mut buf[at..at + len];
        if cfg!(debug_assertions) {
            s.fill(f32::NAN);
        }
        s
    }

    /// What [`Scratch::slice`] handed out, `len` floats.
    fn written(buf: &[f32], len: usize) -> Option<&[f32]> {
        let at = kernels::line_start(buf.as_ptr());
        buf.get(at..at + len)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let bufs = std::mem::take(&mut self.bufs);
        if bufs.iter().all(|b| b.len() <= Self::KEEP) {
            // A thread being torn down has no scratch to return to: the buffers are freed.
            let _ = SCRATCH.try_with(|c| c.set(bufs));
        }
    }
}

/// A tensor with a flag: does it carry the population axis?
#[derive(Clone)]
pub(crate) struct Act {
    pub t: Tensor,
    pub batched: bool,
}

fn check_input(name: &str, x: &Act, inp: usize, pc: usize) -> Result<()> {
    let d = x.t.dims();
    let ok = if x.batched {
        d.len() == 3 && d[0] == pc && d[2] == inp
    } else {
        d.len() == 2 && d[1] == inp
    };
    if ok {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            function: name.to_string(),
            what: "input".into(),
            expected: if x.batched {
                format!("[P={pc}, N, {inp}]")
            } else {
                format!("[N, {inp}]")
            },
            actual: d.to_vec(),
        })
    }
}

/// `x · Wᵀ` for a weight shared by all candidates.
fn shared_matmul(x: &Act, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.batched {
        let (p, n, i) = x.t.dims3()?;
        let out = w.dim(0)?;
        x.t.reshape((p * n, i))?
            .matmul(&w.t()?)?
            .reshape((p, n, out))
    } else {
        x.t.matmul(&w.t()?)
    }
}

/// All layers of a built-in network over a chunk of `pc` candidates. `params` holds each layer's
/// weight, then its bias when it has one.
///
/// On the CPU the candidates are cut into tiles whose widest activation fits in cache, and each
/// tile runs through *all* layers on one worker before the next: activations never leave the
/// cache between layers.
pub(crate) fn forward(
    name: &str,
    x: Act,
    layers: &[Layer],
    params: Vec<ParamChunk>,
    pc: usize,
    kernel: Kernel,
    hoist: &HoistCache,
) -> Result<Act> {
    let tile_floats = kernel.tile_floats();
    let mut it = params.into_iter();
    let mut per_layer = Vec::with_capacity(layers.len());
    for l in layers {
        let missing = || Error::MissingParameter {
            name: format!("{name} (layer weights)"),
        };
        let w = it.next().ok_or_else(missing)?;
        let b = if l.bias {
            Some(it.next().ok_or_else(missing)?)
        } else {
            None
        };
        per_layer.push((*l, w, b));
    }
    // A layer with per-candidate weights or low-rank noise writes each candidate's output
    // class-major, `[out, n]`, when what reads it can take that: a next layer with per-candidate
    // weights or low-rank noise (its GEMMs read a transposed view, its low-rank projections
    // whole rows), or, after the last layer, the class metrics, which read it in place
    // (`kernels::with_class_major`). Its GEMMs land there with no
    // scatter. A layer's output is then the `[P, n, out]` view of that storage.
    let cm: Vec<bool> = (0..per_layer.len())
        .map(|i| {
            class_major_path(&per_layer[i].1)
                && per_layer
                    .get(i + 1)
                    .is_none_or(|next| class_major_path(&next.1))
        })
        .collect();
    let last_cm = cm.last().copied().unwrap_or(false);
    // Runs every layer over candidates [c0, c0 + tc); the last layer writes into `dst` when given.
    // `hoisted`: what the first layer on a shared input needs, computed once for all tiles.
    // On the CPU a layer's per-candidate output goes to this thread's scratch, where the next
    // layer reads it: no allocation and no zero-fill per tile.
    let run = |mut x: Act,
               c0: usize,
               tc: usize,
               narrow: bool,
               mut dst: Option<&mut [f32]>,
               hoisted: Option<&Hoisted>|
     -> Result<Option<Act>> {
        let last = per_layer.len().saturating_sub(1);
        let mut scratch = Scratch::take();
        // Which scratch buffer holds the activation (else it is `x`), and its rows per candidate.
        let mut held: Option<usize> = None;
        let mut n = 0;
        for (i, (l, w, b)) in per_layer.iter().enumerate() {
            let (w, b) = if narrow {
                (
                    w.narrow(c0, tc).at(name)?,
                    b.as_ref().map(|b| b.narrow(c0, tc)).transpose().at(name)?,
                )
            } else {
                (w.clone(), b.clone())
            };
            // The other low-rank kernel: form each candidate's weights in the tile, then the
            // dense per-candidate GEMMs (the same values, another speed).
            let w = match w {
                ParamChunk::LowRank { .. } if kernel.materialize_low_rank => {
                    ParamChunk::PerCandidate(w.materialize(tc).at(name)?)
                }
                w => w,
            };
            if held.is_none() && !kernels::on_cpu_f32(&x.t) {
                x = linear(name, &x, *l, &w, b.as_ref(), tc)?;
                continue;
            }
            let [b0, b1] = &mut scratch.bufs;
            let (input, spare, spare_at) = match held {
                None => {
                    check_input(name, &x, l.inp, tc)?;
                    n = x.t.dim(usize::from(x.batched)).at(name)?;
                    (LayerIn::Act(&x), b0, 0)
                }
                Some(k) => {
                    let (src, spare) = if k == 0 { (&*b0, b1) } else { (&*b1, b0) };
                    let data = Scratch::written(src, tc * n * l.inp).ok_or_else(|| {
                        Error::config(name, "internal: a layer's input is not in the scratch")
                    })?;
                    let cm = i > 0 && cm[i - 1];
                    (LayerIn::Scratch { data, n, cm }, spare, 1 - k)
                }
            };
            let d = if i == last {
                dst.take()
            } else {
                Some(Scratch::slice(spare, tc * n * l.out))
            };
            let h = if i == 0 { hoisted } else { None };
            match linear_cpu(
                name,
                input,
                *l,
                (&w, b.as_ref(), h),
                tc,
                (d, cm[i]),
                tile_floats,
            )? {
                Some(a) => {
                    x = a;
                    held = None;
                }
                None if i == last => return Ok(None),
                None => held = Some(spare_at),
            }
        }
        match held {
            None => Ok(Some(x)),
            // Only the last layer's output can end the loop, and it never goes to the scratch.
            Some(_) => Err(Error::config(
                name,
                "internal: the output was left in the scratch",
            )),
        }
    };
    let shared = !x.batched
        && per_layer.iter().all(|(_, w, b)| {
            matches!(w, ParamChunk::Shared(_))
                && b.as_ref()
                    .is_none_or(|b| matches!(b, ParamChunk::Shared(_)))
        });
    if !kernels::on_cpu_f32(&x.t) || shared || pc == 1 || layers.is_empty() {
        return run(x.clone(), 0, pc, false, None, None)?
            .ok_or_else(|| Error::config(name, "no output"));
    }
    let tiled = || -> Result<Act> {
        let n = x.t.dim(usize::from(x.batched)).at(name)?;
        // The widest activation a tile holds per candidate (a shared input is held once).
        let widest = layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if i == 0 && !x.batched {
                    l.out
                } else {
                    l.out.max(l.inp)
                }
            })
            .max()
            .unwrap_or(1);
        // Candidates per tile: what fits the tile, but no more than a worker's share, so that a
        // small population still keeps every worker busy.
        let share = pc.div_ceil(rayon::current_num_threads().max(1));
        let tc = (tile_floats / (n * widest).max(1)).clamp(1, share.max(1));
        // Antithetic pairs stay whole in a tile (the chunk of a mirrored parameter is even).
        let mirrored = per_layer.iter().any(|(_, w, b)| {
            matches!(w, ParamChunk::Mirrored { .. })
                || matches!(b, Some(ParamChunk::Mirrored { .. }))
        });
        let tc = if mirrored { tc.next_multiple_of(2) } else { tc };
        let out = layers[layers.len() - 1].out;
        // A first layer on a shared input: the input transposed and, with low-rank noise or
        // antithetic pairs, its shared part X·W₀ᵀ, once for all tiles.
        let (l0, w0, _) = &per_layer[0];
        check_input(name, &x, l0.inp, pc)?; // before anything reads the input as `[n, inp]`
        let hoisted = if x.batched || !cm[0] {
            None
        } else {
            // The shared part of low-rank weights and of antithetic pairs.
            let base = match w0 {
                ParamChunk::LowRank { base, .. } if !kernel.materialize_low_rank => Some(base),
                ParamChunk::Mirrored { base, .. } => Some(base),
                _ => None,
            };
            let compute = || {
                with_slice(&x.t, name, |xs| -> Result<Hoisted> {
                    let y0 = match base {
                        Some(b) => {
                            Some(with_slice(b, name, |ws| shared_base(xs, ws, n, *l0, true))?)
                        }
                        None => None,
                    };
                    Ok(Hoisted {
                        xt: kernels::transposed(xs, n, l0.inp),
                        y0,
                    })
                })?
            };
            Some(hoist.get_or_compute(&x.t, base, compute)?)
        };
        // Each tile's share of the output is zeroed by the worker that fills it (a zero-fill of
        // the whole output up front cost 13% of a low-rank evaluation).
        let y = kernels::par_filled(pc * n * out, tc * n * out, |t, dst| -> Result<()> {
            let c0 = t * tc;
            let tcur = dst.len() / (n * out);
            let xt = if x.batched {
                Act {
                    t: x.t.narrow(0, c0, tcur).at(name)?,
                    batched: true,
                }
            } else {
                x.clone()
            };
            // A layer whose output stayed shared cannot write per-candidate rows: copy it out.
            if let Some(a) = run(xt, c0, tcur, true, Some(&mut *dst), hoisted.as_deref())? {
                with_slice(&a.t, name, |v| {
                    for block in dst.chunks_exact_mut(v.len()) {
                        block.copy_from_slice(v);
                    }
                })?;
            }
            Ok(())
        })?;
        let t = if last_cm {
            y.into_tensor((pc, out, n), &candle_core::Device::Cpu)
                .and_then(|t| t.transpose(1, 2))
        } else {
            y.into_tensor((pc, n, out), &candle_core::Device::Cpu)
        };
        Ok(Act {
            t: t.at(name)?,
            batched: true,
        })
    };
    match kernel.threads {
        Some(t) => pool(t)?.install(tiled),
        None => tiled(),
    }
}

/// One dense layer over a chunk of `pc` candidates (candle ops: any device).
pub(crate) fn linear(
    name: &str,
    x: &Act,
    layer: Layer,
    w: &ParamChunk,
    b: Option<&ParamChunk>,
    pc: usize,
) -> Result<Act> {
    check_input(name, x, layer.inp, pc)?;
    let at = |e| Error::tensor(name)(e);
    let (inp, out) = (layer.inp, layer.out);
    let (y, batched) = match w {
        ParamChunk::Shared(w) => (shared_matmul(x, w).map_err(at)?, x.batched),
        ParamChunk::PerCandidate(_) | ParamChunk::Mirrored { .. } => {
            // The candidates' weights (antithetic pairs formed here: this path does not share).
            let w = w.materialize(pc).at(name)?;
            let y = if x.batched {
                x.t.matmul(&w.transpose(1, 2).at(name)?)
            } else {
                // Fold the population into the columns: [N, in] · [in, P·out].
                let n = x.t.dim(0).at(name)?;
                w.reshape((pc * out, inp))
                    .and_then(|w| x.t.matmul(&w.t()?))
                    .and_then(|y| y.reshape((n, pc, out)))
                    .and_then(|y| y.transpose(0, 1))
            };
            (y.map_err(at)?, true)
        }
        ParamChunk::LowRank { base, a, b: fb } => {
            let base_y = shared_matmul(x, base).map_err(at)?;
            let r = a.dim(2).at(name)?;
            let low = if x.batched {
                x.t.matmul(fb).and_then(|xb| xb.matmul(&a.transpose(1, 2)?))
            } else {
                // One GEMM for all candidates: [N, in] · [in, P·r].
                let n = x.t.dim(0).at(name)?;
                fb.permute((1, 0, 2))
                    .and_then(|b| b.reshape((inp, pc * r)))
                    .and_then(|b| x.t.matmul(&b))
                    .and_then(|xb| xb.reshape((n, pc, r)))
                    .and_then(|xb| xb.transpose(0, 1)?.contiguous())
                    .and_then(|xb| xb.matmul(&a.transpose(1, 2)?))
            };
            let y = low.and_then(|l| l.broadcast_add(&base_y)).map_err(at)?;
            (y, true)
        }
    };
    let (y, batched) = match b {
        None => (y, batched),
        Some(ParamChunk::Shared(b)) => (y.broadcast_add(b).map_err(at)?, batched),
        Some(other) => {
            let bp = other.materialize(pc).at(name)?;
            let y = if batched {
                y.broadcast_add(&bp.unsqueeze(1).at(name)?)
            } else {
                y.unsqueeze(0)
                    .and_then(|y| y.broadcast_add(&bp.unsqueeze(1)?))
            };
            (y.map_err(at)?, true)
        }
    };
    let t = layer.act.apply(y).map_err(at)?;
    Ok(Act { t, batched })
}

/// The default tile: 128 Ki floats = 512 KiB.
pub(crate) const DEFAULT_TILE_FLOATS: usize = 128 * 1024;

/// How one population is evaluated: speed only. Tiles never change results; the materialized
/// low-rank kernel and a GPU give the same values up to rounding. It travels with the
/// [`Population`](crate::Population), so two evaluations in one process never see each other's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Kernel {
    /// Floats of activations per worker tile (`None`: `HYPERFUNC_TILE_FLOATS`, else
    /// [`DEFAULT_TILE_FLOATS`]).
    pub tile_floats: Option<usize>,
    /// Low-rank weights formed per candidate instead of the shared GEMM + correction.
    pub materialize_low_rank: bool,
    /// Worker threads for the tiles (`None`: the process's pool, all cores by default).
    pub threads: Option<usize>,
    /// Evaluate on this CUDA device: the population and the examples are copied there for the
    /// evaluation, and only the fitness comes back (`None`: where the population lives).
    pub cuda: Option<usize>,
}

/// A rayon pool of `n` threads, built once per size and kept for the process.
fn pool(n: usize) -> Result<std::sync::Arc<rayon::ThreadPool>> {
    static POOLS: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<usize, std::sync::Arc<rayon::ThreadPool>>>,
    > = std::sync::OnceLock::new();
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(p) = pools.get(&n) {
        return Ok(p.clone());
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(n.max(1))
        .thread_name(move |i| format!("hyperfunc-tiles-{n}-{i}"))
        .build()
        .map_err(|e| Error::config("threads", format!("could not start {n} threads: {e}")))?;
    let p = std::sync::Arc::new(p);
    pools.insert(n, p.clone());
    Ok(p)
}

impl Kernel {
    /// The tile in floats this kernel uses.
    fn tile_floats(self) -> usize {
        static TILE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        self.tile_floats.filter(|&n| n > 0).unwrap_or_else(|| {
            *TILE.get_or_init(|| {
                std::env::var("HYPERFUNC_TILE_FLOATS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .filter(|&v: &usize| v > 0)
                    .unwrap_or(DEFAULT_TILE_FLOATS)
            })
        })
    }
}

/// What a tiled forward computes once for a first layer on a shared input, instead of in every
/// tile.
struct Hoisted {
    /// The input `[n, inp]` transposed, `[inp, n]` row-major: the GEMMs that land class-major
    /// read it without packing it again (the same products in the same order).
    xt: Vec<f32>,
    /// The shared part `X·Wᵀ` of a low-rank layer or of antithetic pairs, class-major `[out, n]`.
    y0: Option<kernels::LineBuf>,
}

/// The [`Hoisted`] parts of the forwards of one population evaluation. Its chunks of candidates
/// run the same network on the same input with the same base weights, so what a first layer
/// hoists (the transposed input, a shared `X·W₀ᵀ`) is computed for the first chunk and reused
/// by the others, instead of once per chunk. Entries are found by the identity of the input's
/// and the base weight's storage and their layouts; an entry holds both tensors, so neither
/// storage can be freed and reused for other values while the cache lives (it is dropped with
/// the evaluation).
#[derive(Default)]
pub(crate) struct HoistCache {
    entries: std::sync::Mutex<Vec<HoistEntry>>,
}

impl std::fmt::Debug for HoistCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoistCache")
            .field("entries", &self.len())
            .finish()
    }
}

/// One [`HoistCache`] entry: the tensors it was computed from, and what was computed.
struct HoistEntry {
    x: Tensor,
    base: Option<Tensor>,
    hoisted: std::sync::Arc<Hoisted>,
}

/// Most entries a [`HoistCache`] keeps (the oldest goes first): one per network a system calls
/// on a shared input in one chunk.
const HOIST_ENTRIES: usize = 8;

/// Whether two tensors view the same storage with the same layout (the same values, while both
/// are alive and nothing writes in place).
fn same_view(a: &Tensor, b: &Tensor) -> bool {
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    std::ptr::eq(&*sa, &*sb)
        && la.start_offset() == lb.start_offset()
        && la.dims() == lb.dims()
        && la.stride() == lb.stride()
}

impl HoistCache {
    /// The hoisted parts for input `x` and base weight `base`, computed by `compute` on a miss.
    fn get_or_compute(
        &self,
        x: &Tensor,
        base: Option<&Tensor>,
        compute: impl FnOnce() -> Result<Hoisted>,
    ) -> Result<std::sync::Arc<Hoisted>> {
        let hit = |e: &HoistEntry| {
            same_view(&e.x, x)
                && match (&e.base, base) {
                    (Some(a), Some(b)) => same_view(a, b),
                    (None, None) => true,
                    _ => false,
                }
        };
        if let Some(e) = lock(&self.entries).iter().find(|e| hit(e)) {
            return Ok(e.hoisted.clone());
        }
        let hoisted = std::sync::Arc::new(compute()?);
        let mut entries = lock(&self.entries);
        if entries.len() >= HOIST_ENTRIES {
            entries.remove(0);
        }
        entries.push(HoistEntry {
            x: x.clone(),
            base: base.cloned(),
            hoisted: hoisted.clone(),
        });
        Ok(hoisted)
    }

    /// Entries held.
    fn len(&self) -> usize {
        lock(&self.entries).len()
    }
}

/// `X · Wᵀ` of a shared input `X` (`n × inp`) and weight `W` (`out × inp`): `[out, n]` when
/// `class_major`, else `[n, out]`.
fn shared_base(
    xs: &[f32],
    ws: &[f32],
    n: usize,
    layer: Layer,
    class_major: bool,
) -> kernels::LineBuf {
    let (inp, out) = (layer.inp, layer.out);
    let mut y0 = kernels::LineBuf::zeros(n * out);
    let (xv, wv) = (Mat::rows(xs, n, inp), Mat::transposed(ws, inp, out));
    if class_major {
        kernels::gemm_cm(&mut y0, n, xv, wv);
    } else {
        kernels::gemm(&mut y0, out, xv, wv);
    }
    y0
}

/// The shared part `X·Wᵀ` of a layer on a shared input, class-major: the one the forward
/// hoisted, or computed into `own` when it did not.
fn shared_part<'a>(
    hoisted: Option<&'a [f32]>,
    own: &'a mut Option<kernels::LineBuf>,
    (xs, ws): (&[f32], &[f32]),
    n: usize,
    layer: Layer,
) -> &'a [f32] {
    match hoisted {
        Some(y0) => y0,
        None => own.insert(shared_base(xs, ws, n, layer, true)),
    }
}

fn vec_of(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    with_slice(t, what, <[f32]>::to_vec)
}

/// Whether [`linear_cpu`] can write a layer's output class-major (`[out, n]` per candidate):
/// per-candidate weights or low-rank noise (on any input, and whichever low-rank kernel), not
/// shared weights.
fn class_major_path(w: &ParamChunk) -> bool {
    !matches!(w, ParamChunk::Shared(_))
}

/// The CPU kernel of one dense layer for one tile of candidates: GEMMs on raw slices, bias and
/// activation fused into the pass that leaves each candidate's output.
fn linear_cpu(
    name: &str,
    x: LayerIn<'_>,
    layer: Layer,
    (w, b, hoisted): (&ParamChunk, Option<&ParamChunk>, Option<&Hoisted>),
    pc: usize,
    (dst, class_major): (Option<&mut [f32]>, bool),
    tile_floats: usize,
) -> Result<Option<Act>> {
    let (inp, out) = (layer.inp, layer.out);
    let (x_batched, n) = match x {
        LayerIn::Act(a) => (a.batched, a.t.dim(usize::from(a.batched)).at(name)?),
        LayerIn::Scratch { n, .. } => (true, n),
    };
    // Antithetic pairs share their `X·Wᵀ` on a shared input written class-major (below);
    // anywhere else each candidate's weights are formed.
    let own_w;
    let w = match w {
        ParamChunk::Mirrored { .. } if x_batched || !class_major => {
            own_w = ParamChunk::PerCandidate(w.materialize(pc).at(name)?);
            &own_w
        }
        w => w,
    };
    let bias = match b {
        None => None,
        Some(ParamChunk::Shared(t)) => Some((vec_of(t, name)?, false)),
        Some(other) => Some((vec_of(&other.materialize(pc).at(name)?, name)?, true)),
    };
    let per_cand_bias = bias.as_ref().is_some_and(|(_, p)| *p);
    let batched = x_batched || !matches!(w, ParamChunk::Shared(_)) || per_cand_bias;
    let per = n * out; // floats of one candidate's output
    let y0 = hoisted.and_then(|h| h.y0.as_deref());
    // A shared input as the class-major GEMMs read it best: through its transpose, when hoisted.
    let xt = hoisted.map(|h| &h.xt[..]);

    // `class_major` asks for each candidate's output block as `[out, n]`; the forward asks it
    // only of layers with per-candidate weights or low-rank noise, whose output is per candidate.
    let cm = class_major && batched && class_major_path(w);
    if class_major && !cm {
        return Err(Error::config(
            name,
            "internal: a class-major output was asked of a layer with shared weights",
        ));
    }
    let mut owned = Vec::new();
    // `dst`, when given, is this tile's share of the forward's output.
    let (y, into_dst): (&mut [f32], bool) = match dst {
        Some(d) if batched && d.len() == pc * per => (d, true),
        _ => {
            owned = vec![0.0f32; if batched { pc * per } else { per }];
            (&mut owned[..], false)
        }
    };

    // The bias of one candidate (or the shared one).
    let bias_of = |cand: usize| -> &[f32] {
        match &bias {
            Some((bv, true)) => &bv[cand * out..(cand + 1) * out],
            Some((bv, false)) => bv,
            None => &[],
        }
    };
    // Bias + activation over one candidate's (or the shared) output block.
    let finish = |block: &mut [f32], cand: usize| {
        let bv = bias_of(cand);
        if cm {
            kernels::bias_act_cm(block, bv, layer.act, n);
        } else {
            kernels::bias_act(block, bv, layer.act);
        }
    };

    // `x_cm`: the input is class-major (written so by the layer before, see `forward`).
    let mut body = |xs: &[f32], x_cm: bool| -> Result<()> {
        match w {
            ParamChunk::Shared(wt) => with_slice(wt, name, |ws| {
                let wt_view = Mat::transposed(ws, inp, out);
                if x_batched {
                    // One GEMM over all candidates' rows, in parallel row tiles of whole candidates.
                    let tile = (tile_floats / per.max(1)).max(1);
                    y.chunks_mut(tile * per).enumerate().for_each(|(t, yc)| {
                        let c0 = t * tile;
                        let rows = yc.len() / out;
                        let xv = Mat::rows(&xs[c0 * n * inp..c0 * n * inp + rows * inp], rows, inp);
                        kernels::gemm(yc, out, xv, wt_view);
                        for (k, block) in yc.chunks_exact_mut(per).enumerate() {
                            finish(block, c0 + k);
                        }
                    });
                } else {
                    // Shared input and weights: one GEMM; a per-candidate bias then fans it out.
                    let mut base = vec![0.0f32; per];
                    kernels::gemm(&mut base, out, Mat::rows(xs, n, inp), wt_view);
                    y.chunks_mut(per).enumerate().for_each(|(k, block)| {
                        block.copy_from_slice(&base);
                        finish(block, k);
                    });
                }
            }),
            ParamChunk::PerCandidate(wt) => with_slice(wt, name, |ws| {
                if x_batched {
                    y.chunks_mut(per).enumerate().for_each(|(p, block)| {
                        let xp = &xs[p * n * inp..(p + 1) * n * inp];
                        let xv = if x_cm {
                            Mat::transposed(xp, n, inp)
                        } else {
                            Mat::rows(xp, n, inp)
                        };
                        let wv = Mat::transposed(&ws[p * out * inp..(p + 1) * out * inp], inp, out);
                        if cm {
                            kernels::gemm_cm(block, n, xv, wv);
                        } else {
                            kernels::gemm(block, out, xv, wv);
                        }
                        finish(block, p);
                    });
                } else {
                    // Fold a tile of candidates into the GEMM's columns: X · [W_p…]ᵀ, then scatter.
                    let tile = (tile_floats / per.max(1)).max(1);
                    let xv = Mat::rows(xs, n, inp);
                    let xv_cm = xt.map_or(xv, |xt| Mat::transposed(xt, n, inp));
                    y.chunks_mut(tile * per).enumerate().for_each(|(t, yc)| {
                        let c0 = t * tile;
                        let tc = yc.len() / per;
                        let cols = tc * out;
                        let wv =
                            Mat::transposed(&ws[c0 * out * inp..(c0 + tc) * out * inp], inp, cols);
                        // Class-major: column-major [n, cols] is each candidate's [out, n], back
                        // to back. Row-major: a buffer, scattered per candidate below.
                        let buf = if cm {
                            kernels::gemm_cm(yc, n, xv_cm, wv);
                            None
                        } else {
                            let mut buf = vec![0.0f32; n * cols];
                            kernels::gemm(&mut buf, cols, xv, wv);
                            Some(buf)
                        };
                        for (k, block) in yc.chunks_exact_mut(per).enumerate() {
                            if let Some(buf) = &buf {
                                for (row, dst) in block.chunks_exact_mut(out).enumerate() {
                                    dst.copy_from_slice(
                                        &buf[row * cols + k * out..row * cols + (k + 1) * out],
                                    );
                                }
                            }
                            finish(block, c0 + k);
                        }
                    });
                }
            }),
            ParamChunk::Mirrored { base, e } => with_slice(base, name, |ws| {
                with_slice(e, name, |es| {
                    // Candidates 2k and 2k + 1 are W ± E_k: X·Wᵀ once (hoisted across tiles),
                    // X·E_kᵀ once per pair into the second half of the pairs' output, then
                    // each candidate's output as the sum or the difference: half the GEMM.
                    let mut own = None;
                    let y0 = shared_part(y0, &mut own, (xs, ws), n, layer);
                    let pairs = (tile_floats / (2 * per).max(1)).max(1);
                    let xv_cm = xt.map_or(Mat::rows(xs, n, inp), |xt| Mat::transposed(xt, n, inp));
                    y.chunks_mut(2 * pairs * per)
                        .enumerate()
                        .for_each(|(t, yc)| {
                            let k0 = t * pairs;
                            let tk = yc.len() / (2 * per);
                            let ev = Mat::transposed(
                                &es[k0 * out * inp..(k0 + tk) * out * inp],
                                inp,
                                tk * out,
                            );
                            kernels::gemm_cm(&mut yc[tk * per..], n, xv_cm, ev);
                            kernels::mirror_out(yc, y0, per, tk, &mut |k, block| {
                                finish(block, 2 * k0 + k);
                            });
                        });
                })
            })?,
            ParamChunk::LowRank { base, a, b: fb } => {
                let r = a.dim(2).at(name)?;
                // One copy of the factor, laid out rank-major as it is read.
                let av = with_slice(a, name, |s| kernels::rank_major(s, out, r))?;
                // One copy of B too, in the layout its branch reads: per candidate [r, inp]
                // (the rows a projection dots with), or all candidates side by side as the
                // columns of one GEMM, [inp, pc·r].
                let bv = with_slice(fb, name, |s| {
                    if x_batched {
                        kernels::rank_major(s, inp, r)
                    } else {
                        // Element by element: a copy of `r` floats was a `memcpy` call per
                        // row (2% of a rank-1 evaluation).
                        let mut cols = vec![0.0f32; inp * pc * r];
                        for (p, bp) in s.chunks_exact(inp * r).enumerate() {
                            for (i, row) in bp.chunks_exact(r).enumerate() {
                                let at = i * pc * r + p * r;
                                for (d, &v) in cols[at..at + r].iter_mut().zip(row) {
                                    *d = v;
                                }
                            }
                        }
                        cols
                    }
                })?;
                with_slice(base, name, |ws| {
                    let wt_view = Mat::transposed(ws, inp, out);
                    if x_batched && x_cm {
                        // A class-major input, `[inp, n]` per candidate: per candidate the
                        // shared part as one GEMM read through a transposed view, its factors
                        // `[r, n]` as rows of the input summed down whole rows, and the update.
                        let mut xbt = kernels::LineBuf::zeros(r * n);
                        let mut xb = if cm { Vec::new() } else { vec![0.0f32; n * r] };
                        y.chunks_mut(per).enumerate().for_each(|(p, block)| {
                            let xp = &xs[p * n * inp..(p + 1) * n * inp];
                            let xv = Mat::transposed(xp, n, inp);
                            let bt = &bv[p * r * inp..(p + 1) * r * inp];
                            kernels::project_cm(&mut xbt, xp, bt, n);
                            let ap = &av[p * out * r..(p + 1) * out * r];
                            if cm {
                                kernels::gemm_cm(block, n, xv, wt_view);
                                let fin = (bias_of(p), layer.act);
                                kernels::low_rank_cm(block, (&[], 0), (&xbt, ap, r), fin, n);
                            } else {
                                kernels::gemm(block, out, xv, wt_view);
                                kernels::transpose_into(&mut xb, &xbt, r, n);
                                kernels::low_rank_add(block, &xb, r, 0, ap, r);
                                finish(block, p);
                            }
                        });
                    } else if x_batched && cm {
                        // The same, class-major: the shared part as one GEMM laid out
                        // [out, pc·n] (candidate p's part starts at column p·n), then per
                        // candidate its factors as [r, n] and the update down whole rows.
                        let mut base_t = vec![0.0f32; pc * per];
                        kernels::gemm_cm(&mut base_t, pc * n, Mat::rows(xs, pc * n, inp), wt_view);
                        let mut xb = vec![0.0f32; n * r];
                        let mut xbt = vec![0.0f32; n * r];
                        y.chunks_mut(per).enumerate().for_each(|(p, block)| {
                            let xp = &xs[p * n * inp..(p + 1) * n * inp];
                            let bt = &bv[p * r * inp..(p + 1) * r * inp];
                            kernels::project(&mut xb, xp, bt, inp);
                            let factors = if r == 1 {
                                &xb // [n, 1] is [1, n]
                            } else {
                                kernels::transpose_into(&mut xbt, &xb, n, r);
                                &xbt
                            };
                            let ap = &av[p * out * r..(p + 1) * out * r];
                            let base = (&base_t[p * n..], pc * n);
                            let fin = (bias_of(p), layer.act);
                            kernels::low_rank_cm(block, base, (factors, ap, r), fin, n);
                        });
                    } else if x_batched {
                        // The shared part as one GEMM over every row of the tile, then per
                        // candidate X_p·B_p (n × r) and the rank-r update in place.
                        kernels::gemm(y, out, Mat::rows(xs, pc * n, inp), wt_view);
                        let mut xb = vec![0.0f32; n * r];
                        y.chunks_mut(per).enumerate().for_each(|(p, block)| {
                            let xp = &xs[p * n * inp..(p + 1) * n * inp];
                            let bt = &bv[p * r * inp..(p + 1) * r * inp];
                            kernels::project(&mut xb, xp, bt, inp);
                            let ap = &av[p * out * r..(p + 1) * out * r];
                            kernels::low_rank_add(block, &xb, r, 0, ap, r);
                            finish(block, p);
                        });
                    } else if cm {
                        // The same, class-major: X·Wᵀ as [out, n] once, X·[B_1 … B_P] as
                        // [pc·r, n] (candidate p's factors are rows p·r..p·r + r), then per
                        // candidate the rank-r update down whole rows.
                        let mut own = None;
                        let y0 = shared_part(y0, &mut own, (xs, ws), n, layer);
                        let mut xbt = kernels::LineBuf::zeros(n * pc * r);
                        kernels::gemm_cm(
                            &mut xbt,
                            n,
                            xt.map_or(Mat::rows(xs, n, inp), |xt| Mat::transposed(xt, n, inp)),
                            Mat::rows(&bv, inp, pc * r),
                        );
                        y.chunks_mut(per).enumerate().for_each(|(p, block)| {
                            let ap = &av[p * out * r..(p + 1) * out * r];
                            let xp = &xbt[p * r * n..(p + 1) * r * n];
                            let fin = (bias_of(p), layer.act);
                            kernels::low_rank_cm(block, (y0, n), (xp, ap, r), fin, n);
                        });
                    } else {
                        // X·Wᵀ once; X·[B_1 … B_P] as one GEMM; then per candidate a rank-r update.
                        // (A hoisted X·Wᵀ is class-major: only the branch above takes it.)
                        let y0 = shared_base(xs, ws, n, layer, false);
                        let mut xb = vec![0.0f32; n * pc * r];
                        kernels::gemm(
                            &mut xb,
                            pc * r,
                            Mat::rows(xs, n, inp),
                            Mat::rows(&bv, inp, pc * r),
                        );
                        y.chunks_mut(per).enumerate().for_each(|(p, block)| {
                            block.copy_from_slice(&y0);
                            let ap = &av[p * out * r..(p + 1) * out * r];
                            kernels::low_rank_add(block, &xb, pc * r, p * r, ap, r);
                            finish(block, p);
                        });
                    }
                })
            }
        }
    };
    // A class-major input is read in place by per-candidate GEMMs (as transposed views) and
    // low-rank projections; anything else reads it row-major (`with_slice` copies a strided
    // view).
    match x {
        LayerIn::Scratch { data, cm, .. } => body(data, cm)?,
        LayerIn::Act(x) => {
            let in_place = if x.batched && class_major_path(w) {
                kernels::with_class_major(&x.t, name, |xs| body(xs, true))?
            } else {
                None
            };
            match in_place {
                Some(r) => r?,
                None => with_slice(&x.t, name, |xs| body(xs, false))??,
            }
        }
    }
    if into_dst {
        return Ok(None);
    }
    let cpu = &candle_core::Device::Cpu;
    let t = if cm {
        Tensor::from_vec(owned, (pc, out, n), cpu).and_then(|t| t.transpose(1, 2))
    } else if batched {
        Tensor::from_vec(owned, (pc, n, out), cpu)
    } else {
        Tensor::from_vec(owned, (n, out), cpu)
    };
    Ok(Some(Act {
        t: t.at(name)?,
        batched,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::function::Activation;
    use crate::kernels::grouping::data as values;
    use candle_core::Device;

    fn bits(a: &Act) -> Vec<u32> {
        a.t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("a CPU f32 output")
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    #[test]
    fn chunks_of_one_evaluation_share_what_a_first_layer_hoists(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let (n, inp, hid, out, pc) = (64, 8, 4, 3, 4);
        let dev = &Device::Cpu;
        let layers = [
            Layer {
                inp,
                out: hid,
                act: Activation::Tanh,
                bias: false,
            },
            Layer {
                inp: hid,
                out,
                act: Activation::Identity,
                bias: false,
            },
        ];
        let params = vec![
            ParamChunk::Mirrored {
                base: Tensor::from_vec(values(hid * inp, 1), (hid, inp), dev)?,
                e: Tensor::from_vec(values(pc / 2 * hid * inp, 2), (pc / 2, hid, inp), dev)?,
            },
            ParamChunk::PerCandidate(Tensor::from_vec(
                values(pc * out * hid, 3),
                (pc, out, hid),
                dev,
            )?),
        ];
        // Two example ranges of one input, and a copy of the first in other storage.
        let all = Tensor::from_vec(values(2 * n * inp, 4), (2 * n, inp), dev)?;
        let first = Act {
            t: all.narrow(0, 0, n)?,
            batched: false,
        };
        let second = Act {
            t: all.narrow(0, n, n)?,
            batched: false,
        };
        let copy = Act {
            t: Tensor::from_vec(values(n * inp, 4), (n, inp), dev)?,
            batched: false,
        };
        // `None`: a cache of this run alone (as an evaluation of one chunk has).
        let run = |x: &Act, cache: Option<&HoistCache>| {
            forward(
                "net",
                x.clone(),
                &layers,
                params.clone(),
                pc,
                Kernel::default(),
                cache.unwrap_or(&HoistCache::default()),
            )
            .map(|a| bits(&a))
        };
        let cache = HoistCache::default();
        let alone = run(&first, None)?;
        assert_eq!(run(&first, Some(&cache))?, alone);
        assert_eq!(cache.len(), 1);
        // The same view again (a narrow of the same rows, as the next chunk gets it): a hit.
        let again = Act {
            t: all.narrow(0, 0, n)?,
            batched: false,
        };
        assert_eq!(run(&again, Some(&cache))?, alone);
        assert_eq!(cache.len(), 1, "the same view hit the entry");
        // Other rows of the same storage, and the same values in other storage: misses.
        assert_eq!(run(&second, Some(&cache))?, run(&second, None)?);
        assert_eq!(cache.len(), 2);
        assert_eq!(run(&copy, Some(&cache))?, alone);
        assert_eq!(cache.len(), 3);
        assert_ne!(run(&second, None)?, alone, "the two ranges differ");
        Ok(())
    }
}
