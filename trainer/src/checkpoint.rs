//! Hugging Face safetensors checkpoints: a single `model.safetensors` or shards resolved through
//! `model.safetensors.index.json`. Files are memory-mapped; tensors are read on demand, so MXFP4
//! experts stay packed and are never dequantized whole.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{io_err, Error, Result};

/// A byte range of a memory-mapped file, usable as MXFP4 storage without copying.
#[derive(Clone, Debug)]
pub struct MmapSlice {
    map: Arc<Mmap>,
    range: Range<usize>,
}

impl AsRef<[u8]> for MmapSlice {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    range: Range<usize>,
}

/// An opened checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    tensors: BTreeMap<String, TensorInfo>,
}

fn map_file(path: &Path) -> Result<Arc<Mmap>> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: the map is read-only; like every tool that maps model files (safetensors, candle,
    // transformers), we rely on nobody truncating the file while we run.
    let map = unsafe { Mmap::map(&f) }.map_err(io_err(path))?;
    Ok(Arc::new(map))
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` (sharded) or `dir/model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut ckpt = Self { dir: dir.to_path_buf(), files: vec![], tensors: BTreeMap::new() };
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| Error::Json { path: index.clone(), source })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Checkpoint {
                file: index.clone(),
                msg: "missing `weight_map` object (expected {\"weight_map\": {tensor: file}})".into(),
            })?;
            let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| Error::Checkpoint {
                    file: index.clone(),
                    msg: format!("weight_map[{name:?}] is not a file name"),
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with("..") {
                    return Err(Error::Checkpoint {
                        file: index.clone(),
                        msg: format!("weight_map[{name:?}] = {file:?} must be a file name inside the model directory"),
                    });
                }
                wanted.entry(file.to_string()).or_default().push(name.clone());
            }
            for (file, names) in &wanted {
                let path = dir.join(file);
                if !path.exists() {
                    return Err(Error::Checkpoint {
                        file: path,
                        msg: format!(
                            "shard is missing; the index lists it for {} tensors (e.g. `{}`)",
                            names.len(),
                            names[0]
                        ),
                    });
                }
                let idx = ckpt.add_file(&path)?;
                for name in names {
                    match ckpt.tensors.get(name) {
                        Some(t) if t.file == idx => {}
                        _ => {
                            return Err(Error::Tensor {
                                name: name.clone(),
                                file: path.clone(),
                                msg: "listed in model.safetensors.index.json but not found in this shard".into(),
                            })
                        }
                    }
                }
            }
        } else if single.exists() {
            ckpt.add_file(&single)?;
        } else {
            return Err(Error::Checkpoint {
                file: dir.to_path_buf(),
                msg: "no model.safetensors or model.safetensors.index.json in this directory".into(),
            });
        }
        Ok(ckpt)
    }

    fn add_file(&mut self, path: &Path) -> Result<usize> {
        let map = map_file(path)?;
        let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| Error::Checkpoint {
            file: path.to_path_buf(),
            msg: format!("not a valid safetensors file: {e}"),
        })?;
        let idx = self.files.len();
        let base = 8 + n;
        for (name, info) in meta.tensors() {
            if let Some(prev) = self.tensors.get(&name) {
                return Err(Error::Tensor {
                    name,
                    file: path.to_path_buf(),
                    msg: format!("also present in {}", self.files[prev.file].0.display()),
                });
            }
            let range = base + info.data_offsets.0..base + info.data_offsets.1;
            self.tensors.insert(name, TensorInfo { file: idx, dtype: info.dtype, shape: info.shape.clone(), range });
        }
        self.files.push((path.to_path_buf(), map));
        Ok(idx)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn file_of(&self, info: &TensorInfo) -> &Path {
        &self.files[info.file].0
    }

    /// Total bytes of tensor data per dtype.
    pub fn bytes_by_dtype(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for t in self.tensors.values() {
            *m.entry(format!("{:?}", t.dtype)).or_insert(0) += t.range.len();
        }
        m
    }

    fn tensor_err(&self, name: &str, msg: String) -> Error {
        let file = self.tensors.get(name).map(|t| self.files[t.file].0.clone()).unwrap_or_else(|| self.dir.clone());
        Error::Tensor { name: name.into(), file, msg }
    }

    /// The tensor's info after checking it exists with one of `dtypes` and exactly `shape`.
    pub fn expect(&self, name: &str, dtypes: &[Dtype], shape: &[usize]) -> Result<&TensorInfo> {
        let t = self.tensors.get(name).ok_or_else(|| {
            self.tensor_err(name, format!("missing: expected a {dtypes:?} tensor of shape {shape:?}"))
        })?;
        if !dtypes.contains(&t.dtype) {
            return Err(self.tensor_err(name, format!("dtype is {:?}, expected one of {dtypes:?}", t.dtype)));
        }
        if t.shape != shape {
            return Err(self.tensor_err(name, format!("shape is {:?}, expected {shape:?}", t.shape)));
        }
        Ok(t)
    }

    /// The raw bytes of a tensor.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.files[info.file].1[info.range.clone()]
    }

    /// A zero-copy handle on a tensor's bytes.
    pub fn slice(&self, info: &TensorInfo) -> MmapSlice {
        MmapSlice { map: self.files[info.file].1.clone(), range: info.range.clone() }
    }

    /// Reads a floating-point tensor (BF16, F16 or F32) of exactly `shape` as f32, rejecting
    /// non-finite values.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.expect(name, &[Dtype::BF16, Dtype::F16, Dtype::F32], shape)?;
        let v = decode_floats(t.dtype, self.bytes(t));
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(self.tensor_err(name, format!("element {i} is {} (weights must be finite)", v[i])));
        }
        Ok(v)
    }
}

/// Little-endian BF16, F16 or F32 bytes as f32 (any other dtype is read as F32; callers check it).
pub fn decode_floats(dtype: Dtype, b: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
    }
}
