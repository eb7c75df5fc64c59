//! Every kernel source of this crate compiles with NVRTC for Hopper (sm_90a), with no GPU needed.
//! CI installs libnvrtc and the CUDA headers from PyPI and runs this with `--include-ignored`.
#![cfg(feature = "cuda")]

#[test]
#[ignore = "needs libnvrtc and the CUDA headers (.ci/run installs them from PyPI wheels and runs this)"]
fn every_kernel_compiles_for_sm_90a() {
    let (major, minor) = oxtune_kernels::nvrtc::version().expect("libnvrtc");
    for (name, src) in oxtune_moe::SOURCES {
        let cubin = oxtune_kernels::nvrtc::compile_cubin(name, src, "sm_90a").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{name}: NVRTC {major}.{minor} did not produce an ELF CUBIN");
        println!("{name}: {} bytes of sm_90a CUBIN (NVRTC {major}.{minor})", cubin.len());
    }
}

#[test]
#[ignore = "needs libnvrtc and the CUDA headers (.ci/run installs them from PyPI wheels and runs this)"]
fn every_kernel_compiles_for_sm_80() {
    // The A100's target (the other GPUs the engine runs on besides Hopper).
    for (name, src) in oxtune_moe::SOURCES {
        let cubin = oxtune_kernels::nvrtc::compile_cubin(name, src, "sm_80").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{name}: no ELF CUBIN for sm_80");
    }
}

#[test]
fn module_names_are_prefixed_and_unique() {
    let mut names: Vec<&str> = oxtune_moe::SOURCES.iter().map(|(n, _)| *n).collect();
    assert!(names.iter().all(|n| n.starts_with("moe_")), "{names:?}");
    names.sort();
    names.dedup();
    assert_eq!(names.len(), oxtune_moe::SOURCES.len());
}
