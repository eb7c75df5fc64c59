//! Causal-LM cross-entropy as transformers' `ForCausalLMLoss` computes it: logits upcast to f32,
//! label at position `t + 1` scored by the logits at `t`, positions labelled −100 ignored, mean over
//! the counted positions.

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fd_check_f64, randn};

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
}
