"""
The optimizers beside AdamW: Muon for the hidden matrices, and one object that steps several optimizers.

Muon (Jordan et al. 2024) is SGD with Nesterov momentum whose update for each 2-D matrix is replaced by
the nearest orthogonal matrix, found by a few Newton-Schulz steps, so that every direction of the update
moves at the same rate. configure_optimizers decides which of a GPT's parameters each optimizer gets.
"""
import math
from collections import defaultdict

import torch


def orthogonalize(G, steps=5):
    """Roughly the orthogonal factor U V^T of G = U S V^T, for a batch of matrices G (N, m, n) with m <= n:
    a quintic Newton-Schulz iteration whose coefficients make the small singular values grow fast
    (Jordan et al. 2024). It leaves them between about 0.7 and 1.2 rather than exactly 1, which trains
    as well. Works in G's dtype."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values into [0, 1]
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A, in one call: on a CPU the calls cost the most
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    return X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for hidden matrices only: embeddings, head and gains stay
    with AdamW.

    A group's `stacked` says how many matrices each parameter stacks along its rows (3 for attention's
    q, k, v); each is orthogonalised on its own. All matrices of one shape go through one batched
    iteration: on a CPU, orthogonalising many small matrices one by one costs more in overhead than in
    arithmetic. `dtype` is the iteration's: bf16 only where it is fast, as with dtype=auto.

    Under FSDP a process holds only some rows of each matrix, and its momentum for them; orthogonalising
    needs the whole update, so every process gathers it, orthogonalises it as one process would, and
    applies its own rows."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, dtype=torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, stacked=1))
        self.dtype = dtype

    @torch.no_grad()
    def step(self, closure=None):  # closure: torch.distributed.checkpoint calls step(closure=None)
        from torch.distributed.tensor import DTensor, distribute_tensor  # FSDP's sharded tensors
        # matrices orthogonalised in one batch: those of one shape, from every group, the iteration wanting
        # rows <= cols; under FSDP each whole matrix alone, so that a process never holds more than one
        batches = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                rows, cols = p.size(0) // group["stacked"], p.size(1)
                batches[id(p) if isinstance(p, DTensor) else (min(rows, cols), max(rows, cols))].append((p, group))
        for members in batches.values():
            updates = []
            for p, group in members:
                update = p.grad.lerp(self.state[p]["momentum_buffer"], group["momentum"])  # Nesterov
                if isinstance(update, DTensor):
                    update = update.full_tensor()
                update = update.view(group["stacked"], -1, p.size(1))  # (stacked, out, in)
                updates.append(update.mT if update.size(1) > update.size(2) else update)
            ortho = orthogonalize(torch.cat(updates).to(self.dtype))
            for (p, group), o in zip(members, ortho.split([group["stacked"] for _, group in members]), strict=True):
                out_features = p.size(0) // group["stacked"]
                o = (o.mT if out_features > p.size(1) else o).reshape(p.shape).to(p.dtype)
                if isinstance(p, DTensor):  # every process computed the same o: keep its own rows
                    o = distribute_tensor(o, p.device_mesh, p.placements, src_data_rank=None)
                # a tall matrix's update gets larger, as in Jordan et al.'s reference implementation
                scale = math.sqrt(max(1.0, out_features / p.size(1)))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(o, alpha=-group["lr"] * scale)


class Optimizers:
    """Several optimizers stepped as one, so the training loop needs no loop over them."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, optimizer="adamw",
                         muon_lr=0.02, muon_momentum=0.95, muon_dtype=torch.float32):
    """AdamW for everything; or Muon for the blocks' matrices and AdamW for embeddings, head and gains.
    A param group's lr_scale is its learning rate relative to learning_rate, for the schedule."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    hidden = {name: p for name, p in params.items() if optimizer == "muon" and ".h." in name and p.dim() == 2}
    rest = [p for name, p in params.items() if name not in hidden]
    # decay the 2-D weights of matmuls and embeddings; leave biases and norm gains alone
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused AdamW updates all parameters in one kernel, on CUDA and (since torch 2.4) on the CPU, where
    # it beats foreach by a wide margin; other devices batch with foreach
    extra = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
    if not hidden:
        return adamw
    # c_attn stacks the q, k and v matrices, and a swiglu c_fc the gate and value: each is its own map
    stacked = {name: 3 if "c_attn" in name else 2 if "c_fc" in name and model.config.mlp == "swiglu" else 1
               for name in hidden}
    muon_groups = [{"params": [p for name, p in hidden.items() if stacked[name] == n], "stacked": n,
                    "lr_scale": muon_lr / learning_rate} for n in sorted(set(stacked.values()))]
    muon = Muon(muon_groups, lr=muon_lr, momentum=muon_momentum, weight_decay=weight_decay, dtype=muon_dtype)
    return Optimizers(adamw, muon)


def parts(optimizer):
    """The torch optimizers that optimizer steps: those inside an Optimizers, or optimizer itself."""
    return list(optimizer.optimizers) if isinstance(optimizer, Optimizers) else [optimizer]
