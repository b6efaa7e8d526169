//! CPU kernels of the hot path: GEMM on raw slices through the `gemm` crate (the backend candle's
//! CPU matmul uses), branch-free `exp`/`tanh`/`ln` that the compiler vectorizes, and helpers to
//! read candle tensors without copying.
//!
//! Elementwise maths is fused into the pass that writes a GEMM's output while it is still in cache
//! (bias + activation), instead of one candle op (one allocation, one memory pass) per step.

use candle_core::{Storage, Tensor};

use crate::error::{Error, Result};
use crate::function::Activation;

/// Runs `f` on the contiguous f32 data of a CPU tensor (copying only if it is not contiguous).
pub(crate) fn with_slice<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous().map_err(Error::tensor(what))?
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::config(
            what,
            "the CPU kernel got a tensor that is not on the CPU",
        ));
    };
    let data = cpu.as_slice::<f32>().map_err(Error::tensor(what))?;
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::config(what, "tensor is not contiguous after contiguous()"))?;
    Ok(f(&data[a..b]))
}

/// `len` floats built by all workers, `chunk` at a time (the last chunk may be shorter): each
/// chunk is zeroed and then filled by `fill(index, chunk)` on the worker that runs it, while it
/// is in that worker's cache. A zero-fill of the whole buffer up front would pass over memory
/// that is out of cache again by the time it is filled. The floats start on a 64-byte boundary
/// (a cache line), so that the kernels' vector loads and stores never straddle two lines.
pub(crate) fn par_filled<E: Send>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [f32]) -> std::result::Result<(), E> + Sync + Send,
) -> std::result::Result<LineBuf, E> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    let mut v: Vec<f32> = Vec::with_capacity(len + LINE_FLOATS);
    let at = line_start(v.as_ptr());
    let (head, rest) = v.spare_capacity_mut().split_at_mut(at);
    head.fill(MaybeUninit::new(0.0));
    rest[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .try_for_each(|(i, raw)| {
            raw.fill(MaybeUninit::new(0.0));
            // SAFETY: every element of `raw` was written just above, and `MaybeUninit<f32>`
            // has the size, alignment and valid bit patterns of `f32`, so the slice may be
            // used as `[f32]`; the new borrow replaces `raw`'s, which is not used again.
            let dst =
                unsafe { &mut *(std::ptr::from_mut::<[MaybeUninit<f32>]>(raw) as *mut [f32]) };
            fill(i, dst)
        })?;
    // SAFETY: the first `at` elements were zeroed above; the chunks cover the next `len` and
    // each was zeroed before anything else; `try_for_each` returned `Ok`, so every chunk ran.
    // `at + len` is within the capacity reserved.
    unsafe { v.set_len(at + len) };
    Ok(LineBuf { data: v, at })
}

/// Floats in a 64-byte cache line.
pub(crate) const LINE_FLOATS: usize = 16;

/// How many floats from `p` the first 64-byte boundary is (a buffer reserved with
/// [`LINE_FLOATS`] spare floats always has it within reach).
pub(crate) fn line_start(p: *const f32) -> usize {
    p.align_offset(64).min(LINE_FLOATS)
}

/// Owned floats that start on a 64-byte boundary (a cache line), so that the kernels' vector
/// loads and stores never straddle two lines: `len` floats from index `at` of `data` (what
/// comes before only aligns them). Derefs to those floats.
pub(crate) struct LineBuf {
    data: Vec<f32>,
    at: usize,
}

impl LineBuf {
    /// `len` zeros.
    pub(crate) fn zeros(len: usize) -> LineBuf {
        let mut data = vec![0.0f32; len + LINE_FLOATS];
        let at = line_start(data.as_ptr());
        data.truncate(at + len);
        LineBuf { data, at }
    }

    /// The floats, as a tensor of `shape` (a view of the buffer: no copy).
    pub(crate) fn into_tensor(
        self,
        shape: impl Into<candle_core::Shape>,
        device: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let (all, len) = (self.data.len(), self.data.len() - self.at);
        Tensor::from_vec(self.data, all, device)?
            .narrow(0, self.at, len)?
            .reshape(shape)
    }
}

impl std::ops::Deref for LineBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data[self.at..]
    }
}

impl std::ops::DerefMut for LineBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data[self.at..]
    }
}

/// `src` (`rows × cols`, row-major) transposed into `dst` (`cols × rows`, row-major), in bands
/// of 16 rows: a band's reads stay in cache while each column's 16 values are written together.
pub(crate) fn transpose_into(dst: &mut [f32], src: &[f32], rows: usize, cols: usize) {
    const BAND: usize = 16;
    if cols == 0 {
        return;
    }
    for (b, band) in src
        .chunks(BAND * cols)
        .take(rows.div_ceil(BAND))
        .enumerate()
    {
        let i0 = b * BAND;
        let h = band.len() / cols;
        for j in 0..cols {
            for (k, d) in dst[j * rows + i0..j * rows + i0 + h].iter_mut().enumerate() {
                *d = band[k * cols + j];
            }
        }
    }
}

/// [`transpose_into`] a new buffer.
pub(crate) fn transposed(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; rows * cols];
    transpose_into(&mut t, src, rows, cols);
    t
}

/// Whether a tensor can take the CPU kernels (CPU device, f32).
pub(crate) fn on_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// `e[p, ..] + base[..]` for every p: the candidates of a dense perturbation (one pass, no
/// broadcast indexing), the rows shared among all workers (a population's candidates are
/// megabytes: written by one thread, they kept the other cores waiting).
pub(crate) fn add_rows(e: &Tensor, base: &Tensor, what: &str) -> Result<Tensor> {
    let dims = e.dims().to_vec();
    let out = with_slice(base, what, |b| {
        with_slice(e, what, |ev| {
            let row = b.len();
            if ev.is_empty() {
                return Ok(None);
            }
            if row == 0 || ev.len() % row != 0 {
                return Err(Error::config(
                    what,
                    format!(
                        "internal: {} perturbation values are not rows of {row}",
                        ev.len()
                    ),
                ));
            }
            let task = row * (16_384 / row).max(1); // whole rows, about 64 KiB per task
            par_filled(ev.len(), task, |t, dst| {
                let src = &ev[t * task..t * task + dst.len()];
                for (d, s) in dst.chunks_exact_mut(row).zip(src.chunks_exact(row)) {
                    for ((d, &x), &y) in d.iter_mut().zip(s).zip(b) {
                        *d = x + y;
                    }
                }
                Ok::<(), Error>(())
            })
            .map(Some)
        })
    })???;
    match out {
        Some(lined) => lined.into_tensor(dims, e.device()),
        None => Tensor::from_vec(Vec::<f32>::new(), dims, e.device()),
    }
    .map_err(Error::tensor(what))
}

/// Interleaves `[K, ..]` rows as `+x_0, −x_0, +x_1, −x_1, …` (`[2K, ..]`; without `negate`,
/// each row twice): antithetic pairs laid out as candidates, on any device.
pub(crate) fn mirror(x: &Tensor, negate: bool) -> candle_core::Result<Tensor> {
    let second = if negate { x.neg()? } else { x.clone() };
    let stacked = Tensor::stack(&[x, &second], 1)?;
    let mut dims = x.dims().to_vec();
    dims[0] *= 2;
    stacked.reshape(dims)
}

/// Rows `[start, start + len)` of [`mirror`]`(e, true)`, from the pairs they touch only: the
/// perturbations of those candidates of antithetic pairs `e`, on any device.
pub(crate) fn mirrored_range(e: &Tensor, start: usize, len: usize) -> candle_core::Result<Tensor> {
    let k0 = start / 2;
    let pairs = e.narrow(0, k0, (start + len).div_ceil(2) - k0)?;
    mirror(&pairs, true)?.narrow(0, start % 2, len)
}

