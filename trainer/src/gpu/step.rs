//! The optimizer step of a GPU run: clipping and the update on the device, then the host's copy
//! of the result (trainable values and optimizer state) into page-locked buffers allocated once,
//! on a second stream that overlaps the next step's work, double-buffered so that the host always
//! holds a complete step, even when a GPU fault stops a copy half-way: the last step, or the one
//! before it when the fault came while the last one was still being copied (or, when the first
//! step's copy was stopped, what it held before the first step). The copy becomes the
//! CPU adapter and optimizer only when a checkpoint is written.

use cudarc::driver::{sys, CudaSlice, DevicePtrMut};
use oxtune_kernels::pinned::{CopyStream, PinnedBuf};
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
struct HostSet<T> {
    /// Trainable values, concatenated in [`GpuEngine::param_views`] order, and their lengths.
    params: Option<PinnedBuf<f32>>,
    lens: Vec<usize>,
    state: StateMirror,
    /// Written by the copy stream: 0 before the set's copies, then `seq` after them, so the set is
    /// complete exactly when `mark` reads `seq` (even after a GPU fault stopped the copies).
    mark: Option<PinnedBuf<u32>>,
    seq: u32,
    /// The caller's description of the step the set holds.
    tag: Option<T>,
}

impl<T> Default for HostSet<T> {
    fn default() -> Self {
        Self { params: None, lens: vec![], state: StateMirror::default(), mark: None, seq: 0, tag: None }
    }
}

impl<T> HostSet<T> {
    fn complete(&self) -> bool {
        self.seq != 0 && self.mark.as_ref().is_some_and(|m| m.as_slice()[0] == self.seq)
    }
}

/// The device optimizer and the host's copies of its steps. The copy of a step runs on a stream of
/// its own while the next step's forward and backward run; the next update waits for it on the
/// device. The two host sets alternate, so one of them always holds a complete step: when a GPU
/// fault stops the copy of step N (in flight during step N + 1), the host still holds step N − 1.
pub(crate) struct DeviceStep<T> {
    opt: GpuOpt,
    sets: [HostSet<T>; 2],
    /// The set the last step was copied into.
    latest: Option<usize>,
    /// The set [`DeviceStep::settle`] found complete: what the host holds.
    held: Option<usize>,
    copy: CopyStream,
    /// Device words the copy stream writes into a set's `mark`: `[0, seq of the step being copied]`.
    marks: CudaSlice<u32>,
    /// Steps taken (the sets' `seq`: 1, 2, ...).
    seq: u32,
    /// Testing hook (`OXTUNE_FAULT_IN_COPY_AT_STEP=N`): step N's update is followed by a kernel
    /// that faults (a sticky CUDA error) 200 ms after it starts, which the host copy of the step
    /// waits behind: the step's remaining calls only queue work and return, the copy never lands
    /// and the fault surfaces during the next step: the host must go back to step N − 1.
    fault_in_copy_at: Option<u32>,
}

impl<T> DeviceStep<T> {
    /// The device twin of `opt` (its configuration and any state it holds, after a resume).
    pub fn new(gpu: &Gpu, opt: &Opt) -> Result<Self> {
        let opt = match opt {
            Opt::AdamW(c) => GpuOpt::AdamW(AdamWGpu::from_cpu(gpu, c).map_err(gpu_err)?),
            Opt::AdamW8bit(c) => GpuOpt::AdamW8bit(AdamW8bitGpu::from_cpu(gpu, c).map_err(gpu_err)?),
        };
        let copy = CopyStream::new(gpu)?;
        let marks = gpu.stream.alloc_zeros::<u32>(2)?;
        let fault_in_copy_at = std::env::var("OXTUNE_FAULT_IN_COPY_AT_STEP").ok().and_then(|v| v.parse().ok());
        Ok(Self { opt, sets: Default::default(), latest: None, held: None, copy, marks, seq: 0, fault_in_copy_at })
    }

    /// Updates `eng`'s trainable tensors (named `names`: the LoRA tensors, then with `sinks` every
    /// layer's sinks, which get no weight decay) from their (clipped) gradients with learning rate
    /// `lr`, then queues the copy of the values and optimizer state to the host on the copy stream
    /// (it overlaps what the compute stream runs next). `tag` describes the step to the caller:
    /// [`DeviceStep::settle`] returns the tag of the step the host holds.
    pub fn step(&mut self, eng: &mut GpuEngine, names: &[String], sinks: bool, lr: f64, tag: T) -> Result<()> {
        let gpu = eng.gpu.clone();
        if self.latest.is_some() {
            // The update below rewrites what the last copy reads.
            self.copy.compute_waits(&gpu)?;
        }
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
        self.seq += 1;
        let next = self.latest.map_or(0, |l| 1 - l);
        // Both sets allocated on the first step (page-locking hundreds of MB takes a while).
        for i in 0..2 {
            if self.sets[i].params.is_none() || self.sets[i].mark.is_none() {
                self.alloc(&gpu, eng, sinks, i)?;
            }
        }
        let queued = self.queue_copy(&gpu, eng, sinks, next, tag);
        if queued.is_err() {
            // Never complete (whatever its mark says), and nothing left to submit into it.
            self.sets[next].seq = 0;
            self.copy.discard_queued();
        }
        queued
    }

