"""
Train a GPT. One process on a CPU or GPU:

    python train.py config/train_shakespeare_char.py --batch_size=32

Several GPUs on one node, or several nodes (run the same command on each):

    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train.py config/train_gpt2.py

A model too big for one GPU's copy of weights, gradients and optimizer state: add --parallel=fsdp.

Everything a later run needs lands in out_dir: ckpt.pt (latest), best.pt (best
validation loss), log.jsonl (metrics) and eval.json (the final full evaluation).
Under fsdp the checkpoints are sharded: ckpt.dcp and best.dcp.
"""
import io
import json
import math
import netrc
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint as ckpt
import tokenizer as tok
from bench import measure_peak_flops
from configurator import autocast, defaults_from, fail, overrides, resolve_device, resolve_dtype
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# I/O
out_dir = "checkpoint/run"
init_from = "scratch"  # scratch | resume (out_dir/ckpt.pt) | other/run/ckpt.pt | hf:FOLDER | gpt2[-medium|-large|-xl]
eval_interval = 250
log_interval = 10
eval_iters = 50  # batches per split in the quick estimate made at each eval
eval_only = False  # evaluate out_dir's checkpoint (or what init_from names) on the whole val split, then exit
always_save_checkpoint = True  # save ckpt.pt at every eval, not only when val loss improves
final_eval = True  # after training, evaluate the whole validation split into eval.json
plot = True  # redraw out_dir/loss.png at every eval
plot_log_scale = True  # logarithmic loss axis
# wandb
wandb_log = False
wandb_project = "gpt"
wandb_run_name = ""  # default: out_dir's name
# data
dataset = "shakespeare_char"  # a folder under data/, made by prepare.py
gradient_accumulation_steps = 1  # micro-steps per optimizer step, across all processes
batch_size = 12  # sequences per micro-step
block_size = 256
# model
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0
bias = False
norm = "layernorm"  # 'layernorm' | 'rmsnorm'
pos = "learned"  # position information: 'learned' embeddings (GPT-2) | 'rope' (rotary)
mlp = "gelu"  # 'gelu' (GPT-2) | 'swiglu' (gated, same parameter count) | 'relu2' (squared ReLU)
qk_norm = False  # RMSNorm of each head's queries and keys
# optimizer
optimizer = "adamw"  # 'adamw' | 'muon': Muon for the blocks' matrices, AdamW at learning_rate for the rest
learning_rate = 6e-4
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables clipping
muon_lr = 0.02  # Muon's learning rate, scheduled like learning_rate
muon_momentum = 0.95
# LoRA: train small low-rank adapters beside chosen matmuls of the init_from model, its weights frozen
lora_rank = 0  # 0 trains every weight
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = "c_attn"  # comma-separated: c_attn (attention's q, k, v), c_proj (both output projections), c_fc
# learning rate schedule: linear warmup, then 'cosine' decay to min_lr at lr_decay_iters, or 'wsd':
# warmup, stable, then a linear decay to min_lr over the last decay_frac of lr_decay_iters
decay_lr = True
lr_schedule = "cosine"
decay_frac = 0.2
warmup_iters = 100
lr_decay_iters = 5000
min_lr = 6e-5
# system
device = "auto"  # auto | cpu | cuda | cuda:N | mps
dtype = "auto"  # auto | float32 | bfloat16 | float16 (float16 uses a GradScaler)
compile = False
parallel = "ddp"  # under torchrun: 'ddp' keeps a whole copy of the model in every process, 'fsdp' shards it
backend = "auto"  # process group backend: nccl on GPUs, gloo on CPUs
ddp_timeout = 300  # seconds a rank waits for the others before giving up
seed = 1337
# -----------------------------------------------------------------------------
# Resuming or evaluating a run takes its config from the checkpoint. The command line may change how
# long it runs, its learning rate (lowered after a divergence, or a longer tail), clipping, evaluation,
# logging, and the hardware it runs on; not the architecture, the data or the batch.
MAY_CHANGE_ON_RESUME = {"init_from", "eval_only", "max_iters", "learning_rate", "muon_lr", "decay_lr", "lr_schedule",
                        "decay_frac", "warmup_iters", "lr_decay_iters", "min_lr", "grad_clip", "eval_interval",
                        "log_interval", "eval_iters", "always_save_checkpoint", "final_eval", "plot", "plot_log_scale",
                        "wandb_log", "wandb_project", "wandb_run_name", "device", "dtype", "compile", "parallel",
                        "backend", "ddp_timeout"}