/// Candidates `[start, start + len)` of antithetic pairs around `base`: candidate `2k` is
/// `base + e_k`, candidate `2k + 1` is `base − e_k` (`e`: `[K, ..]`, the pairs' `+ε_k`).
/// `[len, ..]`, in one pass on the CPU.
pub(crate) fn unmirror(
    e: &Tensor,
    base: &Tensor,
    start: usize,
    len: usize,
    what: &str,
) -> Result<Tensor> {
    if !on_cpu_f32(e) || !on_cpu_f32(base) {
        return mirrored_range(e, start, len)
            .and_then(|m| m.broadcast_add(base))
            .map_err(Error::tensor(what));
    }
    let (k0, k1) = (start / 2, (start + len).div_ceil(2));
    // The pairs the range touches (an error when it runs past them).
    let pairs = e.narrow(0, k0, k1 - k0).map_err(Error::tensor(what))?;
    let mut dims = e.dims().to_vec();
    dims[0] = len;
    let row = base.elem_count();
    let out = with_slice(&pairs, what, |ev| {
        with_slice(base, what, |b| {
            let mut out = Vec::with_capacity(len * row);
            for c in start..start + len {
                let src = &ev[(c / 2 - k0) * row..][..row];
                let sign = if c % 2 == 0 { 1.0f32 } else { -1.0 };
                out.extend(src.iter().zip(b).map(|(&x, &y)| y + sign * x));
            }
            out
        })
    })??;
    Tensor::from_vec(out, dims, e.device()).map_err(Error::tensor(what))
}

/// A row-major matrix view: `rows × cols` with the given strides (in elements).
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A contiguous row-major matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose view of a contiguous row-major `cols × rows` matrix.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: 1,
            cs: rows,
        }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// Whether the `gemm` crate computes an `m × n × k` product on its blocked path with the whole
/// depth in one block. There every output element is one sum over `k` in a fixed order, so its
/// value does not depend on how many other rows or columns are computed with it. Smaller shapes
/// take other paths (dot-product kernels when `m·n ≤ 256`, matrix-vector kernels when `m` or `n`
/// is 1) that round differently; products with `k ≤ 2` are exact outer products on any path.
/// (gemm-common 0.19: `gemm_basic_generic`; the depth block is `k` up to 512, and beyond that
/// depends on `k` alone once `m` or `n` exceeds 64.)
fn canonical(m: usize, n: usize, k: usize) -> bool {
    k <= 2 || (m >= 2 && n >= 2 && m * n > 256 && (k <= 512 || m > 64 || n > 64))
}

/// `dst[m × n] (row stride dst_rs) = lhs · rhs`, single-threaded.
///
/// Every element is computed the same way whatever `m` and `n` are: a shape off the blocked path
/// is padded with zero columns (or rows) onto it. So a candidate's values do not depend on how
/// its population was cut into chunks and tiles, and workers that split a generation get a
/// single process's fitness bit for bit.
///
/// # Panics
/// If a view does not fit its slice or the shapes disagree: callers check shapes first, so this
/// is an internal invariant.
pub(crate) fn gemm(dst: &mut [f32], dst_rs: usize, lhs: Mat<'_>, rhs: Mat<'_>) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "gemm: inner dimensions differ");
    assert!(
        lhs.fits() && rhs.fits(),
        "gemm: a view does not fit its slice"
    );
    assert!(
        m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len(),
        "gemm: destination too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for r in 0..m {
            dst[r * dst_rs..r * dst_rs + n].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if small_rows(m, n, k, &rhs) {
        // SAFETY: `small_rows` admitted this product only after `simd_level()` detected
        // AVX-512 (F, BW, DQ, VL) at run time, the features `small_m::gemm` is compiled for.
        return unsafe { small_m::gemm(dst, dst_rs, &lhs, &rhs) };
    }
    if !canonical(m, n, k) {
        return gemm_padded(dst, dst_rs, lhs, rhs);
    }
    gemm_crate(dst, dst_rs, &lhs, &rhs);
}

/// The `gemm` crate's product of two checked views, single-threaded, not reading `dst`.
fn gemm_crate(dst: &mut [f32], dst_rs: usize, lhs: &Mat<'_>, rhs: &Mat<'_>) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(
        lhs.fits() && rhs.fits() && rhs.rows == k,
        "gemm: a view does not fit its slice"
    );
    assert!(
        m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len(),
        "gemm: destination too small"
    );
    // SAFETY: every element the kernel reads is `lhs.data[i·rs + l·cs]` for i < m, l < k (and the
    // same for rhs with l < k, j < n); `fits()` proved the largest such index is in bounds, and
    // all strides are non-negative. It writes `dst[i·dst_rs + j]` for i < m, j < n, in bounds by
    // the assertion above. `dst` is a unique borrow, so no read aliases a write. With
    // `read_dst = false` the destination's old contents are never read (alpha is ignored).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// [`gemm`] of a shape off the blocked path: the product is computed with zero columns (and,
/// when `m` is 1, a zero row) added until the shape is on it; the extra outputs are dropped.
#[cold]
fn gemm_padded(dst: &mut [f32], dst_rs: usize, lhs: Mat<'_>, rhs: Mat<'_>) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let m2 = m.max(2);
    let mut n2 = n.max(2).max(256 / m2 + 1);
    if k > 512 && m2 <= 64 {
        n2 = n2.max(65);
    }
    let padded;
    let lhs = if m2 > m {
        let mut l = vec![0.0f32; m2 * k];
        for i in 0..m {
            for j in 0..k {
                l[i * k + j] = lhs.data[i * lhs.rs + j * lhs.cs];
            }
        }
        padded = l;
        Mat::rows(&padded, m2, k)
    } else {
        lhs
    };
    let mut r = vec![0.0f32; k * n2];
    for i in 0..k {
        for j in 0..n {
            r[i * n2 + j] = rhs.data[i * rhs.rs + j * rhs.cs];
        }
    }
    debug_assert!(canonical(m2, n2, k));
    let mut out = vec![0.0f32; m2 * n2];
    gemm(&mut out, n2, lhs, Mat::rows(&r, k, n2));
    for i in 0..m {
        dst[i * dst_rs..i * dst_rs + n].copy_from_slice(&out[i * n2..i * n2 + n]);
    }
}

/// [`gemm`] into a column-major destination: element `(i, j)` of `lhs · rhs` lands at
/// `dst[i + j·dst_cs]`. Computed as `rhsᵀ · lhsᵀ` into a row-major view of the same memory.
pub(crate) fn gemm_cm(dst: &mut [f32], dst_cs: usize, lhs: Mat<'_>, rhs: Mat<'_>) {
    gemm(dst, dst_cs, rhs.t(), lhs.t());
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// `e^x` with relative error below 2e-7 on the whole f32 range (branch-free, vectorizable).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    exp_in_range(x.clamp(-87.0, 88.0))
}

/// [`exp`] of `x ≤ 0` (or NaN), as in a softmax after its maximum is subtracted: the same
/// value, one comparison fewer.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    debug_assert!(x.is_nan() || x <= 0.0);
    exp_in_range(if x < -87.0 { -87.0 } else { x })
}

/// [`exp`] of `x` in [−87, 88] (or NaN).
#[inline(always)]
fn exp_in_range(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer in the low bits
    let kf = x.mul_add(LOG2E, MAGIC);
    let k = kf - MAGIC;
    let r = (-k).mul_add(LN2_HI, x);
    let r = (-k).mul_add(LN2_LO, r);
    // Taylor series to degree 6 (|r| ≤ ln2/2: truncation error < 1.2e-7), fused multiply-adds.
    let mut p: f32 = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    // The integer k sits in kf's low mantissa bits: 2^k without a float→int conversion.
    let scale = kf.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(scale)
}

