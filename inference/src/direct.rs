//! Direct convolution, dense layers, max-pooling and softmax over channels-last data,
//! compiled for AVX2 + FMA and for AVX-512 and chosen at run time by what the CPU has
//! (they then replace im2col + sgemm, matrixmultiply's packing, and libm's `expf`).
//!
//! Why: the bundled models are small: convolutions with 8 and 16 output channels and
//! reductions of 9 and 72, dense layers of 64 and 10. There im2col's copy (a 72-float
//! row per output pixel), sgemm's packing and scalar pooling cost more than the
//! arithmetic (BENCHMARKS.md, inference section). Here each output pixel's (or row's)
//! channels live in vector registers: for every (ky, kx, c) of the window (every input
//! column of a dense layer), one input value is broadcast and multiplied into a row of
//! weights, for a block of `P` neighbouring pixels (rows) at once so the weight row is
//! loaded once per block. A convolution's input is first copied into a zero-padded
//! scratch image, so the kernel has no border cases.
//!
//! The kernels use `std::arch` intrinsics in `#[target_feature]` functions, written once
//! (`kernels!`) for both instruction sets and entered only after a run-time check, so
//! the binary still runs on any x86-64 (and elsewhere), where the fused plan keeps
//! im2col + sgemm. (Plain Rust over `[f32; 8]` arrays was tried first: LLVM kept the
//! accumulators on the stack and emitted scalar FMAs, 1.7× slower than im2col + sgemm.)

use crate::fused::Conv;

/// Floats per AVX2 register: the unit of the layouts here.
const L: usize = 8;

/// An instruction set the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// AVX2 + FMA: 8 lanes.
    Avx2,
    /// AVX-512F: 16 lanes (and AVX2 + FMA for what has no AVX-512 version).
    Avx512,
}

/// The instruction sets this CPU has, best last (empty off x86-64 or without AVX2);
/// detected once, since every batch's kernels check against it.
pub(crate) fn levels() -> &'static [Level] {
    static LEVELS: std::sync::OnceLock<Vec<Level>> = std::sync::OnceLock::new();
    LEVELS.get_or_init(|| {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                out.push(Level::Avx2);
                if has!("avx512f") {
                    out.push(Level::Avx512);
                }
            }
        }
        out
    })
}

/// Whether the kernels run here at all: an x86-64 CPU with AVX2 and FMA.
pub(crate) fn available() -> bool {
    best().is_some()
}

/// The best level.
fn best() -> Option<Level> {
    levels().last().copied()
}

/// Whether [`conv`] takes this convolution (output channels a multiple of 8, up to 32).
pub(crate) fn supports(cv: &Conv) -> bool {
    cv.m.is_multiple_of(L) && (1..=4).contains(&(cv.m / L))
}

/// The padded scratch image's height and width for `cv`.
fn padded_dims(cv: &Conv) -> (usize, usize) {
    let hp = ((cv.oh - 1) * cv.stride + cv.kh).max(cv.h + cv.pad_top);
    let wp = ((cv.ow - 1) * cv.stride + cv.kw).max(cv.w + cv.pad_left);
    (hp, wp)
}

/// Copies `rows` NHWC images into `padded` with the convolution's zero borders; every
/// element is written once.
fn pad(cv: &Conv, inp: &[f32], rows: usize, padded: &mut Vec<f32>) {
    let (c, h, w) = (cv.c, cv.h, cv.w);
    let (hp, wp) = padded_dims(cv);
    padded.clear();
    padded.reserve(rows * hp * wp * c);
    let (left, right) = (cv.pad_left * c, (wp - w - cv.pad_left) * c);
    for n in 0..rows {
        padded.resize(padded.len() + cv.pad_top * wp * c, 0.0);
        for y in 0..h {
            padded.resize(padded.len() + left, 0.0);
            let from = (n * h + y) * w * c;
            padded.extend_from_slice(&inp[from..from + w * c]);
            padded.resize(padded.len() + right, 0.0);
        }
        padded.resize(padded.len() + (hp - h - cv.pad_top) * wp * c, 0.0);
    }
}

