//! LoRA on the gpt-oss model: dense LoRA on q/k/v/o_proj and PEFT `target_parameters` LoRA on the
//! experts (`gate_up_proj`, `down_proj`), held as named f32 tensors with PEFT's key names.
//!
//! Dense: `y += s · (x Aᵀ) Bᵀ`, `A [r, in]`, `B [out, r]`. Experts: `A [r·E, in]`, `B [out, r·E]`;
//! expert `e` uses rows `e·r .. e·r + r` of A and columns `k·E + e` of B (PEFT's layout), and its
//! delta is applied to the tokens routed to it without materialising `B·A`.

use std::collections::HashMap;
use std::sync::Mutex;

use oxtune_moe::{gemm, Proj};
use rand::{Rng, SeedableRng};

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
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }
}

/// One trainable tensor and its gradient.
#[derive(Debug)]
pub struct LoraTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Vec<f32>,
    grad: Mutex<Vec<f32>>,
}

impl LoraTensor {
    fn new(name: String, shape: Vec<usize>, value: Vec<f32>) -> Self {
        let n = value.len();
        Self { name, shape, value, grad: Mutex::new(vec![0.0; n]) }
    }

    /// The accumulated gradient.
    pub fn grad(&mut self) -> &mut Vec<f32> {
        self.grad.get_mut().expect("no thread panicked while holding a gradient")
    }

    /// Name, value and gradient at once (for an optimizer step).
    pub fn parts(&mut self) -> (&str, &mut [f32], &[f32]) {
        let g = self.grad.get_mut().expect("no thread panicked while holding a gradient");
        (&self.name, &mut self.value, g)
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    a: usize,
    b: usize,
    n_in: usize,
    n_out: usize,
}

#[derive(Debug)]
pub struct LoraAdapter {
    pub spec: LoraSpec,
    pub tensors: Vec<LoraTensor>,
    num_experts: usize,
    dense: HashMap<(usize, Dense), Slot>,
    experts: HashMap<(usize, Proj), Slot>,
}

/// PEFT's key prefix of a module of layer `l`.
pub fn module_key(l: usize, module: &str) -> String {
    format!("base_model.model.model.layers.{l}.{module}")
}

/// PEFT's module path for an expert projection: both targeted nests `gate_up_proj` one level
/// deeper (`experts.base_layer`), since PEFT wraps parameters in registration order.
fn expert_module(proj: Proj, both: bool) -> &'static str {
    match (proj, both) {
        (Proj::GateUp, true) => "mlp.experts.base_layer",
        _ => "mlp.experts",
    }
}

impl LoraAdapter {
    /// The adapter's tensor names and shapes for a model, in a fixed order.
    pub fn layout(cfg: &GptOssConfig, spec: &LoraSpec) -> Vec<(String, Vec<usize>)> {
        let (h, i, e, r) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, spec.r);
        let mut out = vec![];
        for l in 0..cfg.num_hidden_layers {
            if spec.attention {
                for m in Dense::ALL {
                    let (n_in, n_out) = match m {
                        Dense::Q => (h, cfg.q_width()),
                        Dense::K | Dense::V => (h, cfg.kv_width()),
                        Dense::O => (cfg.q_width(), h),
                    };
                    let k = module_key(l, &format!("self_attn.{}", m.name()));
                    out.push((format!("{k}.lora_A.weight"), vec![r, n_in]));
                    out.push((format!("{k}.lora_B.weight"), vec![n_out, r]));
                }
            }
            if spec.experts {
                for (p, n_in, n_out) in [(Proj::GateUp, h, 2 * i), (Proj::Down, i, h)] {
                    let k = module_key(l, expert_module(p, true));
                    out.push((format!("{k}.lora_A.weight"), vec![r * e, n_in]));
                    out.push((format!("{k}.lora_B.weight"), vec![n_out, r * e]));
                }
            }
        }
        out
    }

    /// A fresh adapter with PEFT's initialisation: A ~ U(±1/√in) (kaiming-uniform, a = √5), B = 0.
    pub fn new(cfg: &GptOssConfig, spec: LoraSpec, seed: u64) -> Self {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let values = Self::layout(cfg, &spec)
            .into_iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                let v = if name.ends_with("lora_A.weight") {
                    let bound = 1.0 / (shape[1] as f32).sqrt();
                    (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
                } else {
                    vec![0.0; n]
                };
                (name, v)
            })
            .collect();
        Self::from_values(cfg, spec, values).expect("layout matches itself")
    }

    /// An adapter from named values; every tensor of the layout must be present with its shape,
    /// and nothing else.
    pub fn from_values(cfg: &GptOssConfig, spec: LoraSpec, mut values: HashMap<String, Vec<f32>>) -> Result<Self> {
        let mut tensors = vec![];
        let (mut dense, mut experts) = (HashMap::new(), HashMap::new());
        for (name, shape) in Self::layout(cfg, &spec) {
            let v = values.remove(&name).ok_or_else(|| {
                Error::Input(format!("adapter is missing `{name}` (expected shape {shape:?}); was it made for this model and these targets?"))
            })?;
            if v.len() != shape.iter().product::<usize>() {
                return Err(Error::Input(format!(
                    "adapter tensor `{name}` has {} values, expected shape {shape:?}",
                    v.len()
                )));
            }
            tensors.push(LoraTensor::new(name, shape, v));
        }
        if let Some(extra) = values.keys().next() {
            return Err(Error::Input(format!(
                "adapter tensor `{extra}` does not belong to a rank-{} adapter of this model ({} unexpected tensors)",
                spec.r,
                values.len()
            )));
        }
        // Pair A/B tensors with the projections they adapt (layout order: A then B).
        let mut it = 0;
        for l in 0..cfg.num_hidden_layers {
            if spec.attention {
                for m in Dense::ALL {
                    let (a, b) = (&tensors[it], &tensors[it + 1]);
                    dense.insert((l, m), Slot { a: it, b: it + 1, n_in: a.shape[1], n_out: b.shape[0] });
                    it += 2;
                }
            }
            if spec.experts {
                for p in [Proj::GateUp, Proj::Down] {
                    let (a, b) = (&tensors[it], &tensors[it + 1]);
                    experts.insert((l, p), Slot { a: it, b: it + 1, n_in: a.shape[1], n_out: b.shape[0] });
                    it += 2;
                }
            }
        }
        Ok(Self { spec, tensors, num_experts: cfg.num_local_experts, dense, experts })
    }

    pub fn zero_grad(&mut self) {
        for t in &mut self.tensors {
            t.grad().fill(0.0);
        }
    }

    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(|t| t.value.len()).sum()
    }

    fn accumulate(&self, idx: usize, f: impl FnOnce(&mut [f32])) {
        let mut g = self.tensors[idx].grad.lock().expect("no thread panicked while holding a gradient");
        f(&mut g);
    }
}