/// `tanh(x)` with absolute error below 3e-7 (branch-free, vectorizable): a minimax rational
/// approximation of the form `x·P(x²)/Q(x²)` with `P` of degree 5 and `Q` of degree 3 on
/// [−8.3, 8.3] (where `1 − tanh` falls below 1.3e-7), one division, no exponential. (Eigen's
/// form has degree 6 over 3; the refit reaches the same accuracy with one multiply-add less.)
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    let x = x.clamp(-8.3, 8.3);
    let x2 = x * x;
    let mut p: f32 = 2.084_899_7e-11;
    for c in [
        -1.372_366_8e-8,
        9.562_412e-6,
        2.951_630_1e-3,
        0.129_474_02,
        0.999_999_9,
    ] {
        p = p.mul_add(x2, c);
    }
    let mut q: f32 = 2.324_529_6e-4;
    for c in [2.388_792_5e-2, 0.462_806_73, 1.0] {
        q = q.mul_add(x2, c);
    }
    x * p / q
}

/// `ln(x)` for positive, finite, normal `x`, absolute error below 3e-7.
#[inline(always)]
pub(crate) fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    // The mantissa in [1, 2), then centred on 1 for a faster series: m in [√½, √2).
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let (m, e) = if m > std::f32::consts::SQRT_2 {
        (m * 0.5, e + 1)
    } else {
        (m, e)
    };
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let s =
        2.0 * t * (1.0 + t2 * (1.0 / 3.0 + t2 * (1.0 / 5.0 + t2 * (1.0 / 7.0 + t2 * (1.0 / 9.0)))));
    e as f32 * std::f32::consts::LN_2 + s
}

/// `sigmoid(x) = 1 / (1 + e^{−x})`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// The widest SIMD level the fused kernels use: `HYPERFUNC_SIMD=avx2|portable` caps it (to
/// compare levels with one binary); otherwise the best the CPU has.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Simd {
    Portable,
    Avx2,
    Avx512,
}

/// The SIMD level in use (decided once per process).
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd_level() -> Simd {
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let avx512 = avx2
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl");
        let best = if avx512 {
            Simd::Avx512
        } else if avx2 {
            Simd::Avx2
        } else {
            Simd::Portable
        };
        let cap = match std::env::var("HYPERFUNC_SIMD").as_deref() {
            Ok("portable") => Simd::Portable,
            Ok("avx2") => Simd::Avx2,
            _ => Simd::Avx512,
        };
        best.min(cap)
    })
}

/// Defines `$name`, which runs `$inline` compiled for AVX-512 or AVX2 + FMA when the CPU has
/// them ([`simd_level`]), and the portable build of the same code otherwise.
macro_rules! simd_dispatch {
    ($(#[$doc:meta])* fn $name:ident / $fast:ident ($($arg:ident: $ty:ty),*) -> $ret:ty = $inline:ident) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn wide($($arg: $ty),*) -> $ret {
                    $inline($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn $fast($($arg: $ty),*) -> $ret {
                    $inline($($arg),*)
                }
                match simd_level() {
                    // SAFETY: a #[target_feature] function may only run on a CPU with those
                    // features; `simd_level()` detected every one of them at run time.
                    Simd::Avx512 => return unsafe { wide($($arg),*) },
                    // SAFETY: as above, for AVX2 and FMA.
                    Simd::Avx2 => return unsafe { $fast($($arg),*) },
                    Simd::Portable => {}
                }
            }
            $inline($($arg),*)
        }
    };
}

/// Whether [`small_m::gemm`] takes an `m × n × k` product: an AVX-512 CPU, few rows of output,
/// whole vectors of columns, the right-hand side's rows contiguous, and a depth the `gemm` crate
/// sums in one block (so the two give the same bits, see [`canonical`]).
#[cfg(target_arch = "x86_64")]
fn small_rows(m: usize, n: usize, k: usize, rhs: &Mat<'_>) -> bool {
    m <= SMALL_M && n >= small_m::NB && k <= SMALL_K && rhs.cs == 1 && simd_level() == Simd::Avx512
}

/// Most rows of output [`small_m::gemm`] takes.
#[cfg(target_arch = "x86_64")]
const SMALL_M: usize = 16;

/// Deepest product [`small_m::gemm`] takes: its packed block of the left-hand side is a stack
/// array of this depth. Within the `gemm` crate's whole-depth block (512), so the two give the
/// same bits.
#[cfg(target_arch = "x86_64")]
const SMALL_K: usize = 128;

#[cfg(target_arch = "x86_64")]
mod small_m {
    //! [`gemm`](super::gemm) with at most [`SMALL_M`] rows of output (a layer's `W · X` with few
    //! outputs, written class-major, as the last layers of Task B and Task A's projections are).
    //! The `gemm` crate packs both sides on every call and pads the rows to its kernel; here a
    //! register block holds up to [`MR`] rows × [`NB`] columns while the depth runs,
    //! broadcasting the packed left-hand side and reading the right-hand side's rows in place.
    //! On a cache-hot 10 × 32 × 256 product that is 7% faster; Task B, dense and low-rank,
    //! gains 4–5%.
    //!
    //! Each element is `Σ_l lhs[i, l]·rhs[l, j]` as fused multiply-adds from zero in order of
    //! `l`, as the `gemm` crate computes it on its blocked path: the same bits (a test checks).

    use super::{Mat, SMALL_K, SMALL_M};
    use std::arch::x86_64::{
        __m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps,
        _mm512_storeu_ps,
    };
    use std::mem::MaybeUninit;

    /// Rows of output in one register block.
    const MR: usize = 12;
    /// Vectors of columns in one register block.
    const V: usize = 2;
    /// Columns of output in one register block.
    pub(super) const NB: usize = V * L;
    const L: usize = 16;

    /// # Safety
    /// The CPU must have AVX-512 F. Shapes are checked by the caller ([`super::gemm`]): the
    /// views fit their slices, `rhs.cs == 1`, `m ≤ SMALL_M`, `k ≤ SMALL_K`, and `dst` holds
    /// row `m − 1` up to column `n`. Slicing below re-checks every bound it relies on.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    pub(super) unsafe fn gemm(dst: &mut [f32], dst_rs: usize, lhs: &Mat<'_>, rhs: &Mat<'_>) {
        debug_assert!(lhs.rows <= SMALL_M && lhs.cols <= SMALL_K && rhs.cs == 1);
        let mut i0 = 0;
        while i0 < lhs.rows {
            let mr = (lhs.rows - i0).min(MR);
            macro_rules! rows {
                ($($r:literal)*) => {
                    match mr {
                        $($r => block::<$r>(dst, dst_rs, lhs, rhs, i0),)*
                        _ => unreachable!("a block has 1 to MR rows"),
                    }
                };
            }
            rows!(1 2 3 4 5 6 7 8 9 10 11 12);
            i0 += mr;
        }
    }

    /// Rows `i0..i0 + R`: [`NB`] columns at a time in registers, then one vector, then the
    /// last columns one at a time (the same sums in the same order).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    fn block<const R: usize>(
        dst: &mut [f32],
        dst_rs: usize,
        lhs: &Mat<'_>,
        rhs: &Mat<'_>,
        i0: usize,
    ) {
        let (k, n) = (lhs.cols, rhs.cols);
        // The block's left-hand side, depth-major: `pack[l·R + i] = lhs[i0 + i, l]`. Left
        // uninitialised, and only its first `k·R` floats written (zeroing all of it cost more
        // than the packing).
        let mut space = [MaybeUninit::<f32>::uninit(); SMALL_K * MR];
        let raw = &mut space[..k * R];
        for (l, p) in raw.chunks_exact_mut(R).enumerate() {
            for (i, v) in p.iter_mut().enumerate() {
                *v = MaybeUninit::new(lhs.data[(i0 + i) * lhs.rs + l * lhs.cs]);
            }
        }
        // SAFETY: every element of `raw` was written just above (`k·R` is a multiple of `R`,
        // so `chunks_exact_mut` left none out), and `MaybeUninit<f32>` has `f32`'s layout.
        let pack = unsafe { &*(std::ptr::from_ref::<[MaybeUninit<f32>]>(raw) as *const [f32]) };
        let row = |l: usize, c0: usize, w: usize| &rhs.data[l * rhs.rs + c0..l * rhs.rs + c0 + w];
        let mut c0 = 0;
        while c0 + NB <= n {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            for (l, a) in pack.chunks_exact(R).enumerate() {
                let x = row(l, c0, NB);
                // SAFETY: `x` holds NB = V·L floats; vector `q` starts q·L floats in.
                let xs: [__m512; V] =
                    std::array::from_fn(|q| unsafe { _mm512_loadu_ps(x.as_ptr().add(q * L)) });
                for i in 0..R {
                    let s = _mm512_set1_ps(a[i]);
                    for q in 0..V {
                        acc[i][q] = _mm512_fmadd_ps(s, xs[q], acc[i][q]);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                store(dst, (i0 + i) * dst_rs + c0, acc);
            }
            c0 += NB;
        }
        if c0 + L <= n {
            let mut acc = [_mm512_setzero_ps(); R];
            for (l, a) in pack.chunks_exact(R).enumerate() {
                // SAFETY: the pointer starts a slice of L floats.
                let x0 = unsafe { _mm512_loadu_ps(row(l, c0, L).as_ptr()) };
                for i in 0..R {
                    acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[i]), x0, acc[i]);
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                store(dst, (i0 + i) * dst_rs + c0, std::slice::from_ref(acc));
            }
            c0 += L;
        }
        for j in c0..n {
            for i in 0..R {
                let mut v = 0.0f32;
                for (l, a) in pack.chunks_exact(R).enumerate() {
                    v = a[i].mul_add(row(l, j, 1)[0], v);
                }
                dst[(i0 + i) * dst_rs + j] = v;
            }
        }
    }

    /// `vs` stored at `dst[at..]`, back to back.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    fn store(dst: &mut [f32], at: usize, vs: &[__m512]) {
        let d = &mut dst[at..at + vs.len() * L];
        for (q, v) in vs.iter().enumerate() {
            // SAFETY: `d` holds `vs.len()·L` floats; vector `q` goes to `d[q·L..(q + 1)·L]`.
            unsafe { _mm512_storeu_ps(d.as_mut_ptr().add(q * L), *v) };
        }
    }
}

