//! Choosing the next token: greedy, or sampling with temperature, top-k and top-p (nucleus),
//! seeded for reproducibility.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::argmax;

#[derive(Clone, Debug)]
pub struct SamplerConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplerConfig {
    /// gpt-oss's generation_config: temperature 1.0, top-p 1.0 (the hub file sets no top-k).
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        Self { cfg, rng }
    }

    pub fn choose(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, l / self.cfg.temperature)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.cfg.top_k > 0 {
            cand.truncate(self.cfg.top_k);
        }
        let m = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - m) as f64).exp()).collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|p| {
                acc += p;
                acc >= self.cfg.top_p as f64
            });
            let keep = keep.map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let z: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= z);
        }
        let mut u: f64 = self.rng.gen();
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return cand[i].0;
            }
            u -= p;
        }
        cand[probs.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_zero_is_greedy() {
        let mut s = Sampler::new(SamplerConfig { temperature: 0.0, ..Default::default() });
        assert_eq!(s.choose(&[0.1, 3.0, 2.9]), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [2.0f32, 1.0, 0.5, 0.0, -1.0];
        let mut s = Sampler::new(SamplerConfig { temperature: 1.0, top_k: 2, top_p: 1.0, seed: 1 });
        let picks: Vec<u32> = (0..500).map(|_| s.choose(&logits)).collect();
        assert!(picks.iter().all(|&p| p < 2) && picks.contains(&0) && picks.contains(&1));
        // p(0) = 0.55 of the softmax, so top-p 0.5 keeps token 0 alone.
        let mut s = Sampler::new(SamplerConfig { temperature: 1.0, top_k: 0, top_p: 0.5, seed: 2 });
        assert!((0..200).all(|_| s.choose(&logits) == 0));
    }

    #[test]
    fn frequencies_follow_the_softmax_and_the_seed_repeats() {
        let logits = [1.0f32, 0.0, (0.5f32).ln()];
        let mut s = Sampler::new(SamplerConfig { seed: 3, ..Default::default() });
        let n = 20000;
        let mut counts = [0usize; 3];
        let seq: Vec<u32> = (0..n).map(|_| s.choose(&logits)).collect();
        seq.iter().for_each(|&c| counts[c as usize] += 1);
        let z = 1f64.exp() + 1.0 + 0.5;
        for (i, want) in [1f64.exp() / z, 1.0 / z, 0.5 / z].iter().enumerate() {
            assert!((counts[i] as f64 / n as f64 - want).abs() < 0.015, "token {i}");
        }
        let mut again = Sampler::new(SamplerConfig { seed: 3, ..Default::default() });
        assert!(seq.iter().take(100).all(|&c| c == again.choose(&logits)));
    }
}