    /// Queues the host copy of the step just taken into set `next` (see [`DeviceStep::step`]).
    fn queue_copy(&mut self, gpu: &Gpu, eng: &GpuEngine, sinks: bool, next: usize, tag: T) -> Result<()> {
        // SAFETY: cuMemsetD32Async(dptr, value, n, stream): word 1 of `marks` (2 u32) on the
        // compute stream, after the last copy read it (step's compute_waits).
        unsafe {
            let (p, _g) = self.marks.device_ptr_mut(&gpu.stream);
            sys::cuMemsetD32Async(p + 4, self.seq, 1, gpu.stream.cu_stream()).result()?;
        }
        if self.fault_in_copy_at == Some(self.seq) {
            self.copy.synchronize()?; // the last step's copy lands first
            gpu.queue_fault(std::time::Duration::from_millis(200))?;
        }
        self.copy.after_compute(gpu)?;
        let set = &mut self.sets[next];
        set.seq = self.seq;
        set.tag = Some(tag);
        self.latest = Some(next);
        self.held = None;
        let views = eng.param_views(sinks);
        set.lens = views.iter().map(|v| v.len()).collect();
        let mark = set.mark.as_mut().expect("allocated with the set");
        // SAFETY: CopyStream::download's contract: the sets are read only after settle()
        // synchronises the copy stream (or finds the context failed), dropped only after it
        // (DeviceStep's drop waits for the copy stream first), and grown only after waiting; the
        // sources (the engine's trainables, the optimizer's states and `marks`) are rewritten only
        // by the next step's update, which waits for `copy.finish()` (step's compute_waits), and
        // freed only after this DeviceStep (the engine outlives it in every caller).
        unsafe {
            // The mark first, alone (the copies of one flush may run in any order), then the data,
            // then the mark again.
            self.copy.download(gpu, mark, &[self.marks.slice(0..1)])?;
            self.copy.flush()?;
            let params = set.params.as_mut().expect("allocated with the set");
            self.copy.download(gpu, params, &views)?;
            match &self.opt {
                GpuOpt::AdamW(o) => o.mirror_on(gpu, &mut set.state, &mut self.copy),
                GpuOpt::AdamW8bit(o) => o.mirror_on(gpu, &mut set.state, &mut self.copy),
            }
            .map_err(gpu_err)?;
            self.copy.flush()?;
            self.copy.download(gpu, mark, &[self.marks.slice(1..2)])?;
        }
        self.copy.finish()?;
        Ok(())
    }

    /// Allocates host set `i` for `eng`'s trainables and the optimizer's states (which exist
    /// after its first step). Set 1's state buffers used to be page-locked by its first copy, in
    /// the second step, after waiting for the first step's copy (PERFORMANCE.md v15: the
    /// "optimizer" part of that step, 0.759 s with gpt-oss-120b shapes, is 0.008 s now).
    fn alloc(&mut self, gpu: &Gpu, eng: &GpuEngine, sinks: bool, i: usize) -> Result<()> {
        let need: usize = eng.param_views(sinks).iter().map(|v| v.len()).sum();
        let set = &mut self.sets[i];
        set.params = Some(PinnedBuf::new(gpu, need)?);
        set.mark = Some(PinnedBuf::new(gpu, 1)?);
        match &self.opt {
            GpuOpt::AdamW(o) => o.reserve_mirror(gpu, &mut set.state),
            GpuOpt::AdamW8bit(o) => o.reserve_mirror(gpu, &mut set.state),
        }
        .map_err(gpu_err)
    }

    /// Waits for the copies in flight, then settles which step the host holds: the last one whose
    /// copy completed, which after a GPU fault may be the one before the last. Returns its tag
    /// (`None`: no step's copy completed, and the host holds what it had before the first step)
    /// and whether it is the last step taken.
    pub fn settle(&mut self) -> (Option<&T>, bool) {
        // An error means a failed context, which has stopped the copies: the marks tell what landed.
        let _ = self.copy.synchronize();
        let Some(latest) = self.latest else { return (None, true) };
        self.held = [latest, 1 - latest].into_iter().find(|&i| self.sets[i].complete());
        (self.held.and_then(|i| self.sets[i].tag.as_ref()), self.held == Some(latest))
    }

    /// The trainable values of the step [`DeviceStep::settle`] found (in [`GpuEngine::param_views`]
    /// order); `None` before it is called after a step, or when no copy completed.
    pub fn host_params(&self) -> Option<Vec<&[f32]>> {
        let set = &self.sets[self.held?];
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

    /// The CPU optimizer of the step [`DeviceStep::settle`] found.
    pub fn host_opt(&self) -> Option<Result<Opt>> {
        let set = &self.sets[self.held?];
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

impl<T> Drop for DeviceStep<T> {
    fn drop(&mut self) {
        // The copies in flight write into the sets, which are freed after this (`copy` is dropped
        // last and waits too, but the sets are fields before it).
        let _ = self.copy.synchronize();
    }
}