#[inline(always)]
fn activate_inline(act: Activation, v: &mut [f32]) {
    activate_after(act, v, |x| x);
}

/// `v[i] = act(pre(v[i]))`: a bias added in the same pass as the activation.
#[inline(always)]
fn activate_after(act: Activation, v: &mut [f32], pre: impl Fn(f32) -> f32) {
    match act {
        Activation::Identity => v.iter_mut().for_each(|x| *x = pre(*x)),
        Activation::Relu => v.iter_mut().for_each(|x| *x = pre(*x).max(0.0)),
        Activation::Tanh => map_runs(v, |x| tanh(pre(x))),
        Activation::Sigmoid => map_runs(v, |x| sigmoid(pre(x))),
        Activation::Gelu => map_runs(v, |x| {
            let y = pre(x);
            0.5 * y * (1.0 + tanh(0.797_884_6 * (y + 0.044_715 * y * y * y)))
        }),
    }
}

/// `v[i] = f(v[i])` in runs of four vectors of constant width. The vectorizer keeps one vector
/// per iteration for a long function of a slice of unknown length (it does not interleave past
/// a division), which leaves each element's dependency chain exposed; a run's four chains
/// overlap.
#[inline(always)]
fn map_runs(v: &mut [f32], f: impl Fn(f32) -> f32) {
    let mut runs = v.chunks_exact_mut(4 * LANES);
    for run in &mut runs {
        run.iter_mut().for_each(|x| *x = f(*x));
    }
    runs.into_remainder().iter_mut().for_each(|x| *x = f(*x));
}

simd_dispatch!(
    /// Adds `bias` (one value per column, or nothing when empty) to every row of `block`, then
    /// applies the activation.
    fn bias_act / bias_act_avx2(block: &mut [f32], bias: &[f32], act: Activation) -> () = bias_act_inline
);

#[inline(always)]
fn bias_act_inline(block: &mut [f32], bias: &[f32], act: Activation) {
    if !bias.is_empty() {
        for row in block.chunks_exact_mut(bias.len()) {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
    }
    activate_inline(act, block);
}

simd_dispatch!(
    /// The outputs of `tk` antithetic pairs from their shared part: `y` holds `2·tk` blocks of
    /// `per` floats, and on entry blocks `tk..2·tk` hold each pair's `X·E_kᵀ`. On return block
    /// `2k` is `y0 + X·E_kᵀ` and block `2k + 1` is `y0 − X·E_kᵀ`. Pairs go in order: pair `k`
    /// writes blocks `2k` and `2k + 1`, and every later pair's input lies past them (or, for the
    /// last pair, is block `2k + 1` itself, read before it is written). `finish(i, block)` runs
    /// on each output block `i` right after it is formed, while it is in cache.
    fn mirror_out / mirror_out_avx2(y: &mut [f32], y0: &[f32], per: usize, tk: usize, finish: &mut dyn FnMut(usize, &mut [f32])) -> () = mirror_out_inline
);

#[inline(always)]
fn mirror_out_inline(
    y: &mut [f32],
    y0: &[f32],
    per: usize,
    tk: usize,
    finish: &mut dyn FnMut(usize, &mut [f32]),
) {
    let y0 = &y0[..per];
    let mut last = Vec::new();
    for k in 0..tk {
        let src = (tk + k) * per;
        // The last pair's input is its own block 2k + 1: a copy of it, so that the loop below
        // reads and writes separate slices and vectorizes (in place it ran scalar).
        let (dst, c): (&mut [f32], &[f32]) = if 2 * k + 1 < tk + k {
            let (dst, rest) = y.split_at_mut(src);
            (dst, &rest[..per])
        } else {
            last.clear();
            last.extend_from_slice(&y[src..src + per]);
            (&mut y[..src + per], &last)
        };
        let (plus, minus) = dst[2 * k * per..(2 * k + 2) * per].split_at_mut(per);
        for (((p, m), &c), &b) in plus.iter_mut().zip(minus.iter_mut()).zip(c).zip(y0) {
            *p = b + c;
            *m = b - c;
        }
        finish(2 * k, plus);
        finish(2 * k + 1, minus);
    }
}

simd_dispatch!(
    /// [`bias_act`] of a class-major block `[out, n]`: `bias[j]` (when not empty) is added to
    /// the whole row `j`, then the activation is applied.
    fn bias_act_cm / bias_act_cm_avx2(block: &mut [f32], bias: &[f32], act: Activation, n: usize) -> () = bias_act_cm_inline
);

#[inline(always)]
fn bias_act_cm_inline(block: &mut [f32], bias: &[f32], act: Activation, n: usize) {
    if bias.is_empty() {
        return activate_inline(act, block);
    }
    for (j, row) in block.chunks_exact_mut(n.max(1)).enumerate() {
        match bias.get(j) {
            Some(&b) => activate_after(act, row, |v| v + b),
            None => activate_inline(act, row),
        }
    }
}

simd_dispatch!(
    /// Adds one candidate's low-rank term in place: `block[n, out] += xb_n · aᵀ`, where row n's
    /// factors `xb_n` (r values) start at `xb[n·stride + off]` and `a` is `[r, out]` (see
    /// [`rank_major`]).
    fn low_rank_add / low_rank_add_avx2(block: &mut [f32], xb: &[f32], stride: usize, off: usize, a: &[f32], r: usize) -> () = low_rank_add_inline
);

simd_dispatch!(
    /// One candidate's rows projected on its rank factors: `dst[n, r] = x[n, k] · btᵀ`, with
    /// `bt` the factors as `[r, k]`. Each value is one dot product in a fixed order, so it does
    /// not depend on what else is computed (unlike a GEMM whose path depends on the shape).
    fn project / project_avx2(dst: &mut [f32], x: &[f32], bt: &[f32], k: usize) -> () = project_inline
);

#[inline(always)]
fn project_inline(dst: &mut [f32], x: &[f32], bt: &[f32], k: usize) {
    const L: usize = LANES;
    let r = bt.len() / k.max(1);
    for (row, d) in x.chunks_exact(k).zip(dst.chunks_exact_mut(r)) {
        for (v, b) in d.iter_mut().zip(bt.chunks_exact(k)) {
            let mut acc = [0.0f32; L];
            let (xs, bs) = (row.chunks_exact(L), b.chunks_exact(L));
            let (xt, bt) = (xs.remainder(), bs.remainder());
            for (xc, bc) in xs.zip(bs) {
                for i in 0..L {
                    acc[i] = xc[i].mul_add(bc[i], acc[i]);
                }
            }
            for (i, (&p, &q)) in xt.iter().zip(bt).enumerate() {
                acc[i] = p.mul_add(q, acc[i]);
            }
            *v = reduce_lanes(acc);
        }
    }
}

/// Each candidate's `[out, r]` factor of `a` (`pc` of them, back to back) copied as
/// `[r, out]`, so that [`low_rank_add`] reads contiguous rows; for rank 1 the layouts are the
/// same.
pub(crate) fn rank_major(a: &[f32], out: usize, r: usize) -> Vec<f32> {
    if r <= 1 {
        return a.to_vec();
    }
    let mut t = vec![0.0f32; a.len()];
    for (src, dst) in a.chunks_exact(out * r).zip(t.chunks_exact_mut(out * r)) {
        transpose_into(dst, src, out, r);
    }
    t
}

simd_dispatch!(
    /// A candidate's class-major block from the shared part and its low-rank term, finished:
    /// `block[out, n] = act(base + aᵀ · xbt + bias)`, where
    /// - `base` is `(shared, ld)`: row `j` of the shared part is `shared[j·ld..j·ld + n]`; an
    ///   empty `shared` means it is already in `block` (the update is then made in place);
    /// - `(xbt, a, r)`: the candidate's factors as `[r, n]` and `a` as `[r, out]`;
    /// - `(bias, act)`: `bias[j]` (when not empty) is added to row `j`, then the activation.
    ///
    /// Each element gets the multiply-adds of [`low_rank_add`] in the same order, then the bias
    /// and activation of [`bias_act_cm`]: the same bits as those three passes, in one pass
    /// that finishes 64 columns of a row at a time in registers.
    fn low_rank_cm / low_rank_cm_avx2(block: &mut [f32], base: (&[f32], usize), factors: (&[f32], &[f32], usize), finish: (&[f32], Activation), n: usize) -> () = low_rank_cm_inline
);

#[inline(always)]
fn low_rank_cm_inline(
    block: &mut [f32],
    (shared, ld): (&[f32], usize),
    (xbt, a, r): (&[f32], &[f32], usize),
    (bias, act): (&[f32], Activation),
    n: usize,
) {
    let n = n.max(1);
    let out = a.len() / r.max(1);
    for (j, row) in block.chunks_exact_mut(n).enumerate() {
        let row_of = RowOf {
            base: (!shared.is_empty()).then(|| &shared[j * ld..j * ld + n]),
            xbt,
            r,
            coef: a.chunks_exact(out.max(1)).map(|al| al[j]),
            bias: bias.get(j).copied(),
            act,
            n,
        };
        // Runs of LR_RUN columns, finished in registers: a full run gets a constant width, so
        // the activations of its vectors interleave instead of exposing one division's latency.
        let mut c0 = 0;
        while c0 < n {
            let w = (n - c0).min(LR_RUN);
            if w == LR_RUN {
                row_of.finish(&mut row[c0..c0 + LR_RUN], c0);
            } else {
                row_of.finish(&mut row[c0..c0 + w], c0);
            }
            c0 += w;
        }
    }
}

/// Columns of a class-major row that [`low_rank_cm`] finishes at once.
const LR_RUN: usize = 4 * LANES;

/// One row of [`low_rank_cm`]: what its elements are made of.
struct RowOf<'a, C> {
    base: Option<&'a [f32]>,
    xbt: &'a [f32],
    r: usize,
    coef: C,
    bias: Option<f32>,
    act: Activation,
    n: usize,
}

