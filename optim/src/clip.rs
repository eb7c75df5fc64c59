//! Global-norm gradient clipping as `torch.nn.utils.clip_grad_norm_` (what the HF Trainer calls before
//! every optimizer step when `max_grad_norm > 0`).

use rayon::prelude::*;

use crate::{Error, Result};

/// Tensors at least this long have their squared norm summed in parallel.
const PAR_MIN: usize = 1 << 16;

/// L2 norm of one tensor, accumulated in f64 and rounded to f32 like torch's per-tensor norm.
fn tensor_norm(g: &[f32]) -> f32 {
    let sq = |c: &[f32]| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
    let total = if g.len() >= PAR_MIN { g.par_chunks(PAR_MIN / 4).map(sq).sum() } else { sq(g) };
    total.sqrt() as f32
}

/// The global L2 norm over all `grads`: the norm of the per-tensor norms, as torch computes it.
pub fn global_grad_norm(grads: &[&[f32]]) -> f32 {
    grads.iter().map(|g| f64::from(tensor_norm(g)).powi(2)).sum::<f64>().sqrt() as f32
}

/// Scales every gradient by `min(1, max_norm / (total + 1e-6))` and returns the pre-clip global norm
/// (the `grad_norm` the HF Trainer logs).
///
/// As in torch (with its default `error_if_nonfinite=False`), a non-finite total norm makes the coefficient
/// NaN and so poisons every gradient; check the returned norm when that must be survivable, or use
/// [`global_grad_norm`] first.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> Result<f32> {
    check_max_norm(max_norm)?;
    let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
    let total = global_grad_norm(&views);
    let coef = clip_coef(total, max_norm);
    for g in grads.iter_mut() {
        if g.len() >= PAR_MIN {
            g.par_iter_mut().for_each(|x| *x *= coef);
        } else {
            g.iter_mut().for_each(|x| *x *= coef);
        }
    }
    Ok(total)
}

pub(crate) fn check_max_norm(max_norm: f32) -> Result<()> {
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return Err(Error::Config(format!(
            "max_grad_norm = {max_norm} must be positive and finite (to disable clipping, skip the call)"
        )));
    }
    Ok(())
}

/// torch's clip coefficient `min(1, max_norm / (total + 1e-6))` in f32.
pub fn clip_coef(total: f32, max_norm: f32) -> f32 {
    // torch clamps with `max=1.0`, which keeps a NaN coefficient NaN; f32::min would drop it.
    let coef = max_norm / (total + 1e-6);
    if coef > 1.0 {
        1.0
    } else {
        coef
    }
}
