"""Reference LoRA gradients from PEFT for oxtune's backward pass.

Loads fixtures/model/tiny-top4 (MXFP4 experts, dequantized by transformers, run in float32), wraps
it with PEFT LoRA on q/k/v/o_proj and on the experts (target_parameters gate_up_proj and down_proj),
sets every LoRA A and B to seeded random values (B = 0 would make every A gradient zero), runs the
loss on the model fixture's inputs and backpropagates. Writes
  fixtures/lora/peft-tiny-top4/adapter_config.json, adapter_model.safetensors   (PEFT's own save)
  fixtures/lora/peft-tiny-top4/reference.safetensors   input_ids, labels, logits, loss and
      grad.<key> for every key of adapter_model.safetensors.

Run (GPU machine or any machine with torch, transformers 5.17, peft 0.21):
    python3 scripts/make_lora_fixtures.py
"""
import argparse, os

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GptOssForCausalLM, Mxfp4Config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fixtures/model/tiny-top4")
    ap.add_argument("--out", default="fixtures/lora/peft-tiny-top4")
    a = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    model = GptOssForCausalLM.from_pretrained(a.model, dtype=torch.float32, experts_implementation="eager",
                                              quantization_config=Mxfp4Config(dequantize=True))
    model.float()
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.train()
    ref = load_file(os.path.join(a.model, "reference.safetensors"))
    out = pm(input_ids=ref["input_ids"], labels=ref["labels"])
    out.loss.backward()
    os.makedirs(a.out, exist_ok=True)
    pm.save_pretrained(a.out)
    saved = load_file(os.path.join(a.out, "adapter_model.safetensors"))
    grads = {}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            key = n.replace(".default", "")
            assert key in saved, f"{key} not among the saved adapter keys"
            assert torch.equal(saved[key], p.detach()), key
            grads["grad." + key] = p.grad.detach().float().contiguous()
    assert len(grads) == len(saved), (len(grads), len(saved))
    save_file(dict(grads, input_ids=ref["input_ids"], labels=ref["labels"],
                   logits=out.logits.detach().float().contiguous(), loss=out.loss.detach().float().reshape(1)),
              os.path.join(a.out, "reference.safetensors"),
              metadata={"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__})
    print(f"loss {out.loss.item():.6f}; {len(grads)} LoRA tensors; peft {peft.__version__}")


if __name__ == "__main__":
    main()
