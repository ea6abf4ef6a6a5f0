"""End to end: prepare, train, resume, evaluate and sample, each as the real script in a scratch folder."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import conftest
from conftest import read_log
from model import GPT, GPTConfig

TINY = ["--dataset=shakespeare_char", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_interval=10", "--eval_iters=2", "--log_interval=1", "--warmup_iters=5",
        "--lr_decay_iters=15", "--learning_rate=1e-3", "--min_lr=1e-4", "--device=cpu", "--plot=False"]


def run(script, *args, cwd):
    p = conftest.run(script, *args, cwd=cwd)
    assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shakespeare_char):
    d = tmp_path_factory.mktemp("run")
    shakespeare_char(d)
    run("train.py", *TINY, "--max_iters=20", "--out_dir=ck", cwd=d)
    return d


def test_training_writes_checkpoint_log_and_eval(workdir):
    ckpt = torch.load(workdir / "ck" / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 20
    assert ckpt["meta"]["tokenizer"] == "char" and ckpt["model_args"]["n_layer"] == 1
    assert (workdir / "ck" / "best.pt").exists()
    log = read_log(workdir / "ck" / "log.jsonl")
    assert [r["iter"] for r in log] == list(range(1, 21))
    assert log[-1]["loss"] < log[0]["loss"]
    evaluation = json.loads((workdir / "ck" / "eval.json").read_text())
    meta = json.loads((workdir / "data" / "shakespeare_char" / "meta.json").read_text())
    assert evaluation["tokens"] == meta["val_tokens"]  # every val token is predicted once
    assert evaluation["perplexity"] == pytest.approx(math.exp(evaluation["val_loss"]))


def cosine_schedule(it, lr=1e-3, min_lr=1e-4, warmup=5, decay=15):
    """TINY's schedule written out: linear warmup, a half cosine from lr down to min_lr, then min_lr."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay:
        return min_lr
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (it - warmup) / (decay - warmup))) / 2


def test_lr_schedule_warmup_cosine_and_floor(workdir):
    lr = {r["iter"]: r["lr"] for r in read_log(workdir / "ck" / "log.jsonl")}
    # the log line for iteration i+1 shows the rate used by step i
    assert lr[5] == pytest.approx(1e-3 * 5 / 6)  # the last warmup step
    assert lr[6] == pytest.approx(1e-3)  # peak at the end of warmup
    # a fifth of the way down the cosine keeps 0.905 of the range (a straight line 0.8); four fifths keep 0.095
    assert lr[8] == pytest.approx(1e-4 + 9e-4 * 0.904508, abs=1e-9)
    assert lr[14] == pytest.approx(1e-4 + 9e-4 * 0.095492, abs=1e-9)
    assert lr[16] == pytest.approx(1e-4) and lr[20] == pytest.approx(1e-4)  # min_lr at lr_decay_iters and past it
    assert [lr[i + 1] for i in range(20)] == pytest.approx([cosine_schedule(i) for i in range(20)], rel=1e-9)


def test_warmup_stable_decay_schedule_drives_both_optimizers(workdir):
    """wsd: warmup, flat, then a straight line to min_lr over the last decay_frac of lr_decay_iters;
    Muon's matrices follow at muon_lr / learning_rate times the same rate."""
    run("train.py", *TINY, "--max_iters=18", "--lr_schedule=wsd", "--decay_frac=0.4", "--optimizer=muon",
        "--muon_lr=0.02", "--final_eval=False", "--out_dir=wsd", cwd=workdir)
    lr = {r["iter"]: r["lr"] for r in read_log(workdir / "wsd" / "log.jsonl")}
    decay_start = 15 - 0.4 * 15  # iteration 9
    expected = [1e-3 * (i + 1) / 6 if i < 5 else 1e-3 if i < decay_start else
                1e-3 + (i - decay_start) / (15 - decay_start) * (1e-4 - 1e-3) if i < 15 else 1e-4 for i in range(18)]
    assert [lr[i + 1] for i in range(18)] == pytest.approx(expected, rel=1e-9)
    assert lr[9] == pytest.approx(1e-3) and lr[13] == pytest.approx(5.5e-4)  # flat to step 8, then a straight line
    groups = torch.load(workdir / "wsd" / "ckpt.pt", weights_only=True)["optimizer"]["optimizers"]
    assert [g["lr"] for g in groups[0]["param_groups"]] == pytest.approx([1e-4, 1e-4])
    assert [g["lr"] for g in groups[1]["param_groups"]] == pytest.approx([2e-3] * len(groups[1]["param_groups"]))


