"""PEFT interoperability of oxtune's LoRA adapter files for gpt-oss, both directions.

(a) `write-fixture DIR`: builds a tiny GptOssForCausalLM (2 layers, hidden 64, 4 experts, fp32, unquantized
    experts), applies a PEFT LoRA on q/k/v/o_proj plus `target_parameters` mlp.experts.gate_up_proj and
    mlp.experts.down_proj, randomises every lora_B (PEFT starts it at zero, which would hide layout mistakes),
    and saves the adapter to DIR with `save_pretrained`. Next to it, `reference.safetensors` holds PEFT's own
    `get_delta_weight` for layer 0's q_proj, gate_up_proj and down_proj, and `tiny_config.json` the model
    config, so the Rust tests can check names, shapes, values and the expert layout of a PEFT-made adapter.

(b) `check DIR [--reference PEFT_DIR] [--allow-unrelated-warnings]`: loads an adapter directory written by
    oxtune into the same tiny model with `PeftModel.from_pretrained` and asserts
      * no warnings at all while loading (PEFT warns on missing or unexpected adapter keys; with
        --allow-unrelated-warnings only warnings about keys fail, others are printed), and no
        missing/unexpected LoRA keys when the state dict is set explicitly;
      * every LoRA parameter of the model equals the tensor in the file;
      * the logits equal those of the base model whose weights were merged by hand from the file, with the
        formulas oxtune implements (dense: W += s B A; experts [E, in, out]: W[e] += s (B_e A_e)^T with
        A_e = rows e*r..e*r+r of A and B_e = columns k*E + e of B);
      * with --reference, the logits equal those of PEFT on PEFT_DIR (round trip): bit for bit on CPU, within
        1e-6 on CUDA, where the experts' index_add_ accumulates in a nondeterministic order.

The model is built from a fixed seed on CPU (then moved to CUDA if available), so (a) and (b) and runs on
different machines see the same base weights. Run with the project venv, e.g.
    /work/pyenv/bin/python scripts/lora_peft_interop.py write-fixture fixtures/lora/peft_gptoss
    cargo run -p oxtune-lora --example write_peft_interop -- fixtures/lora/peft_gptoss /tmp/oxtune-interop
    /work/pyenv/bin/python scripts/lora_peft_interop.py check /tmp/oxtune-interop/roundtrip \
        --reference fixtures/lora/peft_gptoss
    /work/pyenv/bin/python scripts/lora_peft_interop.py check /tmp/oxtune-interop/fresh
"""

import argparse
import json
import logging
import os
import re
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import GptOssConfig, GptOssForCausalLM

R, ALPHA = 4, 8
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_config():
    return GptOssConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=32,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=128,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )


def base_model():
    torch.manual_seed(0)
    model = GptOssForCausalLM(tiny_config()).float().eval()
    # transformers initialises the router and expert tensors; draw every parameter so nothing is left at zero.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model.to(DEVICE)


def input_ids():
    return torch.arange(2 * 24, device=DEVICE).reshape(2, 24) * 7 % 128


def write_fixture(out):
    os.makedirs(out, exist_ok=True)
    model = base_model()
    cfg = LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=TARGET_MODULES,
        target_parameters=TARGET_PARAMETERS,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(p.device))
    peft_model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))  # the generated model card is not part of the interop contract
    # PEFT keeps target_modules as a set, so its order in the file changes from run to run; sort it so that
    # re-running the script reproduces the fixture byte for byte.
    config_path = os.path.join(out, "adapter_config.json")
    with open(config_path) as f:
        saved = json.load(f)
    saved["target_modules"] = sorted(saved["target_modules"])
    with open(config_path, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)

    layer0 = peft_model.base_model.model.model.layers[0]
    down_wrapper = layer0.mlp.experts  # outer ParamWrapper: down_proj, registered second
    gate_up_wrapper = down_wrapper.base_layer  # inner ParamWrapper: gate_up_proj
    assert down_wrapper.parameter_name == "down_proj" and gate_up_wrapper.parameter_name == "gate_up_proj"
    ref = {
        "layers.0.self_attn.q_proj.delta": layer0.self_attn.q_proj.get_delta_weight("default"),
        "layers.0.mlp.experts.gate_up_proj.delta": gate_up_wrapper.get_delta_weight("default"),
        "layers.0.mlp.experts.down_proj.delta": down_wrapper.get_delta_weight("default"),
    }
    save_file({k: v.detach().float().cpu().contiguous() for k, v in ref.items()}, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "tiny_config.json"), "w") as f:
        json.dump(tiny_config().to_dict(), f, indent=1, sort_keys=True, default=str)
    print(f"wrote PEFT adapter fixture to {out}")


