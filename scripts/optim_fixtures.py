"""Writes the golden fixtures for the `optim` crate (fixtures/optim/), from the reference implementations:

* torch.optim.AdamW (single-tensor path, CPU) over 10 steps with a varying learning rate,
* torch.nn.utils.clip_grad_norm_,
* transformers' get_*_schedule_with_warmup learning-rate schedules,
* bitsandbytes' dynamic 8-bit maps, its blockwise 8-bit quantize/dequantize, and its AdamW8bit optimizer
  run on CPU (weight decay 0, where bitsandbytes' CPU and CUDA update orders agree).

bitsandbytes 0.50.2 has two CPU quantizers. Its native CPU library (`cquantize_blockwise_cpu_fp32`, what
`quantize_blockwise` dispatches to on CPU) searches an approximate grid and, for normalised values below about
1e-4, returns codes several steps away from the nearest one (431 of 1391 codes in our fixture), unlike the CUDA
kernel. Its pure-torch "default" backend picks the nearest code by bucketizing on the code midpoints, which is
what the CUDA kernel's binary search computes. The fixtures use the default backend (reached through the
dispatcher's CompositeExplicitAutograd key), also inside the CPU optimizer, because oxtune follows the CUDA kernel.

Run from the repository root with the project venv:  /work/pyenv/bin/python scripts/optim_fixtures.py
Every input is drawn from a seeded generator, so re-running reproduces the files bit for bit.
"""

import json
import os
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from safetensors.torch import save_file
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "optim")


def adamw_torch(gen):
    """Three tensors (one excluded from weight decay) stepped 10 times with lr changing every step."""
    shapes = {"w.attn": (33, 17), "w.vec": (300,), "w.norm": (5,)}
    params = {k: torch.nn.Parameter(torch.randn(s, generator=gen)) for k, s in shapes.items()}
    opt = torch.optim.AdamW(
        [
            {"params": [params["w.attn"], params["w.vec"]], "weight_decay": 0.1},
            {"params": [params["w.norm"]], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.99),
        eps=1e-6,
        foreach=False,
        fused=False,
    )
    out = {f"{k}.init": p.detach().clone() for k, p in params.items()}
    lrs = []
    for step in range(10):
        lr = 1e-2 * (1.0 + 0.5 * step) / (1.0 + step * step * 0.1)
        lrs.append(lr)
        for g in opt.param_groups:
            g["lr"] = lr
        for k, p in params.items():
            p.grad = torch.randn(p.shape, generator=gen) * (0.1 + step)
            out[f"{k}.grad.{step}"] = p.grad.clone()
        opt.step()
        for k, p in params.items():
            out[f"{k}.param.{step}"] = p.detach().clone()
    for k, p in params.items():
        st = opt.state[p]
        out[f"{k}.exp_avg"] = st["exp_avg"].clone()
        out[f"{k}.exp_avg_sq"] = st["exp_avg_sq"].clone()
    out["lrs"] = torch.tensor(lrs, dtype=torch.float64)
    save_file(out, os.path.join(OUT, "adamw_torch.safetensors"))


def clip(gen):
    grads = [torch.randn(s, generator=gen) for s in [(40, 3), (77,), (2, 5, 7)]]
    out = {f"g{i}.before": g.clone() for i, g in enumerate(grads)}
    for max_norm in (1.0, 1e3):
        ps = []
        for g in grads:
            p = torch.nn.Parameter(torch.zeros_like(g))
            p.grad = g.clone()
            ps.append(p)
        total = torch.nn.utils.clip_grad_norm_(ps, max_norm)
        tag = "clipped" if max_norm == 1.0 else "unclipped"
        out[f"{tag}.max_norm"] = torch.tensor([max_norm], dtype=torch.float64)
        out[f"{tag}.total_norm"] = total.reshape(1)
        for i, p in enumerate(ps):
            out[f"g{i}.{tag}"] = p.grad.clone()
    save_file(out, os.path.join(OUT, "clip_torch.safetensors"))


def schedules():
    peak = 2e-4
    cases = []

    def run(name, make, warmup, total, extra):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
        sched = make(opt)
        lrs = []
        for _ in range(total + 4):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        cases.append({"kind": name, "warmup": warmup, "total": total, "peak": peak, "lrs": lrs, **extra})

    for warmup, total in [(0, 20), (3, 20), (7, 50)]:
        run("constant", lambda o: get_constant_schedule_with_warmup(o, warmup), warmup, total, {})
        run("linear", lambda o: get_linear_schedule_with_warmup(o, warmup, total), warmup, total, {})
        run("cosine", lambda o: get_cosine_schedule_with_warmup(o, warmup, total), warmup, total, {})
        run(
            "cosine_with_min_lr",
            lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, warmup, total, min_lr_rate=0.1),
            warmup,
            total,
            {"min_lr_rate": 0.1},
        )
    with open(os.path.join(OUT, "schedules.json"), "w") as f:
        json.dump(cases, f, indent=1)


