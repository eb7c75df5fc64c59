//! Parameter counts, checkpoint bytes and a GPU memory estimate for LoRA training, from the
//! config's shapes alone (no weights needed).

use crate::config::GptOssConfig;

/// Parameter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub total: u64,
    /// Per token: top-k experts, the LM head counted, the input embedding table not (the
    /// convention behind the published "3.6B active").
    pub active: u64,
    pub embedding: u64,
    pub experts: u64,
}

/// Bytes of each kind in a checkpoint with MXFP4 experts (biases stay bf16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointBytes {
    pub mxfp4: u64,
    pub bf16: u64,
}

impl CheckpointBytes {
    pub fn total(&self) -> u64 {
        self.mxfp4 + self.bf16
    }
}

struct Shapes {
    embed: u64,
    head: u64,
    norms: u64,
    attn: u64,
    router: u64,
    expert_weights: u64,
    expert_biases: u64,
    per_expert: u64,
}

fn shapes(c: &GptOssConfig) -> Shapes {
    let (h, i, e, v, l) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.num_local_experts as u64,
        c.vocab_size as u64,
        c.num_hidden_layers as u64,
    );
    let (qw, kw) = (c.q_width() as u64, c.kv_width() as u64);
    let attn = qw * h + qw + 2 * (kw * h + kw) + h * qw + h + c.num_attention_heads as u64;
    Shapes {
        embed: v * h,
        head: if c.tie_word_embeddings { 0 } else { v * h },
        norms: (2 * l + 1) * h,
        attn: l * attn,
        router: l * (e * h + e),
        expert_weights: l * e * (2 * i * h + h * i),
        expert_biases: l * e * (2 * i + h),
        per_expert: 2 * i * h + 2 * i + h * i + h,
    }
}

pub fn params(c: &GptOssConfig) -> Params {
    let s = shapes(c);
    let experts = s.expert_weights + s.expert_biases;
    let total = s.embed + s.head + s.norms + s.attn + s.router + experts;
    let inactive = c.num_hidden_layers as u64 * (c.num_local_experts - c.num_experts_per_tok) as u64 * s.per_expert;
    Params { total, active: total - s.embed - inactive, embedding: s.embed, experts }
}

/// Bytes on disk for the hub layout: MXFP4 expert weights (16 bytes + 1 scale per 32 values).
pub fn checkpoint_bytes(c: &GptOssConfig) -> CheckpointBytes {
    let s = shapes(c);
    CheckpointBytes {
        mxfp4: s.expert_weights / 2 + s.expert_weights / 32,
        bf16: 2 * (s.embed + s.head + s.norms + s.attn + s.router + s.expert_biases),
    }
}

/// Trainable LoRA parameters of rank `r` on q/k/v/o and (optionally) on both expert projections
/// (PEFT `target_parameters`: `A [r·E, in]`, `B [out, r·E]`).
pub fn lora_params(c: &GptOssConfig, r: u64, attention: bool, experts: bool) -> u64 {
    let (h, i, e, l) =
        (c.hidden_size as u64, c.intermediate_size as u64, c.num_local_experts as u64, c.num_hidden_layers as u64);
    let (qw, kw) = (c.q_width() as u64, c.kv_width() as u64);
    let attn = if attention { r * ((h + qw) + 2 * (h + kw) + (qw + h)) } else { 0 };
    let exp = if experts { r * e * ((h + 2 * i) + (i + h)) } else { 0 };
    l * (attn + exp)
}

/// A breakdown of GPU memory for one LoRA training step with experts kept in MXFP4.
#[derive(Clone, Copy, Debug)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub lora: u64,
    pub checkpoints: u64,
    pub layer_working_set: u64,
    pub lm_head_chunk: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights + self.lora + self.checkpoints + self.layer_working_set + self.lm_head_chunk
    }
}

/// Estimate for `tokens` per micro-batch, rank `r` on attention and experts, with per-layer
/// activation checkpointing (bf16 layer inputs kept, one layer recomputed at a time), LoRA
/// parameters and gradients in f32, 8-bit AdamW states (2 bytes + 8/256 per parameter), and
/// the LM head + loss computed in chunks of 1024 tokens.
pub fn lora_memory(c: &GptOssConfig, tokens: u64, r: u64) -> MemoryEstimate {
    let (h, i, k) = (c.hidden_size as u64, c.intermediate_size as u64, c.num_experts_per_tok as u64);
    let (qw, kw) = (c.q_width() as u64, c.kv_width() as u64);
    let n_lora = lora_params(c, r, true, true);
    // One layer's saved activations in bf16: norms, q/k/v, attention output and logsumexp, and per
    // routed slot the expert input, gate/up, SwiGLU output and expert output.
    let layer = 2 * tokens * (3 * h + qw + 2 * kw + qw)
        + 4 * tokens * c.num_attention_heads as u64
        + 2 * tokens * k * (h + 2 * i + i + h);
    MemoryEstimate {
        weights: checkpoint_bytes(c).total(),
        lora: n_lora * 8 + n_lora * 2 + n_lora / 32,
        checkpoints: 2 * tokens * h * c.num_hidden_layers as u64,
        // Forward activations of the layer being recomputed plus their gradients.
        layer_working_set: 2 * layer,
        lm_head_chunk: 4 * tokens.min(1024) * c.vocab_size as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt_oss_20b_matches_published_sizes() {
        let c = GptOssConfig::gpt_oss_20b();
        let p = params(&c);
        assert_eq!(p.total, 20_914_757_184);
        assert_eq!(p.active, 3_608_307_264);
        let b = checkpoint_bytes(&c);
        assert_eq!(b.total(), 13_761_264_768, "hub index total_size");
        assert_eq!(b.mxfp4, 10_152_345_600);
    }

    #[test]
    fn gpt_oss_120b_matches_published_sizes() {
        let c = GptOssConfig::gpt_oss_120b();
        assert_eq!(params(&c).total, 116_829_156_672);
        assert_eq!(params(&c).active, 5_132_849_472);
        assert_eq!(checkpoint_bytes(&c).total(), 65_248_815_744);
    }

    #[test]
    fn lora_estimate_fits_an_h100() {
        let c = GptOssConfig::gpt_oss_20b();
        let m = lora_memory(&c, 2048, 8);
        assert!(m.total() < 20_000_000_000 && m.total() > m.weights);
    }
}
