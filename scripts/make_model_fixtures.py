"""Reference fixtures for oxtune's CPU forward pass, made with Hugging Face transformers.

Builds tiny random GPT-OSS checkpoints in the real hub layout (bf16 dense weights, MXFP4 experts as
`*_blocks`/`*_scales`, sharded with `model.safetensors.index.json`), loads them with transformers'
own MXFP4 integration (dequantize=True) in float32, and records inputs, logits, loss and greedy
generations. It also re-saves one model through `save_pretrained` in bf16, which writes the
unquantized expert layout (`gate_up_proj [E, H, 2I]`), to test loading that layout too.

Run (GPU machine or any machine with torch + transformers 5.17):
    python3 scripts/make_model_fixtures.py --out fixtures/model
Outputs per config: fixtures/model/<name>/{config.json, model-*.safetensors, model.safetensors.index.json,
reference.safetensors}. The reference is computed on the CPU in float32 so it is deterministic.
"""
import argparse, json, os, platform

import torch
import transformers
from safetensors.torch import save_file
from transformers import GptOssForCausalLM, Mxfp4Config

CONFIGS = {
    # top-2, 2 layers (sliding, full), window 4 < sequence 12, transformers-4 style rope keys.
    "tiny-top2": dict(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                      num_experts_per_tok=2, sliding_window=4, rope_style="v4"),
    # top-4 of 8, 3 layers, window 5, transformers-5 style `rope_parameters`.
    "tiny-top4": dict(vocab_size=300, hidden_size=96, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                      num_experts_per_tok=4, sliding_window=5, rope_style="v5"),
}
ROPE = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=4096,
            truncate=False)


