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
import ctypes
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint as ckpt
from bench import measure_peak_flops
from configurator import allow_tf32, autocast, defaults_from, fail, overrides, resolve_device, resolve_dtype
from dataloader import Dataset, batches
from evaluate import (
    all_reduce_sum,
    describe,
    earlier_results,
    estimate_loss,
    evaluate_split,
    load_task,
    multiple_choice,
    task_names,
)
from model import GPT, GPTConfig
from optim import configure_optimizers
from runlog import RunLog, memory_report

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
eval_tasks = ""  # multiple-choice tasks scored at every evaluation, comma-separated: hellaswag, mc:PATH
eval_examples = 500  # the first N examples of each of eval_tasks; 0 scores all
hellaswag = ""  # HellaSwag's validation set: hellaswag_val.jsonl, or a folder of the hub dataset; default: the hub
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
target_flops = 0.0  # a training budget in FLOPs: sets max_iters (and lr_decay_iters) from the model's FLOPs per token
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
# warmup, stable, then a linear decay to min_lr over the last decay_frac of lr_decay_iters, never before warmup's end
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
activation_checkpointing = False  # keep only each block's input for the backward pass, recomputing the rest
parallel = "ddp"  # under torchrun: 'ddp' keeps a whole copy of the model in every process, 'fsdp' shards it
backend = "auto"  # process group backend: nccl on GPUs, gloo on CPUs
ddp_timeout = 300  # seconds a rank waits for the others before giving up
seed = 1337
# -----------------------------------------------------------------------------
# Resuming or evaluating a run takes its config from the checkpoint. The command line may change how
# long it runs, its learning rate (lowered after a divergence, or a longer tail), clipping, evaluation,
# logging, and the hardware it runs on; not the architecture, the data or the batch.
MAY_CHANGE_ON_RESUME = {"init_from", "eval_only", "max_iters", "target_flops", "learning_rate", "muon_lr", "decay_lr",
                        "lr_schedule", "decay_frac", "warmup_iters", "lr_decay_iters", "min_lr", "grad_clip",
                        "eval_interval", "log_interval", "eval_iters", "always_save_checkpoint", "final_eval",
                        "eval_tasks", "eval_examples", "hellaswag", "plot", "plot_log_scale", "wandb_log",
                        "wandb_project", "wandb_run_name", "device", "dtype", "compile", "parallel",
                        "backend", "ddp_timeout", "activation_checkpointing"}
