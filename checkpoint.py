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
"""
import glob
import hashlib
import os
import pickle
import random
import re

import numpy as np
import torch

import tokenizer as tok
from model import GPT, GPTConfig, from_hf_gpt2

FORMAT = 2
# Files written before FORMAT 2 hold numpy's RNG state as an ndarray of uint32. These are the globals
# needed to rebuild exactly that, and they build arrays and dtypes, nothing that runs code. numpy 1.x
# wrote the first under its old module name.
OLD_FORMAT_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct,
                      (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def save(state, path):
    """Write atomically: a kill mid-write leaves the previous file whole."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"could not write {path} ({e.strerror}); the previous checkpoint is intact. "
                              f"Free disk space or choose a writable --out_dir, then resume") from None


def load(path):
    """A checkpoint's contents, read as data only, or a CheckpointError saying why not."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train one first or point --out_dir (or --init_from) "
                              f"at a run")
    try:
        with torch.serialization.safe_globals(OLD_FORMAT_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if unsafe:
            raise CheckpointError(f"{path} contains Python objects that are not plain data ({unsafe[1]}); "
                                  f"refusing to load it (it may run code)") from None
        reason = "damaged, or not written by torch.save" if isinstance(e, pickle.UnpicklingError) else \
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise CheckpointError(f"{path} is not a checkpoint of this project ({reason})") from None
    if not isinstance(ckpt, dict) or not {"model_args", "model", "config", "meta"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a checkpoint of this project (it lacks model_args, model, "
                              f"config or meta)")
    return ckpt


def model_from(ckpt, path, merge=True, **overrides):
    """The GPT a checkpoint holds, with its weights; overrides change GPTConfig fields such as dropout.
    A LoRA run's adapters are put on its base and, unless merge=False (to train them on), merged into it."""
    if "lora" in ckpt:
        return adapted_base(ckpt, path, merge, overrides.get("dropout", ckpt["model_args"]["dropout"]))
    try:
        model = GPT(GPTConfig(**{**ckpt["model_args"], **overrides}))
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        raise CheckpointError(f"{path} is not a checkpoint this model can load "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
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
        raise CheckpointError(f"{path} holds adapters that do not fit {lora['base']} "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model.merge_lora() if merge else model


def base_model(source, dropout=0.0):
    """The model init_from names: a checkpoint file (merged, if it is a LoRA run), hf:FOLDER or a GPT-2 size."""
    if source.endswith(".pt"):
        return model_from(load(source), source, dropout=dropout)
    return hf_gpt2(source, dropout)


def hf_gpt2(source, dropout=0.0):
    """GPT-2 weights from a local Hugging Face folder (hf:FOLDER) or from the hub by name."""
    folder = source.removeprefix("hf:") if source.startswith("hf:") else ""
    if not folder:
        try:
            from huggingface_hub import snapshot_download
            folder = snapshot_download(source, allow_patterns=["config.json", "model.safetensors"])
        except Exception as e:
            raise CheckpointError(f"could not download {source} from the Hugging Face hub ({type(e).__name__}); "
                                  f"without internet, copy its folder here and use --init_from=hf:FOLDER") from None
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise CheckpointError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        return from_hf_gpt2(folder, dropout)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"could not import {folder}: {e}") from None


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


def find(out_dir, name):
    """out_dir/name, or with no out_dir the most recently written checkpoint of that name under checkpoint/."""
    if out_dir:
        return os.path.join(out_dir, name)
    found = sorted(glob.glob(os.path.join("checkpoint", "*", name)), key=os.path.getmtime)
    if not found:
        raise CheckpointError("no checkpoint found under checkpoint/; train one (e.g. make demo) or pass --out_dir")
    return found[-1]


def open_run(out_dir, name):
    """(model, tokenizer, path) of a run's checkpoint, ready to sample from."""
    path = find(out_dir, name)
    ckpt = load(path)
    return model_from(ckpt, path), tokenizer_from(ckpt), path


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
