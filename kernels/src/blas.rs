//! Row-major GEMMs through cuBLAS (`cublasGemmEx`, f32 accumulation, f32 output): the bf16 weight
//! products (LM head, attention projections) and an f32 one.
//!
//! cuBLAS is column-major: the row-major `C [m, n]` is the column-major `Cᵀ [n, m]`, and
//! `Cᵀ = op(B)ᵀ op(A)ᵀ`, so B's buffer goes first. Read column-major, a row-major buffer is its
//! own transpose, so a non-transposed row-major operand is passed with `CUBLAS_OP_N` and a
//! transposed one with `CUBLAS_OP_T`.

use std::sync::Arc;

use cudarc::cublas::{result, sys, CudaBlas};
use cudarc::driver::{sys::CUdeviceptr, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::{Error, Gpu, Result};

/// A cuBLAS handle bound to the GPU's stream; create one and reuse it.
pub struct Blas {
    handle: CudaBlas,
    stream: Arc<CudaStream>,
    /// The handle's workspace, set explicitly so that products captured into a CUDA graph use
    /// this buffer instead of one cuBLAS allocates per capture (as PyTorch does for its handles).
    _workspace: CudaSlice<u8>,
}

/// Bytes of a handle's workspace: what cuBLAS recommends on Hopper (32 MiB; other GPUs ask less).
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// Whether libcublas can be loaded.
pub fn available() -> bool {
    // SAFETY: only dlopen's the library; no cuBLAS call is made.
    unsafe { sys::is_culib_present() }
}

impl Blas {
    /// Creates the handle on `gpu.stream`, or says which libcublas names were searched.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        if !available() {
            return Err(Error::NoLibrary { lib: "libcublas", searched: cudarc::get_lib_name_candidates("cublas") });
        }
        let handle = CudaBlas::new(gpu.stream.clone()).map_err(|e| Error::Driver(format!("cublasCreate: {e:?}")))?;
        // SAFETY: cuBLAS writes the workspace before it reads it.
        let mut workspace = unsafe { gpu.stream.alloc::<u8>(WORKSPACE_BYTES) }?;
        {
            let (ptr, _g) = workspace.device_ptr_mut(&gpu.stream);
            // SAFETY: a live handle and a device buffer of WORKSPACE_BYTES that outlives it (both
            // are fields of the Blas; the handle is dropped first, in declaration order).
            unsafe { sys::cublasSetWorkspace_v2(*handle.handle(), ptr as *mut std::ffi::c_void, WORKSPACE_BYTES) }
                .result()
                .map_err(|e| Error::Driver(format!("cublasSetWorkspace: {e:?}")))?;
        }
        Ok(Self { handle, stream: gpu.stream.clone(), _workspace: workspace })
    }

    /// Row-major `C [m, n] = alpha · op(A) op(B) + beta · C` with `op(A) [m, k]`, `op(B) [k, n]`;
    /// `A` stored `[m, k]` (`[k, m]` when `trans_a`), `B` stored `[k, n]` (`[n, k]` when `trans_b`).
    /// bf16 inputs, f32 accumulation and output. E.g. `y = x Wᵀ` with `W [out, in]`: `trans_b`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bf16(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &CudaView<'_, bf16>,
        trans_a: bool,
        b: &CudaView<'_, bf16>,
        trans_b: bool,
        c: &mut CudaViewMut<'_, f32>,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let dims = Dims::new("matmul_bf16", m, n, k, a.len(), trans_a, b.len(), trans_b, c.len())?;
        // cuBLAS runs in the calling thread's current context.
        self.stream.context().bind_to_thread()?;
        let (pa, _ra) = a.device_ptr(&self.stream);
        let (pb, _rb) = b.device_ptr(&self.stream);
        let (pc, _rc) = c.device_ptr_mut(&self.stream);
        // SAFETY: Dims::new checked that A, B and C hold exactly m·k, k·n and m·n elements and that
        // every dimension fits a c_int; the pointers stay valid while the SyncOnDrop guards live
        // (until the end of this function, after the GEMM is enqueued on the handle's stream).
        unsafe { dims.gemm_ex(&self.handle, pa, pb, pc, sys::cudaDataType_t::CUDA_R_16BF, alpha, beta) }
    }

    /// As [`Blas::matmul_bf16`] with f32 inputs (`CUBLAS_COMPUTE_32F`: full f32, no TF32).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_f32(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &CudaView<'_, f32>,
        trans_a: bool,
        b: &CudaView<'_, f32>,
        trans_b: bool,
        c: &mut CudaViewMut<'_, f32>,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let dims = Dims::new("matmul_f32", m, n, k, a.len(), trans_a, b.len(), trans_b, c.len())?;
        self.stream.context().bind_to_thread()?;
        let (pa, _ra) = a.device_ptr(&self.stream);
        let (pb, _rb) = b.device_ptr(&self.stream);
        let (pc, _rc) = c.device_ptr_mut(&self.stream);
        // SAFETY: as in matmul_bf16.
        unsafe { dims.gemm_ex(&self.handle, pa, pb, pc, sys::cudaDataType_t::CUDA_R_32F, alpha, beta) }
    }
}

