//! The routing plan: the `tokens × k` slots grouped by expert, so each expert runs one GEMM.

use crate::Routing;

/// Slots sorted by expert (stable: ascending token within an expert).
/// Expert `e` owns slots `offsets[e]..offsets[e + 1]`; slot `s` is token `token[s]`, choice
/// `choice[s]` (its position in the token's top-k), with combine weight `weight[s]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingPlan {
    pub offsets: Vec<usize>,
    pub token: Vec<u32>,
    pub choice: Vec<u32>,
    pub weight: Vec<f32>,
}

impl RoutingPlan {
    pub fn new(r: &Routing) -> Self {
        let mut counts = vec![0usize; r.num_experts + 1];
        for &e in &r.experts {
            counts[e as usize + 1] += 1;
        }
        for e in 0..r.num_experts {
            counts[e + 1] += counts[e];
        }
        let offsets = counts.clone();
        let n = r.experts.len();
        let (mut token, mut choice, mut weight) = (vec![0u32; n], vec![0u32; n], vec![0f32; n]);
        let mut next = counts;
        for (i, &e) in r.experts.iter().enumerate() {
            let s = next[e as usize];
            next[e as usize] += 1;
            token[s] = (i / r.k) as u32;
            choice[s] = (i % r.k) as u32;
            weight[s] = r.weights[i];
        }
        Self { offsets, token, choice, weight }
    }

    pub fn num_experts(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Slots of expert `e`.
    pub fn range(&self, e: usize) -> std::ops::Range<usize> {
        self.offsets[e]..self.offsets[e + 1]
    }

    /// Slot index for (token, choice), the inverse of the sort.
    pub fn slot_of(&self, k: usize) -> Vec<usize> {
        let mut inv = vec![0usize; self.token.len()];
        for s in 0..self.token.len() {
            inv[self.token[s] as usize * k + self.choice[s] as usize] = s;
        }
        inv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_with_zero_tokens() {
        let r = Routing {
            k: 2,
            num_experts: 4,
            experts: vec![3, 0, 0, 3, 3, 1],
            weights: vec![0.6, 0.4, 0.7, 0.3, 0.9, 0.1],
        };
        let p = RoutingPlan::new(&r);
        assert_eq!(p.offsets, vec![0, 2, 3, 3, 6]);
        assert!(p.range(2).is_empty());
        assert_eq!(p.token, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(p.choice, vec![1, 0, 1, 0, 1, 0]);
        assert_eq!(p.weight, vec![0.4, 0.7, 0.1, 0.6, 0.3, 0.9]);
        let inv = p.slot_of(2);
        for (i, &s) in inv.iter().enumerate() {
            assert_eq!((p.token[s] as usize, p.choice[s] as usize), (i / 2, i % 2));
        }
    }
}
