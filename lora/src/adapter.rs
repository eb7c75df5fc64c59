//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`, with PEFT's tensor names.
//!
//! A LoRA pair lives at a *site*: `<prefix>.lora_A.weight` / `<prefix>.lora_B.weight`, where the prefix is
//! `base_model.model.` + the module path in the transformers model (`base_model.model.model.layers.3.self_attn.q_proj`).
//! Expert weights targeted with `target_parameters` are wrapped by nested `ParamWrapper`s in the order the
//! parameters are registered on the module, the first one innermost, so each earlier-registered target gains
//! one `.base_layer` per later one. For gpt-oss with both expert weights targeted:
//! `...mlp.experts.base_layer.lora_{A,B}.weight` is `gate_up_proj` and `...mlp.experts.lora_{A,B}.weight` is
//! `down_proj`; with only one of them targeted there is no `base_layer` segment.
//!
//! Loading checks every tensor name, dtype and shape against the sites the caller expects and reports every
//! mismatch at once. Files are written atomically (temp file, fsync, rename).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::{Error, Result};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// gpt-oss expert weights in the order `GptOssExperts` registers them (this order fixes PEFT's nesting).
pub const GPT_OSS_EXPERT_PARAMS: [&str; 2] = ["gate_up_proj", "down_proj"];

/// `target_modules`: a list of names (exact or dotted-suffix match) or one regex / `"all-linear"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

/// The largest rank accepted from a config file; it keeps shape arithmetic far from overflow (PEFT's
/// ranks are in the tens to hundreds).
pub const MAX_RANK: usize = 1 << 16;

/// The LoRA fields of a PEFT `adapter_config.json`. Fields this crate does not interpret are kept in
/// `other`, so a loaded config is written back unchanged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha", serialize_with = "integer_if_whole")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub target_parameters: Option<Vec<String>>,
    #[serde(default)]
    pub exclude_modules: Option<Value>,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default = "default_init")]
    pub init_lora_weights: Value,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, Value>,
    #[serde(default)]
    pub layers_to_transform: Option<Value>,
    #[serde(default)]
    pub layers_pattern: Option<Value>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}
fn default_init() -> Value {
    Value::Bool(true)
}

/// PEFT's `lora_alpha` is an int; write whole numbers as JSON integers.
fn integer_if_whole<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

impl AdapterConfig {
    /// A causal-LM LoRA config with PEFT's defaults for everything not given.
    pub fn new(r: usize, lora_alpha: f64, target_modules: Vec<String>, target_parameters: Vec<String>) -> Self {
        let mut target_modules = target_modules;
        target_modules.sort();
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            revision: None,
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: Some(TargetModules::List(target_modules)),
            target_parameters: (!target_parameters.is_empty()).then_some(target_parameters),
            exclude_modules: None,
            bias: default_bias(),
            lora_bias: false,
            fan_in_fan_out: false,
            use_rslora: false,
            use_dora: false,
            init_lora_weights: default_init(),
            modules_to_save: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            layers_pattern: None,
            inference_mode: true,
            other: BTreeMap::new(),
        }
    }

    /// The LoRA scale `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA), as f32.
    pub fn scaling(&self) -> f32 {
        let r = self.r as f64;
        (if self.use_rslora { self.lora_alpha / r.sqrt() } else { self.lora_alpha / r }) as f32
    }

    /// Rejects PEFT options whose tensors or math this crate does not implement.
    pub fn check_supported(&self) -> Result<()> {
        let unsupported =
            |what: &str| Err(Error::Config(format!("adapter_config.json: {what} is not supported by oxtune")));
        if self.peft_type != "LORA" {
            return unsupported(&format!("peft_type {:?} (only \"LORA\")", self.peft_type));
        }
        if self.r == 0 || self.r > MAX_RANK {
            return Err(Error::Config(format!("adapter_config.json: r = {} must be between 1 and {MAX_RANK}", self.r)));
        }
        if self.use_dora {
            return unsupported("use_dora = true (DoRA)");
        }
        if self.lora_bias || self.bias != "none" {
            return unsupported("a bias on the adapter (bias must be \"none\" and lora_bias false)");
        }
        if self.fan_in_fan_out {
            return unsupported("fan_in_fan_out = true (Conv1D bases)");
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return unsupported("modules_to_save (full copies of modules)");
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return unsupported("rank_pattern / alpha_pattern (per-module rank or alpha)");
        }
        Ok(())
    }

    fn to_json(&self) -> Result<String> {
        // Through a BTreeMap so keys come out sorted, as PEFT's `json.dumps(sort_keys=True)` writes them.
        let err = |e: serde_json::Error| Error::Config(format!("cannot serialise the adapter config: {e}"));
        let sorted: BTreeMap<String, Value> =
            serde_json::from_value(serde_json::to_value(self).map_err(err)?).map_err(err)?;
        serde_json::to_string_pretty(&sorted).map_err(err)
    }
}