def test_whole_run_decay_starts_at_the_peak(workdir):
    """wsd with decay_frac=1: no stable phase, a straight line from the peak at the end of warmup to min_lr."""
    run("train.py", *TINY, "--max_iters=16", "--lr_schedule=wsd", "--decay_frac=1", "--eval_interval=16",
        "--final_eval=False", "--out_dir=linear", cwd=workdir)
    lr = {r["iter"]: r["lr"] for r in read_log(workdir / "linear" / "log.jsonl")}
    expected = [1e-3 * (i + 1) / 6 if i < 5 else 1e-3 + (i - 5) / 10 * (1e-4 - 1e-3) if i < 15 else 1e-4
                for i in range(16)]
    assert [lr[i + 1] for i in range(16)] == pytest.approx(expected, rel=1e-9)
    assert lr[6] == pytest.approx(1e-3) and lr[11] == pytest.approx(5.5e-4)


def test_lr_is_constant_without_decay(workdir):
    run("train.py", *TINY, "--max_iters=3", "--decay_lr=False", "--final_eval=False", "--out_dir=flat", cwd=workdir)
    assert [r["lr"] for r in read_log(workdir / "flat" / "log.jsonl")] == [1e-3] * 3  # no warmup either


def test_resume_continues_from_the_checkpoint(workdir):
    # bit-for-bit continuation after a kill is tested in test_reliability.py
    run("train.py", *TINY, "--max_iters=30", "--out_dir=ck", "--init_from=resume", cwd=workdir)
    resumed = read_log(workdir / "ck" / "log.jsonl")
    assert [r["iter"] for r in resumed] == list(range(1, 31))
    assert torch.load(workdir / "ck" / "ckpt.pt", weights_only=False)["iter_num"] == 30


