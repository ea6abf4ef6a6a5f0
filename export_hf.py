"""
Write a checkpoint of this project as a Hugging Face GPT-2 folder:

    python export_hf.py --out_dir=checkpoint/shakespeare --to=hf/shakespeare

then in Python: transformers.GPT2LMHeadModel.from_pretrained("hf/shakespeare").
Models with settings GPT-2 cannot express (rmsnorm) are refused. The tokenizer stays
this project's: meta.json is copied beside the weights.
"""
import json
import os
import sys

import checkpoint as ckpt
from configurator import configure, defaults_from, fail
from model import to_hf_gpt2

# -----------------------------------------------------------------------------
out_dir = ""  # the run to export; default: the newest under checkpoint/
checkpoint_name = "ckpt.pt"
to = ""  # the folder to write
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    globals().update(configure(defaults_from(globals()), sys.argv[1:]))
    if not to:
        fail("say where to write the Hugging Face folder with --to=FOLDER")
    if os.path.exists(os.path.join(to, "model.safetensors")):
        fail(f"{to} already holds a model; choose an empty --to folder")
    try:
        model, tokenizer, path = ckpt.open_run(out_dir, checkpoint_name)
    except ckpt.CheckpointError as e:
        fail(str(e))
    try:
        to_hf_gpt2(model, to, eot_token=tokenizer.eot_token)
    except ValueError as e:
        fail(f"cannot export {path}: {e}")
    with open(os.path.join(to, "meta.json"), "w") as f:
        json.dump(tokenizer.meta | {"vocab_size": tokenizer.vocab_size, "eot_token": tokenizer.eot_token}, f, indent=1)
    print(f"wrote {to} from {path}: load it with transformers.GPT2LMHeadModel.from_pretrained({to!r})")