/// Where one LoRA pair lives in PEFT's key space, and the shapes the model needs there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraSite {
    key: String,
    in_features: usize,
    out_features: usize,
    rank: usize,
    experts: usize,
}

impl LoraSite {
    /// A dense layer: `module_path` is the full PEFT module name, e.g.
    /// `base_model.model.model.layers.3.self_attn.q_proj`; A `[rank, in]`, B `[out, rank]`.
    pub fn linear(module_path: impl Into<String>, in_features: usize, out_features: usize, rank: usize) -> Self {
        Self { key: module_path.into(), in_features, out_features, rank, experts: 1 }
    }

    /// Expert weight `param` of the experts module at `module_path` (e.g.
    /// `base_model.model.model.layers.3.mlp.experts`), when the module's targeted parameters are `targeted`, in
    /// registration order ([`GPT_OSS_EXPERT_PARAMS`] for gpt-oss). A `[rank·E, in]`, B `[out, rank·E]`.
    pub fn expert_param(
        module_path: &str,
        param: &str,
        targeted: &[&str],
        experts: usize,
        in_features: usize,
        out_features: usize,
        rank: usize,
    ) -> Result<Self> {
        let Some(pos) = targeted.iter().position(|t| *t == param) else {
            return Err(Error::Config(format!(
                "{param} is not among the targeted parameters {targeted:?} of {module_path}"
            )));
        };
        let mut key = module_path.to_string();
        for _ in pos + 1..targeted.len() {
            key.push_str(".base_layer");
        }
        Ok(Self { key, in_features, out_features, rank, experts })
    }

    /// The key prefix (module name, with any `.base_layer` nesting).
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn a_key(&self) -> String {
        format!("{}.lora_A.weight", self.key)
    }

    pub fn b_key(&self) -> String {
        format!("{}.lora_B.weight", self.key)
    }

    /// `[rank·experts, in]`.
    pub fn a_shape(&self) -> [usize; 2] {
        [self.rank * self.experts, self.in_features]
    }

    /// `[out, rank·experts]`.
    pub fn b_shape(&self) -> [usize; 2] {
        [self.out_features, self.rank * self.experts]
    }

    /// Per-expert rank (the rank for a dense layer).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// 1 for a dense layer.
    pub fn experts(&self) -> usize {
        self.experts
    }
}

/// The dimensions of a gpt-oss model that fix its LoRA shapes (transformers `GptOssConfig` fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptOssDims {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub num_local_experts: usize,
}

