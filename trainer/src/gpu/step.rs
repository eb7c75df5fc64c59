//! The optimizer step of a GPU run: clipping and the update on the device, then the host's copy
//! of the result (trainable values and optimizer state) into page-locked buffers allocated once,
//! double-buffered so that the host always holds the last completed step, even when a copy fails
//! half-way (a GPU fault). The copy becomes the CPU adapter and optimizer only when a checkpoint
//! is written.

use oxtune_kernels::pinned::PinnedBuf;
use oxtune_kernels::Gpu;
use oxtune_optim::cuda::{AdamW8bitGpu, AdamWGpu, GpuParam, StateMirror};
use oxtune_optim::{AdamW, AdamW8bit, Optimizer};

use super::GpuEngine;
use crate::error::{Error, Result};

/// The optimizer with its state on the host: what CPU steps update and checkpoints hold.
pub(crate) enum Opt {
    AdamW(AdamW),
    AdamW8bit(AdamW8bit),
}

impl Opt {
    pub fn cpu(&mut self) -> &mut dyn Optimizer {
        match self {
            Opt::AdamW(o) => o,
            Opt::AdamW8bit(o) => o,
        }
    }

    pub fn cpu_ref(&self) -> &dyn Optimizer {
        match self {
            Opt::AdamW(o) => o,
            Opt::AdamW8bit(o) => o,
        }
    }
}

/// The same optimizer with its state on the device (bit-equal updates, see `oxtune_optim::cuda`).
enum GpuOpt {
    AdamW(AdamWGpu),
    AdamW8bit(AdamW8bitGpu),
}

fn gpu_err(e: oxtune_optim::Error) -> Error {
    Error::Gpu(format!("optimizer: {e}"))
}

/// One host copy of a step.
#[derive(Default)]
struct HostSet {
    /// Trainable values, concatenated in [`GpuEngine::param_views`] order, and their lengths.
    params: Option<PinnedBuf<f32>>,
    lens: Vec<usize>,
    state: StateMirror,
}

/// The device optimizer and the host's copies of its steps.
pub(crate) struct DeviceStep {
    opt: GpuOpt,
    sets: [HostSet; 2],
    /// The set that holds the last completed step (none before the first).
    current: Option<usize>,
}

impl DeviceStep {
    /// The device twin of `opt` (its configuration and any state it holds, after a resume).
    pub fn new(gpu: &Gpu, opt: &Opt) -> Result<Self> {
        let opt = match opt {
            Opt::AdamW(c) => GpuOpt::AdamW(AdamWGpu::from_cpu(gpu, c).map_err(gpu_err)?),
            Opt::AdamW8bit(c) => GpuOpt::AdamW8bit(AdamW8bitGpu::from_cpu(gpu, c).map_err(gpu_err)?),
        };
        Ok(Self { opt, sets: Default::default(), current: None })
    }

    /// Updates `eng`'s trainable tensors (named `names`: the LoRA tensors, then with `sinks` every
    /// layer's sinks, which get no weight decay) from their (clipped) gradients with learning rate
    /// `lr`, then copies the values and optimizer state to the host. The host copy of the previous
    /// step stays current until this one is complete.
    pub fn step(&mut self, eng: &mut GpuEngine, names: &[String], sinks: bool, lr: f64) -> Result<()> {
        let gpu = eng.gpu.clone();
        {
            let n_sinks = if sinks { eng.layers() } else { 0 };
            let trainables = eng.trainables(sinks);
            let n_lora = trainables.len() - n_sinks;
            if names.len() != trainables.len() {
                return Err(Error::Gpu(format!("{} names for {} trainable tensors", names.len(), trainables.len())));
            }
            let mut params: Vec<GpuParam> = trainables
                .into_iter()
                .zip(names)
                .enumerate()
                .map(
                    |(i, ((v, g), n))| {
                        if i < n_lora {
                            GpuParam::new(n, v, g)
                        } else {
                            GpuParam::without_decay(n, v, g)
                        }
                    },
                )
                .collect();
            match &mut self.opt {
                GpuOpt::AdamW(o) => o.step(&gpu, &mut params, lr),
                GpuOpt::AdamW8bit(o) => o.step(&gpu, &mut params, lr),
            }
            .map_err(gpu_err)?;
        }
        let next = self.current.map_or(0, |c| 1 - c);
        self.copy_to_host(eng, sinks, next)?;
        if self.sets[1 - next].params.is_none() {
            // The first step also fills the other set, so that both are allocated (page-locking
            // hundreds of MB takes a while) before the steps that follow.
            self.copy_to_host(eng, sinks, 1 - next)?;
        }
        // Only now, every copy complete, is this step the host's.
        self.current = Some(next);
        Ok(())
    }

    /// Copies the trainable values and the optimizer state into host set `i`.
    fn copy_to_host(&mut self, eng: &GpuEngine, sinks: bool, i: usize) -> Result<()> {
        let gpu = eng.gpu.clone();
        let set = &mut self.sets[i];
        let views = eng.param_views(sinks);
        set.lens = views.iter().map(|v| v.len()).collect();
        let need: usize = set.lens.iter().sum();
        if set.params.as_ref().is_none_or(|b| b.len() < need) {
            set.params = None;
            set.params = Some(PinnedBuf::new(&gpu, need)?);
        }
        set.params.as_mut().expect("allocated above").download(&gpu, &views)?;
        match &self.opt {
            GpuOpt::AdamW(o) => o.mirror(&gpu, &mut set.state),
            GpuOpt::AdamW8bit(o) => o.mirror(&gpu, &mut set.state),
        }
        .map_err(gpu_err)
    }

    /// The trainable values of the last completed step (in [`GpuEngine::param_views`] order), if
    /// a step was taken.
    pub fn host_params(&self) -> Option<Vec<&[f32]>> {
        let set = &self.sets[self.current?];
        let all = set.params.as_ref()?.as_slice();
        let mut at = 0;
        Some(
            set.lens
                .iter()
                .map(|&n| {
                    at += n;
                    &all[at - n..at]
                })
                .collect(),
        )
    }

    /// The CPU optimizer of the last completed step, if a step was taken.
    pub fn host_opt(&self) -> Option<Result<Opt>> {
        let set = &self.sets[self.current?];
        Some(match &self.opt {
            GpuOpt::AdamW(o) => o.cpu_from_mirror(&set.state).map(Opt::AdamW).map_err(gpu_err),
            GpuOpt::AdamW8bit(o) => o.cpu_from_mirror(&set.state).map(Opt::AdamW8bit).map_err(gpu_err),
        })
    }

    /// Bytes of pinned host memory held by the copies.
    pub fn host_bytes(&self) -> usize {
        self.sets.iter().map(|s| s.params.as_ref().map_or(0, |b| 4 * b.len()) + s.state.bytes()).sum()
    }
}
