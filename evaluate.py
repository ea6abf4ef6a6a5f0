"""
How good is the model: its loss on a dataset's splits. train.py estimates it at each evaluation and
measures the whole validation split at the end (eval.json). Under torchrun every process takes its share
and the sums are added up, so any number of processes gives the numbers of one.
"""
import math

import numpy as np
import torch
import torch.distributed as dist

from dataloader import to_device, windows


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


@torch.no_grad()
def estimate_loss(model, data, batch_size, eval_iters, seed, mixed_precision, device):
    """Mean loss over eval_iters random batches per split of data, the same batches at every evaluation,
    averaged over processes. The batches come from a generator of their own and dropout is off, so an
    evaluation draws nothing from training's random streams."""
    rank, _ = process()
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(seed + 1000 * (rank + 1))
        tokens = data.tokens(split)
        total = 0.0
        for _ in range(eval_iters):
            starts = torch.randint(len(tokens) - data.block_size, (batch_size,), generator=gen).tolist()
            with mixed_precision:
                total += model(*windows(tokens, starts, data.block_size, device))[1].item()
        s, n = all_reduce_sum([total, eval_iters], device)
        out[split] = s / n
    model.train()
    return out


@torch.no_grad()
def evaluate_split(model, tokens, block_size, batch_size, mixed_precision, device):
    """(mean loss, tokens predicted) over a whole split: consecutive non-overlapping windows, every token
    after the first predicted once."""
    rank, world_size = process()
    model.eval()
    n_targets = len(tokens) - 1
    starts = list(range(0, n_targets, block_size))[rank::world_size]
    # without gradients there is room for more rows: up to 64, while the logits stay under 2**27 floats
    rows = max(batch_size, min(64, 2 ** 27 // (block_size * model.config.vocab_size)))
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
            x[row, :n] = torch.from_numpy(tokens[s:s + n].astype(np.int64))
            y[row, :n] = torch.from_numpy(tokens[s + 1:s + 1 + n].astype(np.int64))
        with mixed_precision:
            loss = model(to_device(x, device), to_device(y, device))[1]
        if chunk:
            loss_sum += loss.item() * sum(lengths)
            count += sum(lengths)
    loss_sum, count = all_reduce_sum([loss_sum, count], device)
    model.train()
    return loss_sum / count, int(count)