def quantize_blockwise_nearest(x, code):
    """bitsandbytes' default-backend blockwise quantizer (see the module docstring)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, x.contiguous(), code, 256)


def blockwise8(gen):
    signed = bnbf.create_dynamic_map(signed=True)
    unsigned = bnbf.create_dynamic_map(signed=False)
    out = {"map.signed": signed.clone(), "map.unsigned": unsigned.clone()}
    # 5 blocks of 256 plus a partial block of 111; magnitudes spread over several decades per block.
    n = 5 * 256 + 111
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3)
    for tag, values, code in (("signed", x, signed), ("unsigned", x.abs() * x.abs(), unsigned)):
        q, absmax = quantize_blockwise_nearest(values, code.clone())
        out[f"{tag}.x"] = values
        out[f"{tag}.q"] = q
        out[f"{tag}.absmax"] = absmax
        out[f"{tag}.deq"] = bnbf.dequantize_blockwise(q, absmax=absmax, code=code.clone(), blocksize=256)
    save_file(out, os.path.join(OUT, "blockwise8_bnb.safetensors"))


def adamw8bit_bnb(gen):
    """bitsandbytes AdamW8bit on CPU. One tensor takes the 8-bit path (>= 4096 elements, with a partial
    256-block), one stays in fp32 (< 4096). Weight decay is 0 because bitsandbytes' CPU backend decays before
    the Adam step while its CUDA kernels (which oxtune follows) decay after it."""
    import bitsandbytes.backends.cpu.ops as cpu_ops

    def requantize(A_fp32, code, absmax_out, out_uint8, blocksize):
        out, absmax = quantize_blockwise_nearest(A_fp32, code)
        out_uint8.copy_(out)
        absmax_out.copy_(absmax)

    cpu_ops._quant_blockwise_fp32_direct = requantize
    big = torch.nn.Parameter(torch.randn(4096 + 300, generator=gen) * 0.5)
    small = torch.nn.Parameter(torch.randn(700, generator=gen) * 0.5)
    opt = bnb.optim.AdamW8bit([big, small], lr=3e-3, betas=(0.9, 0.995), eps=1e-8, weight_decay=0.0)
    out = {"big.init": big.detach().clone(), "small.init": small.detach().clone()}
    for step in range(3):
        for name, p in (("big", big), ("small", small)):
            p.grad = torch.randn(p.shape, generator=gen) * (1.0 + step)
            out[f"{name}.grad.{step}"] = p.grad.clone()
        opt.step()
        if step not in (0, 2):
            continue
        for name, p in (("big", big), ("small", small)):
            out[f"{name}.param.{step}"] = p.detach().clone()
        st = opt.state[big]
        out[f"big.state1.{step}"] = st["state1"].clone()
        out[f"big.state2.{step}"] = st["state2"].clone()
        out[f"big.absmax1.{step}"] = st["absmax1"].clone()
        out[f"big.absmax2.{step}"] = st["absmax2"].clone()
    st = opt.state[small]
    out["small.state1"] = st["state1"].clone()
    out["small.state2"] = st["state2"].clone()
    save_file(out, os.path.join(OUT, "adamw8bit_bnb.safetensors"))


def print_rust_maps():
    """Prints the two maps as the Rust constants pasted into optim/src/quant8.rs (`--print-maps`)."""
    import numpy as np

    def lit(v):
        mantissa, exp = np.format_float_scientific(v, unique=True).split("e")
        mantissa = mantissa + "0" if mantissa.endswith(".") else mantissa
        return mantissa if int(exp) == 0 else f"{mantissa}e{int(exp)}"

    for name, signed in (("SIGNED_MAP", True), ("UNSIGNED_MAP", False)):
        vals = bnbf.create_dynamic_map(signed=signed).numpy().astype(np.float32)
        print(f"pub const {name}: [f32; 256] = [")
        for i in range(0, 256, 8):
            print("    " + " ".join(f"{lit(v)}," for v in vals[i : i + 8]))
        print("];")


def main():
    if "--print-maps" in sys.argv:
        print_rust_maps()
        return
    os.makedirs(OUT, exist_ok=True)
    adamw_torch(torch.Generator().manual_seed(1))
    clip(torch.Generator().manual_seed(2))
    schedules()
    blockwise8(torch.Generator().manual_seed(3))
    adamw8bit_bnb(torch.Generator().manual_seed(4))
    print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}; wrote {OUT}")


if __name__ == "__main__":
    main()
