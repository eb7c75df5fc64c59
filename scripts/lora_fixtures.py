"""Writes the golden fixtures for the `lora` crate (fixtures/lora/) from the reference implementations:

* nf4_bnb.safetensors: bitsandbytes 0.50.2 NF4 quantization (`quantize_4bit`, blocksize 64) of bf16 weights,
  with and without double quantization of the absmax, and `dequantize_4bit`. bitsandbytes quantizes NF4 on CPU
  with its pure-torch default backend (nearest code, like the CUDA kernel). The nested 8-bit absmax
  quantization would go through its native CPU library, whose approximate grid search returns codes several
  steps from the nearest one for small normalised values, unlike the CUDA kernel; so for this script
  `bitsandbytes.functional.quantize_blockwise` is routed to bitsandbytes' own default-backend kernel.
* lora_linear_peft.safetensors: PEFT LoRA on an nn.Linear (r=4, alpha=8, dropout 0.25 in train mode; and an
  rsLoRA variant without dropout) with random B: input, output, dropout keep mask (captured with a hook),
  upstream gradient, autograd dx / dA / dB, and the weight after `merge_and_unload`.
* lora_experts_peft.safetensors: PEFT `target_parameters` LoRA on transformers' GptOssExperts (E=4, H=32,
  I=24, r=2, alpha=6) with random B: for each of gate_up_proj [E, H, 2I] and down_proj [E, I, H], per-expert
  inputs (expert 2 routed no tokens), the outputs x @ W_eff[e] through PEFT's parametrization, autograd
  gradients, and PEFT's merged weights.

Run from the repository root:  /work/pyenv/bin/python scripts/lora_fixtures.py
"""

import os

import bitsandbytes.functional as bnbf
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "lora")


