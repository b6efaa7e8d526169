//! Seeded perturbations: dense Gaussian or low-rank, regenerated from (seed, generation, pair,
//! parameter) with a counter-based generator, and turned into a [`Population`].
//!
//! The noise of pair `k` of parameter `name` in generation `g` depends on nothing else, so any
//! machine holding the seed can rebuild any candidate.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use crate::error::{Result, TensorContext};
use crate::kernels::mirror;
use crate::param::ParamSpec;
use crate::population::{Perturbation, Population};
use crate::rng;
use crate::theta::{Registry, Theta};

/// The unit noise of one generation for one parameter, one row per pair (or per candidate
/// without antithetic sampling).
#[derive(Clone, Debug)]
pub(crate) enum GenNoise {
    /// `[K, ..shape]` standard normals.
    Dense(Tensor),
    /// `ε_k = a_k·b_kᵀ/√r` with `a: [K, out, r]`, `b: [K, in, r]` standard normals.
    LowRank { a: Tensor, b: Tensor, r: usize },
}

/// Where a generation's noise comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NoiseKey {
    pub seed: u64,
    pub generation: u64,
}

/// Draws the unit noise of every parameter for `k` pairs.
pub(crate) fn draw(
    reg: &Registry,
    key: NoiseKey,
    k: usize,
    device: &Device,
) -> Result<BTreeMap<String, GenNoise>> {
    reg.params
        .iter()
        .map(|(name, spec)| Ok((name.clone(), draw_param(name, spec, key, k, device)?)))
        .collect()
}

fn stream(key: NoiseKey, pair: usize, name: &str) -> [u64; 4] {
    [key.seed, key.generation, pair as u64, rng::name_hash(name)]
}

fn draw_param(
    name: &str,
    spec: &ParamSpec,
    key: NoiseKey,
    k: usize,
    device: &Device,
) -> Result<GenNoise> {
    match spec.effective_rank() {
        None => {
            let m = spec.numel();
            let mut buf = vec![0.0f32; k * m];
            for (pair, row) in buf.chunks_mut(m).enumerate() {
                rng::fill_normals(&stream(key, pair, name), row);
            }
            let mut dims = vec![k];
            dims.extend_from_slice(spec.shape());
            Ok(GenNoise::Dense(
                Tensor::from_vec(buf, dims, device).at(name)?,
            ))
        }
        Some(r) => {
            let (out, inp) = (spec.shape()[0], spec.shape()[1]);
            let (ma, mb) = (out * r, inp * r);
            let mut a = vec![0.0f32; k * ma];
            let mut b = vec![0.0f32; k * mb];
            let mut row = vec![0.0f32; ma + mb];
            for pair in 0..k {
                rng::fill_normals(&stream(key, pair, name), &mut row);
                a[pair * ma..(pair + 1) * ma].copy_from_slice(&row[..ma]);
                b[pair * mb..(pair + 1) * mb].copy_from_slice(&row[ma..]);
            }
            Ok(GenNoise::LowRank {
                a: Tensor::from_vec(a, (k, out, r), device).at(name)?,
                b: Tensor::from_vec(b, (k, inp, r), device).at(name)?,
                r,
            })
        }
    }
}

/// The candidates `θ + σ·(±ε_k)` around `theta`.
pub(crate) fn population(
    theta: &Theta,
    noise: &BTreeMap<String, GenNoise>,
    sigma: f64,
    antithetic: bool,
) -> Result<Population> {
    let mut perturb = BTreeMap::new();
    let mut size = 0;
    for (name, n) in noise {
        let p = match n {
            GenNoise::Dense(e) => {
                let e = (e * sigma).at(name)?;
                if antithetic {
                    Perturbation::Mirrored(e)
                } else {
                    Perturbation::Dense(e)
                }
            }
            GenNoise::LowRank { a, b, r } => {
                let a = (a * (sigma / (*r as f64).sqrt())).at(name)?;
                if antithetic {
                    Perturbation::LowRank {
                        a: mirror(&a, true).at(name)?,
                        b: mirror(b, false).at(name)?,
                    }
                } else {
                    Perturbation::LowRank { a, b: b.clone() }
                }
            }
        };
        size = match &p {
            Perturbation::Dense(t) | Perturbation::Explicit(t) => t.dim(0).at(name)?,
            Perturbation::Mirrored(e) => 2 * e.dim(0).at(name)?,
            Perturbation::LowRank { a, .. } => a.dim(0).at(name)?,
        };
        perturb.insert(name.clone(), p);
    }
    Ok(Population::perturbed(theta.clone(), size, perturb))
}

/// `Σ_k w_k ε_k` for one parameter: one GEMM for dense and for low-rank noise
/// (`[out, K·r] · [K·r, in]` over the stacked, weighted factors).
pub(crate) fn weighted_sum(
    noise: &GenNoise,
    w: &Tensor,
    shape: &[usize],
) -> candle_core::Result<Tensor> {
    match noise {
        GenNoise::Dense(e) => {
            let k = e.dim(0)?;
            let flat = e.reshape((k, e.elem_count() / k.max(1)))?;
            w.reshape((1, k))?.matmul(&flat)?.reshape(shape)
        }
        GenNoise::LowRank { a, b, r } => {
            let (k, out, _) = a.dims3()?;
            let inp = b.dim(1)?;
            let aw = a.broadcast_mul(&w.reshape((k, 1, 1))?)?;
            let aw = aw.permute((1, 0, 2))?.reshape((out, k * r))?;
            let bs = b.permute((1, 0, 2))?.reshape((inp, k * r))?;
            aw.matmul(&bs.t()?)? / (*r as f64).sqrt()
        }
    }
}
