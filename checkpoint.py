"""
The one place that knows the checkpoint format: what a checkpoint holds, how it is written, and how it
is read back without running anything inside it.

A checkpoint is one file written by torch.save, a dict of:
  format         FORMAT (files written before the format had a number have none)
  model_args     GPTConfig's fields
  model          the weights, as the uncompiled model names them
  optimizer      the optimizer's state_dict; scaler: the GradScaler's, when fp16 trains
  iter_num, best_val_loss
  config         every train.py key of the run
  meta           the dataset's meta.json, so the tokenizer can be rebuilt without the dataset
  rng            "ranks": one RNG_STATE per process; "sampler": the batch sampler's generator state
  lora           only in a LoRA run's checkpoint, whose `model` then holds just the adapters: their rank,
                 alpha, dropout and targets, and the base they adapt, as `base` (init_from's name for it:
                 a checkpoint file, hf:FOLDER or a GPT-2 size) and `base_sha256` (weights_sha256 of it).
                 Readers rebuild the base, check that it is the same, and put the adapters on it.

Everything in it is a tensor or a plain Python value (dict, list, tuple, str, int, float, bool, None), so
torch.load(weights_only=True) can read it. A file that asks for any other Python object is refused rather
than unpickled: unpickling an object runs whatever code its author chose.

A run sharded with FSDP saves NAME.dcp instead of NAME.pt: a symlink to the directory NAME.dcp.<iteration>,
so that a kill while the next one is written leaves it whole. In the directory:
  state.pt       the dict above without model and optimizer, written by rank 0
  __<rank>_0.distcp, .metadata
                 torch.distributed.checkpoint's (DCP) files: each process's shard of {"model", "optimizer"},
                 in get_state_dict's names, and the index of the shards
No process gathers the whole model to save it. DCP reshards as it reads, so any number of processes, or
one, can read the directory back. DCP itself unpickles its index and any non-tensor value without limits;
both are read here through loaders that admit only the index's own classes and plain data.
A run keeps one checkpoint of each name: writing NAME.pt removes NAME.dcp, and the other way round.

The sections below: the format and its atomic writes; sharded checkpoints; saving and restoring a whole
run; the models a checkpoint, a Hugging Face folder or a GPT-2 size hold; finding a run's checkpoints.
"""
import glob
import hashlib
import os
import pickle
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist

import tokenizer as tok
from configurator import InputError
from hf import load_gpt2
from model import GPT, GPTConfig
from optim import parts

FORMAT = 2
# Files written before FORMAT 2 hold numpy's RNG state as an ndarray of uint32. These are the globals
# needed to rebuild exactly that, and they build arrays and dtypes, nothing that runs code. numpy 1.x
# wrote the first under its old module name.
OLD_FORMAT_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct,
                      (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
SUFFIXES = (".pt", ".dcp")  # a checkpoint file, or a sharded checkpoint's directory


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def save(state, path):
    """Write atomically: a kill mid-write leaves the previous file whole."""
    tmp = path + ".tmp"
    try:
        write(state, tmp)
        os.replace(tmp, path)
        remove(stem(path) + ".dcp")
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"could not write {path} ({e.strerror}); the previous checkpoint is intact. "
                              f"Free disk space or choose a writable --out_dir, then resume") from None


def write(state, path):
    """torch.save the state, with the format number, and wait until it is on disk."""
    with open(path, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())