def use_nearest_blockwise_quantizer():
    """Routes `bitsandbytes.functional.quantize_blockwise` (which `quantize_4bit` calls for the nested absmax)
    to bitsandbytes' default-backend kernel, reached through the dispatcher's CompositeExplicitAutograd key."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    op = torch.ops.bitsandbytes.quantize_blockwise.default

    def nearest(A, code=None, absmax=None, out=None, blocksize=4096, nested=False):
        assert absmax is None and out is None and not nested
        code = bnbf.create_dynamic_map().to(A.device) if code is None else code
        q, am = op.redispatch(keys, A.contiguous(), code, blocksize)
        return q, bnbf.QuantState(absmax=am, code=code.clone(), blocksize=blocksize, dtype=A.dtype)

    bnbf.quantize_blockwise = nearest


def nf4(gen):
    use_nearest_blockwise_quantizer()
    out = {"nf4.code": bnbf.get_4bit_type("nf4", device="cpu").float()}
    # 585 blocks of 64 (3 nested blocks of 256, the last partial) and 37440 elements.
    w = (torch.randn(72, 520, generator=gen) * torch.exp(torch.randn(72, 1, generator=gen))).to(torch.bfloat16)
    w.view(-1)[26 * 64 : 27 * 64] = 0  # an all-zero block (block 26): absmax 0
    packed, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    out["dq.w"] = w
    out["dq.packed"] = packed.reshape(-1)
    out["dq.qabsmax"] = st.absmax
    out["dq.offset"] = st.offset.reshape(1).float()
    out["dq.nested_absmax"] = st.state2.absmax
    out["dq.absmax"] = bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset
    out["dq.deq"] = bnbf.dequantize_4bit(packed, st)
    # An odd element count (385 = 6 blocks of 64 plus one element), fp32 absmax.
    w = torch.randn(5, 77, generator=gen).to(torch.bfloat16)
    packed, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    out["plain.w"] = w
    out["plain.packed"] = packed.reshape(-1)
    out["plain.absmax"] = st.absmax
    out["plain.deq"] = bnbf.dequantize_4bit(packed, st)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "nf4_bnb.safetensors"))


class One(torch.nn.Module):
    def __init__(self, d_in, d_out, gen):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(d_out, d_in, generator=gen) * 0.1)
            self.proj.bias.copy_(torch.randn(d_out, generator=gen))

    def forward(self, x):
        return self.proj(x)


def lora_linear(gen):
    out = {}
    for tag, cfg in (
        ("dropout", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules=["proj"])),
        ("rslora", LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["proj"])),
    ):
        base = One(40, 24, gen)
        w0, b0 = base.proj.weight.detach().clone(), base.proj.bias.detach().clone()
        model = get_peft_model(base, cfg)
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(torch.randn(24, 4, generator=gen) * 0.2)
        model.train()
        captured = {}
        layer.lora_dropout["default"].register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
        x = torch.randn(6, 40, generator=gen, requires_grad=True)
        torch.manual_seed(5)
        y = model(x)
        g = torch.randn(6, 24, generator=gen)
        y.backward(g)
        out[f"{tag}.x"] = x.detach()
        out[f"{tag}.w"] = w0
        out[f"{tag}.bias"] = b0
        out[f"{tag}.a"] = layer.lora_A["default"].weight.detach().clone()
        out[f"{tag}.b"] = layer.lora_B["default"].weight.detach().clone()
        out[f"{tag}.scaling"] = torch.tensor([layer.scaling["default"]], dtype=torch.float64)
        out[f"{tag}.keep"] = (captured["out"] != 0).to(torch.uint8)
        out[f"{tag}.y"] = y.detach()
        out[f"{tag}.g"] = g
        out[f"{tag}.dx"] = x.grad
        out[f"{tag}.da"] = layer.lora_A["default"].weight.grad
        out[f"{tag}.db"] = layer.lora_B["default"].weight.grad
        out[f"{tag}.merged"] = model.merge_and_unload().proj.weight.detach().clone()
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "lora_linear_peft.safetensors"))


class Block(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.experts = GptOssExperts(cfg)


def lora_experts(gen):
    cfg = GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=4)
    block = Block(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    base = {n: getattr(block.experts, n).detach().clone() for n in ("gate_up_proj", "down_proj")}
    lcfg = LoraConfig(r=2, lora_alpha=6, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    model = get_peft_model(block, lcfg)
    outer = model.base_model.model.experts
    wrappers = {outer.parameter_name: outer, outer.base_layer.parameter_name: outer.base_layer}
    with torch.no_grad():
        for wr in wrappers.values():
            wr.lora_B["default"].weight.copy_(torch.randn(wr.lora_B["default"].weight.shape, generator=gen) * 0.2)
    experts = outer.get_base_layer()
    tokens = [3, 5, 0, 4]  # expert 2 gets no tokens
    out = {"tokens": torch.tensor(tokens, dtype=torch.int64)}
    for name, wr in wrappers.items():
        d_in = base[name].shape[1]
        xs = [torch.randn(n, d_in, generator=gen, requires_grad=True) for n in tokens]
        with wr._activate_lora(wr.active_adapters):
            w_eff = getattr(experts, name)  # W + delta, through PEFT's parametrization
            ys = [x @ w_eff[e] for e, x in enumerate(xs)]
        gs = [torch.randn(y.shape, generator=gen) for y in ys]
        sum((y * g).sum() for y, g in zip(ys, gs)).backward()
        out[f"{name}.w"] = base[name]
        out[f"{name}.a"] = wr.lora_A["default"].weight.detach().clone()
        out[f"{name}.b"] = wr.lora_B["default"].weight.detach().clone()
        out[f"{name}.scaling"] = torch.tensor([wr.scaling["default"]], dtype=torch.float64)
        out[f"{name}.da"] = wr.lora_A["default"].weight.grad
        out[f"{name}.db"] = wr.lora_B["default"].weight.grad
        for e in range(len(tokens)):
            out[f"{name}.x.{e}"] = xs[e].detach()
            out[f"{name}.y.{e}"] = ys[e].detach()
            out[f"{name}.g.{e}"] = gs[e]
            out[f"{name}.dx.{e}"] = xs[e].grad if xs[e].grad is not None else torch.zeros_like(xs[e])
    merged = model.merge_and_unload().experts
    for name in wrappers:
        out[f"{name}.merged"] = getattr(merged, name).detach().clone()
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "lora_experts_peft.safetensors"))


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)  # PEFT initialises lora_A from the global generator
    nf4(torch.Generator().manual_seed(1))
    lora_linear(torch.Generator().manual_seed(2))
    lora_experts(torch.Generator().manual_seed(3))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
