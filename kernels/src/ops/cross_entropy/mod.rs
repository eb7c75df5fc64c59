//! Causal-LM cross-entropy as transformers' `ForCausalLMLoss` computes it: logits upcast to f32,
//! label at position `t + 1` scored by the logits at `t`, positions labelled −100 ignored, mean over
//! the counted positions. The CPU reference and the CUDA kernel (per-row losses and, in place, the
//! gradient of the logits).

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use crate::{Error, Gpu, Result};

pub const SRC: &str = include_str!("cross_entropy.cu");

pub const IGNORE_INDEX: i64 = -100;

/// Shifts `labels [B, T]` left by one per row: target of position `t` is `labels[t + 1]`, the last
/// position of each row gets −100.
pub fn shift_labels(labels: &[i64], seq: usize) -> Vec<i64> {
    labels.chunks_exact(seq).flat_map(|row| row[1..].iter().copied().chain(std::iter::once(IGNORE_INDEX))).collect()
}

/// Per-position loss and gradient for targets already aligned with `logits [n, V]`.
/// Returns `(sum of losses, counted positions)`; `dlogits` (if given) receives
/// `(softmax − onehot) · grad_scale` on counted rows and 0 elsewhere.
pub fn cross_entropy(
    logits: &[f32],
    targets: &[i64],
    vocab: usize,
    mut dlogits: Option<&mut [f32]>,
    grad_scale: f32,
) -> (f64, usize) {
    let mut sum = 0.0f64;
    let mut count = 0usize;
    for (t, row) in logits.chunks_exact(vocab).enumerate() {
        let target = targets[t];
        if target == IGNORE_INDEX {
            if let Some(d) = dlogits.as_deref_mut() {
                d[t * vocab..(t + 1) * vocab].fill(0.0);
            }
            continue;
        }
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
        let lse = m as f64 + z.ln();
        sum += lse - row[target as usize] as f64;
        count += 1;
        if let Some(d) = dlogits.as_deref_mut() {
            let dr = &mut d[t * vocab..(t + 1) * vocab];
            for (o, &x) in dr.iter_mut().zip(row) {
                *o = ((x as f64 - lse).exp() as f32) * grad_scale;
            }
            dr[target as usize] -= grad_scale;
        }
    }
    (sum, count)
}