def config_json(c):
    layers = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(c["num_hidden_layers"])]
    cfg = {k: v for k, v in c.items() if k != "rope_style"}
    cfg.update(architectures=["GptOssForCausalLM"], model_type="gpt_oss", layer_types=layers,
               experts_per_token=c["num_experts_per_tok"], max_position_embeddings=131072, rms_norm_eps=1e-5,
               swiglu_limit=7.0, attention_bias=True, attention_dropout=0.0, tie_word_embeddings=False,
               eos_token_id=299, pad_token_id=298, hidden_act="silu", initializer_range=0.02,
               output_router_logits=False, router_aux_loss_coef=0.9, use_cache=True,
               quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": [
                   "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    if c["rope_style"] == "v4":
        cfg.update(rope_theta=150000.0, rope_scaling=dict(ROPE))
    else:
        cfg.update(rope_parameters=dict(ROPE, rope_theta=150000.0))
    return cfg


def random_checkpoint(c, g):
    """Hub-layout tensors: bf16 dense weights, MXFP4 expert blocks/scales, bf16 expert biases."""
    H, I, E, V = c["hidden_size"], c["intermediate_size"], c["num_local_experts"], c["vocab_size"]
    qw, kw = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    bf = lambda *shape, std=1.0, mean=0.0: (torch.randn(*shape, generator=g) * std + mean).to(torch.bfloat16)
    t = {"model.embed_tokens.weight": bf(V, H), "lm_head.weight": bf(V, H, std=H ** -0.5),
         "model.norm.weight": bf(H, std=0.1, mean=1.0)}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        t[p + "input_layernorm.weight"] = bf(H, std=0.1, mean=1.0)
        t[p + "post_attention_layernorm.weight"] = bf(H, std=0.1, mean=1.0)
        for name, o, i in [("q_proj", qw, H), ("k_proj", kw, H), ("v_proj", kw, H), ("o_proj", H, qw)]:
            t[p + f"self_attn.{name}.weight"] = bf(o, i, std=i ** -0.5)
            t[p + f"self_attn.{name}.bias"] = bf(o, std=0.1)
        t[p + "self_attn.sinks"] = bf(c["num_attention_heads"])  # random, non-zero
        t[p + "mlp.router.weight"] = bf(E, H, std=H ** -0.5)
        t[p + "mlp.router.bias"] = bf(E, std=0.1)
        for name, rows, cols in [("gate_up_proj", 2 * I, H), ("down_proj", H, I)]:
            t[p + f"mlp.experts.{name}_blocks"] = torch.randint(0, 256, (E, rows, cols // 32, 16), generator=g,
                                                                  dtype=torch.uint8)
            # E2M1 magnitudes average ~2.5, so 2^(s-127) ~ 1/(2.5 sqrt(cols)) keeps activations O(1).
            t[p + f"mlp.experts.{name}_scales"] = torch.randint(121, 124, (E, rows, cols // 32), generator=g,
                                                                  dtype=torch.uint8)
            t[p + f"mlp.experts.{name}_bias"] = bf(E, rows, std=0.1)
    return t


def save_sharded(t, out):
    """Two shards named like the hub's converter, resolved through an index."""
    names = sorted(t)
    half = len(names) // 2
    shards = [names[:half], names[half:]]
    weight_map, total = {}, 0
    for i, group in enumerate(shards):
        fname = f"model-{i:05d}-of-{len(shards) - 1:05d}.safetensors"
        save_file({n: t[n].contiguous() for n in group}, os.path.join(out, fname), metadata={"format": "pt"})
        for n in group:
            weight_map[n] = fname
            total += t[n].numel() * t[n].element_size()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fixtures/model")
    a = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    for seed, (name, c) in enumerate(CONFIGS.items()):
        g = torch.Generator().manual_seed(1000 + seed)
        out = os.path.join(a.out, name)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config_json(c), f, indent=2)
        save_sharded(random_checkpoint(c, g), out)

        # transformers dequantizes MXFP4 experts to bf16 (exactly: every E2M1 value times a power of
        # two fits in bf16) and would then run them in bf16; upcast so the whole reference is f32.
        model = GptOssForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager",
                                                  quantization_config=Mxfp4Config(dequantize=True))
        model.float().eval()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        B, T = 2, 12
        ids = torch.randint(0, c["vocab_size"], (B, T), generator=g)
        labels = ids.clone()
        labels[0, :3] = -100
        labels[1, 7:9] = -100
        prompt = torch.randint(0, c["vocab_size"], (1, 5), generator=g)
        with torch.no_grad():
            res = model(input_ids=ids, labels=labels)
            model.generation_config.eos_token_id = None
            model.generation_config.pad_token_id = c["vocab_size"] - 2
            gen = model.generate(prompt, max_new_tokens=10, do_sample=False)[:, prompt.shape[1]:]
        save_file({"input_ids": ids.contiguous(), "labels": labels.contiguous(), "logits": res.logits.float().contiguous(),
                   "loss": res.loss.float().reshape(1), "gen_prompt": prompt.contiguous(), "gen_ids": gen.contiguous()},
                  os.path.join(out, "reference.safetensors"),
                  metadata={"transformers": transformers.__version__, "torch": torch.__version__,
                            "machine": platform.node(), "dtype": "float32", "device": "cpu"})
        print(f"{name}: loss {res.loss.item():.6f}, gen {gen.tolist()}")
        if name == "tiny-top2":
            # The unquantized layout as transformers writes it (experts [E, in, out] bf16). Saving the
            # dequantized MXFP4 model itself writes broken expert keys in 5.17 (`gate_up_proj$`), so
            # copy its weights into a model built without quantization_config and save that.
            dq = os.path.join(a.out, name + "-bf16")
            plain_cfg = model.config.to_dict()
            plain_cfg.pop("quantization_config", None)
            plain = GptOssForCausalLM(transformers.GptOssConfig(**plain_cfg))
            plain.load_state_dict(model.state_dict())
            plain.to(torch.bfloat16).save_pretrained(dq)
            print(f"{dq}: {sorted(os.listdir(dq))}")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
