import math
import os

import pytest
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig, Linear, sample_next
from optim import configure_optimizers


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(block_size=32, vocab_size=61, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)
    args.update(kw)
    return GPT(GPTConfig(**args)).eval()


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("bias", [True, False])
def test_shapes_and_loss(norm, bias):
    model = tiny(norm=norm, bias=bias)
    x = torch.randint(61, (3, 16))
    logits, loss = model(x, x)
    assert logits.shape == (3, 16, 61)
    assert loss.shape == ()
    logits, loss = model(x)
    assert logits.shape == (3, 1, 61) and loss is None


def test_init_loss_is_uniform_guess():
    model = tiny(n_layer=4, vocab_size=500)
    x, y = torch.randint(500, (2, 8, 32))
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(500)) < 0.1


def test_causality():
    model = tiny()
    x = torch.randint(61, (1, 20))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 61  # change only later tokens
    a, _ = model(x, x)
    b, _ = model(y, y)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-6)
    assert not torch.allclose(a[0, 12:], b[0, 12:], atol=1e-3)


def test_sdpa_equals_explicit_masked_softmax():
    model = tiny()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 10, 32)
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, 4, C // 4).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // 4)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    reference = attn.c_proj((F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, C))
    assert torch.allclose(attn(x), reference, atol=1e-5)


def test_tied_embedding_shares_storage():
    model = tiny()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_parameter_count_follows_the_architecture():
    model = tiny()
    V, T, L, C = 61, 32, 2, 32
    attention = C * 3 * C + 3 * C + C * C + C
    mlp = C * 4 * C + 4 * C + 4 * C * C + C
    total = V * C + T * C + L * (attention + mlp + 2 * 2 * C) + 2 * C  # the head is the token embedding
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - T * C  # positions do no matmul work


def test_residual_projections_are_scaled():
    model = tiny(n_layer=8, n_embd=64)
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.0015
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("prompt_len,new", [(5, 20), (3, 70)])  # 70 new tokens slide past block_size 32
def test_kv_cache_greedy_equals_recompute(prompt_len, new):
    model = tiny()
    x = torch.randint(61, (2, prompt_len))
    cached = model.generate(x, new, temperature=0, use_cache=True)
    recomputed = model.generate(x, new, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached, recomputed)


def test_cached_logits_match_full_forward():
    model = tiny()
    x = torch.randint(61, (1, 12))
    cache = model.new_cache(1, "cpu", torch.float32)
    model(x[:, :8], cache=cache, pos=0)
    for i in range(8, 12):
        step, _ = model(x[:, i:i + 1], cache=cache, pos=i)
        full, _ = model(x[:, :i + 1])
        assert torch.allclose(step, full, atol=1e-5)


BLOCK_KINDS = dict(gpt2=dict(bias=True), relu2=dict(mlp="relu2", bias=False),
                   modern=dict(pos="rope", mlp="swiglu", norm="rmsnorm", qk_norm=True, bias=False))


@pytest.mark.parametrize("kw", BLOCK_KINDS.values(), ids=BLOCK_KINDS.keys())
def test_a_step_at_a_tensor_position_attends_to_the_keys_up_to_it(kw):
    """The compiled step's path (the position a tensor, the whole buffer attended with later keys masked) gives
    the full forward's logits, though the buffer holds another window's keys and values past the position."""
    model = tiny(**kw)
    x = torch.randint(61, (2, 12))
    cache = model.new_cache(2, "cpu", torch.float32)
    for k, v in cache:
        k.normal_(0, 3.0), v.normal_(0, 3.0)  # leftovers the mask must hide
    model(x[:, :8], cache=cache, pos=0)
    for i in range(8, 12):
        step, _ = model(x[:, i:i + 1], cache=cache, pos=torch.tensor(i))
        full, _ = model(x[:, :i + 1])
        assert torch.allclose(step, full, atol=1e-5), (step - full).abs().max()