def hand_merged_logits(adapter_dir):
    """Logits of the base model with the adapter merged by hand from the file (oxtune's formulas)."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        acfg = json.load(f)
    r, alpha = acfg["r"], acfg["lora_alpha"]
    s = alpha / (r**0.5) if acfg.get("use_rslora") else alpha / r
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    model = base_model()
    prefix = "base_model.model."
    with torch.no_grad():
        for layer_idx, layer in enumerate(model.model.layers):
            for proj in TARGET_MODULES:
                key = f"{prefix}model.layers.{layer_idx}.self_attn.{proj}"
                a, b = tensors[f"{key}.lora_A.weight"].to(DEVICE), tensors[f"{key}.lora_B.weight"].to(DEVICE)
                getattr(layer.self_attn, proj).weight += s * (b @ a)
            experts = layer.mlp.experts
            n_exp = experts.gate_up_proj.shape[0]
            for param, key in (
                ("gate_up_proj", f"{prefix}model.layers.{layer_idx}.mlp.experts.base_layer"),
                ("down_proj", f"{prefix}model.layers.{layer_idx}.mlp.experts"),
            ):
                a, b = tensors[f"{key}.lora_A.weight"].to(DEVICE), tensors[f"{key}.lora_B.weight"].to(DEVICE)
                w = getattr(experts, param)
                for e in range(n_exp):
                    a_e = a[e * r : (e + 1) * r, :]  # [r, in]
                    b_e = b[:, e::n_exp]  # [out, r], columns k*E + e
                    w[e] += s * (b_e @ a_e).T  # [in, out]
        return model(input_ids()).logits


def check(adapter_dir, reference, allow_unrelated_warnings):
    model = base_model()
    logging.captureWarnings(True)
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler = Collect()
    logging.getLogger().addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    logging.getLogger().removeHandler(handler)
    messages = [str(w.message) for w in caught] + records
    about_keys = [m for m in messages if re.search(r"missing|unexpected|key", m, re.IGNORECASE)]
    if allow_unrelated_warnings:
        for m in messages:
            if m not in about_keys:
                print(f"note: unrelated warning while loading: {m}")
        messages = about_keys
    assert not messages, f"warnings while loading {adapter_dir}: {messages}"

    weights = load_peft_weights(adapter_dir, device=DEVICE)
    result = set_peft_model_state_dict(peft_model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    assert not missing and not result.unexpected_keys, f"missing {missing}, unexpected {result.unexpected_keys}"

    file_tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    lora_params = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(lora_params) == len(file_tensors), f"{len(lora_params)} LoRA parameters, {len(file_tensors)} in file"
    for name, p in lora_params.items():
        key = name.replace(".default", "")
        assert key in file_tensors, f"model parameter {name} has no tensor {key} in the file"
        assert torch.equal(p.detach().cpu(), file_tensors[key].to(p.dtype)), f"{key} differs after loading"

    with torch.no_grad():
        got = peft_model(input_ids()).logits
        want = hand_merged_logits(adapter_dir)
    err = (got - want).abs().max().item()
    assert err <= 1e-4, f"PEFT logits differ from the hand-merged model by {err}"
    base = base_model()
    with torch.no_grad():
        moved = (got - base(input_ids()).logits).abs().max().item()
    assert moved > 1e-3, f"the adapter barely changes the logits ({moved}); the check would be vacuous"
    print(f"{adapter_dir}: no load warnings, {len(file_tensors)} tensors equal, logits vs hand merge max |diff| {err:.2e}")

    if reference:
        ref_model = PeftModel.from_pretrained(base_model(), reference).eval()
        with torch.no_grad():
            ref_logits = ref_model(input_ids()).logits
        diff = (got - ref_logits).abs().max().item()
        if DEVICE == "cpu":
            assert torch.equal(got, ref_logits), f"logits differ from PEFT on {reference}: {diff}"
        else:
            assert diff <= 1e-6, f"logits differ from PEFT on {reference}: {diff}"
        print(f"{adapter_dir}: logits equal to PEFT on {reference} (max |diff| {diff:.1e})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-fixture")
    w.add_argument("dir")
    c = sub.add_parser("check")
    c.add_argument("dir")
    c.add_argument("--reference")
    c.add_argument("--allow-unrelated-warnings", action="store_true")
    args = parser.parse_args()
    print(f"device {DEVICE}, torch {torch.__version__}")
    if args.cmd == "write-fixture":
        write_fixture(args.dir)
    else:
        check(args.dir, args.reference, args.allow_unrelated_warnings)


if __name__ == "__main__":
    main()
