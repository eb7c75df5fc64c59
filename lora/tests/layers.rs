//! Behaviour of the LoRA layers beyond the PEFT fixtures: initialisation, scaling, exact gradients by finite
//! differences (the loss is linear in each of A, B and x, so central differences are exact up to rounding),
//! merge consistency in both expert layouts, dropout masks, and errors instead of panics on bad shapes.

mod common;

use common::assert_close;
use half::bf16;
use oxtune_lora::{DropoutMask, Error, ExpertLayout, LoraConfig, LoraExperts, LoraLinear};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn uniform(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum()
}

#[test]
fn fresh_adapters_follow_peft_initialisation() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let cfg = LoraConfig { r: 16, alpha: 32.0, ..LoraConfig::default() };
    let lora = LoraLinear::new(2880, 512, &cfg, &mut rng).unwrap();
    let bound = 1.0 / (2880f32).sqrt();
    assert!(lora.a.iter().all(|v| v.abs() <= bound));
    let n = lora.a.len() as f64;
    let mean = lora.a.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
    let var = lora.a.iter().map(|v| (f64::from(*v) - mean).powi(2)).sum::<f64>() / n;
    let want_var = f64::from(bound * bound) / 3.0;
    assert!(
        mean.abs() < 0.01 * f64::from(bound) && (var / want_var - 1.0).abs() < 0.02,
        "mean {mean}, var {var} vs {want_var}"
    );
    assert!(lora.b.iter().all(|v| *v == 0.0));
    assert_eq!((lora.rank(), lora.scaling()), (16, 2.0));

    // B = 0: the adapter is an exact no-op.
    let x = uniform(&mut rng, 3 * 2880);
    let y0 = uniform(&mut rng, 3 * 512);
    let mut y = y0.clone();
    lora.forward(&x, &mut y, None).unwrap();
    assert_eq!(y, y0);

    let experts = LoraExperts::new(32, 2880, 5760, &LoraConfig { r: 8, ..LoraConfig::default() }, &mut rng).unwrap();
    assert_eq!((experts.a.len(), experts.b.len()), (8 * 32 * 2880, 5760 * 8 * 32));
    assert!(experts.a.iter().all(|v| v.abs() <= bound) && experts.b.iter().all(|v| *v == 0.0));
}

#[test]
fn rslora_scales_by_alpha_over_sqrt_r() {
    let plain = LoraConfig { r: 16, alpha: 32.0, ..LoraConfig::default() };
    let rs = LoraConfig { use_rslora: true, ..plain };
    assert_eq!((plain.scaling(), rs.scaling()), (2.0, 8.0));
}

/// loss = sum(G * y) with y the LoRA branch; checks dA, dB, dx against central differences.
#[test]
fn rank_one_gradients_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (t, d_in, d_out) = (5, 9, 7);
    let lora = LoraLinear::from_weights(d_in, d_out, uniform(&mut rng, d_in), uniform(&mut rng, d_out), 1.5).unwrap();
    assert_eq!(lora.rank(), 1);
    let x = uniform(&mut rng, t * d_in);
    let g = uniform(&mut rng, t * d_out);
    let loss = |l: &LoraLinear, x: &[f32]| {
        let mut y = vec![0f32; t * d_out];
        l.forward(x, &mut y, None).unwrap();
        dot(&y, &g)
    };
    let mut y = vec![0f32; t * d_out];
    let act = lora.forward(&x, &mut y, None).unwrap();
    let mut grads = lora.zero_grads();
    let mut dx = vec![0f32; x.len()];
    lora.backward(&x, &act, &g, Some(&mut dx), None, &mut grads).unwrap();

    let h = 0.25f32;
    let central = |plus: f64, minus: f64| ((plus - minus) / (2.0 * f64::from(h))) as f32;
    let num_a: Vec<f32> = (0..lora.a.len())
        .map(|i| {
            let (mut p, mut m) = (lora.clone(), lora.clone());
            p.a[i] += h;
            m.a[i] -= h;
            central(loss(&p, &x), loss(&m, &x))
        })
        .collect();
    let num_b: Vec<f32> = (0..lora.b.len())
        .map(|i| {
            let (mut p, mut m) = (lora.clone(), lora.clone());
            p.b[i] += h;
            m.b[i] -= h;
            central(loss(&p, &x), loss(&m, &x))
        })
        .collect();
    let num_x: Vec<f32> = (0..x.len())
        .map(|i| {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[i] += h;
            m[i] -= h;
            central(loss(&lora, &p), loss(&lora, &m))
        })
        .collect();
    assert_close("dA", &grads.a, &num_a, 1e-5, 1e-4);
    assert_close("dB", &grads.b, &num_b, 1e-5, 1e-4);
    assert_close("dx", &dx, &num_x, 1e-5, 1e-4);
}

