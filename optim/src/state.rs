//! Optimizer state files: one safetensors file holding every parameter's moments and step count, with the
//! optimizer kind and hyperparameters in the header metadata. Written atomically (temp file, fsync, rename).
//!
//! Keys are `<param>.step` (I64 `[1]`) plus either `<param>.exp_avg` / `<param>.exp_avg_sq` (F32) or
//! `<param>.state1` / `<param>.state2` (U8, one byte per element) and `<param>.absmax1` / `<param>.absmax2`
//! (F32, one per 256-block).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::adamw::{AdamState, AdamWConfig};
use crate::adamw8bit::BlockwiseState;
use crate::quant8::BLOCK;
use crate::{Error, Result};

const FORMAT: &str = "oxtune-optimizer-state";
const VERSION: &str = "1";

pub(crate) enum StateTensor {
    Adam(AdamState),
    Blockwise(BlockwiseState),
}

pub(crate) fn check_state_len(name: &str, state: usize, param: usize) -> Result<()> {
    if state != param {
        return Err(Error::StateLength { name: name.to_string(), state, param });
    }
    Ok(())
}

/// Hyperparameters as exact strings (`{:?}` of an f64 round-trips).
pub(crate) fn config_metadata(c: &AdamWConfig) -> BTreeMap<String, String> {
    [("beta1", c.beta1), ("beta2", c.beta2), ("eps", c.eps), ("weight_decay", c.weight_decay)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), format!("{v:?}")))
        .collect()
}

