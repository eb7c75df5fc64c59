//! LoRA on the gpt-oss model, assembled from the `lora` crate: [`LoraLinear`] on q/k/v/o_proj and
//! [`LoraExperts`] (PEFT `target_parameters`) on the experts' `gate_up_proj` and `down_proj`, with
//! PEFT's key names and adapter files.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use oxtune_lora::{
    load_adapter, save_adapter, AdapterConfig, AdapterTensor, GptOssDims, LoraConfig, LoraExperts, LoraGrads,
    LoraLinear, LoraSite, GPT_OSS_EXPERT_PARAMS,
};
use oxtune_moe::Proj;
use rand::SeedableRng;

use crate::adapter::{Adapter, Dense};
use crate::config::GptOssConfig;
use crate::error::{Error, Result};

/// Which weights get LoRA, and its rank and scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f32,
    /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
    pub attention: bool,
    pub experts: bool,
}

impl Default for LoraSpec {
    /// gpt-oss recipes: r 8, alpha 16, attention and experts.
    fn default() -> Self {
        Self { r: 8, alpha: 16.0, rslora: false, attention: true, experts: true }
    }
}

impl LoraSpec {
    fn lora_config(&self) -> LoraConfig {
        LoraConfig { r: self.r, alpha: self.alpha as f64, use_rslora: self.rslora, dropout: 0.0 }
    }

    fn attention_modules(&self) -> Vec<&'static str> {
        if self.attention {
            Dense::ALL.iter().map(|d| d.name()).collect()
        } else {
            vec![]
        }
    }

    fn expert_params(&self) -> Vec<&'static str> {
        if self.experts {
            GPT_OSS_EXPERT_PARAMS.to_vec()
        } else {
            vec![]
        }
    }

    /// The PEFT `adapter_config.json` for this spec.
    pub fn adapter_config(&self, base_model: Option<&str>) -> AdapterConfig {
        let modules = self.attention_modules().iter().map(|s| s.to_string()).collect();
        let params = self.expert_params().iter().map(|p| format!("mlp.experts.{p}")).collect();
        let mut c = AdapterConfig::new(self.r, self.alpha as f64, modules, params);
        c.use_rslora = self.rslora;
        c.base_model_name_or_path = base_model.map(String::from);
        c
    }

    /// The spec an adapter config describes (only what oxtune trains: all of q/k/v/o or none, both
    /// expert weights or none).
    pub fn from_adapter_config(c: &AdapterConfig) -> Result<Self> {
        let modules: Vec<String> = match &c.target_modules {
            Some(oxtune_lora::TargetModules::List(l)) => l.clone(),
            Some(oxtune_lora::TargetModules::Pattern(p)) => {
                return Err(Error::Input(format!(
                    "adapter target_modules is the pattern {p:?}; oxtune reads adapters that list q_proj, k_proj, v_proj, o_proj"
                )))
            }
            None => vec![],
        };
        let attention = Dense::ALL.iter().all(|d| modules.iter().any(|m| m == d.name()));
        if !attention && !modules.is_empty() {
            return Err(Error::Input(format!(
                "adapter target_modules {modules:?}: oxtune trains all of q_proj, k_proj, v_proj, o_proj or none of them"
            )));
        }
        let params = c.target_parameters.clone().unwrap_or_default();
        let experts = !params.is_empty();
        if experts && GPT_OSS_EXPERT_PARAMS.iter().any(|p| !params.iter().any(|x| x.ends_with(p))) {
            return Err(Error::Input(format!(
                "adapter target_parameters {params:?}: expected both mlp.experts.gate_up_proj and mlp.experts.down_proj"
            )));
        }
        Ok(Self { r: c.r, alpha: c.lora_alpha as f32, rslora: c.use_rslora, attention, experts })
    }
}

/// What a LoRA pair adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Dense(Dense),
    Experts(Proj),
}

/// One LoRA pair's place and shapes: A `[rank·experts, n_in]`, B `[n_out, rank·experts]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SiteLayout {
    pub layer: usize,
    pub target: Target,
    pub n_in: usize,
    pub n_out: usize,
    pub rank: usize,
    /// 1 for dense projections.
    pub experts: usize,
    pub scaling: f32,
}