/// GPU cross-entropy of `logits [n, vocab]` with `targets [n]` (−100 = ignored): writes
/// `losses [n]` (`lse − logit[target]`, 0 on ignored rows; the caller sums and scales). With
/// `want_grad`, the logits are overwritten in place by `(softmax − onehot) · grad_scale` (zeros on
/// ignored rows); without, they are left unchanged.
///
/// Targets are validated by the host (`0 <= target < vocab` or −100); a target outside that range
/// never indexes out of bounds, its row gets a NaN loss (and NaN gradient) instead.
pub fn cross_entropy_gpu(
    gpu: &Gpu,
    logits: &mut CudaViewMut<'_, f32>,
    targets: &CudaView<'_, i32>,
    vocab: usize,
    grad_scale: f32,
    want_grad: bool,
    losses: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let n = targets.len();
    if vocab == 0 || vocab > u32::MAX as usize {
        return Err(Error::Shape(format!("cross_entropy: vocab is {vocab}, expected 1..=2^32-1")));
    }
    if logits.len() != n * vocab {
        return Err(Error::Shape(format!(
            "cross_entropy: logits has {} elements, expected {}",
            logits.len(),
            n * vocab
        )));
    }
    if losses.len() != n {
        return Err(Error::Shape(format!("cross_entropy: losses has {} elements, expected {n}", losses.len())));
    }
    if n > i32::MAX as usize {
        return Err(Error::Shape(format!("cross_entropy: {n} rows, at most 2^31 - 1 (one block per row)")));
    }
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("cross_entropy", SRC, "cross_entropy_f32")?;
    let threads = vocab.next_power_of_two().clamp(32, 1024) as u32;
    let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let (vocab32, grad) = (vocab as u32, want_grad as i32);
    // SAFETY: cross_entropy_f32(float* logits, const int* targets, float* losses, unsigned vocab,
    // float grad_scale, int want_grad): logits holds n·vocab floats, targets and losses n (checked
    // above); one block of a multiple of 32 threads per row; row[target] is read only for
    // 0 <= target < vocab.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(logits)
            .arg(targets)
            .arg(losses)
            .arg(&vocab32)
            .arg(&grad_scale)
            .arg(&grad)
            .launch(cfg)
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, fd_check_f64, randn};

    #[test]
    fn shift_and_ignore() {
        assert_eq!(shift_labels(&[1, 2, 3, 4, 5, 6], 3), vec![2, 3, -100, 5, 6, -100]);
        let logits = [0.0f32, 1.0, 2.0, 5.0, 5.0, 5.0];
        let (s, n) = cross_entropy(&logits, &[2, -100], 3, None, 1.0);
        assert_eq!(n, 1);
        let want = (1.0f64 + (-1.0f64).exp() + (-2.0f64).exp()).ln();
        assert!((s - want).abs() < 1e-6);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let logits = randn(5, 4 * 7, 3.0);
        let targets = [3i64, -100, 0, 6];
        let mut d = vec![0.0f32; logits.len()];
        cross_entropy(&logits, &targets, 7, Some(&mut d), 0.5);
        let f = |x: &[f64]| -> f64 {
            x.chunks(7)
                .zip(targets)
                .filter(|(_, t)| *t != IGNORE_INDEX)
                .map(|(row, t)| {
                    let m = row.iter().cloned().fold(f64::MIN, f64::max);
                    0.5 * (m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - row[t as usize])
                })
                .sum()
        };
        fd_check_f64(&logits, &d, f, 1e-5);
    }

    /// Per-row losses and the gradient from the CPU reference, in the GPU kernel's layout.
    fn reference(logits: &[f32], targets: &[i32], vocab: usize, grad_scale: f32) -> (Vec<f32>, Vec<f32>) {
        let mut grad = vec![0.0f32; logits.len()];
        let losses = logits
            .chunks_exact(vocab)
            .zip(grad.chunks_exact_mut(vocab))
            .zip(targets)
            .map(|((row, g), &t)| cross_entropy(row, &[t as i64], vocab, Some(g), grad_scale).0 as f32)
            .collect();
        (losses, grad)
    }

    fn check_gpu(gpu: &Gpu, seed: u64, targets: &[i32], vocab: usize, scale: f32) {
        let s = &gpu.stream;
        let n = targets.len();
        let logits = randn(seed, n * vocab, scale);
        let grad_scale = 1.0 / targets.iter().filter(|&&t| t as i64 != IGNORE_INDEX).count().max(1) as f32;
        let (want_loss, want_grad) = reference(&logits, targets, vocab, grad_scale);
        let td = s.clone_htod(targets).unwrap();
        let mut ld = s.clone_htod(&logits).unwrap();
        let mut lossd = s.clone_htod(&vec![f32::NAN; n]).unwrap();
        let what = format!("[{n}, {vocab}]");
        cross_entropy_gpu(
            gpu,
            &mut ld.as_view_mut(),
            &td.as_view(),
            vocab,
            grad_scale,
            false,
            &mut lossd.as_view_mut(),
        )
        .unwrap();
        // f32 on the GPU against f64 sums on the CPU. Each thread sums ≤ ⌈V/1024⌉ = 197 terms, then
        // a 10-level tree: the relative error of Σexp is ≤ ~210·2^-24 ≈ 1.3e-5 (plus 2 ulp per
        // expf), an absolute error of ≤ ~2e-5 on lse, on losses of ln(V) ± scale ≈ 12: rtol 1e-4
        // (with atol 3e-5 for rows whose loss is small) bounds it with room to spare.
        assert_close(&format!("losses {what}"), &s.clone_dtoh(&lossd).unwrap(), &want_loss, 3e-5, 1e-4);
        assert_eq!(s.clone_dtoh(&ld).unwrap(), logits, "{what}: without want_grad the logits stay unchanged");
        cross_entropy_gpu(gpu, &mut ld.as_view_mut(), &td.as_view(), vocab, grad_scale, true, &mut lossd.as_view_mut())
            .unwrap();
        assert_close(&format!("losses {what} (with grad)"), &s.clone_dtoh(&lossd).unwrap(), &want_loss, 3e-5, 1e-4);
        // softmax = exp(x − lse): the lse error above is a relative error of the same size on every
        // probability; the onehot entry p − 1 also gets it absolutely, scaled by grad_scale.
        assert_close(&format!("dlogits {what}"), &s.clone_dtoh(&ld).unwrap(), &want_grad, 3e-5 * grad_scale, 1e-4);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn gpt_oss_vocab_with_ignored_rows() {
        let gpu = Gpu::new(0).expect("a GPU");
        // V = 201088; targets at both ends of the vocabulary, ignored rows in between.
        check_gpu(&gpu, 1, &[0, -100, 201087, 123456, -100, 7, 200000], 201088, 4.0);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn single_token() {
        let gpu = Gpu::new(0).expect("a GPU");
        check_gpu(&gpu, 2, &[17], 1000, 3.0);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn all_rows_ignored() {
        let gpu = Gpu::new(0).expect("a GPU");
        check_gpu(&gpu, 3, &[-100, -100, -100], 513, 3.0);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn odd_lengths() {
        let gpu = Gpu::new(0).expect("a GPU");
        // Vocabularies smaller than a warp, not a power of two, and of one entry (loss 0).
        check_gpu(&gpu, 4, &[4, -100, 0, 2, 3], 5, 3.0);
        check_gpu(&gpu, 5, &[1000, 1, -100, 1024], 1025, 5.0);
        check_gpu(&gpu, 6, &[0, -100, 0], 1, 1.0);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn peaked_rows_and_masked_logits() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        let vocab = 3000;
        let mut logits = randn(7, 2 * vocab, 1.0);
        logits[5] = 40.0; // row 0: the target dominates, loss near 0
        for v in &mut logits[vocab..vocab + 2000] {
            *v = f32::NEG_INFINITY; // row 1: masked entries (a thread sees only −inf at first)
        }
        let targets = [5i32, 2500];
        let (want_loss, want_grad) = reference(&logits, &targets, vocab, 1.0);
        let td = s.clone_htod(&targets).unwrap();
        let mut ld = s.clone_htod(&logits).unwrap();
        let mut lossd = s.alloc_zeros::<f32>(2).unwrap();
        cross_entropy_gpu(&gpu, &mut ld.as_view_mut(), &td.as_view(), vocab, 1.0, true, &mut lossd.as_view_mut())
            .unwrap();
        assert_close("losses", &s.clone_dtoh(&lossd).unwrap(), &want_loss, 3e-5, 1e-4);
        assert_close("dlogits", &s.clone_dtoh(&ld).unwrap(), &want_grad, 3e-5, 1e-4);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn out_of_range_target_is_nan_not_out_of_bounds() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        let td = s.clone_htod(&[64i32, -1, 3]).unwrap();
        let mut ld = s.clone_htod(&randn(8, 3 * 64, 1.0)).unwrap();
        let mut lossd = s.alloc_zeros::<f32>(3).unwrap();
        cross_entropy_gpu(&gpu, &mut ld.as_view_mut(), &td.as_view(), 64, 1.0, true, &mut lossd.as_view_mut()).unwrap();
        let (loss, grad) = (s.clone_dtoh(&lossd).unwrap(), s.clone_dtoh(&ld).unwrap());
        assert!(loss[0].is_nan() && loss[1].is_nan() && loss[2].is_finite(), "{loss:?}");
        assert!(grad[..128].iter().all(|v| v.is_nan()) && grad[128..].iter().all(|v| v.is_finite()));
    }
}
