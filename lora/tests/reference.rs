//! LoRA layers and NF4 against fixtures from the reference implementations (`scripts/lora_fixtures.py`:
//! PEFT 0.21 on torch, bitsandbytes 0.50.2).

mod common;

use common::{assert_close, Fixture};
use half::bf16;
use oxtune_lora::nf4::{DYNAMIC_SIGNED, NF4_CODE};
use oxtune_lora::{DropoutMask, ExpertLayout, LoraExperts, LoraLinear, Nf4Absmax, Nf4Tensor};

#[test]
fn nf4_code_table_equals_bitsandbytes() {
    let fx = Fixture::open("nf4_bnb.safetensors");
    let want = fx.f32("nf4.code");
    for (i, (g, w)) in NF4_CODE.iter().zip(&want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "code {i:#06b}: {g} vs {w}");
    }
}

#[test]
fn nf4_codes_packing_and_dequantization_equal_bitsandbytes_for_an_odd_element_count() {
    let fx = Fixture::open("nf4_bnb.safetensors");
    let w = fx.floats("plain.w");
    assert_eq!(w.len() % 2, 1);
    let t = Nf4Tensor::quantize(&w, false).unwrap();
    assert_eq!(t.packed(), fx.u8("plain.packed").as_slice(), "packed codes");
    assert_eq!(t.packed().last().unwrap() & 0x0f, 7, "the padding element is the code of 0.0");
    match t.absmax() {
        Nf4Absmax::F32(a) => assert_eq!(a, &fx.f32("plain.absmax")),
        other => panic!("expected f32 absmax, got {other:?}"),
    }
    let deq: Vec<f32> = t.dequantize().iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
    assert_close("dequantized (as bf16)", &deq, &fx.floats("plain.deq"), 0.0, 0.0);
}

#[test]
fn nf4_double_quantization_equals_bitsandbytes() {
    let fx = Fixture::open("nf4_bnb.safetensors");
    let w = fx.floats("dq.w");
    let t = Nf4Tensor::quantize(&w, true).unwrap();
    let want_packed = fx.u8("dq.packed");
    let bad = t.packed().iter().zip(&want_packed).filter(|(a, b)| a != b).count();
    assert_eq!(bad, 0, "{bad} of {} packed bytes differ", want_packed.len());
    let Nf4Absmax::Double { codes, nested_absmax, offset } = t.absmax() else { panic!("expected double quantization") };
    assert_close("offset", &[*offset], &fx.f32("dq.offset"), 0.0, 0.0);
    assert_close("nested absmax", nested_absmax, &fx.f32("dq.nested_absmax"), 0.0, 0.0);
    assert_eq!(codes, &fx.u8("dq.qabsmax"), "8-bit absmax codes");
    let absmax: Vec<f32> = (0..codes.len()).map(|b| t.block_absmax(b)).collect();
    assert_close("decoded absmax", &absmax, &fx.f32("dq.absmax"), 0.0, 0.0);
    let deq: Vec<f32> = t.dequantize().iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
    assert_close("dequantized (as bf16)", &deq, &fx.floats("dq.deq"), 0.0, 0.0);
    // Block 26 (elements 1664..1728) is all zero: only the code of 0.0, which dequantizes to 0 even though
    // the double-quantized absmax of the block is not exactly 0.
    assert!(w[1664..1728].iter().all(|v| *v == 0.0));
    assert!(t.packed()[1664 / 2..1728 / 2].iter().all(|&b| b == 0x77));
    assert!(t.dequantize()[1664..1728].iter().all(|v| *v == 0.0));
    assert_eq!(DYNAMIC_SIGNED[127], 0.0);
}

fn linear_ref(x: &[f32], w: &[f32], bias: &[f32], d_in: usize, d_out: usize) -> Vec<f32> {
    let t = x.len() / d_in;
    let mut y = vec![0f32; t * d_out];
    for i in 0..t {
        for o in 0..d_out {
            let dot: f64 = (0..d_in).map(|k| f64::from(x[i * d_in + k]) * f64::from(w[o * d_in + k])).sum();
            y[i * d_out + o] = dot as f32 + bias[o];
        }
    }
    y
}

