"""
Measure training speed, honestly: warm up, time real optimizer steps, and compare
with the peak matmul rate measured on this device in the same run.

    python bench.py                                    # train.py's defaults, shakespeare_char
    python bench.py config/train_gpt2.py --batch_size=4 --iters=5
    python bench.py --compare                          # fp32 eager reference, then this setting
    python bench.py --sample                           # generation also without the KV cache, for the ratio
    python bench.py --profile                          # torch.profiler trace of a few steps
    python bench.py --mc_examples=100                  # multiple-choice scoring against a transformers loop

It takes the same config files and --key=value overrides as train.py. Nothing here passes or fails.
"""
import os
import resource
import sys
import time
from dataclasses import fields

import torch
from torch.nn import functional as F

from configurator import (
    InputError,
    allow_tf32,
    autocast,
    configure,
    fail,
    resolve_device,
    resolve_dtype,
    resolve_sampling_dtype,
    script_defaults,
)
from dataloader import Dataset, batches
from model import GPT, GPTConfig
from optim import configure_optimizers

BENCH_DEFAULTS = dict(
    iters=20,  # timed optimizer steps
    warmup=5,  # untimed steps first (compilation, allocator, caches)
    compare=False,  # also run the fp32 eager reference and print the speed-up
    sample=False,  # also time generation without the KV cache, and check that greedy outputs agree
    sample_tokens=500,  # greedy tokens generated after training is timed (0: skip generation)
    profile=False,  # write a torch.profiler trace to bench_trace.json
    synthetic=False,  # random tokens instead of the prepared dataset
    mc_examples=0,  # also time scoring this many multiple-choice examples, against a transformers loop
)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_peak_flops(device, dtype, searches=3):
    """Best FLOP/s of a square matmul in dtype on device, the size doubled until one takes 10 ms: long
    enough to be near the peak, and short, since every training run measures it. The best of several
    searches: on a busy machine one can stop at a size far below the peak, and make the MFU absurd.

    It is timed as F.linear (x @ W.T), the op every layer of the model runs: on CPUs without native bf16
    a plain bf16 a @ b takes another, much slower kernel, and would inflate MFU past 100%."""
    gen = torch.Generator(device=device).manual_seed(0)  # leave the global random state alone
    return max(search_peak_flops(device, getattr(torch, dtype), gen) for _ in range(searches))


