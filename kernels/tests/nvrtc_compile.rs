//! Every kernel source compiles with NVRTC for Hopper (sm_90a), with no GPU needed. CI installs
//! libnvrtc and the CUDA headers from PyPI and runs this with `--ignored` (see .ci/run).

#[test]
#[ignore = "needs libnvrtc and the CUDA headers (.ci/run installs them from PyPI wheels and runs this)"]
fn every_kernel_compiles_for_sm_90a() {
    let (major, minor) = oxtune_kernels::nvrtc::version().expect("libnvrtc");
    assert!(
        !oxtune_kernels::nvrtc::include_dirs().is_empty(),
        "no CUDA include directory found (set OXTUNE_CUDA_INCLUDE)"
    );
    for (name, src) in oxtune_kernels::ops::SOURCES {
        let cubin = oxtune_kernels::nvrtc::compile_cubin(name, src, "sm_90a").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{name}: NVRTC {major}.{minor} did not produce an ELF CUBIN");
        println!("{name}: {} bytes of sm_90a CUBIN (NVRTC {major}.{minor})", cubin.len());
    }
}

#[test]
#[ignore = "needs libnvrtc and the CUDA headers (.ci/run installs them from PyPI wheels and runs this)"]
fn every_kernel_compiles_for_sm_80() {
    // The A100's target: no wgmma (its kernels compile to nothing there), the mma.sync paths.
    for (name, src) in oxtune_kernels::ops::SOURCES {
        let cubin = oxtune_kernels::nvrtc::compile_cubin(name, src, "sm_80").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{name}: no ELF CUBIN for sm_80");
    }
}

#[test]
fn a_broken_kernel_is_a_clear_error() {
    if !oxtune_kernels::nvrtc::available() {
        // Without libnvrtc the error must say so, naming what was searched.
        let e = oxtune_kernels::nvrtc::compile_cubin("broken", "x", "sm_90a").unwrap_err().to_string();
        assert!(e.contains("libnvrtc") && e.contains("LD_LIBRARY_PATH"), "{e}");
        return;
    }
    let e = oxtune_kernels::nvrtc::compile_cubin(
        "broken",
        "extern \"C\" __global__ void k() { undefined_fn(); }",
        "sm_90a",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("broken") && e.contains("undefined_fn"), "{e}");
}

#[test]
fn no_driver_is_a_clear_error_not_a_panic() {
    if oxtune_kernels::device::driver_available() {
        return; // a GPU machine: the GPU tests cover this path
    }
    let e = oxtune_kernels::Gpu::new(0).err().expect("no driver here").to_string();
    assert!(e.contains("libcuda") && e.contains("libcuda.so.1"), "{e}");
}