def load(path):
    """A checkpoint's contents, read as data only, or a CheckpointError saying why not."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train one first or point --out_dir (or --init_from) "
                              f"at a run")
    sharded = os.path.isdir(path)
    # a sharded checkpoint is read from the directory its link names now, even if a save moves the link
    directory = os.path.realpath(path) if sharded else None
    if sharded and not os.path.exists(os.path.join(directory, ".metadata")):
        raise CheckpointError(f"{path} is not a whole sharded checkpoint (it has no .metadata); point "
                              f"--init_from at the NAME.dcp link that a run writes")
    try:
        with torch.serialization.safe_globals(OLD_FORMAT_GLOBALS):
            ckpt = torch.load(os.path.join(directory, "state.pt") if sharded else path, map_location="cpu",
                              weights_only=True)
    except Exception as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if unsafe:
            raise CheckpointError(f"{path} contains Python objects that are not plain data ({unsafe[1]}); "
                                  f"refusing to load it (it may run code)") from None
        why = "damaged, or not written by torch.save" if isinstance(e, pickle.UnpicklingError) else reason(e)
        raise CheckpointError(f"{path} is not a checkpoint of this project ({why})") from None
    if not isinstance(ckpt, dict) or not {"model_args", "config", "meta"} <= ckpt.keys() or \
            not (sharded or "model" in ckpt):
        raise CheckpointError(f"{path} is not a checkpoint of this project (it lacks model_args, model, "
                              f"config or meta)")
    if sharded:
        ckpt["sharded"] = directory  # model and optimizer stay on disk until read_sharded
    return ckpt


def reason(e):
    """An exception in one line: the first process's, when DCP gathered them."""
    if hasattr(e, "failures"):
        e = next(iter(e.failures.values()))[0]
    return f"{type(e).__name__}: " + next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:300]


# -----------------------------------------------------------------------------
# sharded checkpoints (FSDP): one directory, every process writing its own shards
# What DCP's index (.metadata) is made of: its own dataclasses, sizes, dtypes and a layout's name
DCP_INDEX_GLOBALS = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "ChunkStorageMetadata",
    "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}


def save_sharded(state, model, optimizer, path):
    """Write a sharded checkpoint, path being NAME.dcp. Every process calls this and writes its own shard
    of the model and optimizer into a new directory, which the symlink at path then points to. The
    directory must be on a filesystem that every process, on every node, sees."""
    import torch.distributed.checkpoint as dcp  # here: slow to import, and only sharded runs need it
    from torch.distributed.checkpoint.state_dict import get_state_dict
    plan = [None, None]  # the new directory's name, or why there is none; rank 0 decides
    if dist.get_rank() == 0:
        try:
            current = linked(path)
            for left in glob.glob(glob.escape(path) + ".[0-9]*"):  # left by a killed write
                if os.path.realpath(left) != current:
                    shutil.rmtree(left, ignore_errors=True)
            iteration = f"{os.path.basename(path)}.{state['iter_num']:07d}"
            # saved twice at one iteration: the second beside the first
            plan[0] = iteration + "b" if current and os.path.basename(current) == iteration else iteration
        except OSError as e:
            plan[1] = reason(e)
    dist.broadcast_object_list(plan)
    name, error = plan
    target = os.path.join(os.path.dirname(path), name or "")
    if not error:
        try:
            model_state, optimizer_state = get_state_dict(model, parts(optimizer))
            dcp.save({"model": untied(model, model_state), "optimizer": optimizer_state}, checkpoint_id=target)
        except (Exception, dcp.api.CheckpointException) as e:  # DCP gathers every process's: no Exception
            error = reason(e)
    if dist.get_rank() == 0 and not error:
        try:
            write(state, os.path.join(target, "state.pt"))
            if os.path.lexists(path + ".tmp"):
                os.remove(path + ".tmp")
            os.symlink(name, path + ".tmp")
            os.replace(path + ".tmp", path)  # the one step that moves the checkpoint on
            own = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)) + "."
            if current and current.startswith(own):  # never a directory elsewhere that a link was set to by hand
                shutil.rmtree(current, ignore_errors=True)
            remove(stem(path) + ".pt")
        except OSError as e:
            error = reason(e)
    outcome = [error]
    dist.broadcast_object_list(outcome)  # every process ends the run alike, not rank 0 alone
    if outcome[0]:
        raise CheckpointError(f"could not write {path} ({outcome[0]}); the previous checkpoint is intact. "
                              f"Free disk space or choose a writable --out_dir, then resume")


def linked(path):
    """The directory that the sharded checkpoint at path is (its link's target, resolved), or None. A real
    directory there, as a copy that followed the link leaves, is first renamed to where a link can name it."""
    if os.path.isdir(path) and not os.path.islink(path):
        os.rename(path, path + ".0000000")
        os.symlink(os.path.basename(path) + ".0000000", path)
    return os.path.realpath(path) if os.path.lexists(path) else None