defaults = defaults_from(globals())
given = overrides(defaults, sys.argv[1:])
config = {**defaults, **given}
resuming = config["init_from"] == "resume" or (config["eval_only"] and config["init_from"] == "scratch")
ckpt_path = ckpt.existing(os.path.join(config["out_dir"], "ckpt.pt"))  # or the ckpt.dcp of a sharded run
checkpoint = None
if resuming:
    try:
        checkpoint = ckpt.load(ckpt_path)
    except ckpt.CheckpointError as e:
        fail(str(e))
    config = {**defaults, **{k: v for k, v in checkpoint["config"].items() if k in defaults},
              "out_dir": config["out_dir"], "init_from": "resume", "eval_only": config["eval_only"]}
    for key, value in given.items():
        if key in MAY_CHANGE_ON_RESUME:
            config[key] = value
        elif key != "out_dir" and value != config[key]:
            fail(f"{key}={value!r} differs from the run's {config[key]!r}, and {key} cannot change when a run "
                 f"is resumed or evaluated; leave it out, the checkpoint's config is used")
globals().update(config)


def stop_before_training(signum, frame):
    """Until the loop starts there is nothing to save: leave at once, without a traceback."""
    print(f"{signal.Signals(signum).name} received before training began; nothing was written", file=sys.stderr)
    sys.exit(128 + signum)


signal.signal(signal.SIGINT, stop_before_training)
signal.signal(signal.SIGTERM, stop_before_training)

# ranges that would only fail later, less clearly; model.py judges the model's own
for key in ("batch_size", "max_iters", "gradient_accumulation_steps", "eval_interval", "log_interval", "eval_iters"):
    if config[key] < 1 and not (key == "max_iters" and config[key] == 0):
        fail(f"{key} must be at least 1, got {config[key]}")
model_args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name in config}  # vocab_size: the data's
try:
    GPTConfig(**model_args)
except ValueError as e:
    fail(str(e))
if learning_rate <= 0 or min_lr < 0:
    fail(f"learning_rate must be positive and min_lr not negative, got {learning_rate} and {min_lr}")
if decay_lr and lr_decay_iters <= warmup_iters:
    fail(f"lr_decay_iters ({lr_decay_iters}) must be larger than warmup_iters ({warmup_iters})")
for key, valid in (("optimizer", ("adamw", "muon")), ("lr_schedule", ("cosine", "wsd")),
                   ("parallel", ("ddp", "fsdp"))):
    if config[key] not in valid:
        fail(f"unknown {key} {config[key]!r}; use {' or '.join(valid)}")
if not 0 < decay_frac <= 1:
    fail(f"decay_frac must be in (0, 1], got {decay_frac}")
if lora_rank and init_from == "scratch":
    fail("lora_rank needs a trained model to adapt (LoRA fine-tunes one); set --init_from to a checkpoint file, "
         "hf:FOLDER or gpt2, or leave lora_rank at 0")
if lora_rank < 0 or not 0 <= lora_dropout < 1 or lora_alpha <= 0:
    fail(f"need lora_rank >= 0, lora_dropout in [0, 1) and lora_alpha > 0, got {lora_rank}, {lora_dropout} "
         f"and {lora_alpha}")