def test_sample_from_checkpoint(workdir):
    p = run("sample.py", "--out_dir=ck", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=40", cwd=workdir)
    samples = p.stdout.split("---------------\n")
    assert len(samples) == 3 and all(s.startswith("ROMEO:") for s in samples[:2])
    again = run("sample.py", "--out_dir=ck", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=40", cwd=workdir)
    assert again.stdout == p.stdout  # seeded
    (workdir / "prompt.txt").write_text("JULIET:\n")
    p = run("sample.py", "--out_dir=ck", "--start=FILE:prompt.txt", "--num_samples=1", "--max_new_tokens=5",
            cwd=workdir)
    assert p.stdout.startswith("JULIET:\n")


def test_sample_top_p_reaches_the_model(workdir):
    # so small a top_p keeps only the most likely token: sampling at temperature 1 becomes greedy decoding
    args = ["--out_dir=ck", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=30", "--top_k=0"]
    nucleus = run("sample.py", *args, "--temperature=1.0", "--top_p=1e-6", cwd=workdir)
    greedy = run("sample.py", *args, "--temperature=0", cwd=workdir)
    assert nucleus.stdout == greedy.stdout


def test_sample_without_out_dir_takes_the_newest_checkpoint(workdir):
    runs = workdir / "checkpoint"
    for name in ("a", "b"):
        (runs / name).mkdir(parents=True)
        shutil.copy(workdir / "ck" / "ckpt.pt", runs / name / "ckpt.pt")
    shutil.copy(workdir / "ck" / "ckpt.pt", runs / "b" / "best.pt")
    os.utime(runs / "b" / "best.pt", (3e9, 3e9))  # newest of all, but not a ckpt.pt
    for newest, older in (("a", "b"), ("b", "a")):  # by time, never by name
        os.utime(runs / older / "ckpt.pt", (1e9, 1e9))
        os.utime(runs / newest / "ckpt.pt", (2e9, 2e9))
        p = run("sample.py", "--start=A", "--num_samples=1", "--max_new_tokens=1", cwd=workdir)
        # with dtype=auto on a CPU, in fp32: the weights' blocked product is faster there than bf16's
        assert f"sampling from {os.path.join('checkpoint', newest, 'ckpt.pt')} (float32 weights, cpu)\n" in p.stderr, \
            p.stderr


def test_eval_only_writes_full_split_evaluation(workdir):
    os.remove(workdir / "ck" / "eval.json")
    p = run("train.py", *TINY, "--out_dir=ck", "--eval_only=True", cwd=workdir)
    assert "full validation split" in p.stdout
    assert json.loads((workdir / "ck" / "eval.json").read_text())["iter_num"] >= 20


def test_bench_smoke(workdir):
    p = run("bench.py", *TINY, "--iters=2", "--warmup=1", "--sample_tokens=40", cwd=workdir)
    assert "tokens/s" in p.stdout and "MFU" in p.stdout
    assert "with KV cache" in p.stdout and "without KV cache" not in p.stdout  # the cached rate by default
    assert "sampling (float32 weights" in p.stdout  # dtype=auto samples on a CPU as sample.py does
    p = run("bench.py", *TINY, "--iters=2", "--warmup=1", "--sample=True", "--sample_tokens=40", cwd=workdir)
    assert "without KV cache" in p.stdout and "KV cache speed-up" in p.stdout
    assert "greedy output with cache equals recomputation" in p.stdout


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TEST_COMPILE"), reason="inductor takes over a minute here; make test-compile")
def test_compiled_training_matches_eager(workdir):
    """compile=True in train.py and bench.py. Inductor's kernels sum in another order than eager's, so the
    losses agree to a relative 1e-5, not bit for bit."""
    args = [*TINY, "--max_iters=5", "--final_eval=False", "--dropout=0.0", "--dtype=float32"]
    run("train.py", *args, "--out_dir=eager", cwd=workdir)
    # a cache of its own: the kernels inductor writes there show that the model was compiled
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(workdir / "inductor"))
    p = conftest.run("train.py", *args, "--compile=True", "--out_dir=compiled", cwd=workdir, env=env)
    assert p.returncode == 0 and "cpu float32 compiled" in p.stdout, p.stderr
    assert list((workdir / "inductor").rglob("*.py"))
    eager, compiled = (read_log(workdir / name / "log.jsonl") for name in ("eager", "compiled"))
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-5)
    a, b = (torch.load(workdir / name / "ckpt.pt", weights_only=False)["model"] for name in ("eager", "compiled"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    # float32 for the compiled row too: dtype=auto would take bf16 on a CPU with AMX
    p = conftest.run("bench.py", *TINY, "--compile=True", "--compare=True", "--iters=2", "--warmup=1",
                     "--sample_tokens=0", "--dtype=float32", cwd=workdir, env=env)
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith("float32")]
    assert [row[1] for row in rows] == ["False", "True"], p.stdout


def test_clipping_bounds_the_gradient_of_the_first_step(workdir):
    """AdamW's first step moves each weight by u = lr g / (|g| + eps): after bias correction its moments are
    g and g^2. So the step, read from the checkpoints before and after, gives back the gradient it used,
    |g| = eps |u| / (lr - |u|), and that gradient's norm must be grad_clip, far below the unclipped norm.
    Under float16 the scaled gradients must be unscaled before they are clipped, or the step shrinks with
    the loss scale (65,536): its step must be the float32 step, within float16's precision."""
    lr, eps, grad_clip = 1e-2, 1e-8, 1e-6
    before = torch.load(workdir / "ck" / "ckpt.pt", weights_only=True)["model"]
    steps, norms = {}, {}
    for dtype in ("float32", "float16"):
        run("train.py", *TINY, "--init_from=ck/ckpt.pt", f"--out_dir=clip_{dtype}", "--max_iters=1",
            f"--grad_clip={grad_clip}", "--weight_decay=0", "--decay_lr=False", f"--learning_rate={lr}",
            f"--dtype={dtype}", "--final_eval=False", cwd=workdir)
        after = torch.load(workdir / f"clip_{dtype}" / "ckpt.pt", weights_only=True)["model"]
        # lm_head.weight is the token embedding's second name
        steps[dtype] = torch.cat([(before[n] - after[n]).double().flatten() for n in before if n != "lm_head.weight"])
        u = steps[dtype].abs()
        assert u.max() < lr
        norms[dtype] = (eps * u / (lr - u)).norm().item()
    assert norms["float32"] == pytest.approx(grad_clip, rel=1e-3), norms
    assert norms["float16"] == pytest.approx(grad_clip, rel=1e-2), norms
    assert (steps["float16"] - steps["float32"]).norm() < 0.05 * steps["float32"].norm()


def test_evaluation_draws_no_dropout_and_returns_to_training(workdir):
    """A learning rate of 1e-30 moves no weight (they are about 1e-2, whose float32 spacing is 1e-9), so every
    evaluation sees the same model: with dropout 0.5 its loss is the same each time only if dropout is off
    while it evaluates. The training losses, which do draw dropout masks, come out the same with an
    evaluation after every step as with one at the end only if evaluating draws no random numbers and puts
    the model back into training mode."""
    args = [*TINY, "--init_from=ck/ckpt.pt", "--dropout=0.5", "--learning_rate=1e-30", "--decay_lr=False",
            "--max_iters=6", "--final_eval=False"]
    run("train.py", *args, "--eval_interval=1", "--out_dir=dropout_every", cwd=workdir)
    run("train.py", *args, "--eval_interval=6", "--out_dir=dropout_once", cwd=workdir)
    every, once = (read_log(workdir / name / "log.jsonl") for name in ("dropout_every", "dropout_once"))
    val = [r["val_loss"] for r in every]
    assert len(val) == 6 and max(val) - min(val) < 1e-6, val
    assert [r["loss"] for r in every] == [r["loss"] for r in once]
    assert len({r["loss"] for r in every}) == 6  # the losses are of different batches, so they could tell


def test_activation_checkpointing_trains_as_without_it_across_a_resume(workdir):
    """With dropout on, a run that recomputes its blocks, stopped and resumed, takes the same steps as one
    that keeps every activation and runs straight through: same losses, same weights."""
    args = [*TINY, "--dropout=0.2", "--eval_interval=2", "--final_eval=False"]
    run("train.py", *args, "--max_iters=4", "--out_dir=keep_all", cwd=workdir)
    run("train.py", *args, "--max_iters=2", "--activation_checkpointing", "--out_dir=recompute", cwd=workdir)
    run("train.py", "--out_dir=recompute", "--init_from=resume", "--max_iters=4", cwd=workdir)
    kept, recomputed = (read_log(workdir / name / "log.jsonl") for name in ("keep_all", "recompute"))
    assert [r["loss"] for r in recomputed] == [r["loss"] for r in kept]
    weights = [torch.load(workdir / name / "ckpt.pt", weights_only=True)["model"] for name in ("keep_all", "recompute")]
    assert all(torch.allclose(weights[1][n], w, rtol=0, atol=1e-6) for n, w in weights[0].items())
    assert torch.load(workdir / "recompute" / "ckpt.pt", weights_only=True)["config"]["activation_checkpointing"]


def test_target_flops_sets_the_length_and_logs_the_flops_spent(workdir):
    """A budget of 7.5 steps' FLOPs, a step being the model's FLOPs per token times the tokens of a step,
    buys 8 steps and a schedule that decays over them; log.jsonl counts the FLOPs spent. Resumed, the run
    keeps its budget and trains no further."""
    from model import GPT, GPTConfig
    vocab_size = json.loads((workdir / "data" / "shakespeare_char" / "meta.json").read_text())["vocab_size"]
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=32, bias=False))
    flops_per_step = model.flops_per_token() * 4 * 32  # TINY's batch of 4 windows of 32 tokens
    args = [a for a in TINY if not a.startswith("--lr_decay_iters")]
    args += [f"--target_flops={7.5 * flops_per_step}", "--warmup_iters=2", "--out_dir=budget"]
    run("train.py", *args, cwd=workdir)
    log = read_log(workdir / "budget" / "log.jsonl")
    assert [r["iter"] for r in log] == list(range(1, 9))
    assert [r["flops"] for r in log] == pytest.approx([i * flops_per_step for i in range(1, 9)])
    config = torch.load(workdir / "budget" / "ckpt.pt", weights_only=True)["config"]
    assert config["max_iters"] == config["lr_decay_iters"] == 8
    assert [r["lr"] for r in log] == pytest.approx([cosine_schedule(i, warmup=2, decay=8) for i in range(8)])
    run("train.py", "--out_dir=budget", "--init_from=resume", cwd=workdir)
    assert len(read_log(workdir / "budget" / "log.jsonl")) == 8