/// Collects the tensors of a state file before it is written.
pub(crate) struct StateWriter {
    kind: &'static str,
    meta: BTreeMap<String, String>,
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl StateWriter {
    pub fn new(kind: &'static str, meta: BTreeMap<String, String>) -> Self {
        Self { kind, meta, tensors: Vec::new() }
    }

    fn push_step(&mut self, name: &str, step: u64) {
        self.tensors.push((format!("{name}.step"), Dtype::I64, vec![1], (step as i64).to_le_bytes().to_vec()));
    }

    pub fn push_adam(&mut self, name: &str, st: &AdamState) {
        self.push_step(name, st.step);
        for (suffix, v) in [("exp_avg", &st.exp_avg), ("exp_avg_sq", &st.exp_avg_sq)] {
            self.tensors.push((format!("{name}.{suffix}"), Dtype::F32, vec![v.len()], f32_bytes(v)));
        }
    }

    pub fn push_blockwise(&mut self, name: &str, st: &BlockwiseState) {
        self.push_step(name, st.step);
        for (suffix, v) in [("state1", &st.state1), ("state2", &st.state2)] {
            self.tensors.push((format!("{name}.{suffix}"), Dtype::U8, vec![v.len()], v.clone()));
        }
        for (suffix, v) in [("absmax1", &st.absmax1), ("absmax2", &st.absmax2)] {
            self.tensors.push((format!("{name}.{suffix}"), Dtype::F32, vec![v.len()], f32_bytes(v)));
        }
    }

    pub fn write(self, path: &Path) -> Result<()> {
        let mut meta: HashMap<String, String> = self.meta.into_iter().collect();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("version".into(), VERSION.into());
        meta.insert("optimizer".into(), self.kind.into());
        let views = self
            .tensors
            .iter()
            .map(|(k, dt, shape, data)| TensorView::new(*dt, shape.clone(), data).map(|v| (k.as_str(), v)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|source| Error::SafeTensors { path: path.to_path_buf(), source })?;
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|source| Error::SafeTensors { path: path.to_path_buf(), source })?;
        write_atomic(path, &bytes)
    }
}

/// Reads the per-parameter states of a file saved by optimizer `kind` with hyperparameters `expected`.
pub(crate) fn read_state(
    path: &Path,
    kind: &str,
    expected: &BTreeMap<String, String>,
) -> Result<Vec<(String, StateTensor)>> {
    let bytes = fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|source| Error::SafeTensors { path: path.to_path_buf(), source })?;
    let bad = |detail: String| Error::StateFile { path: path.to_path_buf(), detail };
    let (_, header) =
        SafeTensors::read_metadata(&bytes).map_err(|source| Error::SafeTensors { path: path.to_path_buf(), source })?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad("not an oxtune optimizer state file (header metadata has no matching \"format\")".into()));
    }
    if meta.get("version").map(String::as_str) != Some(VERSION) {
        return Err(bad(format!("unsupported state file version {:?}, expected {VERSION}", meta.get("version"))));
    }
    let saved_kind = meta.get("optimizer").cloned().unwrap_or_default();
    if saved_kind != kind {
        return Err(bad(format!(
            "saved by optimizer {saved_kind:?} but loaded into {kind:?}; resume with the optimizer that wrote it"
        )));
    }
    for (k, want) in expected {
        let got = meta.get(k).map(String::as_str).unwrap_or("<missing>");
        if got != want {
            return Err(bad(format!(
                "saved with {k} = {got} but the optimizer has {k} = {want}; resume with the same hyperparameters"
            )));
        }
    }

    let mut groups: BTreeMap<String, BTreeMap<&'static str, TensorView<'_>>> = BTreeMap::new();
    const SUFFIXES: [&str; 7] = ["step", "exp_avg", "exp_avg_sq", "state1", "state2", "absmax1", "absmax2"];
    for (key, view) in st.tensors() {
        let suffix = key.rsplit_once('.').and_then(|(_, s)| SUFFIXES.iter().find(|&&x| x == s).copied());
        let Some(suffix) = suffix else {
            return Err(bad(format!("unexpected tensor {key:?}")));
        };
        let name = &key[..key.len() - suffix.len() - 1];
        groups.entry(name.to_string()).or_default().insert(suffix, view);
    }

    let mut params = Vec::new();
    for (name, mut g) in groups {
        let is_fp32 = g.contains_key("exp_avg");
        let mut take = |suffix: &str, dtype: Dtype| -> Result<Vec<u8>> {
            let v = g.remove(suffix).ok_or_else(|| bad(format!("parameter {name} has no {name}.{suffix}")))?;
            if v.dtype() != dtype || v.shape().len() != 1 {
                return Err(bad(format!(
                    "{name}.{suffix} is {:?} {:?}, expected a 1-D {dtype:?} tensor",
                    v.dtype(),
                    v.shape()
                )));
            }
            Ok(v.data().to_vec())
        };
        let step_bytes = take("step", Dtype::I64)?;
        let step = match <[u8; 8]>::try_from(step_bytes.as_slice()) {
            Ok(b) if i64::from_le_bytes(b) >= 0 => i64::from_le_bytes(b) as u64,
            _ => return Err(bad(format!("{name}.step must hold one non-negative integer"))),
        };
        let to_f32 = |b: Vec<u8>| -> Vec<f32> {
            b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        };
        let entry = if is_fp32 {
            let exp_avg = to_f32(take("exp_avg", Dtype::F32)?);
            let exp_avg_sq = to_f32(take("exp_avg_sq", Dtype::F32)?);
            if exp_avg.len() != exp_avg_sq.len() {
                return Err(bad(format!("{name}: exp_avg and exp_avg_sq differ in length")));
            }
            StateTensor::Adam(AdamState { step, exp_avg, exp_avg_sq })
        } else {
            let state1 = take("state1", Dtype::U8)?;
            let state2 = take("state2", Dtype::U8)?;
            let absmax1 = to_f32(take("absmax1", Dtype::F32)?);
            let absmax2 = to_f32(take("absmax2", Dtype::F32)?);
            let blocks = state1.len().div_ceil(BLOCK);
            if state2.len() != state1.len() || absmax1.len() != blocks || absmax2.len() != blocks {
                return Err(bad(format!(
                    "{name}: 8-bit state of {} elements needs state2 of the same length and {blocks} absmax values each",
                    state1.len()
                )));
            }
            StateTensor::Blockwise(BlockwiseState { step, state1, state2, absmax1, absmax2 })
        };
        if let Some(extra) = g.keys().next() {
            return Err(bad(format!("{name}.{extra} does not belong with the other state tensors of {name}")));
        }
        params.push((name, entry));
    }
    Ok(params)
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one, never a torn file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path.file_name().ok_or_else(|| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path has no file name"),
    })?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(source) = written {
        // Best effort: the temp file is garbage whether or not it can be removed.
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io { path: path.to_path_buf(), source });
    }
    // The rename is durable only once the directory entry is flushed too.
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    Ok(())
}
