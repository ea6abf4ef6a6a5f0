"""
Write a checkpoint of this project as a Hugging Face GPT-2 folder:

    python export_hf.py --out_dir=checkpoint/shakespeare --to=hf/shakespeare

then in Python: transformers.GPT2LMHeadModel.from_pretrained("hf/shakespeare").
Models with settings GPT-2 cannot express (rmsnorm) are refused. The tokenizer stays
this project's: meta.json is copied beside the weights.

A LoRA run exports as its base with the adapters merged in, or with --adapter_only as a PEFT
adapter folder (adapter_config.json, adapter_model.safetensors) for the base's GPT-2 folder:

    python export_hf.py --out_dir=checkpoint/finetune_shakespeare_lora --to=hf/lora --adapter_only
    # peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE_FOLDER), "hf/lora")
"""
import json
import os
import sys

import checkpoint as ckpt
from configurator import configure, defaults_from, fail
from hf import to_hf_gpt2, to_peft_adapter
from model import GPTConfig

# -----------------------------------------------------------------------------
out_dir = ""  # the run to export; default: the newest under checkpoint/
checkpoint_name = "ckpt.pt"  # or best.pt; either finds a sharded run's .dcp of that name too
to = ""  # the folder to write
adapter_only = False  # a LoRA run's adapters alone, as a PEFT adapter folder, instead of the merged model
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    globals().update(configure(defaults_from(globals()), sys.argv[1:]))
    if not to:
        fail("say where to write the Hugging Face folder with --to=FOLDER")
    written = "adapter_model.safetensors" if adapter_only else "model.safetensors"
    if os.path.exists(os.path.join(to, written)):
        fail(f"{to} already holds a {'PEFT adapter' if adapter_only else 'model'}; choose an empty --to folder")
    path = ckpt.find(out_dir, checkpoint_name)
    state = ckpt.load(path)
    tokenizer = ckpt.tokenizer_from(state)
    if adapter_only and "lora" not in state:
        fail(f"{path} is not a LoRA run (it holds all of its weights); --adapter_only exports the adapters "
             f"of a run trained with lora_rank > 0")
    model = None if adapter_only else ckpt.model_from(state, path)
    try:
        if adapter_only:
            to_peft_adapter(state["model"], state["lora"], GPTConfig(**state["model_args"]), to)
        else:
            to_hf_gpt2(model, to, eot_token=tokenizer.eot_token)
    except ValueError as e:
        fail(f"cannot export {path}: {e}")
    with open(os.path.join(to, "meta.json"), "w") as f:
        json.dump(tokenizer.meta | {"vocab_size": tokenizer.vocab_size, "eot_token": tokenizer.eot_token}, f, indent=1)
    if adapter_only:
        print(f"wrote {to} from {path}: load it with peft.PeftModel.from_pretrained(base, {to!r}), base being "
              f"GPT2LMHeadModel.from_pretrained of {state['lora']['base']} (export_hf.py writes a checkpoint's)")
    else:
        print(f"wrote {to} from {path}: load it with transformers.GPT2LMHeadModel.from_pretrained({to!r})")