@pytest.mark.parametrize("kw", BLOCK_KINDS.values(), ids=BLOCK_KINDS.keys())
def test_the_step_of_generation_traces_to_one_graph_for_every_position(kw):
    """What generate(compile=True) compiles: one step of the cache traces to one graph, which serves every
    later position without tracing again, and computes what the full forward does, its plain attention
    hiding the buffer's leftovers past the position (dynamo alone, the graph run as traced: inductor's part
    is make test-compile's)."""
    import torch._dynamo
    torch._dynamo.reset()  # other tests' graphs of the same forward must not count, or be reused
    model = tiny(**kw)
    graphs = []

    def count(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    step = torch.compile(model, backend=count, fullgraph=True, dynamic=False)
    x = torch.randint(61, (1, 14))
    cache = model.new_cache(1, "cpu", torch.float32)
    for k, v in cache:
        k.normal_(0, 3.0), v.normal_(0, 3.0)
    with torch.inference_mode():
        model(x[:, :8], cache=cache, pos=0)
        for i in range(8, 14):
            logits, _ = step(x[:, i:i + 1].clone(), cache=cache, pos=torch.tensor(i))
            assert torch.allclose(logits, model(x[:, :i + 1])[0], atol=1e-5)
    assert len(graphs) == 1


@pytest.mark.skipif(not os.environ.get("TEST_COMPILE"), reason="inductor takes a while here; make test-compile")
@pytest.mark.parametrize("kw", BLOCK_KINDS.values(), ids=BLOCK_KINDS.keys())
def test_compiled_generation_equals_recomputation(kw):
    """generate(compile=True) compiles the step with inductor (its own products of one token on the CPU), once
    for every position, and gives the greedy text of recomputing every window, for two rows, one of which may
    stop early, past block_size and its refill of the cache."""
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny(**kw)
    x = torch.randint(61, (2, 5))
    compiled = model.generate(x, 60, temperature=0, eot_token=3, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # not eager after a recompile limit
    assert torch.equal(compiled, model.generate(x, 60, temperature=0, eot_token=3, use_cache=False))


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_linear_of_a_few_rows_equals_nn_linear(rows, bias, threads):
    """The blocked product for a generation step's few rows computes nn.Linear's function and gradients,
    whatever the thread count (a weight whose rows do not split evenly into blocks takes the usual path)."""
    torch.manual_seed(0)
    layer = Linear(40, 96, bias=bias)
    x = torch.randn(rows, 1, 40, requires_grad=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = layer(x)
        y.square().sum().backward()
    finally:
        torch.set_num_threads(before)
    expected_x = x.detach().requires_grad_()
    expected = F.linear(expected_x, layer.weight.detach(), None if layer.bias is None else layer.bias.detach())
    expected.square().sum().backward()
    assert y.shape == (rows, 1, 96)
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.allclose(x.grad, expected_x.grad, atol=1e-4)


def test_generation_with_bfloat16_weights_follows_float32():
    """sample.py stores the weights in the sampling dtype: the cache must take that dtype, and the
    cached bf16 logits must stay within bf16 rounding of the fp32 model's full forward."""
    model = tiny()
    x = torch.randint(61, (1, 12))
    half = tiny().to(torch.bfloat16)
    out = half.generate(x[:, :8], 30, temperature=0)  # 30 new tokens slide the window past block_size
    assert out.shape == (1, 38)
    cache = half.new_cache(1, "cpu", torch.bfloat16)
    half(x[:, :8], cache=cache, pos=0)
    for i in range(8, 12):
        step, _ = half(x[:, i:i + 1], cache=cache, pos=i)
        full, _ = model(x[:, :i + 1])
        assert step.dtype == torch.bfloat16
        assert torch.allclose(step.float(), full, atol=0.01), (step.float() - full).abs().max()


def test_generation_stops_at_end_of_text():
    model = tiny()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = model.generate(prompt, 10, temperature=0)
    eot = free[0, 3].item()  # make row 0's first new token the end-of-text token
    out = model.generate(prompt, 10, temperature=0, eot_token=eot)
    assert out[0, 3].item() == eot
    assert (out[0, 3:] == eot).all()  # a finished row only repeats end-of-text
    row1 = free[1, 3:].tolist()
    ends = row1.index(eot) + 1 if eot in row1 else 10
    assert out.shape[1] == 3 + ends  # generation stops once every row has ended
    assert torch.equal(out[1], free[1, :3 + ends])


def test_sampling_filters():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    draws = torch.cat([sample_next(logits, 1.0, 2, 1.0) for _ in range(200)])
    assert set(draws.flatten().tolist()) <= {3, 4}
    # probabilities of 4 and 3 are about 0.64 and 0.24: top_p 0.5 keeps only token 4
    draws = torch.cat([sample_next(logits, 1.0, 0, 0.5) for _ in range(50)])
    assert set(draws.flatten().tolist()) == {4}
    draws = torch.cat([sample_next(logits, 1.0, 0, 0.8) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {3, 4}
    assert sample_next(logits, 0, 0, 1.0).item() == 4


def nucleus(logits, temperature, top_k, top_p):
    """The tokens sampling may return, computed directly for one row: the top_k most likely, then of those
    the most likely, in turn, until the ones taken hold top_p of their renormalised probability."""
    probs = (logits / temperature).softmax(-1).tolist()
    ranked = sorted(range(len(probs)), key=lambda i: -probs[i])[:top_k or None]
    total = sum(probs[i] for i in ranked)
    kept, mass = set(), 0.0
    for i in ranked:
        if mass >= top_p:
            break
        kept.add(i)
        mass += probs[i] / total
    return kept


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.7), (0.5, 0, 0.7), (2.0, 0, 0.9), (1.0, 6, 0.8),
                                                     (1.5, 5, 0.6)])
def test_top_p_keeps_the_nucleus_of_each_row(temperature, top_k, top_p):
    rows, draws = torch.randn(4, 12, generator=torch.Generator().manual_seed(0)) * 2, 3000
    samples = sample_next(rows.repeat_interleave(draws, 0), temperature, top_k, top_p,
                          generator=torch.Generator().manual_seed(1)).view(4, draws)
    for row, drawn in zip(rows, samples, strict=True):
        kept = nucleus(row, temperature, top_k, top_p)
        assert set(drawn.tolist()) == kept, (set(drawn.tolist()), kept)


def test_overfits_one_batch():
    model = tiny().train()
    x = torch.randint(61, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = configure_optimizers(model, 0.0, 3e-3, (0.9, 0.95), "cpu")
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_optimizer_decays_only_matrices():
    model = tiny()
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_mfu_uses_flops_per_token():
    model = tiny()
    per_token = model.flops_per_token()
    assert per_token == 6 * model.num_params() + 12 * 2 * 32 * 32
    assert model.estimate_mfu(1000, per_token * 4000) == pytest.approx(0.25)
    # above 100% only a peak measured too low can take it: no figure rather than an absurd one
    assert model.estimate_mfu(1000, per_token * 1000) == pytest.approx(1.0)
    assert model.estimate_mfu(1000, per_token * 999) is None


def train_50_steps(bf16):
    torch.manual_seed(1)  # weights whose 50 steps meet no loss spike, where the two dtypes' spikes differ in height
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    opt = configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), "cpu")
    gen = torch.Generator().manual_seed(0)
    data = (torch.randint(8, (20000,), generator=gen) * (torch.arange(20000) % 3))  # something to learn
    losses = []
    for _ in range(50):
        ix = torch.randint(len(data) - 33, (8,), generator=gen).tolist()
        x = torch.stack([data[i:i + 32] for i in ix])
        y = torch.stack([data[i + 1:i + 33] for i in ix])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_bf16_autocast_training_tracks_fp32():
    # tolerance: 0.05 nats at every one of 50 steps (measured: about 0.0015), and both really learn
    fp32, bf16 = train_50_steps(False), train_50_steps(True)
    assert max(abs(a - b) for a, b in zip(fp32, bf16, strict=True)) < 0.05
    assert bf16[-1] < 0.6 * bf16[0] and fp32[-1] < 0.6 * fp32[0]


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norms_follow_their_formula_with_gains_and_eps(norm):
    """Every norm of the model (ln_1, ln_2, ln_f and qk_norm's) against its definition written out, on
    activations so small that eps matters and with gains and biases away from 1 and 0."""
    eps = 1e-3
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8, norm=norm, norm_eps=eps,
                          qk_norm=True, bias=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 8) * 0.01  # mean square 1e-4, a tenth of eps: an ignored eps moves the output 5%
    block = model.transformer.h[0]
    for layer in (block.ln_1, block.ln_2, model.transformer.ln_f):
        if norm == "rmsnorm":
            expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * layer.weight
        else:
            centred = x - x.mean(-1, keepdim=True)
            expected = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * layer.weight + layer.bias
        assert torch.allclose(layer(x), expected, atol=1e-6, rtol=1e-5)
    q = x.view(3, 5, 2, 4)
    for layer in (block.attn.q_norm, block.attn.k_norm):
        expected = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + eps) * layer.weight
        assert torch.allclose(layer(q), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("top_p,kept", [(0.25, 1), (0.5, 2), (0.75, 3), (0.8, 4)])
def test_top_p_drops_a_token_once_the_mass_before_it_reaches_p(top_p, kept):
    """Four equal logits: probabilities of exactly 1/4, and masses before each token of exactly 0, 1/4,
    1/2 and 3/4, so the boundary case (mass before == top_p) decides the count."""
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next(torch.zeros(1, 4), 1.0, 0, top_p, generator).item() for _ in range(400)}
    assert len(draws) == kept