def test_sample_top_k_reaches_the_model(workdir):
    # top_k=1 keeps only the most likely token: sampling at temperature 1 becomes greedy decoding
    args = ["--out_dir=ck", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=30", "--top_p=1.0"]
    top1 = run("sample.py", *args, "--temperature=1.0", "--top_k=1", cwd=workdir)
    greedy = run("sample.py", *args, "--temperature=0", "--top_k=0", cwd=workdir)
    assert top1.stdout == greedy.stdout


PERIODIC = ["--dataset=periodic", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=8",
            "--max_iters=60", "--eval_interval=60", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2",
            "--lr_decay_iters=60", "--learning_rate=1e-2", "--min_lr=1e-3", "--dropout=0.0", "--device=cpu",
            "--dtype=float32", "--plot=False"]


@pytest.fixture(scope="module")
def periodic(workdir):
    """A corpus whose next token is a function of the current one: the train split repeats the document "ab"
    (a, b, end-of-text), the val split is one character, "c", throughout, 4 whole windows of 16 targets (the
    first after an end-of-text); and a run trained on it."""
    source, data = workdir / "data" / "shakespeare_char", workdir / "data" / "periodic"
    data.mkdir()
    meta = json.loads((source / "meta.json").read_text())
    a, b, c = (meta["chars"].index(ch) for ch in "abc")
    train = np.array([a, b, meta["eot_token"]] * 1000, dtype=meta["dtype"])
    val = np.array([c] * (4 * 16), dtype=meta["dtype"])
    train.tofile(data / "train.bin")
    val.tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({**meta, "train_tokens": len(train), "val_tokens": len(val),
                                                "train_documents": 1000, "val_documents": 0}))
    run("train.py", *PERIODIC, "--out_dir=periodic", cwd=workdir)
    return meta