def remove(path):
    """Delete a checkpoint: a file; or a sharded checkpoint's link first, so that no reader finds it half
    deleted, then the directories it has pointed to (or the directory itself, in a copy)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    if path.endswith(".dcp"):
        for folder in glob.glob(glob.escape(path) + ".[0-9]*"):
            shutil.rmtree(folder, ignore_errors=True)


def untied(model, state_dict):
    """state_dict without the second name of a tied parameter (the head's weight is the token embedding):
    DCP would write it twice, and reading the first name fills both."""
    first = dict(model.named_parameters()).keys()
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
    return {name: t for name, t in state_dict.items() if name not in tied}


class IndexUnpickler(pickle.Unpickler):
    """Unpickles DCP's index, refusing every global but the classes and values it is made of."""

    def find_class(self, module, name):
        if (module, name) in DCP_INDEX_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed in a checkpoint's index")


def read_index(path):
    """DCP's index of the sharded checkpoint at path, unpickled by IndexUnpickler."""
    from torch.distributed.checkpoint.metadata import Metadata
    with open(os.path.join(path, ".metadata"), "rb") as f:
        metadata = IndexUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"its index holds a {type(metadata).__name__}, not DCP's Metadata")
    for where in (metadata.storage_data or {}).values():  # shards are files beside the index, nowhere else
        name = getattr(where, "relative_path", None)
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
            raise ValueError(f"its index names a shard file {name!r} outside its directory")
    return metadata


def read_sharded(directory, state_dict, path=None, no_dist=False):
    """Fill state_dict's tensors (plain or sharded) from a sharded checkpoint's directory (path: the name
    the user gave it, for messages)."""
    path = path or directory
    import torch.distributed.checkpoint as dcp

    class CheckedIndexReader(dcp.FileSystemReader):
        """DCP's reader, handed the index that read_index checked rather than unpickling it with pickle.load."""

        def read_metadata(self, *args, **kwargs):
            index.storage_meta = index.storage_meta or dcp.metadata.StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    class DataOnlyPlanner(dcp.DefaultLoadPlanner):
        """DCP's planner, reading non-tensor values only if torch.load(weights_only=True) accepts them."""

        def load_bytes(self, read_item, value):
            torch.load(value, weights_only=True)  # raises on anything but plain data
            value.seek(0)
            super().load_bytes(read_item, value)

    try:
        index = read_index(directory)  # refused here, as DCP would log a traceback and try other files
        with warnings.catch_warnings():  # reading without collectives is meant, in one process or several
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state_dict, storage_reader=CheckedIndexReader(directory), planner=DataOnlyPlanner(),
                     no_dist=no_dist)
    except (Exception, dcp.api.CheckpointException) as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        if unsafe:
            raise CheckpointError(f"{path} contains Python objects that are not plain data ({unsafe[1]}); "
                                  f"refusing to load it (it may run code)") from None
        raise CheckpointError(f"{path} does not fit this model ({reason(e)})") from None


# -----------------------------------------------------------------------------
# a whole run: saved, and restored for an exact resume
def save_run(state, model, optimizer, path):
    """Save a run: state (what train.py writes out: iteration, config, meta, random states...) with the
    model's weights and the optimizer's state. NAME.pt is one file, and only rank 0 should call this for
    it; NAME.dcp is sharded, and every process calls it. A LoRA run (state has "lora") saves its adapters
    alone: readers rebuild the base from where it came from."""
    if path.endswith(".dcp"):
        return save_sharded(state, model, optimizer, path)
    weights = {name: p.detach() for name, p in model.adapters().items()} if "lora" in state else model.state_dict()
    save({"model": weights, "optimizer": optimizer.state_dict(), **state}, path)


def restore_run(ckpt, model, optimizer, scaler, sampler, device_type):
    """Put back what save_run saved beside the model: the optimizer's state (either of them sharded or
    not), the loss scaler's, the batch sampler's generator, and this process's random streams. Resumed with
    another number of processes, each keeps the seeds the run set instead."""
    restore_optimizer(ckpt, model, optimizer)
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    sampler.set_state(ckpt["rng"]["sampler"])
    ranks = ckpt["rng"]["ranks"]
    world_size, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if len(ranks) == world_size:
        set_rng_state(ranks[rank], cuda=device_type == "cuda")


