"""
The token files prepare.py writes, read back: a dataset's meta.json checked against its train.bin and
val.bin, and windows of block_size tokens cut from them. train.py and bench.py both read data here.
"""
import functools
import os

import numpy as np
import torch

import tokenizer as tok
from configurator import InputError


class Dataset:
    """A prepared dataset, found by its name under data/. Anything that would fail later, less clearly, is
    refused here with the command that fixes it: a missing or damaged dataset, a BPE file that is not the
    one the bins were made with, bins shorter than meta.json promises, or a split shorter than a window."""

    def __init__(self, name, block_size):
        self.name, self.block_size = name, block_size
        self.dir = tok.dataset_dir(name)
        meta_path = os.path.join(self.dir, "meta.json")
        if not os.path.exists(meta_path):
            # prepare.py names a dataset <corpus> (gpt2), <corpus>_char or <corpus>_bpe<vocab_size>
            corpus, _, tokenizer = name.rpartition("_")
            command = (f"python prepare.py --dataset={corpus} --tokenizer=char" if corpus and tokenizer == "char" else
                       f"python prepare.py --dataset={corpus} --tokenizer=bpe --vocab_size={tokenizer[3:]}"
                       if corpus and tokenizer.startswith("bpe") and tokenizer[3:].isdigit() else
                       f"python prepare.py --dataset={name}")
            raise InputError(f"dataset {name!r} not found ({meta_path} is missing); make it with {command}")
        self.meta = tok.read_meta(self.dir)
        self.tokenizer = tok.from_meta(self.meta, self.dir)  # a BPE file must be the one the bins were made with
        self.dtype = np.dtype(self.meta["dtype"])
        for split in ("train", "val"):
            path, tokens = os.path.join(self.dir, f"{split}.bin"), self.meta[f"{split}_tokens"]
            if not os.path.exists(path):
                raise InputError(f"{path} is missing; prepare the dataset again")
            size = os.path.getsize(path)
            if size != tokens * self.dtype.itemsize:
                raise InputError(f"{path} holds {size} bytes but meta.json promises {tokens} {self.dtype} tokens; "
                                 f"prepare the dataset again")
            if tokens <= block_size:
                raise InputError(f"block_size {block_size} is longer than the {split} split ({tokens} tokens); "
                                 f"lower --block_size")

    @functools.cached_property
    def byte_lengths(self):
        """Each token id's UTF-8 bytes (a tensor, to index with targets), for bits per byte: read once, as a
        GPT-2 vocabulary takes a while."""
        return torch.tensor(tok.byte_lengths(self.tokenizer))

    def tokens(self, split):
        """The split's tokens: a fresh memmap per use, as a long-lived one keeps every page it touched resident."""
        return np.memmap(os.path.join(self.dir, f"{split}.bin"), dtype=self.dtype, mode="r")


def to_device(x, device):
    if device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def windows(data, starts, block_size, device):
    """Inputs and next-token targets, each (len(starts), block_size), for the windows at the start offsets."""
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in starts]).astype(np.int64))
    return to_device(x, device), to_device(y, device)


def batches(data, generator, batch_size, block_size, steps, device, rank=0, world_size=1):
    """This process's `steps` micro-batches of batch_size random windows. Every process draws the whole
    global batch from the same generator and keeps its own rows, so the data depends only on the global
    batch, not on how it is split into processes and accumulation steps."""
    starts = torch.randint(len(data) - block_size, (world_size * steps, batch_size), generator=generator)
    return [windows(data, row.tolist(), block_size, device) for row in starts[rank * steps:(rank + 1) * steps]]