/// A checked row-major problem and its column-major translation.
struct Dims {
    op: &'static str,
    m: i32,
    n: i32,
    k: i32,
    trans_a: bool,
    trans_b: bool,
}

impl Dims {
    #[allow(clippy::too_many_arguments)]
    fn new(
        op: &'static str,
        m: usize,
        n: usize,
        k: usize,
        a_len: usize,
        trans_a: bool,
        b_len: usize,
        trans_b: bool,
        c_len: usize,
    ) -> Result<Self> {
        let int = |what: &str, v: usize| {
            i32::try_from(v).map_err(|_| Error::Shape(format!("{op}: {what} = {v} exceeds cuBLAS's int range")))
        };
        let len = |what: &str, got: usize, want: Option<usize>| match want {
            Some(w) if w == got => Ok(()),
            Some(w) => Err(Error::Shape(format!("{op}: {what} has {got} elements, expected {w}"))),
            None => Err(Error::Shape(format!("{op}: {what}'s size overflows usize"))),
        };
        len("a", a_len, m.checked_mul(k))?;
        len("b", b_len, k.checked_mul(n))?;
        len("c", c_len, m.checked_mul(n))?;
        Ok(Self { op, m: int("m", m)?, n: int("n", n)?, k: int("k", k)?, trans_a, trans_b })
    }