@pytest.mark.parametrize("kw", [dict(bias=True, dropout=0.1), dict(mlp="relu2"), dict(lora=True),
                                dict(pos="rope", mlp="swiglu", norm="rmsnorm", qk_norm=True)],
                         ids=["gpt2", "relu2", "lora", "modern"])
def test_the_compiled_training_forward_has_no_graph_break(kw):
    """torch.compile traces the training forward, loss included, as one graph for every kind of block: a
    break would hand each piece back to eager Python, which on a GPU throws away most of what compile is for."""
    import torch._dynamo
    lora = kw.pop("lora", False)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, **kw)).train()
    if lora:
        model.add_lora(4, 8.0, 0.1, ["c_attn", "c_proj", "c_fc"])
    x = torch.randint(64, (2, 16))
    explanation = torch._dynamo.explain(model)(x, x)
    assert explanation.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_activation_checkpointing_computes_the_same_and_keeps_less():
    """Recomputing each block in the backward pass, its dropout masks drawn again from the random state saved
    with its input, gives the loss and gradients of keeping everything (fp32, dropout on), and keeps a
    fraction of the activations, counted as the bytes autograd saves for the backward pass."""
    runs = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=4, n_head=2, n_embd=32, dropout=0.2,
                              pos="rope", mlp="swiglu", qk_norm=True)).train()
        model.recompute_blocks = recompute
        x = torch.randint(64, (4, 32), generator=torch.Generator().manual_seed(1))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            loss = model(x, torch.roll(x, -1, 1))[1]
        loss.backward()
        kept = sum(t.numel() * t.element_size() for t in saved)
        runs.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}, kept))
    (loss, grads, kept), (loss_ac, grads_ac, kept_ac) = runs
    assert loss_ac == loss
    for name, g in grads.items():
        assert torch.allclose(grads_ac[name], g, rtol=0, atol=1e-7), name
    assert kept_ac < kept / 3, (kept_ac, kept)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_a_model_built_on_the_meta_device_initialises_as_a_whole_one(pos):
    """fsdp builds the model on the meta device, where nothing is allocated, and each process then draws its
    own shards: each parameter from a generator of its own, so that they come out as one process draws them."""
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, pos=pos, bias=True)
    torch.manual_seed(7)
    whole = GPT(config)
    with torch.device("meta"):
        empty = GPT(config)
    assert all(t.is_meta for t in (*empty.parameters(), *empty.buffers()))
    empty.to_empty(device="cpu")
    empty.init_weights(7)
    assert empty.lm_head.weight is empty.transformer.wte.weight
    expected = {**whole.state_dict(), **dict(whole.named_buffers())}
    got = {**empty.state_dict(), **dict(empty.named_buffers())}
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    torch.manual_seed(8)
    assert not torch.equal(GPT(config).transformer.wte.weight, whole.transformer.wte.weight)  # the seed counts
