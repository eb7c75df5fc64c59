//! Token embedding: `out [T, H] = table [V, H]` rows picked by `ids [T]`, as f32 from an f32 or a
//! bf16 table. The CPU reference and the CUDA kernels.
//!
//! Ids are validated by the host (the tokenizer's vocabulary is the model's); an id `>= V` still
//! never reads out of bounds: its row comes out NaN, on the GPU and in the reference alike, so that
//! the loss shows it.

use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::pinned::PinnedBuf;
use crate::{Error, Gpu, Result};

pub const SRC: &str = include_str!("embedding.cu");

/// CPU reference: `table [V, hidden]`, `ids [T]` → `[T, hidden]`; NaN rows for ids `>= V`.
pub fn embedding(table: &[f32], ids: &[u32], hidden: usize) -> Vec<f32> {
    assert!(hidden > 0 && table.len().is_multiple_of(hidden), "embedding: table is not [V, {hidden}]");
    let mut out = Vec::with_capacity(ids.len() * hidden);
    for &id in ids {
        match table.get(id as usize * hidden..(id as usize + 1) * hidden) {
            Some(row) => out.extend_from_slice(row),
            None => out.extend(std::iter::repeat_n(f32::NAN, hidden)),
        }
    }
    out
}

/// Launches `symbol` on a table of `table_len` values of `T` at device address `table`.
///
/// # Safety
/// `table` is a device-readable address of `table_len` values of `T` that stay alive and unwritten
/// until the kernel has run.
unsafe fn launch<T: DeviceRepr>(
    gpu: &Gpu,
    table: u64,
    table_len: usize,
    ids: &CudaView<'_, u32>,
    hidden: usize,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    if hidden == 0 || !table_len.is_multiple_of(hidden) {
        return Err(Error::Shape(format!(
            "embedding: table has {table_len} elements, expected a multiple of hidden {hidden}"
        )));
    }
    if table_len / hidden > u32::MAX as usize {
        return Err(Error::Shape(format!("embedding: {} rows exceed the kernel's 2^32 - 1", table_len / hidden)));
    }
    let tokens = ids.len();
    if out.len() != tokens * hidden {
        return Err(Error::Shape(format!("embedding: out has {} elements, expected {}", out.len(), tokens * hidden)));
    }
    if tokens == 0 {
        return Ok(());
    }
    let s = &gpu.stream;
    let bf16_table = std::mem::size_of::<T>() == 2;
    let (out_ptr, _record) = out.device_ptr_mut(s);
    // Eight bf16 a load when the rows, the table and the output allow 16-byte accesses.
    let x8 = bf16_table && hidden.is_multiple_of(8) && table.is_multiple_of(16) && out_ptr.is_multiple_of(16);
    let symbol = match (bf16_table, x8) {
        (true, true) => "embedding_f32_bf16w_x8",
        (true, false) => "embedding_f32_bf16w",
        (false, _) => "embedding_f32_f32w",
    };
    let f = gpu.function("embedding", SRC, symbol)?;
    let per_thread = if x8 { 8 } else { 1 };
    let threads = (hidden / per_thread).next_power_of_two().clamp(32, 256) as u32;
    let cfg =
        LaunchConfig { grid_dim: (tokens.min(65535) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let (tokens64, vocab32) = (tokens as u64, (table_len / hidden) as u32);
    let hidden32 = (hidden / per_thread) as u32;
    // SAFETY: embedding_f32_<T>w(float* out, const T* table, const unsigned* ids, unsigned long long
    // tokens, unsigned vocab, unsigned hidden) and embedding_f32_bf16w_x8 (the same with `hidden /
    // 8` 16-byte pieces, whose alignment is checked above): out holds tokens·hidden floats, table
    // vocab·hidden elements of T (the caller's contract), ids tokens (checked above); the kernel
    // reads table rows only for ids < vocab and strides over the tokens, so any grid is in bounds.
    unsafe {
        s.launch_builder(&f).arg(&out_ptr).arg(&table).arg(ids).arg(&tokens64).arg(&vocab32).arg(&hidden32).launch(cfg)
    }?;
    Ok(())
}

/// GPU [`embedding`] from a bf16 table: `table [V, hidden]`, `ids [T]`, `out [T, hidden]` (f32).
pub fn embedding_gpu_bf16w(
    gpu: &Gpu,
    table: &CudaView<'_, bf16>,
    ids: &CudaView<'_, u32>,
    hidden: usize,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (ptr, _record) = table.device_ptr(&gpu.stream);
    // SAFETY: a device view of table.len() values, borrowed for the launch (stream-ordered).
    unsafe { launch::<bf16>(gpu, ptr, table.len(), ids, hidden, out) }
}

/// GPU [`embedding`] from a bf16 table in mapped host memory ([`PinnedBuf::new_mapped`]): the
/// kernel reads the `ids`' rows over the bus, so the table takes no device memory and the host
/// gathers nothing.
///
/// # Safety
/// The kernel reads the table after this returns: the caller must not write it
/// ([`PinnedBuf::as_mut_slice`]) until `gpu`'s stream has run the kernel (a synchronisation, or a
/// copy back to the host, after the launch). Dropping a mapped buffer synchronises the context
/// first.
pub unsafe fn embedding_gpu_bf16w_host(
    gpu: &Gpu,
    table: &PinnedBuf<bf16>,
    ids: &CudaView<'_, u32>,
    hidden: usize,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let ptr = table
        .device_address()
        .ok_or_else(|| Error::Shape("embedding: the host table is not mapped for the device".into()))?;
    // SAFETY: the mapped buffer's device address of table.len() values, unwritten until the kernel
    // has run (the caller's contract) and alive until then (a mapped buffer's drop synchronises).
    unsafe { launch::<bf16>(gpu, ptr, table.len(), ids, hidden, out) }
}

/// GPU [`embedding`] from an f32 table: `table [V, hidden]`, `ids [T]`, `out [T, hidden]`.
pub fn embedding_gpu_f32w(
    gpu: &Gpu,
    table: &CudaView<'_, f32>,
    ids: &CudaView<'_, u32>,
    hidden: usize,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (ptr, _record) = table.device_ptr(&gpu.stream);
    // SAFETY: a device view of table.len() values, borrowed for the launch (stream-ordered).
    unsafe { launch::<f32>(gpu, ptr, table.len(), ids, hidden, out) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, randn};

    #[test]
    fn rows_are_copied_in_id_order() {
        let table = randn(1, 5 * 3, 1.0);
        let out = embedding(&table, &[4, 0, 4, 2], 3);
        for (t, id) in [4usize, 0, 4, 2].into_iter().enumerate() {
            assert_eq!(&out[t * 3..t * 3 + 3], &table[id * 3..id * 3 + 3]);
        }
    }

    #[test]
    fn out_of_range_id_gives_a_nan_row() {
        let table = randn(2, 4 * 2, 1.0);
        let out = embedding(&table, &[1, 4, u32::MAX], 2);
        assert_eq!(&out[..2], &table[2..4]);
        assert!(out[2..].iter().all(|v| v.is_nan()));
    }

    /// Runs both GPU variants on `table`, rounded to bf16 for the bf16 one, against the reference.
    fn check_gpu(gpu: &Gpu, table: &[f32], ids: &[u32], hidden: usize) {
        let s = &gpu.stream;
        let ids_d = s.clone_htod(ids).unwrap();
        let mut out = s.alloc_zeros::<f32>(ids.len() * hidden).unwrap();
        let t32 = s.clone_htod(table).unwrap();
        embedding_gpu_f32w(gpu, &t32.as_view(), &ids_d.as_view(), hidden, &mut out.as_view_mut()).unwrap();
        // A copy: exact.
        assert_close("embedding f32w", &s.clone_dtoh(&out).unwrap(), &embedding(table, ids, hidden), 0.0, 0.0);
        let tb: Vec<bf16> = table.iter().map(|&v| bf16::from_f32(v)).collect();
        let tb_as_f32: Vec<f32> = tb.iter().map(|v| v.to_f32()).collect();
        let tbd = s.clone_htod(&tb).unwrap();
        embedding_gpu_bf16w(gpu, &tbd.as_view(), &ids_d.as_view(), hidden, &mut out.as_view_mut()).unwrap();
        // bf16 → f32 is exact.
        let want = embedding(&tb_as_f32, ids, hidden);
        assert_close("embedding bf16w", &s.clone_dtoh(&out).unwrap(), &want, 0.0, 0.0);
        // The same table in mapped host memory, read over the bus.
        let mut host = PinnedBuf::<bf16>::new_mapped(gpu, tb.len()).unwrap();
        host.as_mut_slice().copy_from_slice(&tb);
        let mut out2 = s.alloc_zeros::<f32>(ids.len() * hidden).unwrap();
        // SAFETY: the table is not written again; clone_dtoh below synchronises the stream.
        unsafe { embedding_gpu_bf16w_host(gpu, &host, &ids_d.as_view(), hidden, &mut out2.as_view_mut()) }.unwrap();
        assert_close("embedding bf16w from host memory", &s.clone_dtoh(&out2).unwrap(), &want, 0.0, 0.0);
        // A pinned buffer that is not mapped is an error, not a launch.
        let unmapped = PinnedBuf::<bf16>::new(gpu, tb.len()).unwrap();
        // SAFETY: refused before any launch.
        let refused =
            unsafe { embedding_gpu_bf16w_host(gpu, &unmapped, &ids_d.as_view(), hidden, &mut out2.as_view_mut()) };
        assert!(refused.is_err());
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn gpt_oss_hidden_with_repeated_ids() {
        let gpu = Gpu::new(0).expect("a GPU");
        let (v, h) = (1000, 2880);
        let ids: Vec<u32> = (0..257u32).map(|t| (t * 7919) % v as u32).chain([0, 999, 999]).collect();
        check_gpu(&gpu, &randn(1, v * h, 1.0), &ids, h);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn single_token() {
        let gpu = Gpu::new(0).expect("a GPU");
        check_gpu(&gpu, &randn(2, 11 * 64, 1.0), &[10], 64);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn odd_lengths() {
        let gpu = Gpu::new(0).expect("a GPU");
        check_gpu(&gpu, &randn(3, 13 * 17, 1.0), &[12, 0, 5, 5, 1, 3, 11], 17);
        check_gpu(&gpu, &randn(4, 3, 1.0), &[2, 1, 0], 1);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn more_tokens_than_blocks_in_the_grid() {
        let gpu = Gpu::new(0).expect("a GPU");
        let ids: Vec<u32> = (0..70_000u32).map(|t| (t * 31) % 97).collect();
        check_gpu(&gpu, &randn(5, 97 * 64, 1.0), &ids, 64);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn out_of_range_id_gives_a_nan_row_on_the_gpu() {
        let gpu = Gpu::new(0).expect("a GPU");
        check_gpu(&gpu, &randn(6, 4 * 64, 1.0), &[3, 4, u32::MAX, 0], 64);
    }
}