if lora_rank and optimizer == "muon":
    fail("optimizer=muon orthogonalises whole matrices, not LoRA's low-rank factors; use adamw with lora_rank")
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
if init_from not in ("scratch", "resume", *GPT2_SIZES) and not init_from.startswith("hf:") \
        and not init_from.endswith(ckpt.SUFFIXES):
    fail(f"unknown init_from {init_from!r}; use scratch, resume, a checkpoint (.pt, or a sharded run's .dcp), "
         f"hf:FOLDER or one of {', '.join(GPT2_SIZES)}")
distributed = "RANK" in os.environ  # started by torchrun, or a launcher that sets what it sets
if parallel == "fsdp":
    if not distributed and "parallel" in given:
        fail("parallel=fsdp shards the model across processes, and needs several: start train.py with "
             "torchrun --nproc_per_node=N (or leave --parallel out for one process)")
    if lora_rank:
        fail("parallel=fsdp does not shard LoRA runs, whose frozen base is the bulk; use --parallel=ddp")
    # a sharded run resumed in one process: nothing to shard, and its checkpoints say so
    parallel = config["parallel"] = "fsdp" if distributed else "ddp"

# -----------------------------------------------------------------------------
# processes and devices
device = resolve_device(device)
if distributed:
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend=("nccl" if device.startswith("cuda") else "gloo") if backend == "auto" else backend,
                            timeout=timedelta(seconds=ddp_timeout))
    if gradient_accumulation_steps % world_size and not eval_only:
        fail(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be a multiple of "
             f"the number of processes ({world_size})")
    gradient_accumulation_steps = max(1, gradient_accumulation_steps // world_size)
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
device_type = device.split(":")[0]
dtype = resolve_dtype(dtype, device)
if parallel == "fsdp" and dtype == "float16":
    fail("parallel=fsdp trains in bfloat16 or float32, not float16, whose loss scaling it does not share "
         "between processes; use --dtype=bfloat16")
mixed_precision = autocast(device, dtype)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size


def log(*args):
    if master:
        print(*args, flush=True)


# -----------------------------------------------------------------------------
# data: token files written by prepare.py, described by meta.json
try:
    data_dir = tok.dataset_dir(dataset)  # a resumed run's dataset name comes from its checkpoint
except tok.TokenizerError as e:
    fail(str(e))
meta_path = os.path.join(data_dir, "meta.json")
if not os.path.exists(meta_path):
    # prepare.py names a dataset <corpus>, <corpus>_char or <corpus>_bpe<vocab_size>
    corpus, _, kind = dataset.rpartition("_")
    command = (f"python prepare.py --dataset={corpus} --tokenizer=char" if corpus and kind == "char" else
               f"python prepare.py --dataset={corpus} --tokenizer=bpe --vocab_size={kind[3:]}"
               if corpus and kind.startswith("bpe") and kind[3:].isdigit() else
               f"python prepare.py --dataset={dataset}")
    fail(f"dataset {dataset!r} not found ({meta_path} is missing); make it with {command}")
try:
    meta = tok.read_meta(data_dir)
    tok.from_meta(meta, data_dir)  # a BPE file must be the one the bins were made with
except tok.TokenizerError as e:
    fail(str(e))
data_dtype = np.dtype(meta["dtype"])
for split in ("train", "val"):
    path = os.path.join(data_dir, f"{split}.bin")
    size = os.path.getsize(path) if os.path.exists(path) else -1
    if size != meta[f"{split}_tokens"] * data_dtype.itemsize:
        fail(f"{path} holds {size} bytes but meta.json promises {meta[f'{split}_tokens']} {data_dtype} tokens; "
             f"prepare the dataset again")
    if meta[f"{split}_tokens"] <= block_size:
        fail(f"block_size {block_size} is longer than the {split} split ({meta[f'{split}_tokens']} tokens); "
             f"lower --block_size")


def memmap(split):
    # a fresh memmap per use: a long-lived one keeps every page it touched resident
    return np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=data_dtype, mode="r")


def to_device(x):
    if device_type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def windows(data, starts):
    """Inputs and next-token targets for windows of block_size at the given start offsets."""
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in starts]).astype(np.int64))
    return to_device(x), to_device(y)


