//! The optimizers, clipping and schedules against fixtures written by the reference implementations
//! (`scripts/optim_fixtures.py`: torch.optim.AdamW, torch clip_grad_norm_, transformers schedules,
//! bitsandbytes 0.50.2 on CPU).

mod common;

use common::{assert_close, Fixture};
use oxtune_optim::quant8::{dequantize_blockwise, quantize_blockwise, DynamicMap, SIGNED_MAP, UNSIGNED_MAP};
use oxtune_optim::{
    clip_grad_norm, AdamW, AdamW8bit, AdamW8bitConfig, AdamWConfig, LrSchedule, Optimizer, Param, ScheduleKind,
};

#[test]
fn adamw_matches_torch_over_ten_steps() {
    let fx = Fixture::open("adamw_torch.safetensors");
    let names = ["w.attn", "w.vec", "w.norm"];
    let mut values: Vec<Vec<f32>> = names.iter().map(|n| fx.f32(&format!("{n}.init"))).collect();
    let mut opt = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-6, weight_decay: 0.1 }).unwrap();
    for (step, &lr) in fx.f64("lrs").iter().enumerate() {
        let grads: Vec<Vec<f32>> = names.iter().map(|n| fx.f32(&format!("{n}.grad.{step}"))).collect();
        let (attn, rest) = values.split_at_mut(1);
        let (vec, norm) = rest.split_at_mut(1);
        let mut params = [
            Param::new("w.attn", &mut attn[0], &grads[0]),
            Param::new("w.vec", &mut vec[0], &grads[1]),
            Param::without_decay("w.norm", &mut norm[0], &grads[2]),
        ];
        opt.step(&mut params, lr).unwrap();
        for (n, v) in names.iter().zip(&values) {
            // f32 rounding differs from torch's vectorised kernels by an ulp or so per operation.
            assert_close(&format!("{n} after step {}", step + 1), v, &fx.f32(&format!("{n}.param.{step}")), 1e-6, 1e-6);
        }
    }
    for n in names {
        let (m, v) = opt.moments(n).unwrap();
        assert_close(&format!("{n}.exp_avg"), m, &fx.f32(&format!("{n}.exp_avg")), 1e-8, 1e-6);
        assert_close(&format!("{n}.exp_avg_sq"), v, &fx.f32(&format!("{n}.exp_avg_sq")), 1e-8, 1e-6);
        assert_eq!(opt.step_count(n), 10);
    }
}

#[test]
fn clip_grad_norm_matches_torch() {
    let fx = Fixture::open("clip_torch.safetensors");
    for tag in ["clipped", "unclipped"] {
        let mut grads: Vec<Vec<f32>> = (0..3).map(|i| fx.f32(&format!("g{i}.before"))).collect();
        let max_norm = fx.f64(&format!("{tag}.max_norm"))[0] as f32;
        let mut views: Vec<&mut [f32]> = grads.iter_mut().map(|g| g.as_mut_slice()).collect();
        let total = clip_grad_norm(&mut views, max_norm).unwrap();
        assert_close(&format!("{tag} total norm"), &[total], &fx.f32(&format!("{tag}.total_norm")), 0.0, 1e-6);
        for (i, g) in grads.iter().enumerate() {
            assert_close(&format!("{tag} g{i}"), g, &fx.f32(&format!("g{i}.{tag}")), 0.0, 1e-6);
        }
    }
}

#[test]
fn schedules_match_transformers() {
    let text = std::fs::read_to_string(common::fixture_path("schedules.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let kind = match case["kind"].as_str().unwrap() {
            "constant" => ScheduleKind::Constant,
            "linear" => ScheduleKind::Linear,
            "cosine" => ScheduleKind::Cosine { num_cycles: 0.5 },
            "cosine_with_min_lr" => {
                ScheduleKind::CosineWithMinLr { num_cycles: 0.5, min_lr_rate: case["min_lr_rate"].as_f64().unwrap() }
            }
            other => panic!("unknown schedule {other}"),
        };
        let (w, n) = (case["warmup"].as_u64().unwrap(), case["total"].as_u64().unwrap());
        let s = LrSchedule::new(kind, case["peak"].as_f64().unwrap(), w, n).unwrap();
        for (k, want) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let (got, want) = (s.lr(k as u64), want.as_f64().unwrap());
            assert!((got - want).abs() <= 1e-12 * want.abs() + 1e-18, "{kind:?} W={w} N={n} k={k}: {got} vs {want}");
        }
    }
}