/// Runs `cv` over `rows` images in `inp` (NHWC) into `out` (`rows·oh·ow·m`), with bias
/// and the fused `Relu`, with the best kernels here. Only when [`available`] and
/// [`supports`] say so.
pub(crate) fn conv(cv: &Conv, inp: &[f32], rows: usize, padded: &mut Vec<f32>, out: &mut [f32]) {
    let level = best().expect("direct::conv without AVX2");
    conv_at(level, cv, inp, rows, padded, out);
}

/// `c = a · b` over row-major matrices `a: [rows, k]`, `b: [k, m]`, `c: [rows, m]`:
/// matrixmultiply's sgemm (packing, runtime AVX/FMA choice), for what the kernels here
/// do not take.
pub(crate) fn sgemm(a: &[f32], rows: usize, k: usize, b: &[f32], m: usize, c: &mut [f32]) {
    assert!(a.len() >= rows * k && b.len() >= k * m && c.len() >= rows * m);
    let (k_stride, m_stride) = (k as isize, m as isize);
    #[allow(unsafe_code)]
    // SAFETY: the assertion above keeps every element sgemm reads or writes, at these
    // row strides and unit column strides, inside the three slices; `c` is borrowed
    // mutably, so it overlaps neither `a` nor `b`.
    unsafe {
        matrixmultiply::sgemm(
            rows,
            k,
            m,
            1.0,
            a.as_ptr(),
            k_stride,
            1,
            b.as_ptr(),
            m_stride,
            1,
            0.0,
            c.as_mut_ptr(),
            m_stride,
            1,
        )
    };
}

/// [`conv`] with the kernels of `level`, which must be one of [`levels`]. AVX-512 takes
/// output channels in multiples of 16; others fall to AVX2.
pub(crate) fn conv_at(
    level: Level,
    cv: &Conv,
    inp: &[f32],
    rows: usize,
    padded: &mut Vec<f32>,
    out: &mut [f32],
) {
    assert!(levels().contains(&level) && supports(cv));
    assert!(inp.len() >= rows * cv.h * cv.w * cv.c && out.len() >= rows * cv.oh * cv.ow * cv.m);
    pad(cv, inp, rows, padded);
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: a `#[target_feature]` function only requires that the CPU has the
    // features, which `levels()` has just confirmed.
    unsafe {
        if level == Level::Avx512 && cv.m.is_multiple_of(avx512::V) {
            avx512::conv(cv, padded, rows, out)
        } else {
            avx2::conv(cv, padded, rows, out)
        }
    };
}

/// Row length of [`pad_columns`]' layout: a multiple of 16 (one AVX-512 register).
pub(crate) fn padded_width(m: usize) -> usize {
    m.div_ceil(16) * 16
}

/// `weights` (`[k, m]`, row-major) with each row padded with zeros to
/// [`padded_width`] columns, the layout [`dense`] reads (built once, with the plan).
pub(crate) fn pad_columns(weights: &[f32], m: usize) -> Vec<f32> {
    let mp = padded_width(m);
    let mut out = Vec::with_capacity(weights.len() / m.max(1) * mp);
    for row in weights.chunks_exact(m.max(1)) {
        out.extend_from_slice(row);
        out.resize(out.len() + mp - m, 0.0);
    }
    out
}

/// A dense layer: `out[rows, m] = x[rows, k] · W + bias`, then `Relu` if asked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dense<'a> {
    /// Inputs per row.
    pub(crate) k: usize,
    /// Outputs per row.
    pub(crate) m: usize,
    /// `W` as [`pad_columns`] lays it out (rows of [`padded_width`]`(m)` floats).
    pub(crate) weights: &'a [f32],
    /// `m` numbers, or none (zero).
    pub(crate) bias: &'a [f32],
    pub(crate) relu: bool,
}