#[test]
fn expert_gradients_match_finite_differences_with_an_empty_expert() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (experts, r, d_in, d_out) = (3, 2, 6, 5);
    let lora = LoraExperts::from_weights(
        experts,
        d_in,
        d_out,
        uniform(&mut rng, r * experts * d_in),
        uniform(&mut rng, d_out * r * experts),
        0.75,
    )
    .unwrap();
    let tokens = [4usize, 0, 3];
    let xs: Vec<Vec<f32>> = tokens.iter().map(|&n| uniform(&mut rng, n * d_in)).collect();
    let gs: Vec<Vec<f32>> = tokens.iter().map(|&n| uniform(&mut rng, n * d_out)).collect();
    let loss = |l: &LoraExperts, xs: &[Vec<f32>]| -> f64 {
        (0..experts)
            .map(|e| {
                let mut y = vec![0f32; tokens[e] * d_out];
                l.forward_expert(e, &xs[e], &mut y).unwrap();
                dot(&y, &gs[e])
            })
            .sum()
    };
    let mut grads = lora.zero_grads();
    let mut dxs: Vec<Vec<f32>> = xs.iter().map(|x| vec![0f32; x.len()]).collect();
    for e in 0..experts {
        let mut y = vec![0f32; tokens[e] * d_out];
        let h = lora.forward_expert(e, &xs[e], &mut y).unwrap();
        lora.backward_expert(e, &xs[e], &h, &gs[e], Some(&mut dxs[e]), &mut grads).unwrap();
    }
    let h = 0.25f32;
    let central = |plus: f64, minus: f64| ((plus - minus) / (2.0 * f64::from(h))) as f32;
    let num_a: Vec<f32> = (0..lora.a.len())
        .map(|i| {
            let (mut p, mut m) = (lora.clone(), lora.clone());
            p.a[i] += h;
            m.a[i] -= h;
            central(loss(&p, &xs), loss(&m, &xs))
        })
        .collect();
    let num_b: Vec<f32> = (0..lora.b.len())
        .map(|i| {
            let (mut p, mut m) = (lora.clone(), lora.clone());
            p.b[i] += h;
            m.b[i] -= h;
            central(loss(&p, &xs), loss(&m, &xs))
        })
        .collect();
    assert_close("experts dA", &grads.a, &num_a, 1e-5, 1e-4);
    assert_close("experts dB", &grads.b, &num_b, 1e-5, 1e-4);
    for e in [0, 2] {
        let num_x: Vec<f32> = (0..xs[e].len())
            .map(|i| {
                let (mut p, mut m) = (xs.clone(), xs.clone());
                p[e][i] += h;
                m[e][i] -= h;
                central(loss(&lora, &p), loss(&lora, &m))
            })
            .collect();
        assert_close(&format!("dx expert {e}"), &dxs[e], &num_x, 1e-5, 1e-4);
    }
    // Expert 1 had no tokens: its slice of A (rows 2..4) and of B (columns k*3 + 1) got no gradient.
    assert!(grads.a[r * d_in..2 * r * d_in].iter().all(|v| *v == 0.0));
    assert!((0..d_out).all(|o| (0..r).all(|k| grads.b[o * r * experts + k * experts + 1] == 0.0)));
}