#[test]
fn dynamic_maps_equal_bitsandbytes_bit_for_bit() {
    let fx = Fixture::open("blockwise8_bnb.safetensors");
    for (name, table) in [("map.signed", &SIGNED_MAP), ("map.unsigned", &UNSIGNED_MAP)] {
        let want = fx.f32(name);
        let mismatched: Vec<usize> = (0..256).filter(|&i| table[i].to_bits() != want[i].to_bits()).collect();
        assert!(mismatched.is_empty(), "{name}: entries {mismatched:?} differ");
    }
    assert_eq!(SIGNED_MAP[127], 0.0);
    assert_eq!(UNSIGNED_MAP[0], 0.0);
    assert_eq!(SIGNED_MAP[255], 1.0);
}

#[test]
fn blockwise_quantize_matches_bitsandbytes_with_a_partial_block() {
    let fx = Fixture::open("blockwise8_bnb.safetensors");
    for (tag, map) in [("signed", DynamicMap::Signed), ("unsigned", DynamicMap::Unsigned)] {
        let x = fx.f32(&format!("{tag}.x"));
        assert_eq!(x.len() % 256, 111, "the fixture must end with a partial block");
        let mut codes = vec![0u8; x.len()];
        let mut absmax = vec![0f32; x.len().div_ceil(256)];
        quantize_blockwise(&x, map, &mut codes, &mut absmax).unwrap();
        assert_eq!(absmax, fx.f32(&format!("{tag}.absmax")), "{tag} absmax");
        let want = fx.u8(&format!("{tag}.q"));
        let bad: Vec<(usize, u8, u8)> =
            (0..x.len()).filter(|&i| codes[i] != want[i]).map(|i| (i, codes[i], want[i])).collect();
        assert!(
            bad.is_empty(),
            "{tag}: {} codes differ (index, got, want): {:?}",
            bad.len(),
            &bad[..bad.len().min(10)]
        );
        let mut deq = vec![0f32; x.len()];
        dequantize_blockwise(&want, &absmax, map, &mut deq).unwrap();
        assert_close(&format!("{tag} dequantized"), &deq, &fx.f32(&format!("{tag}.deq")), 0.0, 0.0);
    }
}

/// bitsandbytes' CPU optimizer (the reference we can run here) quantizes without the sign fix and decays before
/// the step; with weight decay 0 and these gradients neither matters, so the quantized states agree byte for
/// byte. The CPU backend forms `1 - beta2` in f64 while the CUDA kernel (and oxtune) subtract in f32, which
/// moves the second moment by about 1e-6 relative; everything else differs only by f32 rounding.
#[test]
fn adamw8bit_matches_bitsandbytes_cpu() {
    let fx = Fixture::open("adamw8bit_bnb.safetensors");
    let cfg = AdamW8bitConfig {
        adam: AdamWConfig { beta1: 0.9, beta2: 0.995, eps: 1e-8, weight_decay: 0.0 },
        ..AdamW8bitConfig::default()
    };
    let mut opt = AdamW8bit::new(cfg).unwrap();
    let mut big = fx.f32("big.init");
    let mut small = fx.f32("small.init");
    assert!(big.len() >= 4096 && small.len() < 4096 && !big.len().is_multiple_of(256));
    for step in 0..3 {
        let (gb, gs) = (fx.f32(&format!("big.grad.{step}")), fx.f32(&format!("small.grad.{step}")));
        opt.step(&mut [Param::new("big", &mut big, &gb), Param::new("small", &mut small, &gs)], 3e-3).unwrap();
        if step != 0 && step != 2 {
            continue;
        }
        let st = opt.blockwise_state("big").expect("big takes the 8-bit path");
        assert_close(&format!("absmax1 step {step}"), st.absmax1, &fx.f32(&format!("big.absmax1.{step}")), 0.0, 2e-6);
        assert_close(&format!("absmax2 step {step}"), st.absmax2, &fx.f32(&format!("big.absmax2.{step}")), 0.0, 2e-6);
        assert_eq!(st.state1, fx.u8(&format!("big.state1.{step}")), "state1 bytes after step {step}");
        assert_eq!(st.state2, fx.u8(&format!("big.state2.{step}")), "state2 bytes after step {step}");
        assert_close(&format!("big after step {step}"), &big, &fx.f32(&format!("big.param.{step}")), 1e-7, 1e-6);
        assert_close(&format!("small after step {step}"), &small, &fx.f32(&format!("small.param.{step}")), 1e-7, 1e-6);
    }
    let (m, v) = opt.fp32_moments("small").expect("small stays fp32");
    assert_close("small exp_avg", m, &fx.f32("small.state1"), 1e-7, 2e-6);
    assert_close("small exp_avg_sq", v, &fx.f32("small.state2"), 1e-8, 2e-6);
}