/// Runs `layer` over `rows` rows of `x` into `out` with the best kernels here; no
/// packing step (the weights of our layers stay in L1 between rows). Only when
/// [`available`] says so.
pub(crate) fn dense(layer: &Dense<'_>, x: &[f32], rows: usize, out: &mut [f32]) {
    let level = best().expect("direct::dense without AVX2");
    dense_at(level, layer, x, rows, out);
}

/// [`dense`] with the kernels of `level`, which must be one of [`levels`].
pub(crate) fn dense_at(level: Level, layer: &Dense<'_>, x: &[f32], rows: usize, out: &mut [f32]) {
    assert!(levels().contains(&level));
    assert_eq!(layer.weights.len(), layer.k * padded_width(layer.m));
    assert!(x.len() >= rows * layer.k && out.len() >= rows * layer.m);
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: as in `conv_at`: the features were confirmed at run time.
    unsafe {
        match level {
            Level::Avx512 => avx512::dense(layer, x, rows, out),
            Level::Avx2 => avx2::dense(layer, x, rows, out),
        }
    };
}

/// Softmax over each run of `n` numbers of `src`, written to `dst`: exponentials eight
/// at a time with AVX2 (libm's `expf`, one at a time, was a tenth of the MLP's batch),
/// else the portable loop.
pub(crate) fn softmax(src: &[f32], dst: &mut [f32], n: usize) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if available() {
        #[allow(unsafe_code)]
        // SAFETY: as in `conv_at`: the features were checked at run time.
        unsafe {
            avx2::softmax(src, dst, n)
        };
        return;
    }
    softmax_portable(src, dst, n);
}

fn softmax_portable(src: &[f32], dst: &mut [f32], n: usize) {
    for (r, out) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
        let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for (o, v) in out.iter_mut().zip(r) {
            *o = (*v - max).exp();
            sum += *o;
        }
        for o in out.iter_mut() {
            *o /= sum;
        }
    }
}