#[test]
fn merged_experts_reproduce_the_lora_forward_in_both_layouts() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (experts, r, d_in, d_out, n) = (4, 3, 10, 12, 6);
    let lora = LoraExperts::from_weights(
        experts,
        d_in,
        d_out,
        uniform(&mut rng, r * experts * d_in),
        uniform(&mut rng, d_out * r * experts),
        2.0,
    )
    .unwrap();
    let w_in_out = uniform(&mut rng, experts * d_in * d_out);
    // The same weights in [E, out, in].
    let mut w_out_in = vec![0f32; w_in_out.len()];
    for e in 0..experts {
        for i in 0..d_in {
            for o in 0..d_out {
                w_out_in[(e * d_out + o) * d_in + i] = w_in_out[(e * d_in + i) * d_out + o];
            }
        }
    }
    let (mut m_in_out, mut m_out_in) = (w_in_out.clone(), w_out_in.clone());
    lora.merge_into(&mut m_in_out, ExpertLayout::InOut).unwrap();
    lora.merge_into(&mut m_out_in, ExpertLayout::OutIn).unwrap();
    for e in 0..experts {
        let x = uniform(&mut rng, n * d_in);
        let mut y = vec![0f32; n * d_out];
        let (mut y1, mut y2) = (vec![0f32; n * d_out], vec![0f32; n * d_out]);
        for t in 0..n {
            for o in 0..d_out {
                for i in 0..d_in {
                    let xv = x[t * d_in + i];
                    y[t * d_out + o] += xv * w_in_out[(e * d_in + i) * d_out + o];
                    y1[t * d_out + o] += xv * m_in_out[(e * d_in + i) * d_out + o];
                    y2[t * d_out + o] += xv * m_out_in[(e * d_out + o) * d_in + i];
                }
            }
        }
        lora.forward_expert(e, &x, &mut y).unwrap();
        assert_close(&format!("expert {e} merged [in, out]"), &y1, &y, 1e-5, 1e-5);
        assert_close(&format!("expert {e} merged [out, in]"), &y2, &y, 1e-5, 1e-5);
    }
    lora.unmerge_from(&mut m_in_out, ExpertLayout::InOut).unwrap();
    assert_close("unmerged", &m_in_out, &w_in_out, 1e-6, 1e-6);
}

#[test]
fn bf16_merge_rounds_like_peft_and_unmerge_comes_back_within_bf16_rounding() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (d_in, d_out, r) = (33, 17, 4);
    let lora =
        LoraLinear::from_weights(d_in, d_out, uniform(&mut rng, r * d_in), uniform(&mut rng, d_out * r), 0.05).unwrap();
    let w: Vec<bf16> = uniform(&mut rng, d_out * d_in).into_iter().map(bf16::from_f32).collect();
    let mut merged = w.clone();
    lora.merge_into_bf16(&mut merged).unwrap();
    let delta = lora.delta_weight().unwrap();
    for i in 0..w.len() {
        let want = bf16::from_f32(w[i].to_f32() + bf16::from_f32(delta[i]).to_f32());
        assert_eq!(merged[i], want, "element {i}");
    }
    lora.unmerge_from_bf16(&mut merged).unwrap();
    let back: Vec<f32> = merged.iter().map(|v| v.to_f32()).collect();
    let orig: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    assert_close("unmerged bf16", &back, &orig, 1e-2, 8e-3);
}