#[test]
fn dense_lora_forward_backward_and_merge_match_peft() {
    let fx = Fixture::open("lora_linear_peft.safetensors");
    let (d_in, d_out) = (40, 24);
    for tag in ["dropout", "rslora"] {
        let k = |s: &str| format!("{tag}.{s}");
        let scaling = fx.f64(&k("scaling"))[0];
        let lora = LoraLinear::from_weights(d_in, d_out, fx.f32(&k("a")), fx.f32(&k("b")), scaling as f32).unwrap();
        let x = fx.f32(&k("x"));
        let tokens = x.len() / d_in;
        let mask = (tag == "dropout").then(|| {
            let keep: Vec<bool> = fx.u8(&k("keep")).iter().map(|&b| b != 0).collect();
            DropoutMask::from_keep(0.25, tokens, d_in, &keep).unwrap()
        });
        if tag == "rslora" {
            assert_eq!(scaling, 4.0, "alpha 8 / sqrt(4)");
        }
        let w = fx.f32(&k("w"));
        let mut y = linear_ref(&x, &w, &fx.f32(&k("bias")), d_in, d_out);
        let act = lora.forward(&x, &mut y, mask.as_ref()).unwrap();
        assert_close(&k("y"), &y, &fx.f32(&k("y")), 1e-6, 1e-5);

        let g = fx.f32(&k("g"));
        // dx of the whole layer = dy W (base, frozen) + the LoRA contribution.
        let mut dx = vec![0f32; x.len()];
        for i in 0..tokens {
            for c in 0..d_in {
                dx[i * d_in + c] = (0..d_out).map(|o| g[i * d_out + o] * w[o * d_in + c]).sum();
            }
        }
        let mut grads = lora.zero_grads();
        lora.backward(&x, &act, &g, Some(&mut dx), mask.as_ref(), &mut grads).unwrap();
        assert_close(&k("dx"), &dx, &fx.f32(&k("dx")), 1e-6, 1e-5);
        assert_close(&k("dA"), &grads.a, &fx.f32(&k("da")), 1e-6, 1e-5);
        assert_close(&k("dB"), &grads.b, &fx.f32(&k("db")), 1e-6, 1e-5);

        // Gradients accumulate: a second backward doubles them.
        let mut twice = grads.clone();
        lora.backward(&x, &act, &g, None, mask.as_ref(), &mut twice).unwrap();
        let doubled: Vec<f32> = grads.a.iter().map(|v| 2.0 * v).collect();
        assert_close(&k("dA accumulated"), &twice.a, &doubled, 1e-7, 1e-6);

        let mut merged = w.clone();
        lora.merge_into(&mut merged).unwrap();
        assert_close(&k("merged"), &merged, &fx.f32(&k("merged")), 1e-7, 1e-6);
        lora.unmerge_from(&mut merged).unwrap();
        assert_close(&k("unmerged"), &merged, &w, 1e-6, 1e-6);
    }
}

#[test]
fn expert_lora_matches_peft_target_parameters_including_an_expert_with_zero_tokens() {
    let fx = Fixture::open("lora_experts_peft.safetensors");
    let tokens = fx.i64("tokens");
    assert_eq!(tokens[2], 0);
    for name in ["gate_up_proj", "down_proj"] {
        let k = |s: &str| format!("{name}.{s}");
        let shape = fx.shape(&k("w"));
        let (experts, d_in, d_out) = (shape[0], shape[1], shape[2]);
        let lora = LoraExperts::from_weights(
            experts,
            d_in,
            d_out,
            fx.f32(&k("a")),
            fx.f32(&k("b")),
            fx.f64(&k("scaling"))[0] as f32,
        )
        .unwrap();
        assert_eq!(lora.rank(), 2);
        let w = fx.f32(&k("w"));
        let mut grads = lora.zero_grads();
        for e in 0..experts {
            let x = fx.f32(&k(&format!("x.{e}")));
            let n = x.len() / d_in;
            assert_eq!(n as i64, tokens[e]);
            // y = x W[e] (base, [in, out] layout) + the LoRA branch
            let we = &w[e * d_in * d_out..(e + 1) * d_in * d_out];
            let mut y = vec![0f32; n * d_out];
            for i in 0..n {
                for o in 0..d_out {
                    y[i * d_out + o] = (0..d_in).map(|c| x[i * d_in + c] * we[c * d_out + o]).sum();
                }
            }
            let h = lora.forward_expert(e, &x, &mut y).unwrap();
            assert_close(&k(&format!("y expert {e}")), &y, &fx.f32(&k(&format!("y.{e}"))), 1e-6, 1e-5);
            let g = fx.f32(&k(&format!("g.{e}")));
            let mut dx = vec![0f32; n * d_in];
            for i in 0..n {
                for c in 0..d_in {
                    dx[i * d_in + c] = (0..d_out).map(|o| g[i * d_out + o] * we[c * d_out + o]).sum();
                }
            }
            lora.backward_expert(e, &x, &h, &g, Some(&mut dx), &mut grads).unwrap();
            assert_close(&k(&format!("dx expert {e}")), &dx, &fx.f32(&k(&format!("dx.{e}"))), 1e-6, 1e-5);
        }
        // PEFT reaches dA, dB through the materialised ΔW, summing in another order.
        assert_close(&k("dA"), &grads.a, &fx.f32(&k("da")), 4e-6, 1e-5);
        assert_close(&k("dB"), &grads.b, &fx.f32(&k("db")), 4e-6, 1e-5);
        // Expert 2 saw no tokens: its rows of dA and its columns of dB stay exactly zero.
        let r = lora.rank();
        assert!(grads.a[2 * r * d_in..3 * r * d_in].iter().all(|v| *v == 0.0));
        assert!((0..d_out).all(|o| (0..r).all(|kk| grads.b[o * r * experts + kk * experts + 2] == 0.0)));

        let mut merged = w.clone();
        lora.merge_into(&mut merged, ExpertLayout::InOut).unwrap();
        assert_close(&k("merged"), &merged, &fx.f32(&k("merged")), 1e-7, 1e-6);
    }
}