impl<C: Iterator<Item = f32> + Clone> RowOf<'_, C> {
    /// Columns `c0..c0 + v.len()` (at most [`LR_RUN`]) of the row into `v`: the terms in
    /// order (the first on the shared part, when there is one; else on `v`'s own values),
    /// then the bias, then the activation.
    #[inline(always)]
    fn finish(&self, v: &mut [f32], c0: usize) {
        let w = v.len();
        let mut buf = [0.0f32; LR_RUN];
        let buf = &mut buf[..w];
        let mut terms = self
            .xbt
            .chunks_exact(self.n)
            .take(self.r)
            .zip(self.coef.clone());
        match (self.base, terms.next()) {
            (Some(b), Some((f, s))) => buf
                .iter_mut()
                .zip(&b[c0..c0 + w])
                .zip(&f[c0..c0 + w])
                .for_each(|((v, &b), &x)| *v = x.mul_add(s, b)),
            (Some(b), None) => buf.copy_from_slice(&b[c0..c0 + w]),
            (None, first) => {
                buf.copy_from_slice(v);
                if let Some((f, s)) = first {
                    buf.iter_mut()
                        .zip(&f[c0..c0 + w])
                        .for_each(|(v, &x)| *v = x.mul_add(s, *v));
                }
            }
        }
        for (f, s) in terms {
            buf.iter_mut()
                .zip(&f[c0..c0 + w])
                .for_each(|(v, &x)| *v = x.mul_add(s, *v));
        }
        if let Some(b) = self.bias {
            buf.iter_mut().for_each(|v| *v += b);
        }
        activate_inline(self.act, buf);
        v.copy_from_slice(buf);
    }
}

simd_dispatch!(
    /// [`project`] of a class-major input: `dst[r, n] = bt · x`, with `x` one candidate's input
    /// as `[k, n]` and `bt` its factors as `[r, k]`. Each value is the sum of its `k` products
    /// in order; whole rows of `x` are read, a register block of columns at a time.
    fn project_cm / project_cm_avx2(dst: &mut [f32], x: &[f32], bt: &[f32], n: usize) -> () = project_cm_inline
);

#[inline(always)]
fn project_cm_inline(dst: &mut [f32], x: &[f32], bt: &[f32], n: usize) {
    const W: usize = 4 * LANES; // columns held in registers across the whole sum
    let n = n.max(1);
    let k = x.len() / n;
    for (d, b) in dst.chunks_exact_mut(n).zip(bt.chunks_exact(k.max(1))) {
        let mut c0 = 0;
        while c0 + W <= n {
            let mut acc = [0.0f32; W];
            for (row, &s) in x.chunks_exact(n).zip(b) {
                let xr = &row[c0..c0 + W];
                for j in 0..W {
                    acc[j] = xr[j].mul_add(s, acc[j]);
                }
            }
            d[c0..c0 + W].copy_from_slice(&acc);
            c0 += W;
        }
        let tail = &mut d[c0..];
        tail.fill(0.0);
        for (row, &s) in x.chunks_exact(n).zip(b) {
            tail.iter_mut()
                .zip(&row[c0..])
                .for_each(|(v, &xv)| *v = xv.mul_add(s, *v));
        }
    }
}

#[inline(always)]
fn low_rank_add_inline(
    block: &mut [f32],
    xb: &[f32],
    stride: usize,
    off: usize,
    a: &[f32],
    r: usize,
) {
    let out = a.len() / r.max(1);
    for (n, row) in block.chunks_exact_mut(out).enumerate() {
        let f = &xb[n * stride + off..n * stride + off + r];
        // `a` is r × out (rank-major): each term runs over a contiguous row, vectorized.
        for (&s, aj) in f.iter().zip(a.chunks_exact(out)) {
            row.iter_mut()
                .zip(aj)
                .for_each(|(v, &a)| *v = s.mul_add(a, *v));
        }
    }
}

// Cross-entropy works in blocks of rows stored class-major (`[c, rows]`), so that the max, the
// exponentials, the sums and the logarithms all run down the rows, a vector of rows at a time.
// Row-major logits are transposed a block at a time; class-major logits (what the tiled layers
// write for the last layer, see `layers::forward`) are read in place. Both give the same bits.
const CE_BLOCK: usize = 64;