def train_batches(generator):
    """This process's micro-batches for one optimizer step. Every process draws the whole global
    batch from the same generator and keeps its own rows, so the data depends only on the global
    batch, not on how it is split into processes and accumulation steps."""
    data = memmap("train")
    n = world_size * gradient_accumulation_steps
    starts = torch.randint(len(data) - block_size, (n, batch_size), generator=generator)
    mine = starts[rank * gradient_accumulation_steps:(rank + 1) * gradient_accumulation_steps]
    return [windows(data, row.tolist()) for row in mine]


# -----------------------------------------------------------------------------
# model, optimizer, state
vocab_size = meta["vocab_size"]
if vocab_size > 1024:
    vocab_size = (vocab_size + 63) // 64 * 64  # multiples of 64 make the head's matmul faster
model_args |= {"vocab_size": vocab_size}
iter_num, best_val_loss = 0, float("inf")


def model_from_checkpoint(state, path, **overrides):
    """The model of a checkpoint whose tokenizer is the dataset's, or a one-line refusal."""
    source = state["meta"]
    if any(source.get(k) != meta.get(k) for k in ("tokenizer", "vocab_size", "tokenizer_sha256", "chars")):
        fail(f"{path} was trained with a {source.get('tokenizer')} tokenizer of {source.get('vocab_size')} "
             f"ids, but dataset {dataset!r} uses {meta['tokenizer']} with {meta['vocab_size']}; "
             f"use a dataset prepared with the checkpoint's tokenizer")
    if block_size > state["model_args"].get("block_size", 0):
        fail(f"block_size {block_size} exceeds the checkpoint's {state['model_args'].get('block_size')}; "
             f"lower --block_size")
    try:
        return ckpt.model_from(state, path, **overrides)
    except ckpt.CheckpointError as e:
        fail(str(e))


def pretrained_gpt2():
    """GPT-2 weights from a local Hugging Face folder (hf:FOLDER) or from the hub by name."""
    if meta["tokenizer"] != "gpt2":
        fail(f"GPT-2 weights need a dataset prepared with the gpt2 tokenizer, but {dataset!r} uses "
             f"{meta['tokenizer']}; run python prepare.py --tokenizer=gpt2")
    try:
        gpt2 = ckpt.hf_gpt2(init_from, dropout)
    except ckpt.CheckpointError as e:
        fail(str(e))
    if gpt2.config.vocab_size < meta["vocab_size"]:
        fail(f"{init_from} has {gpt2.config.vocab_size} token embeddings, but dataset {dataset!r} uses "
             f"{meta['vocab_size']} token ids; use a GPT-2 checkpoint with GPT-2's vocabulary")
    if block_size > gpt2.config.block_size:
        fail(f"block_size {block_size} exceeds the model's {gpt2.config.block_size}; lower --block_size")
    return gpt2


torch.manual_seed(seed)  # the same initial weights in every process: fsdp does not copy rank 0's over
lora = None  # a LoRA run's adapter settings and the identity of its base, saved in its checkpoints
if resuming:
    model = model_from_checkpoint(checkpoint, ckpt_path, merge=False)
    lora = checkpoint.get("lora")
    model_args = checkpoint["model_args"]
    iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