defaults = defaults_from(globals())
given = overrides(defaults, sys.argv[1:])
config = {**defaults, **given}
resuming = config["init_from"] == "resume" or (config["eval_only"] and config["init_from"] == "scratch")
resume_path = ckpt.existing(os.path.join(config["out_dir"], "ckpt.pt"))  # or the ckpt.dcp of a sharded run
saved = ckpt.load(resume_path) if resuming else None  # the run's state, until it is restored
if resuming:
    config = {**defaults, **{k: v for k, v in saved["config"].items() if k in defaults},
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
if eval_examples < 0:
    fail(f"eval_examples must be 0 (all) or more, got {eval_examples}")
if "val" in task_names(eval_tasks):
    fail("eval_tasks names multiple-choice tasks (hellaswag, mc:PATH); every evaluation already estimates val_loss "
         "and val_bpb, and the final one measures the whole val split")
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
suffix = ".dcp" if parallel == "fsdp" else ".pt"  # how this run saves: sharded, or one file
ckpt_path = os.path.join(out_dir, "ckpt" + suffix)

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
if parallel == "fsdp" and device_type == "cpu":
    # glibc raises its mmap threshold once a large block is freed, and serves later ones from a heap it keeps:
    # every block's gathered weights and gradients, freed as fsdp goes, would stay resident in each process
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: 64 kB and up go back when freed
    except (OSError, AttributeError):
        pass  # not glibc
dtype = resolve_dtype(dtype, device)
if parallel == "fsdp" and dtype == "float16":
    fail("parallel=fsdp trains in bfloat16 or float32, not float16, whose loss scaling it does not share "
         "between processes; use --dtype=bfloat16")
mixed_precision = autocast(device, dtype)
if device_type == "cuda":
    allow_tf32()
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size


def log(*args):
    if master:
        print(*args, flush=True)


# -----------------------------------------------------------------------------
# data (prepare.py's token files), model, optimizer, state
data = Dataset(dataset, block_size)  # a resumed run's dataset name comes from its checkpoint
meta = data.meta
vocab_size = meta["vocab_size"]
if vocab_size > 1024:
    vocab_size = (vocab_size + 63) // 64 * 64  # multiples of 64 make the head's matmul faster
model_args |= {"vocab_size": vocab_size}
iter_num, best_val_loss = 0, float("inf")
torch.manual_seed(seed)  # the same initial weights in every process: fsdp does not copy rank 0's over
lora = None  # a LoRA run's adapter settings and the identity of its base, saved in its checkpoints
if resuming:
    model = ckpt.model_for(saved, resume_path, meta, dataset, block_size, merge=False)
    lora = saved.get("lora")
    model_args = saved["model_args"]
    iter_num, best_val_loss = saved["iter_num"], saved["best_val_loss"]
else:
    if os.path.exists(resume_path):
        fail(f"{out_dir} already holds a checkpoint; continue it with --init_from=resume, "
             f"or choose another --out_dir")
    if init_from == "scratch":  # under fsdp on the meta device: no process ever holds the whole model
        with torch.device("meta") if parallel == "fsdp" else nullcontext():
            model = GPT(GPTConfig(**model_args))
    else:  # fine-tuning: weights from elsewhere, a fresh optimizer and schedule
        model = ckpt.pretrained(init_from, meta, dataset, block_size, dropout)
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
model.recompute_blocks = activation_checkpointing
flops_per_iter = model.flops_per_token() * tokens_per_iter
if target_flops > 0:  # the budget decides the length; a resumed run keeps it, as its config holds it
    if "max_iters" in given:
        fail("max_iters and target_flops both decide the run's length; leave max_iters out, or pass --target_flops=0")
    max_iters = config["max_iters"] = math.ceil(target_flops / flops_per_iter)
    if not resuming and "lr_decay_iters" not in given:
        lr_decay_iters = config["lr_decay_iters"] = max_iters
    if decay_lr and lr_decay_iters <= warmup_iters:
        fail(f"target_flops {target_flops:.3g} buys {max_iters} iterations of {flops_per_iter:.3g} FLOPs, not more "
             f"than warmup_iters ({warmup_iters}); raise target_flops or lower warmup_iters")
if parallel == "fsdp":  # before the move to the GPU, so that each process moves only its shard there
    model.shard(init_device_mesh(device_type, (world_size,)), torch.bfloat16 if dtype == "bfloat16" else None)
if model.lm_head.weight.is_meta:  # each process allocates its shards and draws them as one process would
    model.to_empty(device=device)
    model.init_weights(seed)
model.to(device)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
# Muon orthogonalises in bf16 only where bf16 is fast, the rule dtype=auto follows
opt = configure_optimizers(model, weight_decay, learning_rate, (beta1, beta2), device_type, optimizer, muon_lr,
                           muon_momentum, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
# the sampler has its own generator, shared by all processes: batches must not shift when dropout
# or evaluation draw numbers
train_gen = torch.Generator().manual_seed(seed)
if saved is not None and not eval_only:
    ckpt.restore_run(saved, model, opt, scaler, train_gen, device_type)
saved = None  # free the memory
mc_tasks = [load_task(name, data.tokenizer, eval_examples, hellaswag) for name in task_names(eval_tasks)]

raw_model = model
if compile:
    model = torch.compile(model)
if distributed and parallel == "ddp":
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
# log.jsonl, loss.png, eval.json and wandb: written by rank 0
title = f"{os.path.basename(os.path.abspath(out_dir))}: {dataset}, {raw_model.num_params() / 1e6:.1f}M parameters"
runlog = RunLog(out_dir, master, ckpt_path, title, config, wandb_log and not eval_only, wandb_project,
                wandb_run_name, plot, plot_log_scale)


def get_lr(it):
    """The learning rate of step it, for learning_rate's groups (Muon's run at muon_lr / learning_rate times it)."""
    if not decay_lr:
        return learning_rate
    # 1) linear warmup for warmup_iters steps
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) after lr_decay_iters, min_lr
    if it >= lr_decay_iters:
        return min_lr
    # 3) in between, wsd holds learning_rate to the last decay_frac of lr_decay_iters (or warmup's end), then falls...
    if lr_schedule == "wsd":
        decay_start = max(warmup_iters, lr_decay_iters - decay_frac * lr_decay_iters)
        if it < decay_start:
            return learning_rate
        return learning_rate + (it - decay_start) / (lr_decay_iters - decay_start) * (min_lr - learning_rate)
    # ...and cosine falls along half a cosine to min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def gradient_sync(last):
    """Processes average their gradients in the backward pass of an optimizer step's last micro-step only;
    the others accumulate locally."""
    if parallel == "fsdp":
        model.set_requires_gradient_sync(last)
    return model.no_sync() if distributed and parallel == "ddp" and not last else nullcontext()


def save_checkpoint(name):
    """Save out_dir/name.pt, written by rank 0; or under fsdp out_dir/name.dcp, to which every process
    writes its own shard of the model and optimizer."""
    ranks_rng = ckpt.rng_states(device_type)  # every process takes part
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
    ckpt.save_run(state, raw_model, opt, os.path.join(out_dir, name + suffix))


scored = (None, {})  # (iteration, eval_tasks' results): the last evaluation's, which the final one reuses


def task_results():
    """eval_tasks' results on their first eval_examples examples (all processes take part)."""
    global scored
    if scored[0] != iter_num:
        scored = iter_num, {key: multiple_choice(raw_model, encoded, skipped, mixed_precision, device)
                            for key, encoded, skipped in mc_tasks}
    return scored[1]


def final_evaluation():
    """The whole validation split and eval_tasks into out_dir/eval.json, beside what evaluate.py added there
    for the same checkpoint at the same iteration (all processes take part)."""
    checkpoint = resume_path if eval_only else ckpt_path
    result = evaluate_split(raw_model, data.tokens("val"), block_size, batch_size, data.byte_lengths,
                            data.tokenizer.eot_token, mixed_precision, device)
    log(describe("val", result))
    for key, task_result in task_results().items():
        log(describe(key, task_result))
    earlier = earlier_results(os.path.join(out_dir, "eval.json"), checkpoint, iter_num, refuse_other=False)
    result = earlier | result | task_results() | {"iter_num": iter_num, "dataset": dataset,
                                                   "checkpoint": checkpoint, "config": config}
    runlog.write("eval.json", json.dumps(result, indent=1))
    log(f"-> {os.path.join(out_dir, 'eval.json')}")


def shut_down():
    """Ranks meet before the process group goes: rank 0 may still be writing, and a process that exits
    with the group alive aborts in gloo's destructors ("terminate called without an active exception")."""
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if eval_only:  # evaluating this run's checkpoint, or what init_from names into a new folder
    final_evaluation()
    shut_down()
    sys.exit(0)

# -----------------------------------------------------------------------------
# training loop
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


def check_finite(value, what):
    if not math.isfinite(value):
        fail(f"{what} became {value} by iteration {iter_num}; training stopped without saving, so "
             f"{ckpt_path} still holds the last good state. Lower learning_rate or raise warmup_iters, "
             f"then resume")


# one search, as every run pays for it: a peak measured too low shows as an MFU of n/a, not over 100%
peak_flops = measure_peak_flops(device, dtype, searches=1) if master else 0.0
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
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

    # one optimizer step: this process's micro-batches, gradients averaged over all processes at the last
    micro_batches = batches(data.tokens("train"), train_gen, batch_size, block_size, gradient_accumulation_steps,
                            device, rank, world_size)
    step_loss = 0.0
    for micro_step, (x, y) in enumerate(micro_batches):
        last = micro_step == len(micro_batches) - 1
        with gradient_sync(last), mixed_precision:
            _, loss = model(x, y)
            loss = loss / gradient_accumulation_steps
        scaler.scale(loss).backward()
        step_loss += loss.detach()
    if grad_clip > 0:
        scaler.unscale_(opt)  # clip the true gradients, not the fp16 loss scaler's multiples of them
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    if iter_num == first_iter:
        log(memory_report(model, opt, device))
    opt.zero_grad(set_to_none=True)
    iter_num += 1
    window_iters += 1

    # every log_interval: the step's loss over the global batch, speed and ETA (all processes take part)
    record = None
    if iter_num % log_interval == 0 or iter_num == max_iters:
        lossf = all_reduce_sum([step_loss.item()], device)[0] / world_size
        check_finite(lossf, "the training loss")
        dt = (time.time() - window_start) / window_iters
        tokens_per_s = tokens_per_iter / dt
        mfu = raw_model.estimate_mfu(tokens_per_s / world_size, peak_flops) if master else None
        log(f"iter {iter_num}/{max_iters} | loss {lossf:.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms/iter | "
            f"{tokens_per_s:,.0f} tok/s | mfu {'n/a' if mfu is None else format(mfu, '.1%')} | "
            f"{iter_num * flops_per_iter:.2e} FLOPs | eta {(max_iters - iter_num) * dt / 60:.1f} min")
        record = {"iter": iter_num, "tokens": iter_num * tokens_per_iter, "flops": iter_num * flops_per_iter,
                  "loss": lossf, "lr": lr, "ms_per_iter": dt * 1000, "tokens_per_s": tokens_per_s, "mfu": mfu}
        window_start, window_iters = time.time(), 0
    stopping = agreed_stop()

    # every eval_interval: estimate both losses and save (all processes take part)
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        losses = estimate_loss(model, data, batch_size, eval_iters, seed, mixed_precision, device)
        check_finite(losses["train"] + losses["val"], "the evaluation loss")
        scores = {f"{key}/{m}": result[m] for key, result in task_results().items() for m in ("acc", "acc_norm")}
        log(f"eval at iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
            f"val perplexity {math.exp(losses['val']):.2f}, val bpb {losses['val_bpb']:.4f}" +
            "".join(f", {key} {'n/a' if value is None else format(value, '.4f')}" for key, value in scores.items()))
        record = dict(record or {"iter": iter_num, "tokens": iter_num * tokens_per_iter},
                      train_loss=losses["train"], val_loss=losses["val"], val_perplexity=math.exp(losses["val"]),
                      val_bpb=losses["val_bpb"], **scores)
        improved = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        if improved:
            save_checkpoint("best")
        if improved or always_save_checkpoint or iter_num == max_iters:
            save_checkpoint("ckpt")
        window_start, window_iters = time.time(), 0  # evaluation time is not training time

    if record is not None:
        runlog.record(record)
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
