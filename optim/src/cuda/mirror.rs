//! [`StateMirror`]: a host copy of a device optimizer's states in page-locked memory, taken after
//! every step at full PCIe speed into buffers allocated once (waiting for it, or queued on a
//! [`CopyStream`] and readable only once that stream is synchronised), and turned into the CPU
//! optimizer (whose `save_state` writes checkpoints) only when one is saved.

use cudarc::driver::CudaView;
use oxtune_kernels::pinned::{CopyStream, PinnedBuf};
use oxtune_kernels::Gpu;

use crate::Result;

/// How one state was laid out in the mirror's flat buffers.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub name: String,
    pub step: u64,
    /// Values of the tensor; 8-bit states also hold `ceil(n / 256)` absmax values per moment.
    pub n: usize,
    pub blockwise: bool,
}

/// The optimizer states as of the last [`crate::cuda::AdamWGpu::mirror`] (or the 8-bit twin):
/// f32 moments / absmax in one pinned buffer, 8-bit moments in another, in the order of `entries`.
#[derive(Default)]
pub struct StateMirror {
    pub(crate) f32s: Option<PinnedBuf<f32>>,
    pub(crate) u8s: Option<PinnedBuf<u8>>,
    pub(crate) entries: Vec<Entry>,
    /// Page-locked buffers allocated so far (each growth counts one).
    allocations: usize,
}

impl StateMirror {
    /// Bytes of pinned host memory held.
    pub fn bytes(&self) -> usize {
        self.f32s.as_ref().map_or(0, |b| 4 * b.len()) + self.u8s.as_ref().map_or(0, |b| b.len())
    }

    /// How many page-locked buffers this mirror has allocated: a copy into a mirror whose buffers
    /// were reserved for the same states allocates none.
    pub fn allocations(&self) -> usize {
        self.allocations
    }

    /// Allocates the pinned buffers for `f32s` and `u8s` now, copying nothing: page-locking takes
    /// a while (~0.4 s a GiB), which a training loop would rather spend before its timed steps than
    /// in the copy of its second one. Entries are left as they are.
    pub(crate) fn reserve(&mut self, gpu: &Gpu, f32s: &[CudaView<'_, f32>], u8s: &[CudaView<'_, u8>]) -> Result<()> {
        grown(gpu, &mut self.f32s, &mut self.allocations, f32s, None)?;
        grown(gpu, &mut self.u8s, &mut self.allocations, u8s, None)?;
        Ok(())
    }

    /// Copies `f32s` and `u8s` (in this order, each after the work queued on the stream) into the
    /// pinned buffers, growing them when needed, and records `entries`.
    pub(crate) fn fill(
        &mut self,
        gpu: &Gpu,
        f32s: &[CudaView<'_, f32>],
        u8s: &[CudaView<'_, u8>],
        entries: Vec<Entry>,
    ) -> Result<()> {
        self.entries.clear();
        grown(gpu, &mut self.f32s, &mut self.allocations, f32s, None)?.download(gpu, f32s)?;
        grown(gpu, &mut self.u8s, &mut self.allocations, u8s, None)?.download(gpu, u8s)?;
        self.entries = entries;
        Ok(())
    }

    /// [`StateMirror::fill`] queued on `copy` without waiting (growing a buffer first waits for
    /// the copies already queued there).
    ///
    /// # Safety
    /// [`CopyStream::download`]'s contract, for this mirror's buffers and the sources.
    pub(crate) unsafe fn fill_on(
        &mut self,
        gpu: &Gpu,
        copy: &mut CopyStream,
        f32s: &[CudaView<'_, f32>],
        u8s: &[CudaView<'_, u8>],
        entries: Vec<Entry>,
    ) -> Result<()> {
        self.entries.clear();
        // SAFETY: the caller's contract.
        unsafe {
            copy.download(gpu, grown(gpu, &mut self.f32s, &mut self.allocations, f32s, Some(copy))?, f32s)?;
            copy.download(gpu, grown(gpu, &mut self.u8s, &mut self.allocations, u8s, Some(copy))?, u8s)?;
        }
        self.entries = entries;
        Ok(())
    }
}

/// `buf`, replaced by a larger one when it cannot hold `srcs` (after the copies queued on `copy`,
/// which may still write into the old one), counted in `allocations`.
fn grown<'a, T: cudarc::driver::DeviceRepr + Copy + Default>(
    gpu: &Gpu,
    buf: &'a mut Option<PinnedBuf<T>>,
    allocations: &mut usize,
    srcs: &[CudaView<'_, T>],
    copy: Option<&CopyStream>,
) -> Result<&'a mut PinnedBuf<T>> {
    let need: usize = srcs.iter().map(|s| s.len()).sum();
    if buf.as_ref().is_none_or(|b| b.len() < need) {
        if let Some(c) = copy {
            c.synchronize()?;
        }
        *buf = None; // free the old pages first
        *buf = Some(PinnedBuf::new(gpu, need)?);
        *allocations += 1;
    }
    Ok(buf.as_mut().expect("allocated above"))
}

/// Reads consecutive runs of a flat buffer.
pub(crate) struct Cursor<'a, T> {
    data: &'a [T],
    at: usize,
}

impl<'a, T: Copy> Cursor<'a, T> {
    pub fn new(data: &'a [T]) -> Self {
        Self { data, at: 0 }
    }

    pub fn take(&mut self, n: usize) -> Vec<T> {
        let v = self.data[self.at..self.at + n].to_vec();
        self.at += n;
        v
    }
}
