"""
How good is a model: its loss on a dataset's validation split, in nats per token and in bits per byte (which
compares models whatever their tokenizers), and its accuracy on multiple-choice tasks: HellaSwag, or a jsonl
of your own questions. train.py calls this at each evaluation and at the end. As a script it evaluates a run
or any model source:

    python evaluate.py --out_dir=checkpoint/demo --tasks=val,mc:tasks/shakespeare.jsonl
    python evaluate.py --init_from=gpt2 --tasks=hellaswag --hellaswag=hellaswag_val.jsonl --out=gpt2.json
    torchrun --standalone --nproc_per_node=2 evaluate.py --out_dir=checkpoint/demo --tasks=val

Under torchrun every process takes its share of the work and the results are added up, so any number of
processes gives exactly the numbers of one.
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint as ckpt
import tokenizer as tok
from configurator import InputError, autocast, configure, defaults_from, fail, resolve_device, resolve_dtype
from dataloader import Dataset, to_device, windows

# -----------------------------------------------------------------------------
out_dir = ""  # a run folder: its checkpoint and dataset are evaluated, and its eval.json gains the results
checkpoint_name = "ckpt.pt"  # or best.pt
init_from = ""  # instead of a run: hf:FOLDER | gpt2[-medium|-large|-xl] | path/ckpt.pt | path/ckpt.dcp
tasks = "val"  # comma-separated: val | hellaswag | mc:PATH (a jsonl of {"context", "choices", "label"})
dataset = ""  # val's dataset, a folder under data/; default: the run's
hellaswag = ""  # HellaSwag's validation set: hellaswag_val.jsonl, or a folder holding the hub dataset's files
eval_examples = 0  # score the first N examples of each multiple-choice task; 0 scores all
out = ""  # a JSON file for the results; default: the run's eval.json (merged: earlier keys are kept)
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------
HELLASWAG_HUB = "Rowan/hellaswag"
TASKS = "val, hellaswag and mc:PATH (a multiple-choice jsonl)"


def process():
    """(rank, world_size): this process's place among those torchrun started, or (0, 1)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce_sum(values, device):
    """Element-wise sums over all processes (the values themselves in a single process)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def shares(n):
    """The forwards this process runs of n planned ones, taken in turn: as many for every process, those past
    the plan (None) spare, as under fsdp each forward is a collective. The plan does not depend on the number
    of processes, and each forward's sums land in their own slot before all are added, so the results are
    bitwise those of one process."""
    rank, world_size = process()
    return [i if i < n else None for i in range(rank, math.ceil(n / world_size) * world_size, world_size)]


@torch.no_grad()
def estimate_loss(model, data, batch_size, eval_iters, seed, mixed_precision, device):
    """Mean loss over eval_iters random batches per split of data, the same batches at every evaluation,
    averaged over processes, and val_bpb over the val batches. The batches come from a generator of their
    own and dropout is off, so an evaluation draws nothing from training's random streams."""
    rank, _ = process()
    training = model.training
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(seed + 1000 * (rank + 1))
        tokens = data.tokens(split)
        total, text_loss, text_bytes = 0.0, 0.0, 0
        for _ in range(eval_iters):
            starts = torch.randint(len(tokens) - data.block_size, (batch_size,), generator=gen).tolist()
            x, y = windows(tokens, starts, data.block_size, device)
            with mixed_precision:  # the training forward, which a compiled model runs without a graph break
                logits = model(x, y)[0]
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
            total += losses.mean().item()
            text = y != data.tokenizer.eot_token
            text_loss += losses[text].sum().item()
            text_bytes += data.byte_lengths[y.cpu()].sum().item()
        total, text_loss, text_bytes, n = all_reduce_sum([total, text_loss, text_bytes, eval_iters], device)
        out[split] = total / n
        if split == "val":
            out["val_bpb"] = text_loss / math.log(2) / text_bytes
    model.train(training)
    return out


