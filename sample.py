"""
Generate text from a trained checkpoint:

    python sample.py --start="Once"
    python sample.py --start=FILE:prompt.txt --out_dir=checkpoint/shakespeare_char --num_samples=3
    python sample.py --prompts=prefixes.json --out=generation.jsonl   # one completion per prompt
    python sample.py --interactive                                     # type a prompt, continue the story

With no --out_dir, the most recently written checkpoint under checkpoint/ is used.
"""
import json
import os
import signal
import sys

import torch

import checkpoint as ckpt
import tokenizer as tok
from configurator import configure, defaults_from, fail, resolve_device, resolve_sampling_dtype

# -----------------------------------------------------------------------------
out_dir = ""  # a run folder holding ckpt.pt; default: the newest under checkpoint/
checkpoint_name = "ckpt.pt"  # or best.pt; either finds a sharded run's .dcp of that name too
start = "\n"  # the prompt, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 500
temperature = 0.8  # 0 is greedy
top_k = 200  # 0 keeps every token
top_p = 1.0  # nucleus sampling; 1.0 keeps every token
seed = 1337
prompts = ""  # a JSON file holding a list of prompt strings: one completion each, written to `out`
out = "generation.jsonl"
interactive = False
device = "auto"
dtype = "auto"
compile = False  # compile one step of generation: inductor fuses its small operations, after a one-time cost
# -----------------------------------------------------------------------------


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[5:]
        if not os.path.isfile(path):
            fail(f"prompt file {path!r} not found")
        with open(path, encoding="utf-8") as f:
            start = f.read()
    return start


if __name__ == "__main__":
    globals().update(configure(defaults_from(globals()), sys.argv[1:]))
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or max_new_tokens < 1 or num_samples < 1:
        fail("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, max_new_tokens >= 1 and num_samples >= 1")
    device = resolve_device(device)
    dtype = resolve_sampling_dtype(dtype, device)

    model, tokenizer, path = ckpt.open_run(out_dir, checkpoint_name)
    model.eval().to(device)
    # weights stored in the sampling dtype, where autocast would convert every weight again for every token
    model.to(getattr(torch, dtype))
    generator = torch.Generator(device=device).manual_seed(seed)

    def encode(text):
        if not text:
            raise tok.TokenizerError("the prompt is empty; give some text (for example --start='\\n')")
        try:
            return tokenizer.encode(text)
        except tok.TokenizerError as e:
            raise tok.TokenizerError(f"the prompt cannot be encoded: {e}") from None

    def complete(ids):
        """The new tokens after ids, up to max_new_tokens, stopping before end-of-text."""
        x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           eot_token=tokenizer.eot_token, generator=generator, compile=compile)
        new = y[0, len(ids):].tolist()
        return new[:new.index(tokenizer.eot_token)] if tokenizer.eot_token in new else new

    settings = dict(checkpoint=path, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, seed=seed)
    if prompts:
        try:
            with open(prompts, encoding="utf-8") as f:
                texts = json.load(f)
            assert isinstance(texts, list) and all(isinstance(t, str) for t in texts)
        except (OSError, ValueError, AssertionError):
            fail(f"--prompts={prompts} must be a readable JSON file holding a list of strings")
        encoded = [encode(t) for t in texts]  # refuse bad prompts before any work or output
        with open(out + ".tmp", "w", encoding="utf-8") as f:
            for text, ids in zip(texts, encoded, strict=True):
                f.write(json.dumps({"prompt": text, "completion": tokenizer.decode(complete(ids)), **settings},
                                   ensure_ascii=False) + "\n")
        os.replace(out + ".tmp", out)
        print(f"wrote {len(texts)} completions to {out}", file=sys.stderr)
    elif interactive:
        # Ctrl-C must leave even when this was started with SIGINT ignored (as background jobs are)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"{path}: type a prompt and press Enter; Ctrl-D or Ctrl-C to leave.")
        story = []
        try:
            while True:
                if not story:
                    try:
                        story = encode(input("prompt> "))
                    except tok.TokenizerError as e:
                        print(e)
                        continue
                    print(tokenizer.decode(story), end="")
                new = complete(story)
                print(tokenizer.decode(new), flush=True)
                story += new
                answer = input("[c]ontinue this story, [n]ew story, [q]uit? ").strip().lower()
                if answer.startswith("q"):
                    break
                if answer.startswith("n"):
                    story = []
        except (EOFError, KeyboardInterrupt):
            print()
    else:
        ids = encode(read_prompt(start))
        print(f"sampling from {path} ({dtype} weights, {device})", file=sys.stderr)
        for _ in range(num_samples):
            print(tokenizer.decode(ids + complete(ids)))
            print("---------------")