enum Weights {
    Dense(LoraLinear),
    Experts(LoraExperts),
}

/// One LoRA pair, its PEFT site and its accumulated gradients.
struct Entry {
    site: LoraSite,
    weights: Weights,
    grads: Mutex<LoraGrads>,
}

/// The adapter of a whole model.
pub struct LoraAdapter {
    pub spec: LoraSpec,
    entries: Vec<Entry>,
    dense: HashMap<(usize, Dense), usize>,
    experts: HashMap<(usize, Proj), usize>,
}

/// The file next to `adapter_config.json` in adapter directories oxtune writes: the fingerprint of
/// the base model it was trained on. PEFT ignores it.
pub const BASE_FILE: &str = "oxtune_base.json";

/// The fingerprint of a base model: a model directory's ([`crate::merge::base_fingerprint`]) or the
/// embedded tiny model's.
pub fn model_fingerprint(model: Option<&Path>) -> Result<String> {
    match model {
        Some(dir) => crate::merge::base_fingerprint(dir),
        None => Ok(format!("embedded-tiny-gpt-oss:seed-{}", crate::tiny::DEFAULT_SEED)),
    }
}

/// Checks that the adapter in `dir` was trained on the model with `fingerprint`. Adapters without
/// oxtune's record (made by PEFT) pass; a different base is an error unless `allow_mismatch`.
pub fn check_base(dir: &Path, fingerprint: &str, allow_mismatch: bool) -> Result<()> {
    let p = dir.join(BASE_FILE);
    let Ok(text) = std::fs::read_to_string(&p) else { return Ok(()) };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: p.clone(), source })?;
    let recorded = v["base_model_fingerprint"].as_str().unwrap_or_default();
    if recorded != fingerprint && !allow_mismatch {
        return Err(Error::Input(format!(
            "the adapter in {} was trained on another base model (fingerprint {recorded}, this model {fingerprint}); \
             pass --ignore-base-mismatch to use it anyway",
            dir.display()
        )));
    }
    Ok(())
}

fn lora_err(e: oxtune_lora::Error) -> Error {
    Error::Input(e.to_string())
}

impl LoraAdapter {
    fn sites(cfg: &GptOssConfig, spec: &LoraSpec) -> Result<Vec<LoraSite>> {
        let dims = GptOssDims {
            hidden_size: cfg.hidden_size,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            intermediate_size: cfg.intermediate_size,
            num_local_experts: cfg.num_local_experts,
        };
        dims.sites(0..cfg.num_hidden_layers, spec.r, &spec.attention_modules(), &spec.expert_params()).map_err(lora_err)
    }

    /// Builds the adapter from `(A, B)` per site, in the order of [`Self::sites`].
    fn assemble(cfg: &GptOssConfig, spec: LoraSpec, pairs: Vec<(Vec<f32>, Vec<f32>)>) -> Result<Self> {
        let lc = spec.lora_config();
        let mut entries = Vec::new();
        let (mut dense, mut experts) = (HashMap::new(), HashMap::new());
        let sites = Self::sites(cfg, &spec)?;
        let mut it = sites.into_iter().zip(pairs);
        for l in 0..cfg.num_hidden_layers {
            for m in Dense::ALL.into_iter().filter(|_| spec.attention) {
                let (site, (a, b)) = it.next().expect("one site per projection");
                let [_, n_in] = site.a_shape();
                let [n_out, _] = site.b_shape();
                let w = LoraLinear::from_weights(n_in, n_out, a, b, lc.scaling()).map_err(lora_err)?;
                dense.insert((l, m), entries.len());
                let grads = Mutex::new(w.zero_grads());
                entries.push(Entry { site, weights: Weights::Dense(w), grads });
            }
            for p in [Proj::GateUp, Proj::Down].into_iter().filter(|_| spec.experts) {
                let (site, (a, b)) = it.next().expect("one site per expert weight");
                let [_, n_in] = site.a_shape();
                let [n_out, _] = site.b_shape();
                let w = LoraExperts::from_weights(site.experts(), n_in, n_out, a, b, lc.scaling()).map_err(lora_err)?;
                experts.insert((l, p), entries.len());
                let grads = Mutex::new(w.zero_grads());
                entries.push(Entry { site, weights: Weights::Experts(w), grads });
            }
        }
        Ok(Self { spec, entries, dense, experts })
    }

