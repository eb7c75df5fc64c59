//! NVRTC compilation of kernel sources to CUBIN for one architecture, cached on disk by a hash of
//! the source, the options and the NVRTC version.

use std::ffi::CString;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use cudarc::nvrtc::{result, sys};

use crate::{Error, Result};

/// Whether libnvrtc can be loaded.
pub fn available() -> bool {
    // SAFETY: only dlopen's the library; no NVRTC call is made.
    unsafe { sys::is_culib_present() }
}

fn require() -> Result<()> {
    if available() {
        Ok(())
    } else {
        Err(Error::NoLibrary { lib: "libnvrtc", searched: cudarc::get_lib_name_candidates("nvrtc") })
    }
}

/// `(major, minor)` of the loaded NVRTC.
pub fn version() -> Result<(i32, i32)> {
    require()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is loaded (checked above) and both pointers are valid for writes.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Driver(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// Directories searched for `cuda_bf16.h` and friends: `OXTUNE_CUDA_INCLUDE`, `$CUDA_HOME/include`,
/// `/usr/local/cuda/include`, those that exist.
pub fn include_dirs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = vec![];
    if let Ok(p) = std::env::var("OXTUNE_CUDA_INCLUDE") {
        v.push(p.into());
    }
    if let Ok(p) = std::env::var("CUDA_HOME") {
        v.push(PathBuf::from(p).join("include"));
    }
    v.push("/usr/local/cuda/include".into());
    v.into_iter().filter(|p| p.join("cuda_runtime_api.h").exists() || p.join("cuda_bf16.h").exists()).collect()
}

fn options(arch: &str) -> Vec<String> {
    let mut o = vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string()];
    o.extend(include_dirs().iter().map(|d| format!("--include-path={}", d.display())));
    o
}

/// Compiles `src` to a CUBIN for `arch` (e.g. `sm_90a`).
pub fn compile_cubin(name: &str, src: &str, arch: &str) -> Result<Vec<u8>> {
    require()?;
    let opts = options(arch);
    let err = |log: String| Error::Compile { name: name.into(), options: opts.clone(), log };
    let csrc = CString::new(src).map_err(|_| err("the source contains a NUL byte".into()))?;
    let prog = result::create_program(&csrc, None).map_err(|e| err(format!("{e:?}")))?;
    // SAFETY: prog is a live program created above; it is destroyed on every path below.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let out = match compiled {
        Err(_) => {
            // SAFETY: prog is live.
            let log = unsafe { result::get_program_log(prog) }
                .map(|l| String::from_utf8_lossy(&l.iter().map(|&c| c as u8).collect::<Vec<_>>()).into_owned())
                .unwrap_or_default();
            Err(err(log))
        }
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: prog compiled successfully; size receives the CUBIN's length.
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result().map_err(|e| err(format!("{e:?}")))?;
            let mut cubin = vec![0u8; size];
            // SAFETY: cubin has exactly the size NVRTC reported.
            unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _) }
                .result()
                .map_err(|e| err(format!("{e:?}")))?;
            Ok(cubin)
        }
    };
    // SAFETY: prog is live and not used afterwards.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// The on-disk cache directory: `OXTUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/oxtune`, else
/// `~/.cache/oxtune`; CUBINs go in its `cubin/` folder.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var("OXTUNE_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|_| {
        std::env::var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache"))
            .join("oxtune")
    });
    base.join("cubin")
}

/// [`compile_cubin`] through the cache. A cache that cannot be read or written only costs a
/// recompilation.
pub fn cached_cubin(name: &str, src: &str, arch: &str) -> Result<Vec<u8>> {
    let (major, minor) = version()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (src, options(arch), major, minor).hash(&mut h);
    let path = cache_dir().join(format!("{name}-{arch}-{:016x}.cubin", h.finish()));
    if let Ok(bytes) = std::fs::read(&path) {
        return Ok(bytes);
    }
    let cubin = compile_cubin(name, src, arch)?;
    if std::fs::create_dir_all(cache_dir()).is_ok() {
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        if std::fs::write(&tmp, &cubin).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(cubin)
}