else:
    if os.path.exists(ckpt_path):
        fail(f"{out_dir} already holds a checkpoint; continue it with --init_from=resume, "
             f"or choose another --out_dir")
    if init_from == "scratch":
        model = GPT(GPTConfig(**model_args))
    else:  # fine-tuning: weights from elsewhere, a fresh optimizer and schedule
        if init_from.endswith(ckpt.SUFFIXES):
            try:
                source = ckpt.load(init_from)
            except ckpt.CheckpointError as e:
                fail(str(e))
            model = model_from_checkpoint(source, init_from, dropout=dropout)
            del source  # free the memory
        else:
            model = pretrained_gpt2()
        if lora_rank:  # the base's identity is taken as loaded, so a reader can rebuild and check it
            lora = {"base": init_from, "base_sha256": ckpt.weights_sha256(model), "rank": lora_rank,
                    "alpha": lora_alpha, "dropout": lora_dropout, "targets": lora_targets.split(",")}
        if block_size < model.config.block_size:
            model.crop_block_size(block_size)
        model_args = dict(vars(model.config))
        # the saved config tells the truth: the architecture is the source's, not the defaults'
        config.update({k: v for k, v in model_args.items() if k in config})
        if lora:
            try:
                model.add_lora(lora_rank, lora_alpha, lora_dropout, lora["targets"])
            except ValueError as e:
                fail(str(e))
if lora:  # the base stays as loaded: only the adapters train, so only they reach the optimizer
    model.requires_grad_(False)
    for p in model.adapters().values():
        p.requires_grad_(True)
if rank:  # but each process its own dropout masks (rank 0 draws on, as a single process does)
    torch.manual_seed(seed + rank)
if parallel == "fsdp":  # before the move to the GPU, so that each process moves only its shard there
    model.shard(init_device_mesh(device_type, (world_size,)), torch.bfloat16 if dtype == "bfloat16" else None)
model.to(device)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
# the config's name of the optimizer becomes the optimizer itself; Muon orthogonalises in bf16 only where
# bf16 is fast, the rule dtype=auto follows
muon_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer,
                                       muon_lr, muon_momentum, muon_dtype)
# the sampler has its own generator, shared by all processes: batches must not shift when dropout
# or evaluation draw numbers
train_gen = torch.Generator().manual_seed(seed)
if checkpoint is not None and not eval_only:
    try:
        ckpt.restore_optimizer(checkpoint, model, optimizer)
    except ckpt.CheckpointError as e:
        fail(str(e))
    if "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    train_gen.set_state(checkpoint["rng"]["sampler"])
    # each process restores its own dropout stream; with another process count, the seeds above stand
    ranks_rng = checkpoint["rng"]["ranks"]
    if len(ranks_rng) == world_size:
        ckpt.set_rng_state(ranks_rng[rank], cuda=device_type == "cuda")
checkpoint = None  # free the memory

raw_model = model
if compile:
    model = torch.compile(model)
if distributed and parallel == "ddp":
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)