    /// A fresh adapter with PEFT's initialisation (A kaiming-uniform, B zero) from `seed`.
    pub fn new(cfg: &GptOssConfig, spec: LoraSpec, seed: u64) -> Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let lc = spec.lora_config();
        let pairs = Self::sites(cfg, &spec)?
            .iter()
            .map(|s| {
                let [_, n_in] = s.a_shape();
                let [n_out, _] = s.b_shape();
                if s.experts() > 1 {
                    LoraExperts::new(s.experts(), n_in, n_out, &lc, &mut rng).map(|w| (w.a, w.b))
                } else {
                    LoraLinear::new(n_in, n_out, &lc, &mut rng).map(|w| (w.a, w.b))
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(lora_err)?;
        Self::assemble(cfg, spec, pairs)
    }

    /// Reads a PEFT adapter directory made for `cfg`, checking every name and shape.
    pub fn load(dir: &Path, cfg: &GptOssConfig) -> Result<Self> {
        let config = oxtune_lora::read_adapter_config(dir).map_err(lora_err)?;
        config.check_supported().map_err(lora_err)?;
        let spec = LoraSpec::from_adapter_config(&config)?;
        let sites = Self::sites(cfg, &spec)?;
        let loaded = load_adapter(dir, &sites).map_err(lora_err)?;
        Self::assemble(cfg, spec, loaded.pairs.into_iter().map(|p| (p.a, p.b)).collect())
    }

    /// Writes the adapter as a PEFT directory (atomic files) with the base model's fingerprint
    /// in [`BASE_FILE`].
    pub fn save_for_base(&self, dir: &Path, base_model: Option<&str>, fingerprint: &str) -> Result<()> {
        self.save(dir, base_model)?;
        let v = serde_json::json!({ "base_model_fingerprint": fingerprint, "base_model_name_or_path": base_model });
        crate::io::write_atomic(&dir.join(BASE_FILE), serde_json::to_string_pretty(&v).expect("json").as_bytes())
    }

    /// Writes the adapter as a PEFT directory (atomic files).
    pub fn save(&self, dir: &Path, base_model: Option<&str>) -> Result<()> {
        let tensors: Vec<AdapterTensor> = self
            .entries
            .iter()
            .map(|e| {
                let (a, b) = e.values();
                AdapterTensor { site: &e.site, a, b }
            })
            .collect();
        save_adapter(dir, &self.spec.adapter_config(base_model), &tensors).map_err(lora_err)
    }

    /// Where each LoRA pair sits, in the order of [`LoraAdapter::tensors`] (pair `i` is tensors
    /// `2i` (A) and `2i + 1` (B)): what an engine on another device needs to mirror the adapter.
    pub fn layout(&self) -> Vec<SiteLayout> {
        let mut v: Vec<Option<SiteLayout>> = vec![None; self.entries.len()];
        let mut put = |i: usize, layer: usize, target: Target| {
            let e = &self.entries[i];
            let [_, n_in] = e.site.a_shape();
            let [n_out, _] = e.site.b_shape();
            let scaling = match &e.weights {
                Weights::Dense(w) => w.scaling(),
                Weights::Experts(w) => w.scaling(),
            };
            v[i] = Some(SiteLayout {
                layer,
                target,
                n_in,
                n_out,
                rank: e.site.rank(),
                experts: e.site.experts(),
                scaling,
            });
        };
        for (&(l, m), &i) in &self.dense {
            put(i, l, Target::Dense(m));
        }
        for (&(l, p), &i) in &self.experts {
            put(i, l, Target::Experts(p));
        }
        v.into_iter().map(|s| s.expect("every entry is in one map")).collect()
    }

    pub fn zero_grad(&mut self) {
        for e in &mut self.entries {
            e.grads.get_mut().expect("no thread panicked while holding a gradient").zero();
        }
    }

    pub fn num_params(&self) -> usize {
        self.entries.iter().map(|e| e.values().0.len() + e.values().1.len()).sum()
    }

    /// `(key, shape, value)` of every tensor, with the keys of `adapter_model.safetensors`.
    pub fn tensors(&self) -> Vec<(String, [usize; 2], &[f32])> {
        self.entries
            .iter()
            .flat_map(|e| {
                let (a, b) = e.values();
                [(e.site.a_key(), e.site.a_shape(), a), (e.site.b_key(), e.site.b_shape(), b)]
            })
            .collect()
    }

    /// `(key, shape, gradient)` of every tensor.
    pub fn grads(&mut self) -> Vec<(String, [usize; 2], &mut [f32])> {
        self.entries
            .iter_mut()
            .flat_map(|e| {
                let g = e.grads.get_mut().expect("no thread panicked while holding a gradient");
                [(e.site.a_key(), e.site.a_shape(), &mut g.a[..]), (e.site.b_key(), e.site.b_shape(), &mut g.b[..])]
            })
            .collect()
    }

    /// `(key, value, gradient)` of every tensor, for an optimizer step.
    pub fn params(&mut self) -> Vec<(String, &mut [f32], &[f32])> {
        self.entries
            .iter_mut()
            .flat_map(|e| {
                let g = e.grads.get_mut().expect("no thread panicked while holding a gradient");
                let (a, b) = match &mut e.weights {
                    Weights::Dense(w) => (&mut w.a, &mut w.b),
                    Weights::Experts(w) => (&mut w.a, &mut w.b),
                };
                [(e.site.a_key(), &mut a[..], &g.a[..]), (e.site.b_key(), &mut b[..], &g.b[..])]
            })
            .collect()
    }
}

impl Entry {
    fn values(&self) -> (&[f32], &[f32]) {
        match &self.weights {
            Weights::Dense(w) => (&w.a, &w.b),
            Weights::Experts(w) => (&w.a, &w.b),
        }
    }

    fn dense(&self) -> &LoraLinear {
        match &self.weights {
            Weights::Dense(w) => w,
            Weights::Experts(_) => unreachable!("dense sites hold dense LoRA"),
        }
    }

    fn experts(&self) -> &LoraExperts {
        match &self.weights {
            Weights::Experts(w) => w,
            Weights::Dense(_) => unreachable!("expert sites hold expert LoRA"),
        }
    }
}

// Shapes are fixed when the adapter is built for the model, and the model passes activations of
// those shapes, so the lora crate's shape errors cannot occur here.
const SHAPES: &str = "activation shapes match the adapter built for this model";

impl Adapter for LoraAdapter {
    fn dense_forward(&self, layer: usize, m: Dense, x: &[f32], y: &mut [f32]) {
        if let Some(&i) = self.dense.get(&(layer, m)) {
            self.entries[i].dense().forward(x, y, None).expect(SHAPES);
        }
    }

    fn dense_backward(&self, layer: usize, m: Dense, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        if let Some(&i) = self.dense.get(&(layer, m)) {
            let e = &self.entries[i];
            let act = e.dense().activations(x, None).expect(SHAPES);
            let mut g = e.grads.lock().expect("no thread panicked while holding a gradient");
            e.dense().backward(x, &act, dy, Some(dx), None, &mut g).expect(SHAPES);
        }
    }

    fn expert_forward(&self, layer: usize, p: Proj, ex: usize, x: &[f32], y: &mut [f32]) {
        if let Some(&i) = self.experts.get(&(layer, p)) {
            self.entries[i].experts().forward_expert(ex, x, y).expect(SHAPES);
        }
    }

    fn expert_backward(&self, layer: usize, p: Proj, ex: usize, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        if let Some(&i) = self.experts.get(&(layer, p)) {
            let e = &self.entries[i];
            let h = e.experts().activations_expert(ex, x).expect(SHAPES);
            let mut g = e.grads.lock().expect("no thread panicked while holding a gradient");
            e.experts().backward_expert(ex, x, &h, dy, Some(dx), &mut g).expect(SHAPES);
        }
    }
}