def rng_states(device_type):
    """Every process's random states, gathered for saving: each process draws its own dropout masks, so
    an exact resume needs them all. Every process must call this."""
    state = rng_state(cuda=device_type == "cuda")
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_optimizer(ckpt, model, optimizer):
    """Put a checkpoint's optimizer state into the optimizer of model, either of them sharded or not."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor
    optimizers = parts(optimizer)
    scales = [group.get("lr_scale") for group in optimizer.param_groups]  # as configured now: muon_lr may change
    if "sharded" in ckpt:  # DCP reads each process's part, whatever the number of processes that wrote it
        state = get_optimizer_state_dict(model, optimizers)
        read_sharded(ckpt["sharded"], {"optimizer": state})
        set_optimizer_state_dict(model, optimizers, state)
    else:
        state = ckpt["optimizer"]
        for opt, opt_state in zip(optimizers, state.get("optimizers", [state]), strict=True):
            params = [p for group in opt.param_groups for p in group["params"]]  # as state_dict numbers them
            for i, values in opt_state["state"].items():
                p = params[i]
                if isinstance(p, DTensor):  # a whole tensor from an unsharded run: keep this process's rows
                    values.update({k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                                   for k, v in values.items() if torch.is_tensor(v) and v.shape == p.shape})
        optimizer.load_state_dict(state)
    for group, scale in zip(optimizer.param_groups, scales, strict=True):
        if scale is not None:
            group["lr_scale"] = scale


def rng_state(cuda=False):
    """This process's random states as plain values: numpy's key array becomes a list of ints."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, key.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}


def set_rng_state(state, cuda=False):
    """Restore what rng_state saved (or what a checkpoint from before FORMAT 2 holds)."""
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if cuda and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])


# -----------------------------------------------------------------------------
# model sources: a checkpoint (a LoRA run's on its base), hf:FOLDER, a GPT-2 size
def model_from(ckpt, path, merge=True, **overrides):
    """The GPT a checkpoint holds, with its weights; overrides change GPTConfig fields such as dropout.
    A LoRA run's adapters are put on its base and, unless merge=False (to train them on), merged into it."""
    if "lora" in ckpt:
        return adapted_base(ckpt, path, merge, overrides.get("dropout", ckpt["model_args"]["dropout"]))
    try:
        model = GPT(GPTConfig(**{**ckpt["model_args"], **overrides}))
        if "sharded" in ckpt:  # each process reads every shard
            read_sharded(ckpt["sharded"], {"model": untied(model, model.state_dict())}, path, no_dist=True)
        else:
            model.load_state_dict(ckpt["model"])
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path} is not a checkpoint this model can load ({reason(e)})") from None
    return model


def adapted_base(ckpt, path, merge, dropout):
    lora = ckpt["lora"]
    model = base_model(lora["base"], dropout)
    if weights_sha256(model) != lora["base_sha256"]:
        raise CheckpointError(f"{path} holds adapters of {lora['base']}, whose weights have changed since "
                              f"(their sha256 differs); restore the base model they were trained on")
    if model.config.block_size > ckpt["model_args"]["block_size"]:
        model.crop_block_size(ckpt["model_args"]["block_size"])
    try:
        model.add_lora(lora["rank"], lora["alpha"], lora["dropout"], lora["targets"])
        if ckpt["model"].keys() != model.adapters().keys():
            raise KeyError(f"{len(ckpt['model'])} adapter tensors for {len(model.adapters())} places")
        model.load_state_dict(ckpt["model"], strict=False)  # strict would ask for the base's weights too
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path} holds adapters that do not fit {lora['base']} ({reason(e)})") from None
    return model.merge_lora() if merge else model


def base_model(source, dropout=0.0):
    """The model init_from names: a checkpoint file (merged, if it is a LoRA run), hf:FOLDER or a GPT-2 size."""
    if source.endswith(SUFFIXES):
        return model_from(load(source), source, dropout=dropout)
    return load_gpt2(source, dropout)