impl GptOssDims {
    /// Sites of a gpt-oss adapter on `layers`: the attention projections named in `attention` (any of
    /// `q_proj`, `k_proj`, `v_proj`, `o_proj`) and the expert weights named in `experts` (any of
    /// [`GPT_OSS_EXPERT_PARAMS`]), all of rank `rank` (per expert for the experts), under
    /// `base_model.model.model.layers.{L}`.
    pub fn sites(
        &self,
        layers: impl IntoIterator<Item = usize>,
        rank: usize,
        attention: &[&str],
        experts: &[&str],
    ) -> Result<Vec<LoraSite>> {
        let (h, q, kv) =
            (self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim);
        let targeted: Vec<&str> = GPT_OSS_EXPERT_PARAMS.iter().copied().filter(|p| experts.contains(p)).collect();
        if let Some(bad) = experts.iter().find(|p| !GPT_OSS_EXPERT_PARAMS.contains(p)) {
            return Err(Error::Config(format!(
                "{bad} is not a gpt-oss expert weight (expected one of {GPT_OSS_EXPERT_PARAMS:?})"
            )));
        }
        let mut sites = Vec::new();
        for layer in layers {
            let prefix = format!("base_model.model.model.layers.{layer}");
            for &proj in attention {
                let (d_in, d_out) = match proj {
                    "q_proj" => (h, q),
                    "k_proj" | "v_proj" => (h, kv),
                    "o_proj" => (q, h),
                    other => return Err(Error::Config(format!("{other} is not a gpt-oss attention projection"))),
                };
                sites.push(LoraSite::linear(format!("{prefix}.self_attn.{proj}"), d_in, d_out, rank));
            }
            for &param in &targeted {
                let (d_in, d_out) =
                    if param == "gate_up_proj" { (h, 2 * self.intermediate_size) } else { (self.intermediate_size, h) };
                let module = format!("{prefix}.mlp.experts");
                sites.push(LoraSite::expert_param(
                    &module,
                    param,
                    &targeted,
                    self.num_local_experts,
                    d_in,
                    d_out,
                    rank,
                )?);
            }
        }
        Ok(sites)
    }
}

/// The weights of one site, to save.
#[derive(Clone, Copy, Debug)]
pub struct AdapterTensor<'a> {
    pub site: &'a LoraSite,
    pub a: &'a [f32],
    pub b: &'a [f32],
}

/// The weights of one site, loaded (f32, whatever dtype the file had).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// A loaded adapter: its config and one pair per expected site, in the caller's order.
#[derive(Clone, Debug)]
pub struct LoadedAdapter {
    pub config: AdapterConfig,
    pub pairs: Vec<LoraPair>,
}

