"""
Generate text from a trained checkpoint:

    python sample.py --start="Once"
    python sample.py --start=FILE:prompt.txt --out_dir=checkpoint/shakespeare_char --num_samples=3

With no --out_dir, the most recently written checkpoint under checkpoint/ is used.
"""
import glob
import os
import sys
from contextlib import nullcontext

import torch

import tokenizer as tok
from configurator import configure, defaults_from, fail, resolve_device, resolve_dtype
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
out_dir = ""  # a run folder holding ckpt.pt; default: the newest under checkpoint/
checkpoint_name = "ckpt.pt"  # or best.pt
start = "\n"  # the prompt, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 500
temperature = 0.8  # 0 is greedy
top_k = 200  # 0 keeps every token
top_p = 1.0  # nucleus sampling; 1.0 keeps every token
seed = 1337
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------


def load_checkpoint(out_dir, checkpoint_name, device):
    """The model and the tokenizer it was trained with, ready for generation."""
    if not out_dir:
        found = sorted(glob.glob(os.path.join("checkpoint", "*", checkpoint_name)), key=os.path.getmtime)
        if not found:
            fail("no checkpoint found under checkpoint/; train one (e.g. make demo) or pass --out_dir")
        out_dir = os.path.dirname(found[-1])
    path = os.path.join(out_dir, checkpoint_name)
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}; train one first or pass the run's --out_dir")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        model = GPT(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict(checkpoint["model"])
    except Exception as e:
        fail(f"{path} is not a checkpoint this model can load ({type(e).__name__}: {str(e).splitlines()[0]})")
    data_dir = os.path.join("data", checkpoint["config"].get("dataset", ""))
    try:
        tokenizer = tok.from_meta(checkpoint["meta"], data_dir)
    except tok.TokenizerError as e:
        fail(str(e))
    model.eval().to(device)
    return model, tokenizer, path


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[5:]
        if not os.path.isfile(path):
            fail(f"prompt file {path!r} not found")
        with open(path, encoding="utf-8") as f:
            start = f.read()
    if not start:
        fail("the prompt is empty; give some text with --start=... (for example --start='\\n')")
    return start


if __name__ == "__main__":
    globals().update(configure(defaults_from(globals()), sys.argv[1:]))
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or max_new_tokens < 1 or num_samples < 1:
        fail("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, max_new_tokens >= 1 and num_samples >= 1")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    device_type = device.split(":")[0]
    autocast = nullcontext() if dtype == "float32" else \
        torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))

    model, tokenizer, path = load_checkpoint(out_dir, checkpoint_name, device)
    prompt = read_prompt(start)
    try:
        ids = tokenizer.encode(prompt)
    except tok.TokenizerError as e:
        fail(f"the prompt cannot be encoded: {e}")
    print(f"sampling from {path}", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]
    for _ in range(num_samples):
        with autocast:
            y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               eot_token=tokenizer.eot_token, generator=generator)
        out = y[0].tolist()
        if tokenizer.eot_token in out[len(ids):]:
            out = out[:len(ids) + out[len(ids):].index(tokenizer.eot_token)]
        print(tokenizer.decode(out))
        print("---------------")
