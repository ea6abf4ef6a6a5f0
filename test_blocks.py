"""The modern options of model.py, each against what it promises: rotary positions, SwiGLU and squared-ReLU
MLPs, QK-norm, and Muon (batched, stacked matrices) against a plain one-matrix-at-a-time reference."""
import math

import pytest
import torch
from torch.nn import functional as F

from hf import to_hf_gpt2
from model import GPT, GPTConfig, rotary_tables, rotate
from optim import Muon, Optimizers, configure_optimizers, orthogonalize

BLOCKS = [dict(pos="rope"), dict(mlp="swiglu"), dict(mlp="relu2"), dict(qk_norm=True),
          dict(pos="rope", mlp="swiglu", qk_norm=True, norm="rmsnorm")]


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(block_size=32, vocab_size=61, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=False) | kw
    model = GPT(GPTConfig(**args)).eval()
    with torch.no_grad():  # gains away from 1, so a missing or misplaced norm shows
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def explicit_attention(attn, x, qk_norm, rope):
    """Causal attention written out: per-head RMSNorm, rotation as complex multiplication, masked softmax."""
    B, T, C = x.shape
    hs = C // attn.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, attn.n_head, hs).transpose(1, 2) for t in (q, k, v))
    if qk_norm:
        q = q / q.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * attn.q_norm.weight
        k = k / k.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * attn.k_norm.weight
    if rope:
        angle = torch.arange(T)[:, None] * 10000.0 ** (-torch.arange(0, hs, 2) / hs)
        turn = torch.polar(torch.ones_like(angle), angle)
        q, k = (torch.view_as_real(torch.complex(t[..., :hs // 2], t[..., hs // 2:]) * turn) for t in (q, k))
        q, k = (torch.cat((t[..., 0], t[..., 1]), dim=-1) for t in (q, k))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return attn.c_proj((F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("qk_norm,rope", [(True, False), (False, True), (True, True)])
def test_attention_equals_explicit_computation(qk_norm, rope):
    model = tiny(qk_norm=qk_norm, pos="rope" if rope else "learned")
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 10, 32)
    table = (model.rope_cos[:10], model.rope_sin[:10]) if rope else None
    assert torch.allclose(attn(x, rope=table), explicit_attention(attn, x, qk_norm, rope), atol=1e-5)


def test_cpu_bf16_training_attention_equals_flash_attention():
    """On the CPU in bf16 with gradients on, attention is computed plainly (the flash kernel's backward is
    slow there); it must mean what scaled_dot_product_attention means: causal, a packed row's mask, a cache."""
    attn = tiny(qk_norm=True).to(torch.bfloat16).transformer.h[0].attn
    with torch.no_grad():  # outputs of order 1, so that a tolerance for bf16 still sees a wrong weighting
        attn.c_attn.weight.normal_(0.0, 0.3)
        attn.c_proj.weight.normal_(0.0, 0.3)
    x = torch.randn(2, 10, 32, dtype=torch.bfloat16)
    seen = torch.ones(10, 10, dtype=torch.bool).tril()
    seen[7:, 4:7] = False  # a context of 4 tokens, then two continuations of 3 that see only it and themselves
    cache = [torch.zeros(2, 4, 32, 8, dtype=torch.bfloat16) for _ in range(2)]

    def same_with_and_without_gradients(x, **kw):
        plain = attn(x, **kw)
        with torch.no_grad():
            flash = attn(x, **kw)
        assert plain.requires_grad and not flash.requires_grad
        torch.testing.assert_close(plain.float(), flash.float(), atol=2e-2, rtol=2e-2)

    same_with_and_without_gradients(x)
    same_with_and_without_gradients(x, mask=seen.expand(2, -1, -1))
    same_with_and_without_gradients(x[:, :6], cache=cache, pos=0)  # a prompt fills the cache
    same_with_and_without_gradients(x[:, 6:7], cache=cache, pos=6)  # one query, 7 cached keys


def test_rope_scores_depend_only_on_distance():
    model = tiny(pos="rope")
    q, k = torch.randn(2, 1, 1, 8)
    cos, sin = rotary_tables(8, 40)
    score = [[(rotate(q, cos[i:i + 1], sin[i:i + 1]) * rotate(k, cos[j:j + 1], sin[j:j + 1])).sum().item()
              for j in range(40)] for i in range(40)]
    for shift in (1, 7, 20):
        assert score[3][1] == pytest.approx(score[3 + shift][1 + shift], abs=1e-5)
    assert abs(score[3][1] - score[3][0]) > 1e-3  # but it does depend on the distance
    assert "transformer.wpe.weight" not in model.state_dict() and "rope_cos" not in model.state_dict()


@pytest.mark.parametrize("mlp", ["gelu", "swiglu", "relu2"])
def test_mlp_kinds(mlp):
    block = tiny(mlp=mlp).transformer.h[0].mlp
    x = torch.randn(3, 5, 32)
    h = x @ block.c_fc.weight.T
    if mlp == "swiglu":
        gate, value = h.chunk(2, dim=-1)
        h = gate * torch.sigmoid(gate) * value
    elif mlp == "relu2":
        h = h.clamp(min=0) ** 2
    else:
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    assert torch.allclose(block(x), h @ block.c_proj.weight.T, atol=1e-5)


def test_swiglu_keeps_the_parameter_count():
    for n_embd in (32, 128, 384):
        gelu, swiglu = (tiny(mlp=m, n_embd=n_embd).num_params() for m in ("gelu", "swiglu"))
        assert abs(swiglu - gelu) / gelu < 0.01, (n_embd, gelu, swiglu)


@pytest.mark.parametrize("kw", BLOCKS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("prompt_len,new", [(5, 20), (3, 70)])  # 70 new tokens slide past block_size 32
def test_cached_generation_equals_recomputation(kw, prompt_len, new):
    model = tiny(**kw)
    x = torch.randint(61, (2, prompt_len))
    cached = model.generate(x, new, temperature=0, use_cache=True)
    assert torch.equal(cached, model.generate(x, new, temperature=0, use_cache=False))


@pytest.mark.parametrize("kw", BLOCKS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_cached_logits_equal_the_full_forward(kw):
    model = tiny(**kw)
    x = torch.randint(61, (2, 14))
    cache = model.new_cache(2, "cpu", torch.float32)
    model(x[:, :8], cache=cache, pos=0)
    for i in range(8, 14):
        step, _ = model(x[:, i:i + 1], cache=cache, pos=i)
        assert torch.allclose(step, model(x[:, :i + 1])[0], atol=1e-5)


@pytest.mark.parametrize("kw", BLOCKS[:-1], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_gpt2_export_refuses_what_gpt2_cannot_hold(tmp_path, kw):
    key = next(iter(kw))
    with pytest.raises(ValueError, match=f"{key}={kw[key]}"):
        to_hf_gpt2(tiny(**kw), str(tmp_path))
    assert not any(tmp_path.iterdir())


def newton_schulz(G, steps=5):
    """The published quintic iteration (Jordan et al. 2024) for one wide matrix, written out here so that
    a change inside model.orthogonalize shows: scale to unit Frobenius norm, then X <- aX + (bA + cA^2)X."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X


def reference_muon_step(params, momentum, lr, weight_decay, stacked, buffers):
    """Muon as its definition reads, one matrix at a time: Nesterov momentum, then each stacked matrix
    (transposed to be wide) through the same Newton-Schulz iteration, scaled by sqrt(max(1, out/in))."""
    for p, n in zip(params, stacked, strict=True):
        buf = buffers.setdefault(p, torch.zeros_like(p))
        buf.mul_(momentum).add_(p.grad, alpha=1 - momentum)
        update = p.grad * (1 - momentum) + buf * momentum
        pieces = []
        for g in update.chunk(n, dim=0):
            tall = g.size(0) > g.size(1)
            o = newton_schulz(g.T if tall else g)
            pieces.append((o.T if tall else o) * math.sqrt(max(1.0, g.size(0) / g.size(1))))
        p.mul_(1 - lr * weight_decay).sub_(torch.cat(pieces) * lr)


def test_muon_matches_a_plain_reference():
    model, reference = tiny(mlp="swiglu"), tiny(mlp="swiglu")
    optimizer = configure_optimizers(model, 0.1, 2e-3, (0.9, 0.95), "cpu", "muon", muon_lr=0.05)
    assert isinstance(optimizer, Optimizers) and isinstance(optimizer.optimizers[1], Muon)
    lrs = {1: 0.05, 2: 0.03, 3: 0.02}  # one rate per group (by stacked matrices), though they share a batch
    for group in optimizer.optimizers[1].param_groups:
        group["lr"] = lrs[group["stacked"]]
    names = [n for n, p in model.named_parameters() if ".h." in n and p.dim() == 2]
    assert {n.split(".")[-2] for n in names} == {"c_attn", "c_proj", "c_fc"}  # wide, tall, and stacked 2 and 3
    stacked = [3 if "c_attn" in n else 2 if "c_fc" in n else 1 for n in names]
    matrices = [dict(reference.named_parameters())[n] for n in names]
    buffers = {}
    x = torch.randint(61, (4, 16))
    for _ in range(3):
        for m in (model, reference):
            m.zero_grad()
            m(x, x)[1].backward()
        optimizer.optimizers[1].step()
        with torch.no_grad():
            for n in lrs:
                chosen = [i for i, k in enumerate(stacked) if k == n]
                reference_muon_step([matrices[i] for i in chosen], 0.95, lrs[n], 0.1, [n] * len(chosen), buffers)
    for n, p in zip(names, matrices, strict=True):
        assert (dict(model.named_parameters())[n] - p).abs().max() < 1e-5, n
    assert all((dict(model.named_parameters())[n] != p).any() for n, p in tiny(mlp="swiglu").named_parameters()
               if n in names)  # they moved


def test_orthogonalize_flattens_the_spectrum():
    g = torch.randn(3, 16, 48) * torch.logspace(-2, 1, 48)  # singular values over three decades
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.3


def test_orthogonalize_is_the_quintic_newton_schulz_iteration():
    """On singular values spread over three decades (U diag(logspace(-3, 0)) V^T), where each step of the
    iteration still lifts the small ones, so a lost step shows."""
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(2, 32, 32, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(2, 64, 32, generator=gen))[0]
    G = U @ torch.diag(torch.logspace(-3, 0, 32)) @ V.mT  # (2, 32, 64)
    got = orthogonalize(G)
    for g, o in zip(G, got, strict=True):
        assert torch.allclose(o, newton_schulz(g), atol=1e-5)
        assert not torch.allclose(o, newton_schulz(g, steps=4), atol=1e-3)
    s = torch.linalg.svdvals(got)
    assert s.min() > 0.2 and s.max() < 1.3


def test_muon_and_modern_blocks_learn():
    model = tiny(pos="rope", mlp="swiglu", qk_norm=True).train()
    x = torch.randint(61, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = configure_optimizers(model, 0.0, 3e-3, (0.9, 0.95), "cpu", "muon")
    losses = []
    for _ in range(40):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