impl Adapter for LoraAdapter {
    fn dense_forward(&self, layer: usize, m: Dense, x: &[f32], y: &mut [f32]) {
        let Some(s) = self.dense.get(&(layer, m)) else { return };
        let (r, n) = (self.spec.r, x.len() / s.n_in);
        let mut hid = vec![0.0f32; n * r];
        gemm::matmul(x, &self.tensors[s.a].value, &mut hid, n, s.n_in, r, true, 0.0);
        hid.iter_mut().for_each(|v| *v *= self.spec.scale());
        gemm::matmul(&hid, &self.tensors[s.b].value, y, n, r, s.n_out, true, 1.0);
    }

    fn dense_backward(&self, layer: usize, m: Dense, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let Some(s) = self.dense.get(&(layer, m)) else { return };
        let (r, n, sc) = (self.spec.r, x.len() / s.n_in, self.spec.scale());
        let (a, b) = (&self.tensors[s.a].value, &self.tensors[s.b].value);
        let mut hid = vec![0.0f32; n * r];
        gemm::matmul(x, a, &mut hid, n, s.n_in, r, true, 0.0);
        // g = s · dy B  [n, r]
        let mut g = vec![0.0f32; n * r];
        gemm::matmul(dy, b, &mut g, n, s.n_out, r, false, 0.0);
        g.iter_mut().for_each(|v| *v *= sc);
        hid.iter_mut().for_each(|v| *v *= sc);
        self.accumulate(s.b, |gb| gemm::matmul_at(dy, &hid, gb, s.n_out, n, r, 1.0));
        self.accumulate(s.a, |ga| gemm::matmul_at(&g, x, ga, r, n, s.n_in, 1.0));
        gemm::matmul(&g, a, dx, n, r, s.n_in, false, 1.0);
    }

    fn expert_forward(&self, layer: usize, p: Proj, e: usize, x: &[f32], y: &mut [f32]) {
        let Some(s) = self.experts.get(&(layer, p)) else { return };
        let (r, ne, n) = (self.spec.r, self.num_experts, x.len() / s.n_in);
        let a_e = &self.tensors[s.a].value[e * r * s.n_in..(e + 1) * r * s.n_in];
        let mut hid = vec![0.0f32; n * r];
        gemm::matmul(x, a_e, &mut hid, n, s.n_in, r, true, 0.0);
        hid.iter_mut().for_each(|v| *v *= self.spec.scale());
        // y += hid · B_eᵀ with B_eᵀ[k, o] = B[o, k·E + e].
        let b = &self.tensors[s.b].value[e..];
        gemm::sgemm_strided(n, r, s.n_out, &hid, (r, 1), b, (ne, r * ne), 1.0, y, s.n_out);
    }

    fn expert_backward(&self, layer: usize, p: Proj, e: usize, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let Some(s) = self.experts.get(&(layer, p)) else { return };
        let (r, ne, n, sc) = (self.spec.r, self.num_experts, x.len() / s.n_in, self.spec.scale());
        let a_e = &self.tensors[s.a].value[e * r * s.n_in..(e + 1) * r * s.n_in];
        let b = &self.tensors[s.b].value[e..];
        let mut hid = vec![0.0f32; n * r];
        gemm::matmul(x, a_e, &mut hid, n, s.n_in, r, true, 0.0);
        hid.iter_mut().for_each(|v| *v *= sc);
        // g = s · dy B_e with B_e[o, k] = B[o, k·E + e].
        let mut g = vec![0.0f32; n * r];
        gemm::sgemm_strided(n, s.n_out, r, dy, (s.n_out, 1), b, (r * ne, ne), 0.0, &mut g, r);
        g.iter_mut().for_each(|v| *v *= sc);
        let mut gb = vec![0.0f32; s.n_out * r];
        gemm::matmul_at(dy, &hid, &mut gb, s.n_out, n, r, 0.0);
        self.accumulate(s.b, |acc| {
            for o in 0..s.n_out {
                for k in 0..r {
                    acc[o * r * ne + k * ne + e] += gb[o * r + k];
                }
            }
        });
        self.accumulate(s.a, |acc| {
            gemm::matmul_at(&g, x, &mut acc[e * r * s.n_in..(e + 1) * r * s.n_in], r, n, s.n_in, 1.0)
        });
        gemm::matmul(&g, a_e, dx, n, r, s.n_in, false, 1.0);
    }
}