    /// `cublasGemmEx` computing `Cᵀ [n, m] = op(B)ᵀ [n, k] · op(A)ᵀ [k, m]` column-major.
    ///
    /// # Safety
    /// `a`, `b`, `c` are device pointers to `m·k`, `k·n`, `m·n` elements of `dtype` (`c` f32),
    /// live until the GEMM has run on the handle's stream.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_ex(
        &self,
        blas: &CudaBlas,
        a: CUdeviceptr,
        b: CUdeviceptr,
        c: CUdeviceptr,
        dtype: sys::cudaDataType_t,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if self.m == 0 || self.n == 0 {
            return Ok(());
        }
        let op = |t: bool| if t { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
        // Leading dimensions of the row-major buffers read column-major: B [k, n] → n, B [n, k] → k,
        // A [m, k] → k, A [k, m] → m. At least 1, as cuBLAS requires even when k = 0.
        let ldb = if self.trans_b { self.k } else { self.n }.max(1);
        let lda = if self.trans_a { self.m } else { self.k }.max(1);
        let ldc = self.n.max(1);
        // SAFETY: the caller's contract; alpha and beta are host f32 (the handle's default host
        // pointer mode, matching CUBLAS_COMPUTE_32F's scalar type).
        unsafe {
            result::gemm_ex(
                *blas.handle(),
                op(self.trans_b),
                op(self.trans_a),
                self.n,
                self.m,
                self.k,
                (&alpha) as *const f32 as *const _,
                b as *const _,
                dtype,
                ldb,
                a as *const _,
                dtype,
                lda,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                sys::cudaDataType_t::CUDA_R_32F,
                ldc,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            Error::Driver(format!(
                "{}: cublasGemmEx(m {}, n {}, k {}, trans_a {}, trans_b {}): {e:?}",
                self.op, self.m, self.n, self.k, self.trans_a, self.trans_b
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, randn};
    use rayon::prelude::*;

    /// f64 row-major reference `alpha · op(A) op(B) + beta · C`.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        trans_a: bool,
        b: &[f32],
        trans_b: bool,
        c: &[f32],
        alpha: f32,
        beta: f32,
    ) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|t| {
                        let av = if trans_a { a[t * m + i] } else { a[i * k + t] };
                        let bv = if trans_b { b[j * k + t] } else { b[t * n + j] };
                        av as f64 * bv as f64
                    })
                    .sum();
                out[i * n + j] = (alpha as f64 * dot + beta as f64 * c[i * n + j] as f64) as f32;
            }
        }
        out
    }

    #[test]
    fn reference_transposes_agree() {
        // op(A) op(B) with A stored transposed must equal the same product with A stored plainly.
        let (m, n, k) = (3, 4, 5);
        let a = randn(1, m * k, 1.0);
        let b = randn(2, k * n, 1.0);
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let c = randn(3, m * n, 1.0);
        let want = reference(m, n, k, &a, false, &b, false, &c, 0.5, 1.0);
        for (ta, tb) in [(true, false), (false, true), (true, true)] {
            let got = reference(m, n, k, if ta { &at } else { &a }, ta, if tb { &bt } else { &b }, tb, &c, 0.5, 1.0);
            assert_close(&format!("trans_a {ta} trans_b {tb}"), &got, &want, 1e-6, 1e-6);
        }
    }

    #[test]
    fn wrong_lengths_are_shape_errors() {
        let e = Dims::new("matmul_f32", 3, 4, 5, 15, false, 19, false, 12).err().expect("b is short");
        assert!(e.to_string().contains("b has 19 elements, expected 20"), "{e}");
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn all_transposes_odd_sizes_and_beta_accumulation() {
        let gpu = Gpu::new(0).expect("a GPU");
        let blas = Blas::new(&gpu).expect("cuBLAS");
        let s = &gpu.stream;
        let (m, n, k) = (37, 53, 71);
        for (seed, (ta, tb)) in [(false, false), (true, false), (false, true), (true, true)].into_iter().enumerate() {
            for (alpha, beta) in [(1.0f32, 0.0f32), (0.7, 1.0)] {
                let seed = seed as u64 * 10 + (beta as u64);
                let a = randn(seed + 1, m * k, 1.0);
                let b = randn(seed + 2, k * n, 1.0);
                let c0 = randn(seed + 3, m * n, 1.0);
                // f32: full-precision products, f32 sums over k = 71 terms of magnitude ≤ 1, so
                // |err| ≲ k·2^-24·Σ|ab| ≈ 1e-5 at worst: atol 1e-5, rtol 1e-5.
                let want = reference(m, n, k, &a, ta, &b, tb, &c0, alpha, beta);
                let (ad, bd) = (s.clone_htod(&a).unwrap(), s.clone_htod(&b).unwrap());
                let mut cd = s.clone_htod(&c0).unwrap();
                blas.matmul_f32(m, n, k, &ad.as_view(), ta, &bd.as_view(), tb, &mut cd.as_view_mut(), alpha, beta)
                    .unwrap();
                let what = format!("f32 [{m}, {n}, {k}] trans_a {ta} trans_b {tb} beta {beta}");
                assert_close(&what, &s.clone_dtoh(&cd).unwrap(), &want, 1e-5, 1e-5);

                // bf16: compare with the reference on the bf16-rounded inputs (exact products in
                // f32), so only the f32 accumulation differs: atol 1e-4 + rtol 1e-3 is generous.
                let (a16, b16): (Vec<bf16>, Vec<bf16>) =
                    (a.iter().map(|&v| bf16::from_f32(v)).collect(), b.iter().map(|&v| bf16::from_f32(v)).collect());
                let (ar, br): (Vec<f32>, Vec<f32>) =
                    (a16.iter().map(|v| v.to_f32()).collect(), b16.iter().map(|v| v.to_f32()).collect());
                let want = reference(m, n, k, &ar, ta, &br, tb, &c0, alpha, beta);
                let (ad, bd) = (s.clone_htod(&a16).unwrap(), s.clone_htod(&b16).unwrap());
                let mut cd = s.clone_htod(&c0).unwrap();
                blas.matmul_bf16(m, n, k, &ad.as_view(), ta, &bd.as_view(), tb, &mut cd.as_view_mut(), alpha, beta)
                    .unwrap();
                let what = format!("bf16 [{m}, {n}, {k}] trans_a {ta} trans_b {tb} beta {beta}");
                assert_close(&what, &s.clone_dtoh(&cd).unwrap(), &want, 1e-4, 1e-3);
            }
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn lm_head_chunk_shape() {
        // logits [256, vocab chunk] = x_bf16 [256, 2880] · W_bf16ᵀ (W stored [vocab, 2880]); an
        // odd vocabulary chunk so the last column tile is partial.
        let gpu = Gpu::new(0).expect("a GPU");
        let blas = Blas::new(&gpu).expect("cuBLAS");
        let s = &gpu.stream;
        let (m, n, k) = (256, 4099, 2880);
        let x: Vec<bf16> = randn(11, m * k, 1.0).into_iter().map(bf16::from_f32).collect();
        let w: Vec<bf16> = randn(12, n * k, 0.05).into_iter().map(bf16::from_f32).collect();
        let (xf, wf): (Vec<f32>, Vec<f32>) =
            (x.iter().map(|v| v.to_f32()).collect(), w.iter().map(|v| v.to_f32()).collect());
        let want: Vec<f32> = (0..m * n)
            .into_par_iter()
            .map(|idx| {
                let (i, j) = (idx / n, idx % n);
                (0..k).map(|t| xf[i * k + t] as f64 * wf[j * k + t] as f64).sum::<f64>() as f32
            })
            .collect();
        let (xd, wd) = (s.clone_htod(&x).unwrap(), s.clone_htod(&w).unwrap());
        let mut yd = s.alloc_zeros::<f32>(m * n).unwrap();
        blas.matmul_bf16(m, n, k, &xd.as_view(), false, &wd.as_view(), true, &mut yd.as_view_mut(), 1.0, 0.0).unwrap();
        // Sums of 2880 products of magnitude ≤ 0.05 (|y| ~ 0.5): f32 accumulation error ~1e-6.
        assert_close("logits [256, 4099]", &s.clone_dtoh(&yd).unwrap(), &want, 1e-4, 1e-3);
    }
}