#[test]
fn dropout_masks_are_reproducible_and_keep_about_1_minus_p() {
    let a = DropoutMask::sample(0.25, 64, 300, 7).unwrap();
    let b = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| DropoutMask::sample(0.25, 64, 300, 7).unwrap());
    assert_eq!(a, b, "the mask must not depend on the thread count");
    assert_ne!(a, DropoutMask::sample(0.25, 64, 300, 8).unwrap());
    let kept = (0..64).flat_map(|t| (0..300).map(move |f| (t, f))).filter(|&(t, f)| a.keeps(t, f)).count();
    let frac = kept as f64 / (64.0 * 300.0);
    assert!((frac - 0.75).abs() < 0.015, "kept {frac}");

    // p = 0 keeps everything: identical to no dropout.
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let lora = LoraLinear::from_weights(300, 8, uniform(&mut rng, 2 * 300), uniform(&mut rng, 8 * 2), 1.0).unwrap();
    let x = uniform(&mut rng, 4 * 300);
    let (mut y1, mut y2) = (vec![0f32; 32], vec![0f32; 32]);
    lora.forward(&x, &mut y1, None).unwrap();
    lora.forward(&x, &mut y2, Some(&DropoutMask::sample(0.0, 4, 300, 1).unwrap())).unwrap();
    assert_eq!(y1, y2);
}

#[test]
fn bad_shapes_are_errors_naming_the_tensor() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let lora = LoraLinear::from_weights(10, 6, uniform(&mut rng, 20), uniform(&mut rng, 12), 1.0).unwrap();
    let err = lora.forward(&[0.5; 25], &mut [0.0; 12], None).unwrap_err();
    assert!(matches!(err, Error::Shape { ref what, .. } if what == "LoRA input x"), "{err}");
    let err = lora.forward(&[0.5; 20], &mut [0.0; 13], None).unwrap_err();
    assert!(err.to_string().contains("LoRA output y"), "{err}");
    let mask = DropoutMask::sample(0.1, 3, 10, 0).unwrap();
    let err = lora.forward(&[0.5; 20], &mut [0.0; 12], Some(&mask)).unwrap_err();
    assert!(err.to_string().contains("dropout mask"), "{err}");
    let act = lora.forward(&[0.5; 20], &mut [0.0; 12], None).unwrap();
    let mut grads = lora.zero_grads();
    grads.b.pop();
    let err = lora.backward(&[0.5; 20], &act, &[1.0; 12], None, None, &mut grads).unwrap_err();
    assert!(err.to_string().contains("grad of lora_B"), "{err}");
    assert!(LoraLinear::from_weights(10, 6, vec![0.1; 21], vec![0.1; 12], 1.0).is_err());
    let mut resized = lora.clone();
    resized.b.push(0.5);
    let err = resized.forward(&[0.5; 20], &mut [0.0; 12], None).unwrap_err();
    assert!(err.to_string().contains("lora_B") && err.to_string().contains("fixed at construction"), "{err}");
    assert!(resized.delta_weight().is_err());
    assert!(LoraLinear::new(10, 6, &LoraConfig { r: 0, ..LoraConfig::default() }, &mut rng).is_err());

    let experts = LoraExperts::from_weights(4, 6, 5, uniform(&mut rng, 8 * 6), uniform(&mut rng, 5 * 8), 1.0).unwrap();
    assert!(matches!(experts.forward_expert(4, &[], &mut []), Err(Error::OutOfRange(_))));
    let mut resized = experts.clone();
    resized.a.truncate(5);
    assert!(matches!(resized.forward_expert(0, &[], &mut []), Err(Error::Shape { .. })));
    assert!(
        LoraExperts::from_weights(4, 6, 5, vec![0.1; 7 * 6], vec![0.1; 5 * 7], 1.0).is_err(),
        "r*E must divide by E"
    );
    let err = LoraExperts::new(4, 6, 5, &LoraConfig { dropout: 0.1, ..LoraConfig::default() }, &mut rng).unwrap_err();
    assert!(err.to_string().contains("lora_dropout"), "{err}");
}
