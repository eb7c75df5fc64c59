"""Check `oxtune merge` outputs with Hugging Face transformers.

Loads OUT_BF16 (transformers' unquantized layout) and OUT_MXFP4 (hub MXFP4 layout, dequantized by
transformers' Mxfp4Config(dequantize=True)) with GptOssForCausalLM.from_pretrained, runs both in
float32 on the input_ids of REF.safetensors (or --tokens FILE) and compares their logits with REF's
`logits`: oxtune's base model + adapter, e.g.

    oxtune forward --model BASE --adapter ADAPTER --tokens TOKENS.safetensors --out REF.safetensors

Prints ||got - want|| / ||want|| and the worst |got - want| with its index for each, and exits 1 when
bf16 > --tol-bf16 or mxfp4 > --tol-mxfp4. Those two differences are the merge's own rounding (bf16
once; MXFP4 re-quantization), not a layout question, so the defaults are loose and fit the tiny
fixtures' large random adapter (measured 2.17e-2 and 3.49e-1).

The file-format check is --oxtune-bf16 / --oxtune-mxfp4: oxtune's logits of the *merged* directories
(`oxtune forward --model OUT_BF16 ...`); transformers must read the same weights, so these compare at
--tol-parity (default 1e-4; measured on the CPU: 1.2e-6 bf16, 1.9e-6 mxfp4).

Runs on CUDA when available, else on the CPU (--device).

    python3 scripts/check_merge.py OUT_BF16 OUT_MXFP4 REF.safetensors [--tokens TOKENS.safetensors] \
        [--oxtune-bf16 FWD_BF16.safetensors --oxtune-mxfp4 FWD_MXFP4.safetensors]
"""
import argparse
import sys

import torch
import transformers
from safetensors.torch import load_file
from transformers import GptOssForCausalLM, Mxfp4Config


def logits_of(model_dir, ids, device, quantized):
    kw = dict(dtype=torch.float32, experts_implementation="eager")
    if quantized:
        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    model = GptOssForCausalLM.from_pretrained(model_dir, **kw).float().to(device).eval()
    with torch.no_grad():
        out = model(input_ids=ids.to(device)).logits.float().cpu()
    del model
    return out


def compare(name, got, want, tol):
    if got.shape != want.shape:
        print(f"{name}: logits shape {tuple(got.shape)} != reference {tuple(want.shape)}")
        return False
    diff = (got - want).abs()
    rel = ((got - want).norm() / want.norm()).item()
    worst = int(diff.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), got.shape))
    ok = rel <= tol
    print(f"{name}: ||got - want|| / ||want|| = {rel:.3e} (tolerance {tol:.1e}) worst |diff| {diff.max().item():.3e} "
          f"at {idx} (got {got[idx].item():.6f}, want {want[idx].item():.6f}) -> {'ok' if ok else 'FAIL'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_bf16")
    ap.add_argument("out_mxfp4")
    ap.add_argument("ref", help="safetensors with `logits` (F32 [B, T, V]) and, unless --tokens, `input_ids`")
    ap.add_argument("--tokens", help="safetensors with `input_ids` (I64 [B, T])")
    # bf16: the merged weights are rounded to bf16 once; 1e-2 relative leaves room for that rounding
    # across a deep model. mxfp4: re-quantizing the merged experts (oxtune prints its weight error).
    ap.add_argument("--tol-bf16", type=float, default=3e-2)
    ap.add_argument("--tol-mxfp4", type=float, default=0.5)
    ap.add_argument("--oxtune-bf16", help="oxtune forward logits of OUT_BF16")
    ap.add_argument("--oxtune-mxfp4", help="oxtune forward logits of OUT_MXFP4")
    ap.add_argument("--tol-parity", type=float, default=1e-4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 logits, as on the CPU
    ref = load_file(a.ref)
    if "logits" not in ref:
        sys.exit(f"{a.ref}: no `logits` tensor")
    ids = (load_file(a.tokens) if a.tokens else ref).get("input_ids")
    if ids is None:
        sys.exit(f"no `input_ids` in {a.tokens or a.ref}; pass --tokens FILE")
    want = ref["logits"].float()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {a.device}, "
          f"input_ids {tuple(ids.shape)}")
    got_bf16 = logits_of(a.out_bf16, ids, a.device, False)
    got_mx = logits_of(a.out_mxfp4, ids, a.device, True)
    ok = compare("bf16 merge  vs base + adapter", got_bf16, want, a.tol_bf16)
    ok &= compare("mxfp4 merge vs base + adapter", got_mx, want, a.tol_mxfp4)
    for name, got, path in [("bf16 merge ", got_bf16, a.oxtune_bf16), ("mxfp4 merge", got_mx, a.oxtune_mxfp4)]:
        if path:
            ok &= compare(f"{name} transformers vs oxtune", got, load_file(path)["logits"].float(), a.tol_parity)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