def search_peak_flops(device, ptdtype, gen):
    best, n = 0.0, 256
    while True:
        a = torch.randn(n, n, device=device, dtype=ptdtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=ptdtype, generator=gen)
        F.linear(a, b)
        sync(device)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            F.linear(a, b)
            sync(device)
            times.append(time.perf_counter() - t)
        best = max(best, 2 * n ** 3 / min(times))
        if min(times) > 0.01 or n >= (8192 if device.startswith("cuda") else 4096):
            return best
        n *= 2


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_training(cfg, model_config, train_data, device, dtype, compiled, peak):
    torch.manual_seed(cfg["seed"])
    device_type = device.split(":")[0]
    model = GPT(model_config).to(device)
    model.recompute_blocks = cfg["activation_checkpointing"]
    optimizer = configure_optimizers(model, cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                     device_type, cfg["optimizer"], cfg["muon_lr"], cfg["muon_momentum"],
                                     torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    mixed_precision = autocast(device, dtype)
    step_model = torch.compile(model) if compiled else model
    # a few fixed batches: from the prepared dataset's train split, or random tokens without one
    gen = torch.Generator().manual_seed(cfg["seed"])
    if train_data is None:
        train_data = torch.randint(model_config.vocab_size, (8 * cfg["batch_size"] * (cfg["block_size"] + 1),),
                                   generator=gen).numpy()
    data = batches(train_data, gen, cfg["batch_size"], cfg["block_size"], 8, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)

    def step(i):
        for micro in range(cfg["gradient_accumulation_steps"]):
            x, y = data[(i * cfg["gradient_accumulation_steps"] + micro) % len(data)]
            with mixed_precision:
                loss = step_model(x, y)[1] / cfg["gradient_accumulation_steps"]
            scaler.scale(loss).backward()
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for i in range(cfg["warmup"]):
        step(i)
    sync(device)
    t = time.perf_counter()
    for i in range(cfg["iters"]):
        loss = step(i)
    loss.item()
    sync(device)
    dt = (time.perf_counter() - t) / cfg["iters"]
    tokens_per_s = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["block_size"] / dt
    row = dict(dtype=dtype, compile=compiled, ms_per_iter=dt * 1000, tokens_per_s=tokens_per_s,
               mfu=model.estimate_mfu(tokens_per_s, peak), peak_mb=peak_memory_mb(device))
    if cfg["profile"]:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
        with profile(activities=activities) as prof:
            for i in range(3):
                step(i)
            sync(device)
        prof.export_chrome_trace("bench_trace.json")
        print(prof.key_averages().table(sort_by=f"{'cuda' if device_type == 'cuda' else 'cpu'}_time_total",
                                        row_limit=15))
        print("trace written to bench_trace.json (open in chrome://tracing or https://ui.perfetto.dev)")
    return model, row


def bench_multiple_choice(model, cfg, device, dtype, vocab_size):
    """Examples/s scoring HellaSwag-shaped examples of random tokens as evaluate.py does (in dtype), and
    as a straightforward transformers loop does (fp32, one choice per forward) on the same weights. An
    example is a context of 20 to 100 tokens and 4 choices of 10 to 40, four times as long for a character
    vocabulary."""
    import tempfile

    import numpy as np
    from transformers import GPT2LMHeadModel

    from evaluate import multiple_choice
    from hf import to_hf_gpt2
    rng = np.random.default_rng(cfg["seed"])
    scale, block = (4 if vocab_size < 1024 else 1), model.config.block_size
    examples = [(rng.integers(vocab_size, size=rng.integers(20, 100) * scale).tolist(),
                 [rng.integers(vocab_size, size=rng.integers(10, 40) * scale).tolist() for _ in range(4)], 0)
                for _ in range(cfg["mc_examples"])]
    model.eval()
    multiple_choice(model, examples[:4], 0, autocast(device, dtype), device)  # warm up
    sync(device)
    t = time.perf_counter()
    ours = multiple_choice(model, examples, 0, autocast(device, dtype), device)
    sync(device)
    ours_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as folder:
        try:
            to_hf_gpt2(model, folder)
        except ValueError as e:
            fail(f"mc_examples compares with transformers' GPT-2, which cannot hold this model: {e}")
        hf = GPT2LMHeadModel.from_pretrained(folder).to(device).eval()

    @torch.no_grad()
    def loop(examples):
        correct = 0
        for context, choices, label in examples:
            losses = []
            for choice in choices:  # each sequence cropped from the left to the model's context
                ids = torch.tensor([(context + choice)[-(block + 1):]], device=device)
                scored = min(len(choice), block)
                logits = hf(ids[:, :-1]).logits[0, -scored:]
                losses.append(F.cross_entropy(logits, ids[0, -scored:]).item())
            correct += int(np.argmin(losses) == label)
        return correct / len(examples)
    loop(examples[:4])
    sync(device)
    t = time.perf_counter()
    theirs = loop(examples)
    sync(device)
    theirs_s = time.perf_counter() - t
    print(f"multiple choice, {len(examples)} examples: {len(examples) / ours_s:.2f} examples/s ({dtype}); "
          f"transformers loop {len(examples) / theirs_s:.2f} examples/s (float32); {theirs_s / ours_s:.2f}x "
          f"(acc_norm {ours['acc_norm']:.3f} and {theirs:.3f})")
    model.train()


def bench_sampling(model, cfg, device, dtype):
    """Seconds to the first token and tokens/s for sample_tokens greedy tokens with the KV cache, and with
    --sample also recomputed without it."""
    model.eval().to(getattr(torch, dtype))  # as sample.py does: weights stored in the sampling dtype
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    results = {}
    for use_cache in (True, False) if cfg["sample"] else (True,):
        compile_note = ""
        if cfg["compile"] and use_cache:  # the step after the first token is compiled once, before the timing
            t = time.perf_counter()
            model.generate(prompt, 2, temperature=0, compile=True)
            compile_note = f", compiled in {time.perf_counter() - t:.1f} s"
        sync(device)
        t = time.perf_counter()
        model.generate(prompt, 1, temperature=0, use_cache=use_cache)
        sync(device)
        first = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(prompt, cfg["sample_tokens"], temperature=0, use_cache=use_cache,
                             compile=cfg["compile"])
        sync(device)
        total = time.perf_counter() - t
        results[use_cache] = (out, total)
        print(f"sampling ({dtype} weights{compile_note}) {'with' if use_cache else 'without'} KV cache: first token "
              f"{first * 1000:.1f} ms, {cfg['sample_tokens'] / total:,.0f} tokens/s "
              f"({cfg['sample_tokens']} tokens in {total:.2f} s)")
    if cfg["sample"]:
        same = torch.equal(results[True][0], results[False][0])
        print(f"KV cache speed-up {results[False][1] / results[True][1]:.1f}x; greedy output with cache "
              f"{'equals' if same else 'DIFFERS FROM'} recomputation")
    return {use_cache: cfg["sample_tokens"] / total for use_cache, (_, total) in results.items()}


if __name__ == "__main__":
    train_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    cfg = configure({**script_defaults(train_script), **BENCH_DEFAULTS}, sys.argv[1:])
    device = resolve_device(cfg["device"])
    dtype = resolve_dtype(cfg["dtype"], device)
    if cfg["iters"] < 1 or cfg["warmup"] < 0 or cfg["batch_size"] < 1 or cfg["block_size"] < 1 \
            or cfg["sample_tokens"] < 0 or cfg["mc_examples"] < 0:
        fail("iters, batch_size and block_size must be at least 1, and warmup, sample_tokens and mc_examples "
             "not negative")
    train_data = None
    if cfg["synthetic"]:
        vocab_size = 50304
    else:
        try:
            dataset = Dataset(cfg["dataset"], cfg["block_size"])
        except InputError as e:
            fail(f"{e}; or measure on random tokens with --synthetic=True")
        train_data = dataset.tokens("train")
        vocab_size = dataset.meta["vocab_size"]
        vocab_size = (vocab_size + 63) // 64 * 64 if vocab_size > 1024 else vocab_size
    try:
        model_config = GPTConfig(**{f.name: cfg[f.name] for f in fields(GPTConfig) if f.name in cfg},
                                 vocab_size=vocab_size)
    except ValueError as e:
        fail(str(e))
    if device.startswith("cuda"):
        allow_tf32()

    runs = ([("float32", False)] if cfg["compare"] else []) + [(dtype, cfg["compile"])]
    peaks = {d: measure_peak_flops(device, d) for d in {d for d, _ in runs}}
    for d, p in peaks.items():
        print(f"measured peak on {device}: {p / 1e12:.3f} TFLOP/s ({d} matmul)")
    rows = []
    for run_dtype, compiled in runs:
        model, row = bench_training(cfg, model_config, train_data, device, run_dtype, compiled, peaks[run_dtype])
        rows.append(row)
    name = " ".join(a for a in sys.argv[1:] if not a.startswith("--")) or "train.py defaults"
    print(f"\nconfig: {name} | {cfg['n_layer']}L {cfg['n_head']}H {cfg['n_embd']}d, context {cfg['block_size']}, "
          f"batch {cfg['batch_size']}x{cfg['gradient_accumulation_steps']}, vocab {vocab_size}, "
          f"{model.num_params() / 1e6:.2f}M params, {model.flops_per_token() / 1e6:.1f} MFLOP/token")
    print(f"{'dtype':<10}{'compile':<9}{'ms/iter':>9}{'tokens/s':>11}{'MFU':>7}{'peak MB':>9}")
    for r in rows:
        print(f"{r['dtype']:<10}{str(r['compile']):<9}{r['ms_per_iter']:>9.1f}{r['tokens_per_s']:>11,.0f}"
              f"{'n/a' if r['mfu'] is None else format(r['mfu'], '.1%'):>7}{r['peak_mb']:>9,.0f}")
    if cfg["compare"]:
        print(f"speed-up over fp32 eager: {rows[0]['ms_per_iter'] / rows[-1]['ms_per_iter']:.2f}x")
    if cfg["mc_examples"] > 0:
        bench_multiple_choice(model, cfg, device, dtype, vocab_size)
    if cfg["sample_tokens"] > 0:
        bench_sampling(model, cfg, device, resolve_sampling_dtype(cfg["dtype"], device))
