//! Answering a conversation with the model: harmony prompt → decoding → parsed channels.

use oxtune_data::{parse_completion, Completion, Conversation, Renderer, Tokenizer};

use crate::adapter::Adapter;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::sample::{Sampler, SamplerConfig};

/// The generated tokens and, when they follow the harmony format, their parsed messages.
pub struct Reply {
    pub ids: Vec<u32>,
    pub completion: std::result::Result<Completion, String>,
}

impl Reply {
    /// The final answer, or the raw decoded text when the model did not write one.
    pub fn text(&self, tok: &Tokenizer) -> String {
        match self.completion.as_ref().ok().and_then(|c| c.final_text()) {
            Some(t) => t.to_string(),
            None => format!("(no final answer) {}", tok.decode(&self.ids).unwrap_or_default()),
        }
    }
}

/// Something that continues a token sequence: the CPU model with an adapter, or the GPU engine.
pub trait Generate {
    /// Up to `max_new` tokens after `prompt`, stopping after any of `stop`; `choose` picks each
    /// token from the logits.
    fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        choose: &mut dyn FnMut(&[f32]) -> u32,
    ) -> Result<Vec<u32>>;
}

/// The CPU model with an adapter (KV-cached decoding).
pub struct CpuGenerator<'a> {
    pub model: &'a Model,
    pub adapter: &'a dyn Adapter,
}

impl Generate for CpuGenerator<'_> {
    fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        choose: &mut dyn FnMut(&[f32]) -> u32,
    ) -> Result<Vec<u32>> {
        self.model.generate(prompt, max_new, stop, self.adapter, choose)
    }
}

/// The assistant's reply to `conv` (which ends with a user or tool message).
pub fn reply(
    model: &Model,
    adapter: &dyn Adapter,
    renderer: &Renderer,
    tok: &Tokenizer,
    conv: &Conversation,
    sampling: &SamplerConfig,
    max_new_tokens: usize,
) -> Result<Reply> {
    reply_with(&mut CpuGenerator { model, adapter }, renderer, tok, conv, sampling, max_new_tokens)
}

/// [`reply`] with any [`Generate`] (the GPU engine, say).
pub fn reply_with(
    gen: &mut dyn Generate,
    renderer: &Renderer,
    tok: &Tokenizer,
    conv: &Conversation,
    sampling: &SamplerConfig,
    max_new_tokens: usize,
) -> Result<Reply> {
    let data_err = |e: oxtune_data::Error| Error::Input(e.to_string());
    let prompt = renderer.render_prompt(conv).map_err(data_err)?;
    let h = tok.harmony_tokens();
    let stop = [h.return_, h.call];
    let mut sampler = Sampler::new(sampling.clone());
    let ids = gen.generate(&prompt, max_new_tokens, &stop, &mut |l| sampler.choose(l))?;
    let completion = parse_completion(tok, &ids).map_err(|e| e.to_string());
    Ok(Reply { ids, completion })
}
