"""
One call that checks this project on a GPU and prints one table:

    make gpu-check                                  # or: python gpu_check.py
    python gpu_check.py --nanogpt=../nanoGPT        # also nanoGPT's bench.py on the same GPU, and the ratio
    python gpu_check.py --quick                     # the same at tiny shapes on the CPU, torchrun left out (the suite)

It needs the PyTorch already installed (no network, no pip) with numpy and tiktoken, and writes only into
a temporary folder. The rows: the measured bf16 peak; bench.py at GPT-2 small's shape with compile off
and on (ms/iter, tokens/s, MFU against the measured peak and against the datasheet, peak memory, graph
breaks); the fp16 path; activation checkpointing's memory; cached sampling; 200 iterations of train.py
with config/train_c4.py's model on random tokens; torchrun under ddp and fsdp, with a sharded save and a
resume. A step that fails says so in its row, and the others still run.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import fields

import numpy as np
import torch

from bench import BENCH_DEFAULTS, bench_sampling, bench_training, measure_peak_flops
from configurator import allow_tf32, configure, defaults_from, script_defaults
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
quick = False  # tiny shapes on the CPU in float32, compile left out: the test suite's run
nanogpt = ""  # a nanoGPT checkout outside this repository: its bench.py runs beside ours
datasheet_tflops = 989.0  # H100 SXM, dense bf16
timeout = 600  # seconds for each script run
# -----------------------------------------------------------------------------
REPO = os.path.dirname(os.path.abspath(__file__))
VOCAB = 50257  # GPT-2's vocabulary size, padded to 50304 by the scripts as for GPT-2's own tokenizer


def shapes(quick):
    """(bench's shape, train.py's arguments for config/train_c4.py's model, iterations, device, dtype)."""
    if quick:
        tiny = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=2)
        return tiny, [f"--{k}={v}" for k, v in tiny.items()], 4, "cpu", "float32"
    gpt2 = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12)  # nanoGPT's bench shape
    return gpt2, [], 200, "cuda", "bfloat16"