fn f32_le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `config` and the tensors to `dir` (created if missing) as a PEFT adapter, in f32.
pub fn save_adapter(dir: &Path, config: &AdapterConfig, tensors: &[AdapterTensor<'_>]) -> Result<()> {
    config.check_supported()?;
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    let mut owned: Vec<(String, [usize; 2], Vec<u8>)> = Vec::new();
    for t in tensors {
        if t.site.rank != config.r {
            problems.push(format!(
                "{}: rank {} differs from the config's r = {} (per-module ranks need rank_pattern, which oxtune does not write)",
                t.site.key, t.site.rank, config.r
            ));
        }
        for (key, shape, data) in [(t.site.a_key(), t.site.a_shape(), t.a), (t.site.b_key(), t.site.b_shape(), t.b)] {
            if data.len() != shape[0] * shape[1] {
                problems.push(format!(
                    "{key}: {} values given, its shape {shape:?} needs {}",
                    data.len(),
                    shape[0] * shape[1]
                ));
            }
            if !seen.insert(key.clone()) {
                problems.push(format!("{key}: given twice"));
            }
            owned.push((key, shape, f32_le_bytes(data)));
        }
    }
    if !problems.is_empty() {
        return Err(Error::AdapterMismatch { path: dir.to_path_buf(), problems: problems.join("\n  ") });
    }
    fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let views = owned
        .iter()
        .map(|(k, shape, data)| TensorView::new(Dtype::F32, shape.to_vec(), data).map(|v| (k.as_str(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|source| Error::SafeTensors { path: weights_path.clone(), source })?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|source| Error::SafeTensors { path: weights_path.clone(), source })?;
    write_atomic(&weights_path, &bytes)?;
    write_atomic(&dir.join(CONFIG_FILE), config.to_json()?.as_bytes())
}

/// Reads `dir/adapter_config.json`.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path, source })
}

fn decode(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let d = view.data();
    Some(match view.dtype() {
        Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => d.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => d.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

/// Loads the adapter in `dir`, checking it holds exactly the `expected` sites with their shapes.
pub fn load_adapter(dir: &Path, expected: &[LoraSite]) -> Result<LoadedAdapter> {
    let config = read_adapter_config(dir)?;
    config.check_supported()?;
    let path = dir.join(WEIGHTS_FILE);
    let bytes = fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|source| Error::SafeTensors { path: path.clone(), source })?;

    let mut problems = Vec::new();
    let mut wanted: BTreeMap<String, [usize; 2]> = BTreeMap::new();
    for site in expected {
        if wanted.contains_key(&site.a_key()) {
            problems.push(format!("{}: the caller lists this site twice", site.key));
        }
        if site.rank != config.r {
            problems.push(format!(
                "{}: the model expects rank {} but adapter_config.json has r = {}",
                site.key, site.rank, config.r
            ));
        }
        wanted.insert(site.a_key(), site.a_shape());
        wanted.insert(site.b_key(), site.b_shape());
    }
    let mut decoded: HashMap<String, Vec<f32>> = HashMap::new();
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    for name in names {
        let view = st.tensor(name).map_err(|source| Error::SafeTensors { path: path.clone(), source })?;
        let Some(shape) = wanted.get(name) else {
            problems.push(unexpected_hint(name, &wanted));
            continue;
        };
        if view.shape() != shape {
            let mut msg = format!("{name}: shape {:?} in the file, the model expects {shape:?}", view.shape());
            if view.shape() == [shape[1], shape[0]] {
                msg.push_str(" (transposed: was it written for a model with the other in/out order of this weight?)");
            }
            problems.push(msg);
            continue;
        }
        match decode(&view) {
            Some(v) => {
                decoded.insert(name.to_string(), v);
            }
            None => problems.push(format!("{name}: dtype {:?}, expected F32, BF16 or F16", view.dtype())),
        }
    }
    for (key, shape) in &wanted {
        if !decoded.contains_key(key) && !problems.iter().any(|p| p.starts_with(&format!("{key}:"))) {
            problems.push(format!("{key}: missing from {WEIGHTS_FILE} (the model expects {shape:?})"));
        }
    }
    for site in expected {
        let file_shape = |k: String| st.tensor(&k).ok().map(|v| v.shape().to_vec());
        let (a, b) = (file_shape(site.a_key()), file_shape(site.b_key()));
        let [total, d_in] = site.a_shape();
        let d_out = site.b_shape()[0];
        if d_in != d_out && a.as_deref() == Some(&[total, d_out][..]) && b.as_deref() == Some(&[d_in, total][..]) {
            problems.push(format!(
                "{}: in and out are swapped relative to the model (A is [r*E, {d_out}], B is [{d_in}, r*E]); an \
                 adapter made by PEFT on a model whose expert weights are not marked is_transposed (transformers 4.x \
                 gpt-oss) has this layout",
                site.key
            ));
        }
    }
    if !problems.is_empty() {
        return Err(Error::AdapterMismatch { path: dir.to_path_buf(), problems: problems.join("\n  ") });
    }
    let pairs = expected
        .iter()
        .map(|s| LoraPair {
            a: decoded.remove(&s.a_key()).unwrap_or_default(),
            b: decoded.remove(&s.b_key()).unwrap_or_default(),
        })
        .collect();
    Ok(LoadedAdapter { config, pairs })
}

/// Explains a tensor the model has no site for, pointing at the likely cause.
fn unexpected_hint(name: &str, wanted: &BTreeMap<String, [usize; 2]>) -> String {
    let mut msg = format!("{name}: not a LoRA tensor of the model");
    let without = name.replace(".base_layer", "");
    let nested_elsewhere = wanted.keys().any(|k| k.replace(".base_layer", "") == without);
    if nested_elsewhere {
        msg.push_str(" (the model nests this expert weight differently: were the same target_parameters targeted?)");
    } else if name.contains("lora_magnitude_vector") {
        msg.push_str(" (DoRA, not supported)");
    } else if name.ends_with(".bias") {
        msg.push_str(" (a LoRA bias, not supported)");
    } else {
        msg.push_str(" (was the adapter trained with other target_modules or on another model?)");
    }
    msg
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one, never a torn file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp: PathBuf = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(source) = written {
        // Best effort: the temp file is garbage whether or not it can be removed.
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io { path: path.to_path_buf(), source });
    }
    // The rename is durable only once the directory entry is flushed too.
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|source| Error::Io { path: dir.to_path_buf(), source })
}
