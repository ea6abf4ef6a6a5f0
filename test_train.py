"""End to end: prepare, train, resume, evaluate and sample, each as the real script in a scratch folder."""
import json
import math
import os

import pytest
import torch

import conftest

TINY = ["--dataset=shakespeare_char", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_interval=10", "--eval_iters=2", "--log_interval=1", "--warmup_iters=5",
        "--lr_decay_iters=15", "--learning_rate=1e-3", "--min_lr=1e-4", "--device=cpu", "--plot=False"]


def run(script, *args, cwd):
    p = conftest.run(script, *args, cwd=cwd)
    assert p.returncode == 0, p.stderr
    return p


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    run("prepare.py", "--tokenizer=char", "--num_proc=1", cwd=d)
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
    assert evaluation["tokens"] == meta["val_tokens"] - 1  # every val token after the first is predicted once
    assert evaluation["perplexity"] == pytest.approx(math.exp(evaluation["val_loss"]))


def test_lr_schedule_warmup_peak_and_end(workdir):
    lr = {r["iter"]: r["lr"] for r in read_log(workdir / "ck" / "log.jsonl")}
    # the log line for iteration i+1 shows the rate used by step i
    assert lr[1] == pytest.approx(1e-3 * 1 / 6)  # warmup: (it+1)/(warmup+1)
    assert lr[5] == pytest.approx(1e-3 * 5 / 6)
    assert lr[6] == pytest.approx(1e-3)  # peak at the end of warmup
    assert lr[11] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)  # half way down
    assert lr[16] == pytest.approx(1e-4) and lr[20] == pytest.approx(1e-4)  # min_lr after lr_decay_iters


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


def test_eval_only_writes_full_split_evaluation(workdir):
    os.remove(workdir / "ck" / "eval.json")
    p = run("train.py", *TINY, "--out_dir=ck", "--eval_only=True", cwd=workdir)
    assert "full validation split" in p.stdout
    assert json.loads((workdir / "ck" / "eval.json").read_text())["iter_num"] >= 20


def test_bench_smoke(workdir):
    p = run("bench.py", *TINY, "--iters=2", "--warmup=1", "--sample_tokens=40", cwd=workdir)
    assert "tokens/s" in p.stdout and "MFU" in p.stdout
    assert "with KV cache" in p.stdout and "without KV cache" not in p.stdout  # the cached rate by default
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
    p = conftest.run("bench.py", *TINY, "--compile=True", "--compare=True", "--iters=2", "--warmup=1",
                     "--sample_tokens=0", cwd=workdir, env=env)
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith("float32")]
    assert [row[1] for row in rows] == ["False", "True"], p.stdout