simd_dispatch!(
    /// Mean softmax cross-entropy of the rows of `logits` (`rows × c`) against `labels`.
    fn cross_entropy / cross_entropy_avx2(logits: &[f32], c: usize, labels: &[usize]) -> f32 = cross_entropy_inline
);

simd_dispatch!(
    /// [`cross_entropy`] of class-major logits: `zt` is `[c, n]` with `n = labels.len()`.
    fn cross_entropy_cm / cross_entropy_cm_avx2(zt: &[f32], c: usize, labels: &[usize]) -> f32 = cross_entropy_cm_inline
);

#[inline(always)]
fn cross_entropy_inline(logits: &[f32], c: usize, labels: &[usize]) -> f32 {
    let mut total = 0.0f64;
    let mut zt = vec![0.0f32; CE_BLOCK * c];
    for (rows, ys) in logits.chunks(CE_BLOCK * c).zip(labels.chunks(CE_BLOCK)) {
        for (r, row) in rows.chunks_exact(c).enumerate() {
            for (k, &z) in row.iter().enumerate() {
                zt[k * CE_BLOCK + r] = z;
            }
        }
        total += f64::from(ce_block(&zt, CE_BLOCK, c, ys));
    }
    (total / labels.len().max(1) as f64) as f32
}

#[inline(always)]
fn cross_entropy_cm_inline(zt: &[f32], c: usize, labels: &[usize]) -> f32 {
    let n = labels.len();
    let mut total = 0.0f64;
    for (b, ys) in labels.chunks(CE_BLOCK).enumerate() {
        total += f64::from(ce_block(&zt[b * CE_BLOCK..], n, c, ys));
    }
    (total / n.max(1) as f64) as f32
}

/// Σ over the block's rows of (log-sum-exp − the labelled logit); row `r`'s class `k` is at
/// `zt[k·ld + r]`, and the block has `ys.len() ≤ CE_BLOCK` rows.
#[inline(always)]
fn ce_block(zt: &[f32], ld: usize, c: usize, ys: &[usize]) -> f32 {
    // A full block gets a constant width: its maxima and sums then live in registers, and the
    // exponentials of its four vectors of rows interleave. (One vector of rows at a time left
    // each exponential's long dependency chain exposed; 28% slower on Zen 4.)
    if ys.len() == CE_BLOCK {
        ce_rows(zt, ld, c, CE_BLOCK, ys)
    } else {
        ce_rows(zt, ld, c, ys.len(), ys)
    }
}

/// [`ce_block`] of `nr` rows.
#[inline(always)]
fn ce_rows(zt: &[f32], ld: usize, c: usize, nr: usize, ys: &[usize]) -> f32 {
    let (mut m, mut sum) = ([0.0f32; CE_BLOCK], [0.0f32; CE_BLOCK]);
    let (m, sum) = (&mut m[..nr], &mut sum[..nr]);
    m.copy_from_slice(&zt[..nr]);
    // `z > m` rather than `f32::max`: one instruction, not three. A row with a NaN logit gets
    // a NaN loss either way (through that logit's exponential, or through the maximum).
    for k in 1..c {
        let col = &zt[k * ld..k * ld + nr];
        m.iter_mut()
            .zip(col)
            .for_each(|(m, &z)| *m = if z > *m { z } else { *m });
    }
    for k in 0..c {
        let col = &zt[k * ld..k * ld + nr];
        sum.iter_mut()
            .zip(col)
            .zip(&*m)
            .for_each(|((s, &z), &m)| *s += exp_nonpositive(z - m));
    }
    // The labelled logits gathered, then each row's loss mapped (vectorized) and reduced after:
    // a float reduction in the same loop would stay scalar.
    let mut picked = [0.0f32; CE_BLOCK];
    for (p, (r, &y)) in picked.iter_mut().zip(ys.iter().enumerate()) {
        *p = zt[y * ld + r];
    }
    sum.iter_mut()
        .zip(&*m)
        .zip(&picked)
        .for_each(|((s, &m), &z)| *s = ln(*s) + m - z);
    lane_sum(sum)
}

/// A sum in 16 lanes, then [`reduce_lanes`] (vectorizes, unlike a sequential float sum).
#[inline(always)]
fn lane_sum(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    for (a, &x) in acc.iter_mut().zip(rest) {
        *a += x;
    }
    reduce_lanes(acc)
}

/// Accumulator lanes of the fixed-order sums ([`project`], [`lane_sum`]).
const LANES: usize = 16;

/// The lanes of an accumulator summed in a fixed pairwise order.
#[inline(always)]
fn reduce_lanes(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
}

/// Fraction of rows whose largest logit is the labelled class.
pub(crate) fn class_accuracy(logits: &[f32], c: usize, labels: &[usize]) -> f32 {
    let hits = logits
        .chunks_exact(c)
        .zip(labels)
        .filter(|(row, &y)| row.iter().all(|&z| z <= row[y]))
        .count();
    hits as f32 / labels.len().max(1) as f32
}

/// [`class_accuracy`] of class-major logits: `zt` is `[c, n]` with `n = labels.len()`.
pub(crate) fn class_accuracy_cm(zt: &[f32], c: usize, labels: &[usize]) -> f32 {
    let n = labels.len();
    let hits = labels
        .iter()
        .enumerate()
        .filter(|&(r, &y)| (0..c).all(|k| zt[k * n + r] <= zt[y * n + r]))
        .count();
    hits as f32 / n.max(1) as f32
}