def synthetic_dataset(folder, tokens):
    """Random tokens as a prepared dataset. Its tokenizer is a character one of GPT-2's vocabulary size:
    GPT-2's BPE file comes from a package that a GPU machine without network may lack."""
    os.makedirs(folder)
    data = np.random.default_rng(0).integers(0, VOCAB - 1, tokens + tokens // 10, dtype=np.uint16)
    data[:tokens].tofile(os.path.join(folder, "train.bin"))
    data[tokens:].tofile(os.path.join(folder, "val.bin"))
    meta = {"format": 1, "tokenizer": "char", "chars": "".join(chr(0x100 + i) for i in range(VOCAB - 1)),
            "vocab_size": VOCAB, "eot_token": VOCAB - 1, "dtype": "uint16", "train_tokens": tokens,
            "val_tokens": tokens // 10, "source": "random tokens (gpu_check.py)"}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)


def script(args, cwd):
    """Run python args in cwd; its standard output, or a RuntimeError with the last line it wrote."""
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"exit {p.returncode}: {(p.stdout + p.stderr).strip().splitlines()[-1:]}")
    return p.stdout


def graph_breaks(model_config, device):
    import torch._dynamo
    model = GPT(model_config).to(device)
    x = torch.randint(model_config.vocab_size, (1, model_config.block_size), device=device)
    return torch._dynamo.explain(model)(x, x).graph_break_count


def bench_row(cfg, model_config, device, dtype, compiled, peak):
    model, row = bench_training(cfg, model_config, None, device, dtype, compiled, peak)
    mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
    datasheet = model.flops_per_token() * row["tokens_per_s"] / (datasheet_tflops * 1e12)
    against = f" (of the datasheet's {datasheet_tflops:.0f} TFLOP/s: {datasheet:.1%})" if device == "cuda" else ""
    return model, row, (f"{row['ms_per_iter']:.1f} ms/iter, {row['tokens_per_s']:,.0f} tok/s, MFU {mfu}{against}, "
                        f"peak {row['peak_mb']:,.0f} MB")


def main():
    bench_shape, train_shape, iters, device, dtype = shapes(quick)
    cfg = {**script_defaults(os.path.join(REPO, "train.py")), **BENCH_DEFAULTS, **bench_shape,
           "gradient_accumulation_steps": 1, "dropout": 0.0, "bias": False, "iters": 3 if quick else 20,
           "warmup": 1 if quick else 10, "sample_tokens": 20 if quick else 500}
    model_config = GPTConfig(**{f.name: cfg[f.name] for f in fields(GPTConfig) if f.name in cfg}, vocab_size=50304)
    if device == "cuda":
        allow_tf32()
    rows, results = [], {}
    work = tempfile.mkdtemp(prefix="gpu_check-")
    synthetic_dataset(os.path.join(work, "data", "synthetic"), tokens=20_000 if quick else 2_000_000)
    train = [os.path.join(REPO, "train.py"), "config/train_c4.py", "--dataset=synthetic", "--target_flops=0",
             "--plot=False", *train_shape, *(["--device=cpu", "--dtype=float32", "--compile=False"] if quick else [])]
    os.symlink(os.path.join(REPO, "config"), os.path.join(work, "config"))

    def check(name, step):
        t = time.time()
        try:
            rows.append((name, step()))
        except Exception as e:  # one broken step must not hide what the others find
            traceback.print_exc()
            rows.append((name, f"FAILED: {type(e).__name__}: {str(e)[:200]}"))
        print(f"{name}: {rows[-1][1]} ({time.time() - t:.0f} s)", flush=True)

    def peak():
        results["peak"] = measure_peak_flops(device, dtype)
        return f"{results['peak'] / 1e12:.1f} TFLOP/s ({dtype} matmul)"

    def eager():
        results["model"], results["eager"], text = bench_row(cfg, model_config, device, dtype, False, results["peak"])
        return text

    def compiled():
        if quick:
            return "left out with --quick (inductor's compile is slow on a CPU)"
        _, results["compiled"], text = bench_row(cfg, model_config, device, dtype, True, results["peak"])
        return text

    def fp16():
        fp16_peak = measure_peak_flops(device, "float16")
        # a CPU's fp16 is slow, and --quick only checks that the step runs: one timed step there
        return bench_row({**cfg, "iters": 1} if quick else cfg, model_config, device, "float16", False, fp16_peak)[2]

    def recompute():
        _, row = bench_training({**cfg, "activation_checkpointing": True}, model_config, None, device, dtype, False,
                                results["peak"])
        return (f"peak {row['peak_mb']:,.0f} MB against {results['eager']['peak_mb']:,.0f} MB, "
                f"{row['ms_per_iter']:.1f} ms/iter against {results['eager']['ms_per_iter']:.1f}")

    def sampling():
        speed = bench_sampling(results["model"], cfg, device, dtype)
        return f"{speed[True]:,.0f} tokens/s with the KV cache ({cfg['sample_tokens']} tokens, {dtype} weights)"

    def training():
        script([*train, f"--max_iters={iters}", f"--eval_interval={iters}", "--eval_iters=2",
                f"--log_interval={max(1, iters // 10)}", "--out_dir=c4"], work)
        with open(os.path.join(work, "c4", "log.jsonl")) as f:
            last = [json.loads(line) for line in f][-1]
        return (f"{iters} iterations, loss {last['loss']:.3f}, {last['ms_per_iter']:.0f} ms/iter, "
                f"{last['tokens_per_s']:,.0f} tok/s")

    def torchrun(parallel):
        def run():
            if quick:  # the suite launches the same runs under torchrun in test_ddp.py and test_fsdp.py
                return "left out with --quick (each launch costs two interpreters' start)"
            out = f"torchrun_{parallel}"
            launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
            common = [*train, f"--parallel={parallel}", "--compile=False", "--eval_iters=2", "--log_interval=1",
                      f"--out_dir={out}"]
            script([*launch, *common, "--max_iters=4", "--eval_interval=2"], work)
            script([*launch, os.path.join(REPO, "train.py"), f"--out_dir={out}", "--init_from=resume",
                    "--max_iters=6"], work)
            with open(os.path.join(work, out, "log.jsonl")) as f:
                iters_logged = [json.loads(line)["iter"] for line in f]
            saved = "ckpt.dcp" if parallel == "fsdp" else "ckpt.pt"
            assert iters_logged == list(range(1, 7)), iters_logged
            assert os.path.exists(os.path.join(work, out, saved)), f"no {saved}"
            return f"trained 4, saved {saved}, resumed to 6"
        return run

    def nanogpt_bench():
        if not nanogpt or quick:
            return "not run: give --nanogpt=PATH to a nanoGPT checkout (its bench.py needs CUDA)"
        args = ["--real_data=False", "--compile=True", "--dtype=bfloat16", f"--batch_size={cfg['batch_size']}",
                f"--block_size={cfg['block_size']}"]
        code = (f"import runpy, sys, torch; sys.argv = ['bench.py', *{args!r}]; runpy.run_path('bench.py', "
                f"run_name='__main__'); print('peak_mb', torch.cuda.max_memory_allocated() / 2 ** 20)")
        out = script(["-c", code], os.path.abspath(nanogpt))
        ours = results["compiled"]
        ms = float(out.split("time per iteration:")[-1].split("ms")[0])
        peak_mb = float(out.split("peak_mb")[-1])
        return (f"{ms:.1f} ms/iter, peak {peak_mb:,.0f} MB; this project compiled: {ms / ours['ms_per_iter']:.2f}x "
                f"its tokens/s at {ours['peak_mb'] / peak_mb:.2f}x its peak memory")

    try:  # each check runs even when one before it failed; the temporary folder goes in any case
        check("measured peak", peak)
        check("graph breaks (compiled training forward)", lambda: str(graph_breaks(model_config, device)))
        check("bench, GPT-2 small shape, eager" if not quick else "bench, tiny shape, eager", eager)
        check("bench, compiled", compiled)
        check("bench, fp16 with a gradient scaler", fp16)
        check("activation checkpointing", recompute)
        check("sampling", sampling)
        check("train.py, config/train_c4.py's model, random tokens", training)
        check("torchrun, 1 process, ddp", torchrun("ddp"))
        check("torchrun, 1 process, fsdp (sharded save, resume)", torchrun("fsdp"))
        check("nanoGPT bench.py", nanogpt_bench)
    finally:
        shutil.rmtree(work)

    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n| check ({where}, torch {torch.__version__}) | result |\n|---|---|")
    for name, result in rows:
        print(f"| {name} | {result} |")
    return 1 if any(result.startswith("FAILED") for _, result in rows) else 0


if __name__ == "__main__":
    globals().update(configure(defaults_from(globals()), sys.argv[1:]))
    sys.exit(main())
