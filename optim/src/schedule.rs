//! Learning-rate schedules of transformers' `get_*_schedule_with_warmup` family.
//!
//! `k` is the number of optimizer steps already taken: the HF Trainer steps its `LambdaLR` *after* each
//! optimizer step, so optimizer step 1 uses `k = 0` (and therefore lr 0 whenever there is a warmup).

use crate::{Error, Result};

/// The decay after warmup.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScheduleKind {
    /// `get_constant_schedule_with_warmup` (plain `constant` when `warmup_steps == 0`).
    Constant,
    /// `get_linear_schedule_with_warmup`: linear decay to 0 at `total_steps`.
    Linear,
    /// `get_cosine_schedule_with_warmup`; `num_cycles = 0.5` is a half cosine down to 0.
    Cosine { num_cycles: f64 },
    /// `get_cosine_with_min_lr_schedule_with_warmup` with `min_lr_rate` (the floor as a fraction of the peak).
    CosineWithMinLr { num_cycles: f64, min_lr_rate: f64 },
}

/// A learning-rate schedule: `lr(k) = peak_lr * multiplier(k)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    kind: ScheduleKind,
    peak_lr: f64,
    warmup_steps: u64,
    total_steps: u64,
}

impl LrSchedule {
    pub fn new(kind: ScheduleKind, peak_lr: f64, warmup_steps: u64, total_steps: u64) -> Result<Self> {
        if !(peak_lr >= 0.0 && peak_lr.is_finite()) {
            return Err(Error::Config(format!("learning rate {peak_lr} must be finite and non-negative")));
        }
        match kind {
            ScheduleKind::Cosine { num_cycles } | ScheduleKind::CosineWithMinLr { num_cycles, .. }
                if !num_cycles.is_finite() =>
            {
                return Err(Error::Config(format!("num_cycles = {num_cycles} must be finite")));
            }
            ScheduleKind::CosineWithMinLr { min_lr_rate, .. } if !(0.0..=1.0).contains(&min_lr_rate) => {
                return Err(Error::Config(format!("min_lr_rate = {min_lr_rate} must be in [0, 1]")));
            }
            _ => {}
        }
        Ok(Self { kind, peak_lr, warmup_steps, total_steps })
    }

    /// Warmup steps for a warmup *ratio* of `total_steps`, as transformers rounds it (`ceil`).
    pub fn warmup_from_ratio(ratio: f64, total_steps: u64) -> u64 {
        (total_steps as f64 * ratio).ceil().max(0.0) as u64
    }

    pub fn kind(&self) -> ScheduleKind {
        self.kind
    }

    /// The multiplier on the peak learning rate after `k` optimizer steps.
    pub fn multiplier(&self, k: u64) -> f64 {
        let (k, w, n) = (k as f64, self.warmup_steps as f64, self.total_steps as f64);
        if k < w {
            return k / w.max(1.0);
        }
        let progress = (k - w) / (n - w).max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((n - k) / (n - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine { num_cycles } => {
                (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())).max(0.0)
            }
            ScheduleKind::CosineWithMinLr { num_cycles, min_lr_rate } => {
                let f = 0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos());
                (f * (1.0 - min_lr_rate) + min_lr_rate).max(0.0)
            }
        }
    }

    /// The learning rate for the optimizer step taken after `k` earlier steps.
    pub fn lr(&self, k: u64) -> f64 {
        self.peak_lr * self.multiplier(k)
    }
}