/// The convolution and dense kernels, written once and compiled per instruction set:
/// `$feature` is enabled on every function, so each module may only be entered after a
/// run-time check of it (see [`Level`]); inside, the functions call each other safely.
/// The pixel/row block sizes (`conv_p`, `dense_p`, for 1–4 vectors of output channels)
/// keep the accumulators, one weight row and a broadcast within the register file (16
/// registers for AVX2, 32 for AVX-512): a block that does not fit spills to the stack.
#[cfg(target_arch = "x86_64")]
macro_rules! kernels {
    (
        $(#[$doc:meta])*
        mod $name:ident {
            feature: $feature:literal,
            vector: $vec:ident, lanes: $lanes:literal,
            load: $loadu:ident, store: $storeu:ident, set1: $set1:ident,
            fmadd: $fmadd:ident, max: $max:ident, zero: $zero:ident,
            conv_p: [$c1:literal, $c2:literal, $c3:literal, $c4:literal],
            dense_p: [$d1:literal, $d2:literal, $d3:literal, $d4:literal],
        }
        $($extra:item)*
    ) => {
        $(#[$doc])*
        mod $name {
            #[allow(unused_imports)]
            use std::arch::x86_64::*;

            use super::{padded_dims, Dense};
            use crate::fused::Conv;

            /// Floats per register.
            pub(super) const V: usize = $lanes;

            #[target_feature(enable = $feature)]
            pub(super) fn load(v: &[f32]) -> $vec {
                let v: &[f32; V] = v[..V].try_into().expect("a register's worth");
                #[allow(unsafe_code)]
                // SAFETY: `v` is V initialised floats; the load has no alignment rule.
                unsafe {
                    $loadu(v.as_ptr())
                }
            }

            #[target_feature(enable = $feature)]
            pub(super) fn store(v: &mut [f32], x: $vec) {
                let v: &mut [f32; V] = (&mut v[..V]).try_into().expect("a register's worth");
                #[allow(unsafe_code)]
                // SAFETY: `v` is V writable floats; the store has no alignment rule.
                unsafe {
                    $storeu(v.as_mut_ptr(), x)
                }
            }

            /// Needs `cv.m` a multiple of V, at most 4·V.
            #[target_feature(enable = $feature)]
            pub(super) fn conv(cv: &Conv, padded: &[f32], rows: usize, out: &mut [f32]) {
                match cv.m / V {
                    1 => blocked::<1, $c1>(cv, padded, rows, out),
                    2 => blocked::<2, $c2>(cv, padded, rows, out),
                    3 => blocked::<3, $c3>(cv, padded, rows, out),
                    _ => blocked::<4, $c4>(cv, padded, rows, out),
                }
            }

            /// `MB` vectors of output channels per pixel, `P` pixels per block.
            #[target_feature(enable = $feature)]
            fn blocked<const MB: usize, const P: usize>(
                cv: &Conv,
                padded: &[f32],
                rows: usize,
                out: &mut [f32],
            ) {
                let (hp, wp) = padded_dims(cv);
                let zero = $zero();
                let mut bias = [zero; MB];
                for (i, b) in bias.iter_mut().enumerate() {
                    *b = load(&cv.bias[i * V..]);
                }
                for n in 0..rows {
                    for oy in 0..cv.oh {
                        // Full blocks with P known at compile time (accumulators in
                        // registers), then the pixels left one by one.
                        let mut ox = 0;
                        while ox + P <= cv.ow {
                            pixel_block::<MB, P>(cv, padded, (hp, wp), (n, oy, ox), &bias, out);
                            ox += P;
                        }
                        while ox < cv.ow {
                            pixel_block::<MB, 1>(cv, padded, (hp, wp), (n, oy, ox), &bias, out);
                            ox += 1;
                        }
                    }
                }
            }

            /// Output pixels `ox .. ox + P` of row `oy` of image `n`.
            #[target_feature(enable = $feature)]
            #[inline]
            fn pixel_block<const MB: usize, const P: usize>(
                cv: &Conv,
                padded: &[f32],
                (hp, wp): (usize, usize),
                (n, oy, ox): (usize, usize, usize),
                bias: &[$vec; MB],
                out: &mut [f32],
            ) {
                let (c, s, m) = (cv.c, cv.stride, cv.m);
                let zero = $zero();
                let mut acc = [*bias; P];
                for ky in 0..cv.kh {
                    // For one kernel row, a pixel's window (kx, ci) is kw·c contiguous
                    // numbers, and so are the weight rows: one loop over both, and the
                    // block's span bounds-checked once.
                    let line = ((n * hp + oy * s + ky) * wp + ox * s) * c;
                    // Weight row (ky·kw + kx)·c + ci holds the M output channels.
                    let wrows = &cv.weights[ky * cv.kw * c * m..][..cv.kw * c * m];
                    let span = &padded[line..line + (P - 1) * s * c + cv.kw * c];
                    for (j, row) in wrows.chunks_exact(m).enumerate() {
                        let mut w = [zero; MB];
                        for (i, v) in w.iter_mut().enumerate() {
                            *v = load(&row[i * V..]);
                        }
                        for (p, a) in acc.iter_mut().enumerate() {
                            let x = $set1(span[p * s * c + j]);
                            for (a, w) in a.iter_mut().zip(&w) {
                                *a = $fmadd(x, *w, *a);
                            }
                        }
                    }
                }
                let first = ((n * cv.oh + oy) * cv.ow + ox) * m;
                for (p, a) in acc.iter().enumerate() {
                    let px = &mut out[first + p * m..first + (p + 1) * m];
                    for (i, v) in a.iter().enumerate() {
                        let v = if cv.relu { $max(*v, zero) } else { *v };
                        store(&mut px[i * V..], v);
                    }
                }
            }

            #[target_feature(enable = $feature)]
            pub(super) fn dense(layer: &Dense<'_>, x: &[f32], rows: usize, out: &mut [f32]) {
                // Output columns in chunks of up to four registers.
                let vectors = layer.m.div_ceil(V);
                let mut first = 0;
                while first < vectors {
                    match vectors - first {
                        1 => dense_chunk::<1, $d1>(layer, x, rows, first, out),
                        2 => dense_chunk::<2, $d2>(layer, x, rows, first, out),
                        3 => dense_chunk::<3, $d3>(layer, x, rows, first, out),
                        _ => dense_chunk::<4, $d4>(layer, x, rows, first, out),
                    }
                    first += (vectors - first).min(4);
                }
            }

            /// Columns `first·V .. (first + MB)·V` (clipped to `m`) of every output row,
            /// `P` rows at a time.
            #[target_feature(enable = $feature)]
            fn dense_chunk<const MB: usize, const P: usize>(
                layer: &Dense<'_>,
                x: &[f32],
                rows: usize,
                first: usize,
                out: &mut [f32],
            ) {
                let zero = $zero();
                let mut b = [zero; MB];
                for (i, v) in b.iter_mut().enumerate() {
                    // The bias padded like the weights (an empty bias is zero).
                    let mut lanes = [0.0; V];
                    for (j, l) in lanes.iter_mut().enumerate() {
                        *l = layer.bias.get((first + i) * V + j).copied().unwrap_or(0.0);
                    }
                    *v = load(&lanes);
                }
                // Full blocks of P rows (accumulators in registers), then one by one.
                let mut r = 0;
                while r + P <= rows {
                    dense_rows::<MB, P>(layer, x, r, first, &b, out);
                    r += P;
                }
                while r < rows {
                    dense_rows::<MB, 1>(layer, x, r, first, &b, out);
                    r += 1;
                }
            }

            /// Rows `r .. r + P`, columns from `first·V`, starting from the bias `b`.
            #[target_feature(enable = $feature)]
            #[inline]
            fn dense_rows<const MB: usize, const P: usize>(
                layer: &Dense<'_>,
                x: &[f32],
                r: usize,
                first: usize,
                b: &[$vec; MB],
                out: &mut [f32],
            ) {
                let (k, m, w, relu) = (layer.k, layer.m, layer.weights, layer.relu);
                let mp = super::padded_width(m);
                let zero = $zero();
                let mut acc = [*b; P];
                let xs = &x[r * k..(r + P) * k];
                for kk in 0..k {
                    let row = &w[kk * mp + first * V..][..MB * V];
                    let mut wv = [zero; MB];
                    for (i, v) in wv.iter_mut().enumerate() {
                        *v = load(&row[i * V..]);
                    }
                    for (p, a) in acc.iter_mut().enumerate() {
                        let xv = $set1(xs[p * k + kk]);
                        for (a, w) in a.iter_mut().zip(&wv) {
                            *a = $fmadd(xv, *w, *a);
                        }
                    }
                }
                for (p, a) in acc.iter().enumerate() {
                    let o = &mut out[(r + p) * m..(r + p + 1) * m];
                    for (i, v) in a.iter().enumerate() {
                        let v = if relu { $max(*v, zero) } else { *v };
                        let col = (first + i) * V;
                        if col + V <= m {
                            store(&mut o[col..], v);
                        } else {
                            // The last, partial vector of a row (m not a multiple of V).
                            let mut lanes = [0.0; V];
                            store(&mut lanes, v);
                            o[col..].copy_from_slice(&lanes[..m - col]);
                        }
                    }
                }
            }

            $($extra)*
        }
    };
}

#[cfg(target_arch = "x86_64")]
kernels! {
    /// AVX2 + FMA: 8 floats per register, 16 registers. Also softmax's `exp` and
    /// max-pooling, AVX2 only: together under 8% of a CNN batch by profile.
    mod avx2 {
        feature: "avx2,fma",
        vector: __m256, lanes: 8,
        load: _mm256_loadu_ps, store: _mm256_storeu_ps, set1: _mm256_set1_ps,
        fmadd: _mm256_fmadd_ps, max: _mm256_max_ps, zero: _mm256_setzero_ps,
        conv_p: [8, 4, 3, 2],
        dense_p: [8, 5, 3, 2],
    }
    /// e^x for x ≤ 0 (softmax's inputs less their maximum), Cephes' `expf` scheme:
    /// x = k·ln 2 + r, e^r by a degree-5 polynomial, 2^k into the exponent bits. About
    /// 1 ulp; below −87.3 the result is 0 (the true value is under 1e-37).
    #[target_feature(enable = "avx2,fma")]
    fn exp_nonpositive(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
        let k = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        // r = x − k·ln 2, with ln 2 split in two for precision.
        let r = _mm256_fmadd_ps(k, _mm256_set1_ps(-0.693_359_4), x);
        let r = _mm256_fmadd_ps(k, _mm256_set1_ps(2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let e_r = _mm256_fmadd_ps(
            p,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvttps_epi32(k),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(e_r, _mm256_castsi256_ps(bits))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax(src: &[f32], dst: &mut [f32], n: usize) {
        // Each number less its row's maximum, then the exponentials over the whole
        // batch as one contiguous run (row by row, with short rows padded into a
        // vector, the stores and reloads stalled and it was slower than libm).
        for (r, out) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
            let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for (o, v) in out.iter_mut().zip(r) {
                *o = v - max;
            }
        }
        let mut chunks = dst.chunks_exact_mut(V);
        for c in &mut chunks {
            let e = exp_nonpositive(load(c));
            store(c, e);
        }
        for v in chunks.into_remainder() {
            *v = v.exp();
        }
        for out in dst.chunks_exact_mut(n) {
            let inv = 1.0 / out.iter().sum::<f32>();
            for o in out.iter_mut() {
                *o *= inv;
            }
        }
    }

    /// Max-pooling with channels a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn maxpool(pool: &super::Pool, inp: &[f32], rows: usize, out: &mut [f32]) {
        let super::Pool { c, h, w, k, s, oh, ow } = *pool;
        let mut pixels = out.chunks_exact_mut(c);
        for n in 0..rows {
            for oy in 0..oh {
                for ox in 0..ow {
                    let Some(o) = pixels.next() else { return };
                    for lane in (0..c).step_by(V) {
                        let first = ((n * h + oy * s) * w + ox * s) * c + lane;
                        let mut best = load(&inp[first..]);
                        for ky in 0..k {
                            for kx in 0..k {
                                let i = ((n * h + oy * s + ky) * w + ox * s + kx) * c + lane;
                                best = _mm256_max_ps(load(&inp[i..]), best);
                            }
                        }
                        store(&mut o[lane..], best);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
kernels! {
    /// AVX-512F: 16 floats per register, 32 registers.
    mod avx512 {
        feature: "avx512f",
        vector: __m512, lanes: 16,
        load: _mm512_loadu_ps, store: _mm512_storeu_ps, set1: _mm512_set1_ps,
        fmadd: _mm512_fmadd_ps, max: _mm512_max_ps, zero: _mm512_setzero_ps,
        conv_p: [8, 8, 6, 4],
        dense_p: [12, 10, 7, 5],
    }
}

/// A max-pooling: `k`×`k` windows at stride `s`, no padding, over `c`×`h`×`w` NHWC
/// images, giving `oh`×`ow`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pool {
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) k: usize,
    pub(crate) s: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
}

/// Runs `pool` over `rows` images on any CPU; with AVX2 and channels a multiple of 8,
/// eight channels per instruction.
pub(crate) fn maxpool(pool: &Pool, inp: &[f32], rows: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if pool.c.is_multiple_of(L) && available() {
        #[allow(unsafe_code)]
        // SAFETY: as in `conv_at`: the features were checked at run time.
        unsafe {
            avx2::maxpool(pool, inp, rows, out)
        };
        return;
    }
    maxpool_lanes(pool, inp, rows, out);
}

fn maxpool_lanes(pool: &Pool, inp: &[f32], rows: usize, out: &mut [f32]) {
    let Pool {
        c,
        h,
        w,
        k,
        s,
        oh,
        ow,
    } = *pool;
    let mut pixels = out.chunks_exact_mut(c);
    for n in 0..rows {
        for oy in 0..oh {
            for ox in 0..ow {
                let Some(o) = pixels.next() else { return };
                let first = ((n * h + oy * s) * w + ox * s) * c;
                o.copy_from_slice(&inp[first..first + c]);
                for ky in 0..k {
                    for kx in 0..k {
                        let i = ((n * h + oy * s + ky) * w + ox * s + kx) * c;
                        // `>` rather than `f32::max` (whose NaN rule costs extra
                        // instructions per lane): one vector max. A NaN input is
                        // skipped either way, unless it is the window's first value.
                        for (o, x) in o.iter_mut().zip(&inp[i..i + c]) {
                            *o = if *x > *o { *x } else { *o };
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::conv_im2col;

    /// Deterministic numbers in [-1, 1) (xorshift), so failures reproduce.
    fn numbers(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn conv(
        c: usize,
        h: usize,
        w: usize,
        m: usize,
        k: usize,
        stride: usize,
        pad: (usize, usize, usize, usize),
        relu: bool,
    ) -> Conv {
        let (pt, pl, pb, pr) = pad;
        Conv {
            src: 0,
            dst: 1,
            c,
            h,
            w,
            m,
            kh: k,
            kw: k,
            stride,
            pad_top: pt,
            pad_left: pl,
            oh: (h + pt + pb - k) / stride + 1,
            ow: (w + pl + pr - k) / stride + 1,
            weights: numbers(k * k * c * m, 7 + m as u64),
            bias: numbers(m, 11),
            relu,
        }
    }

    #[test]
    fn direct_convolution_matches_im2col_and_sgemm() {
        if levels().is_empty() {
            eprintln!("no AVX2 + FMA on this CPU: the direct kernels are not used here");
            return;
        }
        // The bundled CNN's two shapes, then strides, uneven padding, widths that leave
        // partial pixel blocks, and every supported channel count.
        let cases = [
            conv(1, 8, 8, 8, 3, 1, (1, 1, 1, 1), true),
            conv(8, 8, 8, 16, 3, 1, (1, 1, 1, 1), true),
            conv(3, 11, 7, 24, 3, 2, (0, 1, 2, 0), false),
            conv(5, 9, 13, 32, 5, 1, (2, 2, 2, 2), true),
            conv(2, 6, 5, 8, 1, 1, (0, 0, 0, 0), false),
            conv(4, 7, 9, 16, 2, 3, (1, 0, 0, 1), true),
        ];
        // Every instruction set this CPU has (AVX-512 takes the multiples of 16).
        for &level in levels() {
            for (i, cv) in cases.iter().enumerate() {
                assert!(supports(cv));
                let rows = 3;
                let inp = numbers(rows * cv.h * cv.w * cv.c, 100 + i as u64);
                let len = rows * cv.oh * cv.ow * cv.m;
                let (mut ours, mut reference) = (vec![f32::NAN; len], vec![f32::NAN; len]);
                conv_at(level, cv, &inp, rows, &mut Vec::new(), &mut ours);
                conv_im2col(cv, &inp, rows, &mut Vec::new(), &mut reference);
                for (j, (a, b)) in ours.iter().zip(&reference).enumerate() {
                    // Same products, summed in another order: a few roundings apart.
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{level:?}, case {i}, element {j}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn dense_layers_match_sgemm() {
        if levels().is_empty() {
            eprintln!("no AVX2 + FMA on this CPU: the direct kernels are not used here");
            return;
        }
        // Column counts that fill 1–4 registers, leave a partial one (10, 61) or take
        // more than one chunk of four (40, 64, 72); row counts that leave partial
        // blocks; with and without bias and Relu.
        for (i, &(rows, k, m, bias, relu)) in [
            (64, 64, 64, true, true),
            (64, 64, 10, true, false),
            (7, 3, 8, false, true),
            (13, 256, 10, true, false),
            (5, 17, 40, true, true),
            (9, 33, 61, false, false),
            (1, 64, 72, true, true),
            (3, 5, 24, true, false),
        ]
        .iter()
        .enumerate()
        {
            let x = numbers(rows * k, 1 + i as u64);
            let w = numbers(k * m, 50 + i as u64);
            let b = if bias {
                numbers(m, 90 + i as u64)
            } else {
                Vec::new()
            };
            for &level in levels() {
                let mut ours = vec![f32::NAN; rows * m];
                let padded = pad_columns(&w, m);
                let layer = Dense {
                    k,
                    m,
                    weights: &padded,
                    bias: &b,
                    relu,
                };
                dense_at(level, &layer, &x, rows, &mut ours);
                for r in 0..rows {
                    for j in 0..m {
                        let mut want = b.get(j).copied().unwrap_or(0.0);
                        for kk in 0..k {
                            want += x[r * k + kk] * w[kk * m + j];
                        }
                        if relu {
                            want = want.max(0.0);
                        }
                        let got = ours[r * m + j];
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f32).sqrt(),
                            "{level:?}, case {i}, row {r}, column {j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn vector_softmax_matches_libm() {
        // Rows of 10 (the models'), 3 and 17 (partial vectors across row boundaries),
        // with spreads from tiny to past the exponential's underflow.
        for (n, scale) in [(10, 1.0), (10, 30.0), (3, 5.0), (17, 200.0), (8, 0.01)] {
            let src: Vec<f32> = numbers(n * 7, n as u64).iter().map(|v| v * scale).collect();
            let (mut ours, mut reference) = (vec![0.0; src.len()], vec![0.0; src.len()]);
            softmax(&src, &mut ours, n);
            softmax_portable(&src, &mut reference, n);
            for (j, (a, b)) in ours.iter().zip(&reference).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6,
                    "n {n}, scale {scale}, element {j}: {a} vs {b}"
                );
            }
            for row in ours.chunks_exact(n) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn vector_max_pooling_matches_the_portable_loop() {
        for (c, h, w, k, s) in [
            (16, 8, 8, 2, 2),
            (8, 7, 9, 3, 2),
            (5, 6, 6, 2, 2),
            (24, 5, 5, 2, 1),
        ] {
            let (oh, ow) = ((h - k) / s + 1, (w - k) / s + 1);
            let rows = 2;
            let inp = numbers(rows * h * w * c, (c * h) as u64);
            let len = rows * oh * ow * c;
            let (mut ours, mut reference) = (vec![f32::NAN; len], vec![f32::NAN; len]);
            let pool = Pool {
                c,
                h,
                w,
                k,
                s,
                oh,
                ow,
            };
            maxpool(&pool, &inp, rows, &mut ours);
            maxpool_lanes(&pool, &inp, rows, &mut reference);
            assert_eq!(ours, reference, "c {c}, {h}×{w}, k {k}, s {s}");
            // And against the definition, for one output.
            let want = (0..k)
                .flat_map(|ky| (0..k).map(move |kx| (ky * w + kx) * c))
                .map(|i| inp[i])
                .fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(ours[0], want);
        }
    }
}
