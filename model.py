"""
The GPT, all in one file: the only code that knows the architecture.

A decoder-only transformer in the GPT-2 mould (Radford et al. 2019): token embeddings, pre-norm blocks of causal
self-attention and an MLP, a final norm, and an output head tied to the token embedding. GPT-2 itself is the default;
each later choice is one GPTConfig field:
  norm     layernorm | rmsnorm (Zhang & Sennrich 2019)
  pos      learned position embeddings | rope, rotary embeddings of queries and keys (Su et al. 2021)
  mlp      gelu | swiglu, a gated MLP (Shazeer 2020) | relu2, squared ReLU (So et al. 2021)
  qk_norm  RMSNorm of each head's queries and keys (Dehghani et al. 2023)
Training uses AdamW, or Muon for the hidden matrices with AdamW for the rest (optim.py). Fine-tuning may instead
train LoRA adapters (Hu et al. 2021) beside chosen matmuls of a frozen model. Under torchrun GPT.shard splits the
model across processes with FSDP2 (Zhao et al. 2023).
"""
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

CHOICES = {"norm": ("layernorm", "rmsnorm"), "pos": ("learned", "rope"), "mlp": ("gelu", "swiglu", "relu2")}


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2 has
    norm: str = "layernorm"  # 'layernorm' | 'rmsnorm'
    norm_eps: float = 1e-5  # added to the variance inside every norm, as GPT-2's layer_norm_epsilon
    pos: str = "learned"  # 'learned' | 'rope'
    mlp: str = "gelu"  # 'gelu' | 'swiglu' | 'relu2'
    mlp_hidden: int = 0  # width of the MLP's hidden layer; 0 is GPT-2's 4 * n_embd (8/3 * n_embd for swiglu)
    qk_norm: bool = False

    def __post_init__(self):
        """Refuse a config that would build a broken model, or none, with a message that names the field."""
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for key, valid in CHOICES.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"unknown {key} {getattr(self, key)!r}; use {', '.join(valid[:-1])} or {valid[-1]}")
        if self.norm_eps <= 0 or self.mlp_hidden < 0:
            raise ValueError(f"norm_eps must be positive and mlp_hidden not negative, "
                             f"got {self.norm_eps} and {self.mlp_hidden}")