def get_lr(it):
    """Linear warmup to learning_rate, then cosine (or warmup-stable-decay) down to min_lr at lr_decay_iters."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    if lr_schedule == "wsd":
        decay_start = lr_decay_iters - decay_frac * lr_decay_iters
        if it < decay_start:
            return learning_rate
        return learning_rate + (it - decay_start) / (lr_decay_iters - decay_start) * (min_lr - learning_rate)
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def gradient_sync(last):
    """Processes average their gradients in the backward pass of an optimizer step's last micro-step only;
    the others accumulate locally."""
    if parallel == "fsdp":
        model.set_requires_gradient_sync(last)
    return model.no_sync() if distributed and parallel == "ddp" and not last else nullcontext()


def all_reduce_sum(values):
    """Element-wise sums over all processes (the values themselves in a single process)."""
    if not distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters random batches per split, the same batches at every eval, averaged over ranks."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(seed + 1000 * (rank + 1))
        data = memmap(split)
        total = 0.0
        for _ in range(eval_iters):
            x, y = windows(data, torch.randint(len(data) - block_size, (batch_size,), generator=gen).tolist())
            with mixed_precision:
                total += model(x, y)[1].item()
        s, n = all_reduce_sum([total, eval_iters])
        out[split] = s / n
    model.train()
    return out


@torch.no_grad()
def evaluate_split(split="val"):
    """Loss over a whole split: consecutive non-overlapping windows, every token predicted once."""
    model.eval()
    data = memmap(split)
    n_targets = len(data) - 1
    starts = list(range(0, n_targets, block_size))[rank::world_size]
    # without gradients there is room for more rows: up to 64, while the logits stay under 2**27 floats
    rows = max(batch_size, min(64, 2 ** 27 // (block_size * raw_model.config.vocab_size)))
    # every process runs as many forwards as the busiest (under fsdp each is a collective); spare ones
    # predict nothing
    forwards = math.ceil(len(range(0, n_targets, block_size)) / world_size / rows)
    loss_sum, count = 0.0, 0
    for i in range(0, forwards * rows, rows):
        chunk = starts[i:i + rows]  # empty for a spare forward
        lengths = [min(block_size, n_targets - s) for s in chunk]
        x = torch.zeros(max(1, len(chunk)), block_size, dtype=torch.int64)
        y = torch.full((max(1, len(chunk)), block_size), -1, dtype=torch.int64)  # -1 is ignored by the loss
        for row, (s, n) in enumerate(zip(chunk, lengths, strict=True)):
            x[row, :n] = torch.from_numpy(data[s:s + n].astype(np.int64))
            y[row, :n] = torch.from_numpy(data[s + 1:s + 1 + n].astype(np.int64))
        with mixed_precision:
            loss = raw_model(to_device(x), to_device(y))[1]
        if chunk:
            loss_sum += loss.item() * sum(lengths)
            count += sum(lengths)
    loss_sum, count = all_reduce_sum([loss_sum, count])
    model.train()
    return loss_sum / count, int(count)


def save_checkpoint(name):
    """Save out_dir/name.pt, written by rank 0; or under fsdp out_dir/name.dcp, to which every process
    writes its own shard of the model and optimizer."""
    rng = ckpt.rng_state(cuda=device_type == "cuda")
    ranks_rng = [rng]
    if distributed:  # every process draws its own dropout masks, so an exact resume needs every process's state
        ranks_rng = [None] * world_size
        dist.all_gather_object(ranks_rng, rng)
    if parallel != "fsdp" and not master:
        return
    state = {
        "model_args": model_args,
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "config": config,
        "meta": meta,
        "rng": {"ranks": ranks_rng, "sampler": train_gen.get_state()},
    }
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    if lora:
        state["lora"] = lora
    path = os.path.join(out_dir, name + suffix)
    try:
        if parallel == "fsdp":
            ckpt.save_sharded(state, raw_model, optimizer, path)
        else:
            # a LoRA run saves its adapters alone: the base is rebuilt from where it came from
            weights = {name: p.detach() for name, p in raw_model.adapters().items()} if lora else raw_model.state_dict()
            ckpt.save({"model": weights, "optimizer": optimizer.state_dict(), **state}, path)
    except ckpt.CheckpointError as e:
        fail(str(e))


def plot_losses():
    """Train and validation loss against iterations (bottom axis) and tokens seen (top axis)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    train = [(r["iter"], r["loss"]) for r in records if "loss" in r]
    val = [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue", alpha=0.6, lw=1, label="train loss (per step)")
    if val:
        ax.plot(*zip(*val, strict=True), color="tab:orange", marker="o", ms=3, lw=2, label="validation loss (estimate)")
    if plot_log_scale:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    millions = (lambda i: i * tokens_per_iter / 1e6, lambda t: t * 1e6 / tokens_per_iter)  # iterations <-> tokens
    top = ax.secondary_xaxis("top", functions=millions)
    top.set_xlabel("tokens seen (millions)")
    ax.set_title(f"{os.path.basename(os.path.abspath(out_dir))}: {dataset}, {raw_model.num_params() / 1e6:.1f}M "
                 f"parameters" + (f", best val {best_val_loss:.3f}" if val else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_file("loss.png", png.getvalue(), "wb")


def write_file(name, data, mode="w"):
    """Write data to out_dir/name: mode "a" appends, the others replace the file atomically. A write
    that fails (a full disk, a file size limit, out_dir gone) ends the run in one line and leaves the file
    as it was, so a resumed run can go on appending to log.jsonl."""
    path = os.path.join(out_dir, name)
    target = path if mode == "a" else path + ".tmp"
    size = os.path.getsize(path) if mode == "a" and os.path.exists(path) else 0
    try:
        with open(target, mode) as f:
            f.write(data)
        if target != path:
            os.replace(target, path)
    except OSError as e:
        try:  # a partly written line or file would break the next reader
            if target == path:
                os.truncate(path, size)
            elif os.path.exists(target):
                os.remove(target)
        except OSError:
            pass
        fail(f"could not write {path} ({e.strerror}); {ckpt_path} is intact. "
             f"Free disk space or choose a writable --out_dir, then resume")


def final_evaluation():
    val_loss, n = evaluate_split("val")
    result = {"val_loss": val_loss, "perplexity": math.exp(val_loss), "tokens": n, "iter_num": iter_num,
              "dataset": dataset, "checkpoint": ckpt_path, "config": config}
    if master:
        write_file("eval.json", json.dumps(result, indent=1))
    log(f"full validation split: loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f} over {n:,} tokens "
        f"-> {os.path.join(out_dir, 'eval.json')}")


def shut_down():
    """Ranks meet before the process group goes: rank 0 may still be writing, and a process that exits
    with the group alive aborts in gloo's destructors ("terminate called without an active exception")."""
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if eval_only:
    if master:
        os.makedirs(out_dir, exist_ok=True)  # evaluating another source (init_from) starts a folder
    final_evaluation()
    shut_down()
    sys.exit(0)

# -----------------------------------------------------------------------------
# training loop
suffix = ".dcp" if parallel == "fsdp" else ".pt"  # how this run saves: sharded, or one file
ckpt_path = os.path.join(out_dir, "ckpt" + suffix)
if master:
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"out_dir {out_dir} is not writable ({e.strerror}); choose another --out_dir")
    if wandb_log:
        import wandb
        try:  # `wandb login` keeps the key in ~/.netrc rather than the environment
            logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            logged_in = False
        if not (os.environ.get("WANDB_API_KEY") or logged_in or os.environ.get("WANDB_MODE")):
            os.environ["WANDB_MODE"] = "offline"
            log(f"wandb: no API key, logging offline; upload later with: wandb sync {out_dir}/wandb/offline-run-*")
        wandb.init(project=wandb_project, name=wandb_run_name or os.path.basename(out_dir.rstrip("/")),
                   config=config, dir=out_dir)

stop_signal = None


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signal.Signals(signum).name


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)


def agreed_stop():
    """All processes must stop at the same iteration: they agree at each log interval."""
    if not distributed:
        return stop_signal is not None
    if iter_num % log_interval:
        return False
    flag = torch.tensor([float(stop_signal is not None)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def memory_use():
    """What this process holds of the weights, gradients and optimizer state (its shards under fsdp), and
    its peak memory so far: read after the first step, when all three exist."""
    def megabytes(tensors):
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # a DTensor's own shard
        return sum(t.numel() * t.element_size() for t in local) / 2 ** 20
    params = list(model.parameters())
    state = [v for opt in ckpt.optimizers_of(optimizer) for s in opt.state.values() for v in s.values()
             if torch.is_tensor(v)]
    peak = (f"peak {device_type} memory {torch.cuda.max_memory_allocated(device) / 2 ** 20:,.0f} MB"
            if device_type == "cuda" else
            f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10:,.0f} MB")
    return (f"memory per process: weights {megabytes(params):,.1f} MB, gradients "
            f"{megabytes(p.grad for p in params if p.grad is not None):,.1f} MB, optimizer state "
            f"{megabytes(state):,.1f} MB; {peak}")


def check_finite(value, what):
    if not math.isfinite(value):
        fail(f"{what} became {value} by iteration {iter_num}; training stopped without saving, so "
             f"{ckpt_path} still holds the last good state. Lower learning_rate or raise warmup_iters, "
             f"then resume")


peak_flops = measure_peak_flops(device, dtype) if master else 0.0
trained = f" ({sum(p.numel() for p in raw_model.adapters().values()):,} in LoRA adapters trained)" if lora else ""
log(f"{raw_model.num_params() / 1e6:.2f}M parameters{trained} | {device} {dtype}{' compiled' if compile else ''} | "
    f"{tokens_per_iter:,} tokens/iter | {world_size} process(es) | from iter {iter_num} | "
    f"measured peak {peak_flops / 1e12:.3f} TFLOP/s")
t0 = time.time()
first_iter = iter_num
stopping = False
window_start, window_iters = time.time(), 0
while iter_num < max_iters:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups run at muon_lr / learning_rate times lr

    batches = train_batches(train_gen)
    step_loss = 0.0
    for micro_step, (x, y) in enumerate(batches):
        last = micro_step == len(batches) - 1
        with gradient_sync(last), mixed_precision:
            _, loss = model(x, y)
            loss = loss / gradient_accumulation_steps
        scaler.scale(loss).backward()
        step_loss += loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if iter_num == first_iter:
        log(memory_use())
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    window_iters += 1

    record = None
    if iter_num % log_interval == 0 or iter_num == max_iters:
        lossf = all_reduce_sum([step_loss.item()])[0] / world_size  # the step's mean loss over the global batch
        check_finite(lossf, "the training loss")
        dt = (time.time() - window_start) / window_iters
        tokens_per_s = tokens_per_iter / dt
        mfu = raw_model.estimate_mfu(tokens_per_s / world_size, peak_flops) if master else 0.0
        log(f"iter {iter_num}/{max_iters} | loss {lossf:.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms/iter | "
            f"{tokens_per_s:,.0f} tok/s | mfu {mfu:.1%} | eta {(max_iters - iter_num) * dt / 60:.1f} min")
        record = {"iter": iter_num, "tokens": iter_num * tokens_per_iter, "loss": lossf, "lr": lr,
                  "ms_per_iter": dt * 1000, "tokens_per_s": tokens_per_s, "mfu": mfu}
        window_start, window_iters = time.time(), 0
    stopping = agreed_stop()

    if iter_num % eval_interval == 0 or iter_num == max_iters:
        losses = estimate_loss()
        check_finite(losses["train"] + losses["val"], "the evaluation loss")
        log(f"eval at iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
            f"val perplexity {math.exp(losses['val']):.2f}")
        record = dict(record or {"iter": iter_num, "tokens": iter_num * tokens_per_iter},
                      train_loss=losses["train"], val_loss=losses["val"], val_perplexity=math.exp(losses["val"]))
        improved = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        if improved:
            save_checkpoint("best")
        if improved or always_save_checkpoint or iter_num == max_iters:
            save_checkpoint("ckpt")
        window_start, window_iters = time.time(), 0  # evaluation time is not training time

    if record is not None and master:
        write_file("log.jsonl", json.dumps(record) + "\n", "a")
        if wandb_log:
            wandb.log(record, step=iter_num)
        if plot and "val_loss" in record:
            plot_losses()
    if stopping:
        # saved without an evaluation, so a stop is prompt; evaluations draw from their own generator,
        # so the resumed run goes on exactly as an uninterrupted one would
        save_checkpoint("ckpt")
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        launcher = "python" if not distributed else f"torchrun --nproc_per_node={per_node}" + \
            (f" --nnodes={world_size // per_node} ..." if world_size > per_node else "")
        log(f"{stop_signal or 'a stop request'} received: saved {ckpt_path} at iteration {iter_num}. "
            f"Continue with: {launcher} train.py --out_dir={out_dir} --init_from=resume")
        break

if final_eval and not stopping and max_iters > 0:
    final_evaluation()
log(f"done in {(time.time() - t0) / 60:.1f} min" +
    (f"; best val loss {best_val_loss:.4f}" if math.isfinite(best_val_loss) else ""))
shut_down()