/// Runs `f` on the storage of a `[P, N, C]` tensor laid out class-major, i.e. the transposed
/// view of a contiguous `[P, C, N]` (what the tiled layers return for their last layer); `None`
/// when `t` is laid out otherwise.
pub(crate) fn with_class_major<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> R,
) -> Result<Option<R>> {
    let &[p, n, c] = t.dims() else {
        return Ok(None);
    };
    let layout = t.layout();
    if t.is_contiguous() || layout.stride() != [n * c, 1, n] || !on_cpu_f32(t) {
        return Ok(None);
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let data = cpu.as_slice::<f32>().map_err(Error::tensor(what))?;
    let a = layout.start_offset();
    Ok(data.get(a..a + p * n * c).map(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_math_is_accurate() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let e = exp(x);
            assert!(
                ((e - x.exp()) / x.exp()).abs() < 3e-7,
                "exp({x}) = {e} vs {}",
                x.exp()
            );
            assert!((tanh(x) - x.tanh()).abs() < 3e-7, "tanh({x})");
        }
        for x in [1e-30f32, 1e-5, 0.5, 1.0, 1.5, 2.0, 3.7, 10.0, 1e6, 3e38] {
            assert!(
                (ln(x) - x.ln()).abs() < 3e-7 * x.ln().abs().max(1.0),
                "ln({x}) = {} vs {}",
                ln(x),
                x.ln()
            );
        }
        assert_eq!(exp(-1000.0), exp(-87.0));
        // The softmax's exponential is `exp` itself on x ≤ 0, NaN included.
        for x in [
            0.0f32,
            -1e-30,
            -0.3,
            -5.0,
            -86.9,
            -87.0,
            -87.5,
            -1e30,
            f32::NEG_INFINITY,
        ] {
            assert_eq!(
                exp_nonpositive(x).to_bits(),
                exp(x).to_bits(),
                "exp_nonpositive({x})"
            );
        }
        assert!(exp_nonpositive(f32::NAN).is_nan());
        assert!((tanh(50.0) - 1.0).abs() < 3e-7 && (tanh(-50.0) + 1.0).abs() < 3e-7);
        // tanh densely against the f64 reference, through the clamp: 400,001 points on
        // [−10, 10], every region of the rational approximation.
        let worst = (-200_000..=200_000)
            .map(|i| {
                let x = i as f32 * 5e-5;
                (f64::from(tanh(x)) - f64::from(x).tanh()).abs()
            })
            .fold(0.0, f64::max);
        assert!(worst < 3e-7, "tanh is off by up to {worst:e}");
    }

    #[test]
    fn gemm_matches_naive_including_transposed_views() {
        let a: Vec<f32> = (0..6).map(|v| v as f32).collect(); // 2×3
        let b: Vec<f32> = (0..12).map(|v| v as f32 * 0.5).collect(); // 4×3, used transposed
        let mut out = vec![0.0; 8];
        gemm(&mut out, 4, Mat::rows(&a, 2, 3), Mat::transposed(&b, 3, 4));
        for i in 0..2 {
            for j in 0..4 {
                let want: f32 = (0..3).map(|l| a[i * 3 + l] * b[j * 3 + l]).sum();
                assert_eq!(out[i * 4 + j], want);
            }
        }
    }

    #[test]
    fn low_rank_add_matches_the_naive_product_for_every_rank() {
        for r in [1usize, 2, 3, 8] {
            let (n, out) = (5usize, 7usize);
            let a: Vec<f32> = (0..out * r).map(|v| (v as f32 * 0.37).sin()).collect(); // [out, r]
            let xb: Vec<f32> = (0..n * r).map(|v| (v as f32 * 0.11).cos()).collect(); // [n, r]
            let mut block: Vec<f32> = (0..n * out).map(|v| v as f32 * 0.01).collect();
            let want: Vec<f32> = (0..n * out)
                .map(|i| {
                    let (row, o) = (i / out, i % out);
                    block[i] + (0..r).map(|j| xb[row * r + j] * a[o * r + j]).sum::<f32>()
                })
                .collect();
            low_rank_add(&mut block, &xb, r, 0, &rank_major(&a, out, r), r);
            for (g, w) in block.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "rank {r}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn cross_entropy_of_uniform_logits_is_ln_c() {
        let ce = cross_entropy(&[0.0; 20], 10, &[3, 7]);
        assert!((ce - 10f32.ln()).abs() < 1e-6);
        assert_eq!(class_accuracy(&[0.0, 1.0, 2.0, 0.0], 2, &[1, 0]), 1.0);
    }

    /// `v` (`rows × cols`, row-major) transposed.
    pub(super) fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0.0f32; v.len()];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = v[i * cols + j];
            }
        }
        t
    }

    pub(super) fn assert_same_bits(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x.to_bits(), y.to_bits(), "{what}, element {i}: {x} vs {y}");
        }
    }

    /// Class-major logits give the row-major kernels' bits, with a partial last block, large
    /// logits (the max shift matters) and ties (accuracy counts a tie as a hit).
    #[test]
    fn class_major_metrics_equal_the_row_major_ones_bit_for_bit() {
        for (n, c) in [(1, 3), (64, 10), (150, 7), (200, 1)] {
            let z: Vec<f32> = (0..n * c)
                .map(|i| ((i * 7919) % 1013) as f32 * 0.11 - 50.0)
                .collect();
            let zt = transpose(&z, n, c);
            let labels: Vec<usize> = (0..n).map(|r| (r * 5) % c).collect();
            let (a, b) = (
                cross_entropy(&z, c, &labels),
                cross_entropy_cm(&zt, c, &labels),
            );
            assert!(a.is_finite() && a >= 0.0, "n {n}, c {c}: {a}");
            assert_eq!(a.to_bits(), b.to_bits(), "n {n}, c {c}: {a} vs {b}");
            assert_eq!(
                class_accuracy(&z, c, &labels),
                class_accuracy_cm(&zt, c, &labels)
            );
        }
        let tie = [1.0f32, 0.0, 1.0, 0.0]; // [c = 2, n = 2]: both rows tie
        assert_eq!(class_accuracy_cm(&tie, 2, &[1, 0]), 1.0);
    }

    /// The class-major low-rank update gives the row-major one's bits, transposed, at every rank.
    #[test]
    fn class_major_low_rank_add_is_the_transpose_of_low_rank_add() {
        // n = 150: two full runs of LR_RUN columns and a tail; n = 37: a tail alone.
        for (n, r) in [(37, 1), (37, 2), (37, 5), (150, 1), (150, 3)] {
            let out = 6;
            let base: Vec<f32> = (0..n * out).map(|i| (i % 13) as f32 * 0.3 - 1.0).collect();
            let xb: Vec<f32> = (0..n * r).map(|i| (i % 7) as f32 * 0.21 - 0.5).collect();
            let a: Vec<f32> = (0..out * r).map(|i| (i % 5) as f32 * 0.17 - 0.3).collect();
            let am = rank_major(&a, out, r);
            let mut rm = base.clone();
            low_rank_add(&mut rm, &xb, r, 0, &am, r);
            let (base_t, xbt) = (transpose(&base, n, out), transpose(&xb, n, r));
            let mut cm = vec![f32::NAN; n * out];
            let none = (&[][..], Activation::Identity);
            low_rank_cm(&mut cm, (&base_t, n), (&xbt, &am, r), none, n);
            assert_same_bits(&transpose(&rm, n, out), &cm, &format!("rank {r}"));
            // In place, with the bias and activation of the row-major passes.
            let bias: Vec<f32> = (0..out).map(|j| j as f32 * 0.1 - 0.2).collect();
            bias_act(&mut rm, &bias, Activation::Tanh);
            let mut cm = base_t.clone();
            let fin = (&bias[..], Activation::Tanh);
            low_rank_cm(&mut cm, (&[], 0), (&xbt, &am, r), fin, n);
            assert_same_bits(&transpose(&rm, n, out), &cm, &format!("rank {r}, finished"));
        }
    }

    /// The class-major bias and activation (one pass) give the row-major passes' bits, for
    /// every activation, past the runs of `map_runs` and in their tail.
    #[test]
    fn class_major_bias_and_activation_equal_the_row_major_passes() {
        let (n, out) = (150, 5);
        let z: Vec<f32> = (0..n * out)
            .map(|i| ((i * 37) % 101) as f32 * 0.09 - 4.5)
            .collect();
        let bias: Vec<f32> = (0..out).map(|j| j as f32 * 0.7 - 1.4).collect();
        for act in [
            Activation::Identity,
            Activation::Relu,
            Activation::Tanh,
            Activation::Sigmoid,
            Activation::Gelu,
        ] {
            let mut rm = z.clone();
            bias_act(&mut rm, &bias, act);
            let mut cm = transpose(&z, n, out);
            bias_act_cm(&mut cm, &bias, act, n);
            assert_same_bits(&transpose(&rm, n, out), &cm, &format!("{act:?}"));
        }
    }

    /// `gemm_cm` writes the transpose of what `gemm` writes, with the same bits.
    #[test]
    fn column_major_gemm_is_the_transpose_of_gemm() {
        for (m, k, n) in [(1024, 64, 30), (5, 3, 4), (40, 32, 10)] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.4)
                .collect();
            let b: Vec<f32> = (0..n * k)
                .map(|i| ((i * 17) % 89) as f32 / 89.0 - 0.6)
                .collect();
            let (lhs, rhs) = (Mat::rows(&a, m, k), Mat::transposed(&b, k, n));
            let mut rm = vec![0.0f32; m * n];
            let mut cm = vec![0.0f32; m * n];
            gemm(&mut rm, n, lhs, rhs);
            gemm_cm(&mut cm, m, lhs, rhs);
            assert_same_bits(&transpose(&rm, m, n), &cm, &format!("{m}×{k}×{n}"));
        }
    }
}
#[cfg(test)]
pub(crate) mod grouping {
    use super::tests::{assert_same_bits, transpose};
    use super::*;