@torch.no_grad()
def evaluate_split(model, tokens, block_size, batch_size, byte_lengths, eot, mixed_precision, device,
                   progress=False):
    """The whole split in non-overlapping windows of block_size, every token predicted once, the first after
    an end-of-text as every other document's first token is. Returns val_loss (nats per predicted token),
    perplexity, tokens (how many were predicted), val_bpb (bits per byte: the loss of every token but
    end-of-text over the UTF-8 bytes of the text they make, byte_lengths giving each id's) and bytes."""
    training = model.training
    model.eval()
    n = len(tokens)
    starts = range(0, n, block_size)
    # without gradients there is room for more rows: up to 64, while the logits stay under 2**27 floats
    rows = max(batch_size, min(64, 2 ** 27 // (block_size * model.config.vocab_size)))
    plan = [starts[i:i + rows] for i in range(0, len(starts), rows)]
    sums = np.zeros((len(plan), 4))  # per forward: loss, text tokens' loss, tokens, bytes
    for i in tqdm(shares(len(plan)), desc="val", unit=" forwards", disable=not progress, dynamic_ncols=True):
        chunk = plan[i] if i is not None else []
        x = torch.zeros(max(1, len(chunk)), block_size, dtype=torch.int64)
        y = torch.full((max(1, len(chunk)), block_size), -1, dtype=torch.int64)  # -1: nothing to predict
        for row, s in enumerate(chunk):
            m = min(block_size, n - s)
            inputs = tokens[s - 1:s - 1 + m] if s else np.concatenate([[eot], tokens[:m - 1]])
            x[row, :m] = torch.from_numpy(inputs.astype(np.int64))
            y[row, :m] = torch.from_numpy(tokens[s:s + m].astype(np.int64))
        with mixed_precision:
            losses = model(to_device(x, device), to_device(y, device), reduction="none")[1].double().cpu()
        if chunk:
            counted = y >= 0
            text = counted & (y != eot)
            sums[i] = (losses.sum().item(), losses[text].sum().item(), counted.sum().item(),
                       byte_lengths[y[counted]].sum().item())
    loss, text_loss, count, n_bytes = np.reshape(all_reduce_sum(sums.ravel().tolist(), device), sums.shape).sum(0)
    model.train(training)
    return {"val_loss": loss / count, "perplexity": math.exp(loss / count), "tokens": int(count),
            "val_bpb": text_loss / math.log(2) / n_bytes, "bytes": int(n_bytes)}


# -----------------------------------------------------------------------------
# multiple-choice tasks: each choice is scored by its tokens' loss after the context's, as in build-nanogpt
# and the Eleuther harness; acc picks the lowest summed loss, acc_norm the lowest loss per token
def task_names(spec):
    """The tasks a comma-separated spec names, each checked, none named twice in results."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        if name not in ("val", "hellaswag") and not (name.startswith("mc:") and len(name) > 3):
            raise InputError(f"unknown task {name!r}; the tasks are {TASKS}")
    keys = [task_key(name) for name in names]
    for key in keys:
        if keys.count(key) > 1:
            raise InputError(f"tasks names {key} twice (results are kept by the file's name without its folder); "
                             f"name each task once, renaming one of two files of the same name")
    return names


def task_key(name):
    """A task's name in results and logs: hellaswag, or mc: and the file's name without its suffix."""
    return f"mc:{os.path.splitext(os.path.basename(name[3:]))[0]}" if name.startswith("mc:") else name


def read_jsonl(path):
    """(line number, object) for each non-blank line of a jsonl file."""
    try:
        with open(path, "rb") as f:
            lines = f.readlines()
    except OSError as e:
        raise InputError(f"cannot read {path} ({e.strerror}); give a jsonl file, one JSON object per line") from None
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line.decode("utf-8"))
            except ValueError as e:  # UnicodeDecodeError included
                raise InputError(f"{path} line {n} is not JSON in UTF-8 ({e}); each line must be one JSON object") \
                    from None
            if not isinstance(record, dict):
                raise InputError(f"{path} line {n} is not a JSON object; each line must be one")
            records.append((n, record))
    return records


def checked(records, where, context_key, choices_key):
    """(context, choices, label) of each (line, record), refused with the line if it is not a question."""
    examples = []
    for n, r in records:
        context, choices, label = r.get(context_key), r.get(choices_key), r.get("label")
        if isinstance(label, str) and label.isdigit():  # the hub's copy of HellaSwag stores labels as text
            label = int(label)
        if not isinstance(context, str) or not context or not isinstance(choices, list) or \
                not all(isinstance(c, str) for c in choices):
            raise InputError(f"{where} line {n}: needs {context_key!r} (some text), {choices_key!r} (a list of texts) "
                             f"and 'label' (the right one's index)")
        if len(choices) < 2:
            raise InputError(f"{where} line {n}: {len(choices)} choice(s); a question needs at least 2")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise InputError(f"{where} line {n}: label {label!r} is not the index of one of its "
                             f"{len(choices)} choices (0 to {len(choices) - 1})")
        examples.append((context, choices, label))
    if not examples:
        raise InputError(f"{where} holds no examples")
    return examples


def hellaswag_examples(source):
    """HellaSwag's validation examples from source: the original repository's hellaswag_val.jsonl, a folder
    holding the hub dataset's files, or "" for the hub itself."""
    if source and os.path.isfile(source):
        return checked(read_jsonl(source), source, "ctx", "endings")
    if source and not os.path.isdir(source):
        raise InputError(f"--hellaswag={source} is neither a file nor a folder")
    import datasets
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(source or HELLASWAG_HUB, split="validation")
    except Exception as e:
        if source:
            raise InputError(f"could not read HellaSwag's validation split from {source} ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]})") from None
        raise InputError(f"could not load {HELLASWAG_HUB} from the Hugging Face hub ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}); without internet, pass --hellaswag=FILE "
                         f"(hellaswag_val.jsonl from github.com/rowanz/hellaswag) or --hellaswag=FOLDER (a copy of "
                         f"the hub dataset's files)") from None
    return checked(enumerate(rows, 1), source or HELLASWAG_HUB, "ctx", "endings")


def load_task(name, tokenizer, examples=0, hellaswag_source=""):
    """A multiple-choice task ready to score: (key, encoded examples, how many the tokenizer cannot encode).
    An example is its context's tokens, each choice's tokens (" " + choice, encoded on its own) and its label."""
    found = hellaswag_examples(hellaswag_source) if name == "hellaswag" else \
        checked(read_jsonl(name[3:]), name[3:], "context", "choices")
    encoded, skipped = [], 0
    for context, choices, label in found[:examples or None]:
        try:
            encoded.append((tokenizer.encode(context), [tokenizer.encode(" " + c) for c in choices], label))
        except tok.TokenizerError:  # a character model meets a character it never saw
            skipped += 1
    return task_key(name), encoded, skipped


@torch.no_grad()
def choice_losses(model, encoded, mixed_precision, device, progress=False):
    """(summed loss, tokens scored) of every choice of every example, in order. An example's choices share a
    row: the context once, then each choice at the positions that follow it, seeing only the context and
    itself, so a forward computes the context once, not once per choice. A choice whose sequence is longer
    than the model's context has a row of its own, cropped from the left: as the context's tokens then differ
    from choice to choice, they cannot be shared. Rows of similar length share a forward."""
    block_size, vocab_size = model.config.block_size, model.config.vocab_size
    rows, first = [], 0  # (context, choices, the choices' indices among all)
    for context, choices, _ in encoded:
        indices = range(first, first + len(choices))
        first += len(choices)
        if len(context) + max(map(len, choices)) <= block_size + 1:
            rows.append((context, choices, indices))
            continue
        for choice, i in zip(choices, indices, strict=True):
            sequence = (context + choice)[-(block_size + 1):]
            scored = min(len(choice), block_size)
            rows.append((sequence[:-scored], [sequence[-scored:]], [i]))
    length = [len(context) - 1 + sum(map(len, choices)) for context, choices, _ in rows]
    # tokens per forward: enough for the matmuls to run near their peak, few enough that the activations and
    # the scored tokens' logits (at most 2**27 floats) stay small
    budget = max(block_size, min(4096, 2 ** 27 // vocab_size))
    plan, forward = [], []
    for r in sorted(range(len(rows)), key=lambda r: -length[r]):
        if forward and (len(forward) + 1) * length[forward[0]] > budget:
            plan.append(forward)
            forward = []
        forward.append(r)
    plan += [forward] if forward else []
    sums = torch.zeros(first, dtype=torch.float64)
    training = model.training
    model.eval()
    for f in tqdm(shares(len(plan)), desc="choices", unit=" forwards", disable=not progress, dynamic_ncols=True):
        forward = plan[f] if f is not None else []
        T = max([length[r] for r in forward], default=1)
        x = torch.zeros(max(1, len(forward)), T, dtype=torch.int64)
        y = torch.full(x.shape, -1, dtype=torch.int64)
        # 0: the context; j: choice j; padding: a segment of its own per column, so it sees only the context
        segment = -1 - torch.arange(T).repeat(len(x), 1)
        choice = torch.full(x.shape, -1, dtype=torch.int64)  # the index of the choice a target belongs to
        for row, r in enumerate(forward):
            context, choices, indices = rows[r]
            at = len(context) - 1
            x[row, :at], segment[row, :at] = torch.tensor(context[:-1]), 0
            for j, (tokens, i) in enumerate(zip(choices, indices, strict=True)):
                n = len(tokens)
                x[row, at:at + n] = torch.tensor(context[-1:] + tokens[:-1])
                y[row, at:at + n] = torch.tensor(tokens)
                segment[row, at:at + n], choice[row, at:at + n] = j + 1, i
                at += n
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = causal & ((segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None]))
        with mixed_precision:
            losses = model(to_device(x, device), to_device(y, device), reduction="none",
                           mask=to_device(mask, device))[1].cpu()
        scored = choice >= 0
        sums.index_add_(0, choice[scored], losses[scored].double())
    counts = [len(c) for _, choices, _ in rows for c in choices]
    model.train(training)
    return np.stack([all_reduce_sum(sums.tolist(), device), counts], axis=1)


def multiple_choice(model, encoded, skipped, mixed_precision, device, progress=False):
    """acc (the lowest summed loss is the label's) and acc_norm (the lowest loss per token), ties going to
    the lower index, over the encoded examples; None where there are none."""
    losses = choice_losses(model, encoded, mixed_precision, device, progress)
    correct = correct_norm = first = 0
    for _, choices, label in encoded:
        summed, counts = losses[first:first + len(choices)].T
        first += len(choices)
        correct += int(np.argmin(summed) == label)
        correct_norm += int(np.argmin(summed / counts) == label)
    n = len(encoded)
    return {"acc": correct / n if n else None, "acc_norm": correct_norm / n if n else None, "examples": n,
            "skipped": skipped}


def earlier_results(path, checkpoint, iter_num, refuse_other):
    """What the results file at path holds about this checkpoint at this iteration, to keep beside new
    results: {} where there is none, or where the file describes another model or an earlier state of the
    run and is to be replaced. With refuse_other (a file the user named), a file that is not a JSON object
    or describes another model is refused rather than written over."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder) or os.path.isdir(path):
        why = "it is a folder" if os.path.isdir(path) else f"there is no folder {folder}"
        raise InputError(f"cannot write results to {path}: {why}; pass --out=FILE in a folder that exists")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        earlier = None
    if isinstance(earlier, dict) and earlier.get("iter_num") == iter_num and \
            os.path.normpath(str(earlier.get("checkpoint"))) == os.path.normpath(checkpoint):
        return earlier
    if refuse_other:
        held = (f"holds the results of {earlier.get('checkpoint')} at iteration {earlier.get('iter_num')}"
                if isinstance(earlier, dict) else "is not a JSON object")
        at = "" if iter_num is None else f" at iteration {iter_num}"
        raise InputError(f"{path} {held}, not of {checkpoint}{at}; move it away or pass another --out")
    return {}


def describe(key, result):
    """One line of a task's result."""
    if key == "val":
        return (f"full validation split: loss {result['val_loss']:.4f}, perplexity {result['perplexity']:.2f}, "
                f"{result['val_bpb']:.4f} bits per byte over {result['tokens']:,} tokens ({result['bytes']:,} bytes)")
    if result["acc"] is None:
        return f"{key}: no example scored; the tokenizer could encode none of {result['skipped']:,}"
    return (f"{key}: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} over {result['examples']:,} "
            f"examples" + (f" ({result['skipped']:,} skipped: the tokenizer cannot encode them)"
                           if result["skipped"] else ""))


if __name__ == "__main__":
    globals().update(configure(defaults_from(globals()), sys.argv[1:]))
    names = task_names(tasks)
    if not names:
        fail(f"--tasks names no task; the tasks are {TASKS}")
    if bool(out_dir) == bool(init_from):
        fail("evaluate a run with --out_dir=RUN or a model with --init_from=SOURCE (hf:FOLDER, gpt2 or a "
             "checkpoint file), one of the two")
    if eval_examples < 0:
        fail(f"eval_examples must be 0 (all) or more, got {eval_examples}")
    device = resolve_device(device)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if dist.is_initialized() and device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dtype = resolve_dtype(dtype, device)
    mixed_precision = autocast(device, dtype)
    master = process()[0] == 0

    source = ckpt.find(out_dir, checkpoint_name) if out_dir else init_from
    results = {"checkpoint": source}
    named_out = bool(out)
    if source.endswith(ckpt.SUFFIXES):  # a run's checkpoint: its own tokenizer, dataset and eval.json
        saved = ckpt.load(source)
        model, tokenizer = ckpt.model_from(saved, source), ckpt.tokenizer_from(saved)
        dataset = dataset or saved["config"].get("dataset", "")
        out = out or os.path.join(os.path.dirname(source), "eval.json")
        results["iter_num"] = saved.get("iter_num")
        saved = None
    else:
        model, tokenizer = ckpt.base_model(source), tok.gpt2()
    earlier = earlier_results(out, source, results.get("iter_num"), named_out) if out else {}
    model.to(device)
    loaded = [load_task(name, tokenizer, eval_examples, hellaswag) for name in names if name != "val"]
    if "val" in names:
        if not dataset:
            fail(f"the val task needs a dataset for {source}: pass --dataset=NAME (a folder under data/ "
                 f"prepared with its tokenizer)")
        data = Dataset(dataset, 1)
        if data.tokenizer.meta != tokenizer.meta:
            fail(f"dataset {dataset!r} was prepared with a {data.meta['tokenizer']} tokenizer that is not the "
                 f"model's; pass --dataset=NAME of a dataset prepared with the model's tokenizer")

    for name in names:
        if name == "val":
            result = evaluate_split(model, data.tokens("val"), model.config.block_size, 1, data.byte_lengths,
                                    tokenizer.eot_token, mixed_precision, device, progress=master)
            results.update(result, dataset=dataset)
            key = "val"
        else:
            key, encoded, skipped = loaded.pop(0)
            result = results[key] = multiple_choice(model, encoded, skipped, mixed_precision, device, master)
        if master:
            print(describe(key, result), flush=True)
    if master and out:
        try:
            with open(out + ".tmp", "w", encoding="utf-8") as f:
                json.dump(earlier | results, f, indent=1)
            os.replace(out + ".tmp", out)
        except OSError as e:
            fail(f"could not write {out} ({e.strerror}); the results are above")
        print(f"-> {out}")
    elif master:
        print(json.dumps(results, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