def model_for(ckpt, path, meta, dataset, block_size, **overrides):
    """The model of a checkpoint, to train or evaluate on a dataset of meta.json meta: refused unless it was
    trained with the dataset's tokenizer and its context holds block_size tokens."""
    theirs = ckpt["meta"]
    if any(theirs.get(k) != meta.get(k) for k in ("tokenizer", "vocab_size", "tokenizer_sha256", "chars")):
        raise CheckpointError(f"{path} was trained with a {theirs.get('tokenizer')} tokenizer of "
                              f"{theirs.get('vocab_size')} ids, but dataset {dataset!r} uses {meta['tokenizer']} "
                              f"with {meta['vocab_size']}; use a dataset prepared with the checkpoint's tokenizer")
    if block_size > ckpt["model_args"].get("block_size", 0):
        raise CheckpointError(f"block_size {block_size} exceeds the checkpoint's "
                              f"{ckpt['model_args'].get('block_size')}; lower --block_size")
    return model_from(ckpt, path, **overrides)


def pretrained(source, meta, dataset, block_size, dropout):
    """The model init_from names to fine-tune on a dataset of meta.json meta: a checkpoint, hf:FOLDER or
    a GPT-2 size, checked as model_for checks."""
    if source.endswith(SUFFIXES):
        return model_for(load(source), source, meta, dataset, block_size, dropout=dropout)
    if meta["tokenizer"] != "gpt2":
        raise CheckpointError(f"GPT-2 weights need a dataset prepared with the gpt2 tokenizer, but {dataset!r} "
                              f"uses {meta['tokenizer']}; run python prepare.py --tokenizer=gpt2")
    gpt2 = load_gpt2(source, dropout)
    if gpt2.config.vocab_size < meta["vocab_size"]:
        raise CheckpointError(f"{source} has {gpt2.config.vocab_size} token embeddings, but dataset {dataset!r} "
                              f"uses {meta['vocab_size']} token ids; use a GPT-2 checkpoint with GPT-2's vocabulary")
    if block_size > gpt2.config.block_size:
        raise CheckpointError(f"block_size {block_size} exceeds the model's {gpt2.config.block_size}; "
                              f"lower --block_size")
    return gpt2


def weights_sha256(model):
    """The identity of a model's weights: sha256 over its state_dict's names, shapes, dtypes and bytes, in
    name order. Equal for the same weights however they were loaded, so an adapter can name its base."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(f"{name} {tuple(t.shape)} {t.dtype}\n".encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def tokenizer_from(ckpt):
    """The tokenizer the checkpoint's model was trained with (a BPE file is read from its dataset's folder)."""
    try:
        return tok.from_meta(ckpt["meta"], tok.dataset_dir(str(ckpt["config"].get("dataset", ""))))
    except tok.TokenizerError as e:
        raise CheckpointError(str(e)) from None


# -----------------------------------------------------------------------------
# finding a run's checkpoints
def stem(path):
    """A checkpoint's path without its suffix: ckpt of ckpt.pt and of ckpt.dcp."""
    for suffix in SUFFIXES:
        path = path.removesuffix(suffix)
    return path


def existing(path):
    """The checkpoint saved as path in either format (NAME.pt or NAME.dcp; the newer if a kill left both),
    or path itself if there is neither."""
    found = [stem(path) + suffix for suffix in SUFFIXES if os.path.exists(stem(path) + suffix)]
    return max(found, key=os.path.getmtime) if found else path


def find(out_dir, name):
    """out_dir/name, or with no out_dir the most recently written checkpoint of that name under checkpoint/
    (ckpt.pt also finds a sharded run's ckpt.dcp)."""
    if out_dir:
        return existing(os.path.join(out_dir, name))
    found = [path for suffix in SUFFIXES for path in glob.glob(os.path.join("checkpoint", "*", stem(name) + suffix))
             if os.path.exists(path)]  # not a link a kill left dangling
    found.sort(key=os.path.getmtime)
    if not found:
        raise CheckpointError("no checkpoint found under checkpoint/; train one (e.g. make demo) or pass --out_dir")
    return found[-1]


def open_run(out_dir, name):
    """(model, tokenizer, path) of a run's checkpoint, ready to sample from."""
    path = find(out_dir, name)
    ckpt = load(path)
    return model_from(ckpt, path), tokenizer_from(ckpt), path
