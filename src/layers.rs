//! Batched kernels of the built-in dense layers, including the low-rank fast path.
//!
//! For `θ_p = W + A_p·B_pᵀ` (σ/√r and the antithetic sign already folded into `A_p`) the layer
//! computes `X·Wᵀ` once for the whole chunk and adds `(X·B_p)·A_pᵀ` per candidate, so the perturbed
//! matrix is never formed. With a shared input the per-candidate factors are folded into one GEMM
//! (`X · [B_1 … B_P]`), which keeps the matrix kernels large.

use candle_core::Tensor;

use crate::error::{Error, Result, TensorContext};
use crate::function::Layer;
use crate::population::ParamChunk;

/// A tensor with a flag: does it carry the population axis?
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

/// One dense layer over a chunk of `pc` candidates.
pub(crate) fn linear(
    name: &str,
    x: &Act,
    layer: Layer,
    w: &ParamChunk,
    b: &ParamChunk,
    pc: usize,
) -> Result<Act> {
    check_input(name, x, layer.inp, pc)?;
    let at = |e| Error::tensor(name)(e);
    let (inp, out) = (layer.inp, layer.out);
    let (y, batched) = match w {
        ParamChunk::Shared(w) => (shared_matmul(x, w).map_err(at)?, x.batched),
        ParamChunk::PerCandidate(w) => {
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
        ParamChunk::Shared(b) => (y.broadcast_add(b).map_err(at)?, batched),
        other => {
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