    /// Deterministic test values in [−0.5, 0.5).
    pub(crate) fn data(len: usize, salt: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + salt * 104_729) % 1000) as f32 / 997.0 - 0.5)
            .collect()
    }

    /// A candidate's rows (or columns) computed alone or among others give the same bits, for
    /// shapes on and off the gemm crate's blocked path.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_few_rows_kernel_gives_the_gemm_crates_bits_and_the_f64_product() {
        // `gemm` sends these shapes to `small_m::gemm`; the `gemm` crate, called directly, is the
        // reference (its blocked path, padded where the shape is off it, as `gemm_padded` does).
        let crate_product = |m: usize, n: usize, k: usize, l: &[f32], lrs, lcs, r: &[f32]| {
            let (m2, n2) = (m.max(2), n.max(256 / m.max(2) + 1));
            let mut lp = vec![0.0f32; m2 * k];
            for i in 0..m {
                for j in 0..k {
                    lp[i * k + j] = l[i * lrs + j * lcs];
                }
            }
            let mut rp = vec![0.0f32; k * n2];
            for i in 0..k {
                rp[i * n2..i * n2 + n].copy_from_slice(&r[i * n..(i + 1) * n]);
            }
            let mut out = vec![0.0f32; m2 * n2];
            gemm_crate(&mut out, n2, &Mat::rows(&lp, m2, k), &Mat::rows(&rp, k, n2));
            (0..m)
                .flat_map(|i| out[i * n2..i * n2 + n].to_vec())
                .collect::<Vec<f32>>()
        };
        let mut checked = 0;
        for m in [1, 3, 10, 11, 16] {
            for n in [32, 47, 56, 64, 256] {
                for k in [1, 5, 32, 64, 128] {
                    let l = data(m * k, m + k);
                    let r = data(k * n, n);
                    assert!(small_rows(m, n, k, &Mat::rows(&r, k, n)));
                    let mut got = vec![f32::NAN; m * n];
                    gemm(&mut got, n, Mat::rows(&l, m, k), Mat::rows(&r, k, n));
                    let want = crate_product(m, n, k, &l, k, 1, &r);
                    assert_same_bits(&got, &want, &format!("{m}×{n}×{k}"));
                    // The left-hand side read through a transposed view: the same bits.
                    let lt = transpose(&l, m, k);
                    let mut got_t = vec![f32::NAN; m * n];
                    gemm(
                        &mut got_t,
                        n,
                        Mat::transposed(&lt, m, k),
                        Mat::rows(&r, k, n),
                    );
                    assert_same_bits(&got_t, &want, &format!("{m}×{n}×{k}, transposed"));
                    for i in 0..m {
                        for j in 0..n {
                            let exact: f64 = (0..k)
                                .map(|q| f64::from(l[i * k + q]) * f64::from(r[q * n + j]))
                                .sum();
                            let tol = 1e-5 * (k as f64).max(1.0);
                            assert!((f64::from(got[i * n + j]) - exact).abs() <= tol);
                        }
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 125);
    }

    #[test]
    fn a_block_of_rows_or_columns_does_not_depend_on_its_neighbours() {
        for &(rows, k, out) in &[
            (256, 32, 10),
            (48, 12, 4),
            (4, 4, 1),
            (1, 64, 32),
            (256, 64, 1),
            (3, 600, 5),
            (5, 2, 3),
        ] {
            let w = data(out * k, 1);
            for tc in [1usize, 2, 3, 7, 33] {
                let x = data(tc * rows * k, 2);
                let mut all = vec![0.0; tc * rows * out];
                gemm(
                    &mut all,
                    out,
                    Mat::rows(&x, tc * rows, k),
                    Mat::transposed(&w, k, out),
                );
                let wide = data(tc * out * k, 3);
                let mut cols = vec![0.0; rows * tc * out];
                let x0 = &x[..rows * k];
                gemm(
                    &mut cols,
                    tc * out,
                    Mat::rows(x0, rows, k),
                    Mat::transposed(&wide, k, tc * out),
                );
                for c in 0..tc {
                    let mut one = vec![0.0; rows * out];
                    let xc = &x[c * rows * k..(c + 1) * rows * k];
                    gemm(
                        &mut one,
                        out,
                        Mat::rows(xc, rows, k),
                        Mat::transposed(&w, k, out),
                    );
                    let same = |a: &[f32], b: &[f32]| {
                        a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits())
                    };
                    assert!(
                        same(&one, &all[c * rows * out..(c + 1) * rows * out]),
                        "rows: {rows}×{k}×{out}, {tc} candidates, candidate {c}"
                    );
                    let wc = &wide[c * out * k..(c + 1) * out * k];
                    gemm(
                        &mut one,
                        out,
                        Mat::rows(x0, rows, k),
                        Mat::transposed(wc, k, out),
                    );
                    let col: Vec<f32> = (0..rows)
                        .flat_map(|r| {
                            cols[r * tc * out + c * out..r * tc * out + (c + 1) * out].to_vec()
                        })
                        .collect();
                    assert!(
                        same(&one, &col),
                        "columns: {rows}×{k}×{out}, {tc} candidates, candidate {c}"
                    );
                    // And against a plain f64 product, loosely: padding changes nothing else.
                    for r in 0..rows {
                        for j in 0..out {
                            let e: f64 = (0..k)
                                .map(|l| f64::from(x0[r * k + l]) * f64::from(wc[j * k + l]))
                                .sum();
                            assert!(
                                (f64::from(one[r * out + j]) - e).abs() < 1e-3 * (1.0 + e.abs())
                            );
                        }
                    }
                }
            }
        }
    }

    /// The class-major projection is each value's sum of products in order, also in the
    /// columns past the last register block.
    #[test]
    fn class_major_projection_sums_each_column_in_order() {
        for (n, k, r) in [(64, 9, 1), (70, 5, 2), (131, 32, 3), (3, 4, 1)] {
            let x = data(k * n, 3);
            let bt = data(r * k, 5);
            let mut dst = vec![f32::NAN; r * n];
            project_cm(&mut dst, &x, &bt, n);
            for l in 0..r {
                for t in 0..n {
                    let want =
                        (0..k).fold(0.0f32, |acc, i| x[i * n + t].mul_add(bt[l * k + i], acc));
                    assert_eq!(
                        dst[l * n + t].to_bits(),
                        want.to_bits(),
                        "n {n}, row {l}, col {t}"
                    );
                }
            }
        }
    }

    /// Dense candidates: every row of the perturbation plus the base, whatever the split.
    #[test]
    fn add_rows_adds_the_base_to_every_row_and_refuses_a_ragged_one() {
        let dev = candle_core::Device::Cpu;
        let (rows, cols) = (37, 1000); // several tasks of whole rows, the last one short
        let e = data(rows * cols, 7);
        let b = data(cols, 11);
        let et = Tensor::from_vec(e.clone(), (rows, cols), &dev).unwrap();
        let bt = Tensor::from_vec(b.clone(), cols, &dev).unwrap();
        let sum = add_rows(&et, &bt, "t")
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, v) in sum.iter().enumerate() {
            assert_eq!(v.to_bits(), (e[i] + b[i % cols]).to_bits(), "element {i}");
        }
        let ragged = Tensor::from_vec(data(10, 1), 10, &dev).unwrap();
        let three = Tensor::from_vec(data(3, 1), 3, &dev).unwrap();
        assert!(add_rows(&ragged, &three, "t").is_err());
    }

    #[test]
    fn par_filled_floats_start_on_a_cache_line_and_keep_their_values_in_a_tensor() {
        for len in [0, 1, 17, 1000] {
            let v = par_filled(len, 7, |i, dst| {
                for (k, d) in dst.iter_mut().enumerate() {
                    *d = (i * 7 + k) as f32;
                }
                Ok::<(), ()>(())
            })
            .unwrap();
            assert_eq!(v.as_ptr().align_offset(64), 0, "len {len}");
            assert_eq!(v.len(), len);
            let t = v.into_tensor((1, len), &candle_core::Device::Cpu).unwrap();
            let back = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(back, (0..len).map(|k| k as f32).collect::<Vec<_>>());
            let z = LineBuf::zeros(len);
            assert_eq!(z.as_ptr().align_offset(64), 0);
            assert!(z.len() == len && z.iter().all(|&x| x == 0.0));
        }
        // A failing chunk fails the whole fill.
        assert!(par_filled(100, 10, |i, _| if i == 3 { Err(i) } else { Ok(()) }).is_err());
    }
}
