"""
The GPT, all in one file: the only code that knows the architecture.

A decoder-only transformer in the GPT-2 mould (Radford et al. 2019): learned
token and position embeddings, pre-norm blocks of causal self-attention and a
GELU MLP, a final norm, and an output head tied to the token embedding.
"""
import json
import math
import os
import pickle
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2 has
    norm: str = "layernorm"  # 'layernorm' | 'rmsnorm' (Zhang & Sennrich 2019)
    norm_eps: float = 1e-5  # added to the variance inside every norm, as GPT-2's layer_norm_epsilon
    mlp_hidden: int = 0  # width of the MLP's hidden layer; 0 is GPT-2's 4 * n_embd

    def __post_init__(self):
        """Refuse a config that would build a broken model, or none, with a message that names the field."""
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"unknown norm {self.norm!r}; use layernorm or rmsnorm")
        if self.norm_eps <= 0 or self.mlp_hidden < 0:
            raise ValueError(f"norm_eps must be positive and mlp_hidden not negative, "
                             f"got {self.norm_eps} and {self.mlp_hidden}")


def make_norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, cache=None, pos=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            # keys and values of earlier positions are kept, so a new token attends without recomputing them
            cache_k, cache_v = cache
            cache_k[:B, :, pos:pos + T] = k
            cache_v[:B, :, pos:pos + T] = v
            k, v = cache_k[:B, :, :pos + T], cache_v[:B, :, :pos + T]
        # a single new query may see every cached key; a block of queries starting at 0 is causal
        assert pos == 0 or T == 1, "the cache is filled by one prompt at position 0, then one token at a time"
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        hidden = config.mlp_hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)

        self.apply(self._init_weights)
        # residual projections scaled by 1/sqrt(2*n_layer), so the residual stream's variance
        # does not grow with depth (GPT-2 paper, section 2.3)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameter count; position embeddings are left out by default as they do no matmul work.
        The token embedding stays in: it is also the output head."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, cache=None, pos=0):
        B, T = idx.shape
        assert pos + T <= self.config.block_size, \
            f"sequence of {pos + T} tokens is longer than block_size {self.config.block_size}"
        positions = torch.arange(pos, pos + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache[i], pos)
        x = self.transformer.ln_f(x)
        if targets is None:
            # generation needs only the last position's distribution
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay the 2-D weights of matmuls and embeddings; leave biases and norm gains alone
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # fused AdamW updates all parameters in one kernel, on CUDA and (since torch 2.4) on the CPU, where
        # it is 5x faster than foreach for the 10M-parameter char model; other devices batch with foreach
        extra = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per parameter (forward and backward matmuls) plus attention's
        query-key and attention-value products, as in the PaLM paper (Chowdhery et al. 2022, appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def estimate_mfu(self, tokens_per_s, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s as a fraction of the peak given."""
        return self.flops_per_token() * tokens_per_s / peak_flops

    def crop_block_size(self, block_size):
        """Shorten the context, e.g. to fine-tune a 1024-context model on 256-token windows."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def new_cache(self, batch_size, device, dtype):
        """Empty key/value buffers for every layer, long enough for a whole block."""
        c = self.config
        shape = (batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
        return [(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
                for _ in range(c.n_layer)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eot_token=None,
                 use_cache=True, generator=None):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens.

        The model sees at most block_size tokens. When the window is full it slides forward by half
        a block, and with use_cache the cache is refilled from that window, so cached and recomputed
        generation condition on the same tokens. temperature 0 is greedy. A row that emits eot_token
        keeps emitting it; generation stops when every row has.
        """
        block = self.config.block_size
        start = max(0, idx.size(1) - block)  # first token inside the window
        cache, filled = None, 0  # filled: how many window tokens the cache holds
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if idx.size(1) - start > block:
                start += block // 2
                filled = 0
            if not use_cache:
                logits, _ = self(idx[:, start:])
            elif filled == 0:
                if cache is None:  # under autocast, keys and values come out in the autocast dtype
                    kind = idx.device.type
                    autocasting = torch.is_autocast_enabled(kind)
                    dtype = torch.get_autocast_dtype(kind) if autocasting else self.lm_head.weight.dtype
                    cache = self.new_cache(idx.size(0), idx.device, dtype)
                logits, _ = self(idx[:, start:], cache=cache, pos=0)
                filled = idx.size(1) - start
            else:
                logits, _ = self(idx[:, -1:], cache=cache, pos=filled)
                filled += 1
            idx_next = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            if eot_token is not None:
                idx_next = torch.where(done[:, None], eot_token, idx_next)
                done |= idx_next[:, 0] == eot_token
            idx = torch.cat((idx, idx_next), dim=1)
            if eot_token is not None and done.all():
                break
        return idx


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


# -----------------------------------------------------------------------------
# Hugging Face GPT-2 checkpoints, both ways. GPT-2 is this architecture with layernorm, biases,
# tanh-approximated GELU ("gelu_new") and learned positions; its matmul weights are stored as
# Conv1D, shaped (in, out): the transpose of nn.Linear's.
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# config.json settings under which GPT2LMHeadModel computes something this architecture does not, with
# the value that matches it: another activation, attention scores not scaled by 1/sqrt(head size) or also
# by 1/layer, cross-attention to an encoder, an output head of its own
GPT2_AS_HERE = {"activation_function": "gelu_new", "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False, "tie_word_embeddings": True}


def from_hf_gpt2(folder, dropout=0.0):
    """A GPT from a Hugging Face GPT-2 folder: config.json plus model.safetensors or pytorch_model.bin."""
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{folder} holds a {hf.get('model_type')} model; only GPT-2 checkpoints can be imported")
    other = [f"{k}={hf[k]}" for k, v in GPT2_AS_HERE.items() if hf.get(k, v) != v]
    if other:
        raise ValueError(f"{folder} is a GPT-2 with {', '.join(other)}, which this model does not compute; "
                         f"only plain GPT-2 checkpoints can be imported")
    weights = os.path.join(folder, "model.safetensors")
    if os.path.exists(weights):
        from safetensors.torch import load_file
        state = load_file(weights)
    else:
        try:
            state = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{folder}/pytorch_model.bin contains Python objects that are not plain data; "
                             f"refusing to load it (it may run code)") from None
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, bias=True, norm="layernorm",
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp_hidden=hf.get("n_inner") or 0)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name == "lm_head.weight":
                continue  # tied to wte
            w = state[name.removeprefix("transformer.")]
            p.copy_(w.t() if name.endswith(HF_TRANSPOSED) else w)
    return model


def to_hf_gpt2(model, folder, eot_token=None):
    """Write model as a Hugging Face GPT-2 folder that GPT2LMHeadModel.from_pretrained loads."""
    from safetensors.torch import save_file
    c = model.config
    if c.norm != "layernorm":
        raise ValueError(f"GPT-2 has no {c.norm}; only layernorm models can be exported")
    state = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # transformers ties it to wte itself
        state[name] = (p.t() if name.endswith(HF_TRANSPOSED) else p).contiguous()
    if not c.bias:  # GPT-2 always has biases: zeros compute the same function
        for name, p in list(state.items()):
            if name.endswith("weight") and ("ln_" in name or name.endswith(HF_TRANSPOSED)):
                out_features = p.shape[-1] if name.endswith(HF_TRANSPOSED) else p.shape[0]
                state[name[:-len("weight")] + "bias"] = torch.zeros(out_features, dtype=p.dtype)
    hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
          "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
          "n_inner": c.mlp_hidden or None, "activation_function": "gelu_new", "layer_norm_epsilon": c.norm_eps,
          "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
          "tie_word_embeddings": True, "bos_token_id": eot_token, "eos_token_id": eot_token}
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().cpu().float() for k, v in state.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
