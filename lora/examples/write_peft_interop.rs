//! Writes two adapter directories for `scripts/lora_peft_interop.py check`, for the tiny gpt-oss model of
//! the PEFT fixture (`fixtures/lora/peft_gptoss`):
//!
//! - `OUT/roundtrip`: the PEFT-made fixture adapter loaded by oxtune and saved again;
//! - `OUT/fresh`: a new adapter with oxtune's initialisation and seeded random B.
//!
//! Usage: `cargo run -p oxtune-lora --example write_peft_interop -- fixtures/lora/peft_gptoss OUT`

use std::path::Path;

use oxtune_lora::{
    load_adapter, save_adapter, AdapterConfig, AdapterTensor, GptOssDims, LoraConfig, LoraExperts, LoraLinear,
    GPT_OSS_EXPERT_PARAMS,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ATTENTION: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, fixture, out] = args.as_slice() else {
        return Err("usage: write_peft_interop <peft fixture dir> <output dir>".into());
    };
    let (fixture, out) = (Path::new(fixture), Path::new(out));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("tiny_config.json"))?)?;
    let field = |k: &str| cfg[k].as_u64().map(|v| v as usize).ok_or(format!("tiny_config.json has no integer {k}"));
    let dims = GptOssDims {
        hidden_size: field("hidden_size")?,
        num_attention_heads: field("num_attention_heads")?,
        num_key_value_heads: field("num_key_value_heads")?,
        head_dim: field("head_dim")?,
        intermediate_size: field("intermediate_size")?,
        num_local_experts: field("num_local_experts")?,
    };
    let layers = 0..field("num_hidden_layers")?;
    let peft_config = oxtune_lora::read_adapter_config(fixture)?;
    let sites = dims.sites(layers, peft_config.r, &ATTENTION, &GPT_OSS_EXPERT_PARAMS)?;

    let loaded = load_adapter(fixture, &sites)?;
    let tensors: Vec<AdapterTensor<'_>> =
        sites.iter().zip(&loaded.pairs).map(|(site, p)| AdapterTensor { site, a: &p.a, b: &p.b }).collect();
    save_adapter(&out.join("roundtrip"), &loaded.config, &tensors)?;

    let lora = LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() };
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let mut weights = Vec::new();
    for site in &sites {
        let [rows, d_in] = site.a_shape();
        let [d_out, _] = site.b_shape();
        let (a, mut b) = if site.experts() == 1 {
            let l = LoraLinear::new(d_in, d_out, &lora, &mut rng)?;
            (l.a, l.b)
        } else {
            let l = LoraExperts::new(site.experts(), d_in, d_out, &lora, &mut rng)?;
            (l.a, l.b)
        };
        assert_eq!(a.len(), rows * d_in);
        b.iter_mut().for_each(|v| *v = rng.gen_range(-0.05..0.05));
        weights.push((a, b));
    }
    let tensors: Vec<AdapterTensor<'_>> =
        sites.iter().zip(&weights).map(|(site, (a, b))| AdapterTensor { site, a, b }).collect();
    let config = AdapterConfig::new(
        lora.r,
        lora.alpha,
        ATTENTION.iter().map(|s| s.to_string()).collect(),
        GPT_OSS_EXPERT_PARAMS.iter().map(|p| format!("mlp.experts.{p}")).collect(),
    );
    save_adapter(&out.join("fresh"), &config, &tensors)?;
    println!("wrote {} and {}", out.join("roundtrip").display(), out.join("fresh").display());
    Ok(())
}
