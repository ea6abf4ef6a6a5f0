"""
Hugging Face's GPT-2, both ways: import a GPT2LMHeadModel folder (or download one from the hub), export
a model as such a folder, and export LoRA adapters as a PEFT adapter folder. export_hf.py is the command.

GPT-2 is this project's architecture with layernorm, biases, tanh-approximated GELU ("gelu_new") and
learned positions; its matmul weights are stored as Conv1D, shaped (in, out): the transpose of nn.Linear's.
"""
import json
import os
import pickle

import torch

from configurator import InputError
from model import GPT, GPTConfig

HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# config.json settings under which GPT2LMHeadModel computes something this architecture does not, with
# the value that matches it: another activation, attention scores not scaled by 1/sqrt(head size) or also
# by 1/layer, cross-attention to an encoder, an output head of its own
GPT2_AS_HERE = {"activation_function": "gelu_new", "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False, "tie_word_embeddings": True}


def from_hf_gpt2(folder, dropout=0.0):
    """A GPT from a Hugging Face GPT-2 folder: config.json plus model.safetensors or pytorch_model.bin."""
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{folder} holds a {hf.get('model_type')} model; only GPT-2 checkpoints can be imported")
    other = [f"{k}={hf[k]}" for k, v in GPT2_AS_HERE.items() if hf.get(k, v) != v]
    if other:
        raise ValueError(f"{folder} is a GPT-2 with {', '.join(other)}, which this model does not compute; "
                         f"only plain GPT-2 checkpoints can be imported")
    weights = os.path.join(folder, "model.safetensors")
    if os.path.exists(weights):
        from safetensors.torch import load_file
        state = load_file(weights)
    else:
        try:
            state = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{folder}/pytorch_model.bin contains Python objects that are not plain data; "
                             f"refusing to load it (it may run code)") from None
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, bias=True, norm="layernorm",
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp_hidden=hf.get("n_inner") or 0)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name == "lm_head.weight":
                continue  # tied to wte
            w = state[name.removeprefix("transformer.")]
            p.copy_(w.t() if name.endswith(HF_TRANSPOSED) else w)
    return model


def check_gpt2_can_hold(c):
    """A ValueError unless GPT2LMHeadModel can compute the model of GPTConfig c."""
    beyond = [f"{key}={getattr(c, key)}" for key, gpt2 in (("norm", "layernorm"), ("pos", "learned"), ("mlp", "gelu"),
                                                          ("qk_norm", False)) if getattr(c, key) != gpt2]
    if beyond:
        raise ValueError(f"GPT-2 cannot hold a model with {', '.join(beyond)}; only layernorm, learned positions, "
                         f"a gelu MLP and no qk_norm can be exported")


def to_hf_gpt2(model, folder, eot_token=None):
    """Write model as a Hugging Face GPT-2 folder that GPT2LMHeadModel.from_pretrained loads."""
    from safetensors.torch import save_file
    c = model.config
    check_gpt2_can_hold(c)
    state = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # transformers ties it to wte itself
        state[name] = (p.t() if name.endswith(HF_TRANSPOSED) else p).contiguous()
    if not c.bias:  # GPT-2 always has biases: zeros compute the same function
        for name, p in list(state.items()):
            if name.endswith("weight") and ("ln_" in name or name.endswith(HF_TRANSPOSED)):
                out_features = p.shape[-1] if name.endswith(HF_TRANSPOSED) else p.shape[0]
                state[name[:-len("weight")] + "bias"] = torch.zeros(out_features, dtype=p.dtype)
    hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
          "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
          "n_inner": c.mlp_hidden or None, "activation_function": "gelu_new", "layer_norm_epsilon": c.norm_eps,
          "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
          "tie_word_embeddings": True, "bos_token_id": eot_token, "eos_token_id": eot_token}
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().cpu().float() for k, v in state.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)


def to_peft_adapter(adapters, lora, config, folder):
    """Write LoRA adapters (GPT.adapters() of a model of GPTConfig config, trained with the settings in lora)
    as a PEFT adapter folder, which peft.PeftModel.from_pretrained puts on the base's GPT2LMHeadModel.
    The factors need no transpose: PEFT keeps A (rank, in) and B (out, rank) for GPT-2's Conv1D too, and
    fan_in_fan_out tells it that the base weight beside them is stored (in, out)."""
    from safetensors.torch import save_file
    check_gpt2_can_hold(config)
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
                   "base_model_name_or_path": lora["base"].removeprefix("hf:"),
                   "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
                   "target_modules": lora["targets"], "fan_in_fan_out": True, "bias": "none", "inference_mode": True}
    state = {f"base_model.model.{name}.weight": p.detach().cpu().float().contiguous() for name, p in adapters.items()}
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(peft_config, f, indent=1)


def load_gpt2(source, dropout=0.0):
    """GPT-2 weights from a local Hugging Face folder (hf:FOLDER) or from the hub by name (gpt2, gpt2-medium...)."""
    folder = source.removeprefix("hf:") if source.startswith("hf:") else ""
    if not folder:
        try:
            from huggingface_hub import snapshot_download
            folder = snapshot_download(source, allow_patterns=["config.json", "model.safetensors"])
        except Exception as e:
            raise InputError(f"could not download {source} from the Hugging Face hub ({type(e).__name__}); "
                             f"without internet, copy its folder here and use --init_from=hf:FOLDER") from None
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise InputError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        return from_hf_gpt2(folder, dropout)
    except (ValueError, KeyError, OSError) as e:
        raise InputError(f"could not import {folder}: {e}") from None