def make_norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rotary_tables(head_size, length, base=10000.0):
    """cos and sin of every position's rotation angles, each (length, head_size // 2)."""
    frequencies = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), frequencies)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """Rotate pairs of x's features (the first half against the second) by each position's angles, x (B, nh, T, hs),
    cos and sin (1 or B, 1, T, hs // 2): dot products of rotated queries and keys depend only on their distance."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Linear(nn.Linear):
    """nn.Linear, faster on the CPU for a generation step's few rows (up to 8) of fp32 (bf16 gains nothing): its
    speed is how fast each weight streams from memory, which MKL's matrix-vector product does on one thread. As one
    batched product of a block of rows per thread, or compiled, as a sum inductor loops over the rows, every core."""

    def forward(self, x):
        w = self.weight
        if x.numel() > 8 * w.shape[1] or w.dtype != torch.float32 or not w.is_cpu:
            return super().forward(x)
        if torch.compiler.is_compiling():  # which could not trace get_num_threads below (an int, not a tensor)
            if torch.is_autocast_enabled("cpu"):  # a sum is not cast as a matmul would be
                return super().forward(x)
            y = (x.unsqueeze(-2) * w).sum(-1)
        else:
            blocks = torch.get_num_threads()
            if blocks < 2 or w.shape[0] % blocks:
                return super().forward(x)
            rows = x.reshape(-1, w.shape[1]).t()  # (in, rows)
            y = torch.bmm(w.view(blocks, -1, w.shape[1]), rows.expand(blocks, -1, -1))  # (blocks, out / blocks, rows)
            y = y.permute(2, 0, 1).reshape(*x.shape[:-1], w.shape[0])
        return y if self.bias is None else y + self.bias


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        if config.qk_norm:  # bounds attention logits, which otherwise grow with the weights
            self.q_norm = nn.RMSNorm(config.n_embd // config.n_head, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(config.n_embd // config.n_head, eps=config.norm_eps)

    def forward(self, x, cache=None, pos=0, rope=None, mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # the tables' rows for the tokens' positions
            q, k = rotate(q, *rope), rotate(k, *rope)
        assert T == 1 or (not torch.is_tensor(pos) and pos == 0), "a cache is filled from 0, then a token at a time"
        if cache is not None:
            # keys and values of earlier positions are kept, so a new token attends without recomputing them; a
            # compiled step's token (pos a tensor) attends to the whole buffer, later keys masked: one graph for all
            cache_k, cache_v = cache
            if torch.is_tensor(pos):
                assert mask is None, "a step at a tensor position makes its own mask"
                cache_k[:B].index_copy_(2, pos.view(1), k.to(cache_k.dtype))
                cache_v[:B].index_copy_(2, pos.view(1), v.to(cache_v.dtype))
                k, v = cache_k[:B], cache_v[:B]
                mask = (torch.arange(k.size(2), device=k.device) <= pos)[None, None]
            else:
                cache_k[:B, :, pos:pos + T] = k
                cache_v[:B, :, pos:pos + T] = v
                k, v = cache_k[:B, :, :pos + T], cache_v[:B, :, :pos + T]
        # a single new query sees every cached key; a block of queries from 0 is causal, or as mask says
        S = k.size(-2)  # keys: T, a cache's pos + T, or its whole buffer
        if q.is_cpu and (T == 1 and q.dtype == torch.float32 and torch.compiler.is_compiling() or
                         q.dtype == torch.bfloat16 and torch.is_grad_enabled() and S <= 256):
            # plainly for a compiled step's query, fused with its neighbours where flash attention is a call of its
            # own, and for bf16 training (slow in the flash backward) over contexts as long as measured (memory T * S)
            scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.mT
            seen = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T) if mask is None else mask[:, None]
            att = F.dropout(scores.masked_fill(~seen, float("-inf")).softmax(dim=-1), self.dropout, self.training)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None],
                                               is_causal=T > 1 and mask is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.activation = config.mlp
        # swiglu has three matrices, not two: a hidden width of 8/3 instead of 4 keeps the parameter count
        hidden = config.mlp_hidden or (8 * config.n_embd // 3 if self.activation == "swiglu" else 4 * config.n_embd)
        # swiglu's gate and value come from one matmul, c_fc, as attention's q, k and v do from c_attn
        self.c_fc = Linear(config.n_embd, (2 if self.activation == "swiglu" else 1) * hidden, bias=config.bias)
        self.c_proj = Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.activation == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, pos=0, rope=None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, pos, rope, mask)
        return x + self.mlp(self.ln_2(x))


class LoRALinear(nn.Module):
    """A linear layer with a low-rank path beside it: base(x) + alpha / rank * B A dropout(x) (Hu et al. 2021).
    B starts at zero, so until it trains the layer computes exactly what base does: a PEFT LoRA layer's computation,
    dropout on the path's input included, so the adapters export to PEFT as they are. A module around the layer, not
    a parametrization, which sees only the weight (it cannot drop the path's input) and forms B A at every step."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises, and PEFT
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def merged(self):
        """The base layer with the low-rank update added to its weight: the same function, one matmul."""
        with torch.no_grad():
            self.base.weight += (self.lora_B @ self.lora_A * self.scale).to(self.base.weight.dtype)
        return self.base


LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # the blocks' matmuls, by GPT-2's names for them


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        learned = {"wpe": nn.Embedding(config.block_size, config.n_embd)} if config.pos == "learned" else {}
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **learned,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.pos == "rope":  # derived from positions, not learned: kept out of the state dict; init_weights fills
            for name in ("rope_cos", "rope_sin"):
                self.register_buffer(name, torch.empty(config.block_size, config.n_embd // config.n_head // 2),
                                     persistent=False)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        self.recompute_blocks = False  # activation checkpointing: memory for a second forward of each block
        self.init_weights(torch.initial_seed())

    def init_weights(self, seed):
        """GPT-2's init: weights normal, std 0.02, the residual projections' scaled by 1/sqrt(2 * n_layer) so the
        residual stream's variance does not grow with depth (GPT-2 paper, 2.3); biases 0, gains 1. Each parameter's
        generator is seeded by seed and its name: sharded, each process draws whole parameters and keeps its rows."""
        if self.config.pos == "rope":  # buffers are empty too after the meta device
            tables = rotary_tables(self.config.n_embd // self.config.n_head, self.config.block_size)
            self.rope_cos, self.rope_sin = (t.to(self.rope_cos.device) for t in tables)
        if self.transformer.wte.weight is not self.lm_head.weight:  # to_empty unties them, outside FSDP
            self.transformer.wte.weight = self.lm_head.weight
        gains = {f"{name}.weight" for name, m in self.named_modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))}
        for name, p in self.named_parameters():
            if p.is_meta:
                continue  # to be initialised once its process's part is allocated
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02
            generator = torch.Generator().manual_seed(zlib.crc32(f"{seed} {name}".encode()))
            value = (torch.zeros(p.shape) if name.endswith(".bias") else torch.ones(p.shape) if name in gains else
                     torch.empty(p.shape).normal_(0.0, std, generator=generator)).to(p.device, p.dtype)
            if hasattr(p, "device_mesh"):  # a DTensor: this process's rows of the whole
                from torch.distributed.tensor import distribute_tensor
                value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
            with torch.no_grad():
                p.copy_(value)

    def num_params(self, non_embedding=True):
        """Parameter count, less the position embeddings (no matmul work) if non_embedding; wte is also the head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, cache=None, pos=0, reduction="mean", mask=None):
        """Logits and the mean loss over targets that are not -1; with reduction="none" each target's loss (0 at
        -1), the head run only where there is one. mask (B, T, T) lets a row hold several continuations of one
        context, each seeing only the context and itself: a token's position is then how many tokens it sees."""
        B, T = idx.shape
        assert reduction in ("mean", "none"), f"reduction {reduction!r}: mean or none"
        if mask is None:
            # a tensor position is generate's, which keeps it inside the block (a check would sync a GPU)
            assert torch.is_tensor(pos) or pos + T <= self.config.block_size, \
                f"sequence of {pos + T} tokens is longer than block_size {self.config.block_size}"
            positions = torch.arange(T, device=idx.device) + pos
        else:
            positions = mask.sum(-1) - 1
        x = self.transformer.wte(idx)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(positions)
        else:
            rope = self.rope_cos[positions].unsqueeze(-3), self.rope_sin[positions].unsqueeze(-3)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            if self.recompute_blocks and torch.is_grad_enabled():
                # keep only each block's input; its insides are computed again in the backward pass, their
                # dropout masks drawn again from the random state saved here (Chen et al. 2016)
                x = checkpoint(block, x, None, pos, rope, mask, use_reentrant=False)
            else:
                x = block(x, None if cache is None else cache[i], pos, rope, mask)
        x = self.transformer.ln_f(x)
        if targets is None:  # generation needs only the last position's distribution
            return self.lm_head(x[:, [-1], :]), None
        if reduction == "none":
            scored = targets != -1
            loss = torch.zeros(targets.shape, device=x.device)
            loss[scored] = F.cross_entropy(self.lm_head(x[scored]).float(), targets[scored], reduction="none")
            return None, loss
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def shard(self, mesh, param_dtype=None):
        """Split weights, gradients and optimizer state across mesh's processes (FSDP2), each holding 1/N: each block
        is a unit whose weights are gathered just before its forward and its backward and freed after, the embedding,
        final norm and head the last. With param_dtype (bf16), weights gather in it, gradients average in fp32."""
        # imported here: slow to import, and only fsdp needs it
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for block in self.transformer.h:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(self, mesh=mesh, mp_policy=policy)
        return self

    def flops_per_token(self):
        """Training FLOPs per token: 6 per parameter (forward and backward matmuls) plus attention's
        query-key and attention-value products, as in the PaLM paper (Chowdhery et al. 2022, appendix B).
        A frozen parameter (a LoRA run's base) saves the 2 of the backward pass that form its own gradient."""
        c = self.config
        frozen = sum(p.numel() for name, p in self.named_parameters()
                     if not p.requires_grad and name != "transformer.wpe.weight")  # as num_params counts
        return 6 * self.num_params() - 2 * frozen + 12 * c.n_layer * c.n_embd * c.block_size

    def estimate_mfu(self, tokens_per_s, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s as a fraction of the peak given; None above 1,
        which only a peak measured too low (on a busy machine) can give, and which nobody should read."""
        mfu = self.flops_per_token() * tokens_per_s / peak_flops
        return mfu if mfu <= 1 else None

    def crop_block_size(self, block_size):
        """Shorten the context, e.g. to fine-tune a 1024-context model on 256-token windows."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.config.pos == "learned":
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        else:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]

    def add_lora(self, rank, alpha, dropout, targets):
        """Wrap each block matmul named in targets in a LoRALinear (c_proj is attention's and the MLP's, as in PEFT)."""
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"lora_targets {','.join(unknown)} matches no layer; valid names: "
                             f"{', '.join(LORA_TARGETS)}")
        for name, module in list(self.transformer.h.named_modules()):
            parent, _, layer = name.rpartition(".")
            if layer in targets:
                if not 0 < rank <= min(module.in_features, module.out_features):
                    raise ValueError(f"lora_rank {rank} must be between 1 and the smaller side of the {layer} "
                                     f"matrix, {min(module.in_features, module.out_features)}")
                setattr(self.transformer.h.get_submodule(parent), layer, LoRALinear(module, rank, alpha, dropout))

    def adapters(self):
        """The LoRA adapters' parameters by name; empty when there are none."""
        return {name: p for name, p in self.named_parameters() if name.endswith((".lora_A", ".lora_B"))}

    def merge_lora(self):
        """Fold every adapter into the weight beside it, leaving a plain GPT that computes the same."""
        for name, module in list(self.named_modules()):
            if isinstance(module, LoRALinear):
                parent, _, layer = name.rpartition(".")
                setattr(self.get_submodule(parent), layer, module.merged())
        return self

    def new_cache(self, batch_size, device, dtype):
        """Key/value buffers for every layer, long enough for a whole block. Zeros, not garbage: a compiled step
        attends to the whole buffer, and a masked NaN would still spoil its weighted sum."""
        c = self.config
        shape = (batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
        return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                for _ in range(c.n_layer)]

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eot_token=None,
                 use_cache=True, generator=None, compile=False):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens.

        The model sees at most block_size tokens. When the window is full it slides forward by half a block, and
        with use_cache the cache is refilled from that window, so cached and recomputed generation condition on
        the same tokens. temperature 0 is greedy. A row that emits eot_token keeps emitting it; generation stops
        when every row has. Inference mode skips autograd's bookkeeping on a token's many small operations; with
        compile, inductor fuses them into one step of the cache, compiled once (its shapes never change).
        """
        # realize_opcount_threshold: a product's input (a norm, a gelu) computed once, not again for every weight row
        step = torch.compile(self, fullgraph=True, dynamic=False, options={"realize_opcount_threshold": 1}) \
            if compile and use_cache else None
        checked = False  # whether step has run in this call, dynamo checking that its graph fits
        block = self.config.block_size
        start = max(0, idx.size(1) - block)  # first token inside the window
        cache, filled = None, 0  # filled: how many window tokens the cache holds
        idx_next = None  # the token sampled last
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if idx.size(1) - start > block:
                start += block // 2
                filled = 0
            if not use_cache:
                logits, _ = self(idx[:, start:])
            elif filled == 0:
                if cache is None:  # under autocast, keys and values come out in the autocast dtype
                    autocasting = torch.is_autocast_enabled(idx.device.type)
                    dtype = torch.get_autocast_dtype(idx.device.type) if autocasting else self.lm_head.weight.dtype
                    cache = self.new_cache(idx.size(0), idx.device, dtype)
                logits, _ = self(idx[:, start:], cache=cache, pos=0)
                filled = idx.size(1) - start
            elif step is None:
                logits, _ = self(idx[:, -1:], cache=cache, pos=filled)
                filled += 1
            else:
                # the position, and the last token, as tensors of their own (a slice of idx has new strides, which
                # would compile again). Once dynamo has checked that the graph fits, nothing it checks changes here
                with torch.compiler.set_stance(skip_guard_eval_unsafe=checked):
                    logits, _ = step(idx_next, cache=cache, pos=torch.tensor(filled, device=idx.device))
                checked = True
                filled += 1
            idx_next = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            if eot_token is not None:
                idx_next = torch.where(done[:, None], eot_token, idx_next)
                done |= idx_next[:, 0] == eot_token
            idx = torch.cat((idx, idx_next), dim=1)
            if eot_token is not None and done.all():
                break
        with torch.inference_mode(False):  # an ordinary tensor, which autograd may use later
            return idx.clone()


def sample_next(logits, temperature, top_k, top_p, generator=None):
    """One token per row from logits (B, V): greedy at temperature 0, else softmax sampling
    restricted to the top_k most likely tokens and to the smallest set holding top_p of the mass."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p; the most likely always stays
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)