def test_training_predicts_the_next_token(workdir, periodic):
    """Each training target is the token after its input. In this corpus the next token follows from the current
    one, so the trained model, read from ckpt.pt and scored here on the next token of a window at each phase of
    the text, does far better than a uniform guess, and as well as the run's own evaluation of the train split."""
    state = torch.load(workdir / "periodic" / "ckpt.pt", weights_only=True)
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])
    model.eval()
    text = np.fromfile(workdir / "data" / "periodic" / "train.bin", dtype=periodic["dtype"]).astype(np.int64)
    x = torch.from_numpy(np.stack([text[s:s + 16] for s in range(3)]))
    y = torch.from_numpy(np.stack([text[s + 1:s + 17] for s in range(3)]))
    with torch.no_grad():
        loss = model(x, y)[1].item()
    last = read_log(workdir / "periodic" / "log.jsonl")[-1]
    uniform = math.log(periodic["vocab_size"])
    assert loss < uniform / 4 and loss == pytest.approx(last["train_loss"], abs=uniform / 40), (loss, last)


def test_evaluation_estimates_the_val_split(workdir, periodic):
    """Every window of the val split holds the same tokens, so the estimate from a few random windows equals the
    loss of any one of them; the whole split is that window three times and, first, its tokens after an
    end-of-text. And a model that never saw "c" predicts it worse than the train split."""
    last = read_log(workdir / "periodic" / "log.jsonl")[-1]
    evaluation = json.loads((workdir / "periodic" / "eval.json").read_text())
    assert evaluation["iter_num"] == last["iter"] == 60 and evaluation["tokens"] == 4 * 16
    state = torch.load(workdir / "periodic" / "ckpt.pt", weights_only=True)
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])
    c = torch.full((1, 17), periodic["chars"].index("c"))
    after_eot = torch.cat([torch.tensor([[periodic["eot_token"]]]), c[:, :15]], dim=1)
    with torch.no_grad():
        window, first = model(c[:, :16], c[:, 1:])[1].item(), model(after_eot, c[:, 1:])[1].item()
    assert last["val_loss"] == pytest.approx(window, rel=1e-4)
    assert last["val_bpb"] == pytest.approx(window / math.log(2), rel=1e-4)  # a byte per token, none end-of-text
    assert evaluation["val_loss"] == pytest.approx((first + 3 * window) / 4, rel=1e-4)
    assert last["val_loss"] > last["train_loss"]


def test_sample_stops_at_the_end_of_text(workdir, periodic):
    """Greedy, the model continues "a" with "b" and then ends the document: nothing of end-of-text is printed."""
    p = run("sample.py", "--out_dir=periodic", "--start=a", "--temperature=0", "--num_samples=2",
            "--max_new_tokens=10", "--device=cpu", "--dtype=float32", cwd=workdir)
    assert p.stdout == "ab\n---------------\n" * 2
