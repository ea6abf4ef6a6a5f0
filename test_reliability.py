"""Runs survive kills: exact resume, graceful signals, atomic saves, divergence and full disks."""
import json
import os
import random
import shutil
import signal
import time

import pytest
import torch

import conftest
from conftest import read_log

REPO = os.path.dirname(os.path.abspath(__file__))
TINY = ["--dataset=shakespeare_char", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64",
        "--batch_size=8", "--log_interval=1", "--eval_interval=10", "--eval_iters=2", "--warmup_iters=5",
        "--lr_decay_iters=40", "--max_iters=40", "--dropout=0.1", "--final_eval=False", "--device=cpu",
        "--plot=False"]


def run(script, *args, cwd, check=True, env=None):
    p = conftest.run(script, *args, cwd=cwd, env=env)
    assert not check or p.returncode == 0, p.stderr
    return p


def last_iter(path):
    try:
        return read_log(path)[-1]["iter"]
    except (FileNotFoundError, IndexError, json.JSONDecodeError):
        return 0


def wait_for(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the condition held"
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shakespeare_char):
    d = tmp_path_factory.mktemp("reliability")
    shakespeare_char(d)
    run("train.py", *TINY, "--out_dir=reference", cwd=d)
    return d


def final_state(out_dir):
    return torch.load(out_dir / "ckpt.pt", weights_only=True)


def losses_by_iter(out_dir):
    """The loss logged for each iteration; a resumed run logs the replayed iterations again."""
    by_iter = {}
    for r in read_log(out_dir / "log.jsonl"):
        by_iter.setdefault(r["iter"], []).append(r["loss"])
    return by_iter


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(workdir):
    reference = losses_by_iter(workdir / "reference")
    ref_model = final_state(workdir / "reference")["model"]
    kill_points = sorted(random.sample(range(12, 36), 2))
    for k in kill_points:
        out = workdir / f"killed_at_{k}"
        proc = conftest.start("train.py", *TINY, f"--out_dir={out.name}", cwd=workdir)
        try:
            wait_for(lambda out=out, k=k: last_iter(out / "log.jsonl") >= k, proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            proc.kill()
        killed_at = last_iter(out / "log.jsonl")
        resumed_from = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
        assert resumed_from < 40 and resumed_from % 10 == 0
        run("train.py", *TINY, f"--out_dir={out.name}", "--init_from=resume", cwd=workdir)
        got = losses_by_iter(out)
        assert sorted(got) == sorted(reference), f"kill at {killed_at}"
        for it, values in got.items():  # replayed iterations repeat the first attempt exactly
            assert all(v == reference[it][0] for v in values), f"kill at {killed_at}, iteration {it}"
        model = final_state(out)["model"]
        assert all(torch.equal(model[k2], ref_model[k2]) for k2 in ref_model), f"kill at {killed_at}"
        print(f"SIGKILL at iteration {killed_at}, resumed from {resumed_from}: identical losses and weights")


def test_resume_is_bitwise_with_muon_and_modern_blocks(workdir):
    """Muon's momentum is in the checkpoint, and rope, swiglu, qk_norm, the wsd schedule and eval_tasks
    change nothing about resuming: 6 steps, then 6 more after a resume, equal 12 straight. The first leg
    evaluates once more than the straight run, its scoring under dropout 0.1 drawing nothing."""
    modern = [*TINY, "--n_embd=32", "--block_size=32", "--optimizer=muon", "--pos=rope", "--mlp=swiglu",
              "--qk_norm", "--norm=rmsnorm", "--lr_schedule=wsd", "--warmup_iters=2", "--lr_decay_iters=12",
              "--max_iters=12", f"--eval_tasks=mc:{REPO}/tasks/shakespeare.jsonl", "--eval_interval=4"]
    run("train.py", *modern, "--out_dir=modern", cwd=workdir)
    run("train.py", *modern, "--max_iters=6", "--out_dir=modern_resumed", cwd=workdir)
    run("train.py", "--out_dir=modern_resumed", "--init_from=resume", "--max_iters=12", cwd=workdir)
    straight, resumed = losses_by_iter(workdir / "modern"), losses_by_iter(workdir / "modern_resumed")
    assert straight == resumed and sorted(straight) == list(range(1, 13))
    scores = [{r["iter"]: r["mc:shakespeare/acc_norm"] for r in read_log(workdir / name / "log.jsonl")
               if "val_loss" in r} for name in ("modern", "modern_resumed")]
    assert sorted(scores[0]) == [4, 8, 12] and sorted(scores[1]) == [4, 6, 8, 12]
    assert all(scores[1][it] == score for it, score in scores[0].items())
    a, b = final_state(workdir / "modern"), final_state(workdir / "modern_resumed")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(a["optimizer"]["optimizers"][1]["state"]) > 0  # Muon's momentum buffers were saved


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_exits_cleanly(workdir, sig):
    out = workdir / f"stopped_{sig.name}"
    proc = conftest.start("train.py", *TINY, f"--out_dir={out.name}", cwd=workdir)
    try:
        wait_for(lambda: last_iter(out / "log.jsonl") >= 13, proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert f"{sig.name} received" in stdout and "--init_from=resume" in stdout
    stopped = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
    assert stopped == last_iter(out / "log.jsonl")  # saved at the step it was on, nothing lost
    run("train.py", *TINY, f"--out_dir={out.name}", "--init_from=resume", cwd=workdir)
    ref_model = final_state(workdir / "reference")["model"]
    model = final_state(out)["model"]
    assert all(torch.equal(model[k], ref_model[k]) for k in ref_model)


@pytest.mark.slow
def test_kill_inside_checkpoint_write_keeps_previous(workdir):
    # a model big enough that writing its checkpoint takes a moment, trained on tiny batches
    big = ["--dataset=shakespeare_char", "--n_layer=2", "--n_head=4", "--n_embd=512", "--block_size=8",
           "--batch_size=1", "--eval_interval=2", "--eval_iters=1", "--max_iters=1000", "--final_eval=False",
           "--out_dir=big", "--plot=False"]
    out = workdir / "big"
    landed_mid_write = False
    for attempt in range(5):  # a kill can arrive just after the rename; then the next save is tried
        proc = conftest.start("train.py", *big, *(["--init_from=resume"] if attempt else []), cwd=workdir)
        try:
            wait_for(lambda: (out / "ckpt.pt").exists(), proc)
            old = os.stat(out / "ckpt.pt").st_ino  # os.replace gives ckpt.pt a new inode
            before = (out / "ckpt.pt").read_bytes()

            def writing(old=old):
                try:
                    return (out / "ckpt.pt.tmp").stat().st_size > 0 and os.stat(out / "ckpt.pt").st_ino == old
                except FileNotFoundError:
                    return False
            wait_for(writing, proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            proc.kill()
        torch.load(out / "ckpt.pt", weights_only=True)  # whole either way
        if os.stat(out / "ckpt.pt").st_ino == old:
            assert (out / "ckpt.pt").read_bytes() == before  # killed mid-write: the old file is untouched
            landed_mid_write = True
            break
    assert landed_mid_write, "no kill landed inside a write in 5 tries"
    run("train.py", *big, "--init_from=resume", "--max_iters=3", cwd=workdir)  # resumable


def test_divergence_stops_without_touching_the_checkpoint(workdir):
    out = workdir / "diverge"
    shutil.copytree(workdir / "reference", out)
    before = (out / "ckpt.pt").read_bytes(), (out / "best.pt").read_bytes()
    p = run("train.py", *TINY, "--out_dir=diverge", "--init_from=resume", "--max_iters=60",
            "--lr_decay_iters=60", "--learning_rate=1e30", "--min_lr=1e30", cwd=workdir, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line, = p.stderr.strip().splitlines()
    assert "became nan" in line or "became inf" in line
    assert "by iteration 42" in line and "ckpt.pt" in line  # the second step at lr 1e30 overflows
    assert ((out / "ckpt.pt").read_bytes(), (out / "best.pt").read_bytes()) == before


FULL_DISK = """
import errno, os, runpy, sys, torch
real_save, calls = torch.save, []
def save(*args, **kwargs):
    calls.append(1)
    if len(calls) > int(os.environ["SAVES_BEFORE_FULL"]):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(*args, **kwargs)
torch.save = save
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_full_disk_at_save_keeps_previous_checkpoint(workdir):
    out = workdir / "full"
    # saves at iteration 10: best.pt then ckpt.pt; the disk is full from the save at iteration 20 on
    (workdir / "full_disk.py").write_text(FULL_DISK)
    p = run(workdir / "full_disk.py", os.path.join(REPO, "train.py"), *TINY, "--out_dir=full", cwd=workdir, check=False,
            env=dict(os.environ, SAVES_BEFORE_FULL="2"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line, = p.stderr.strip().splitlines()
    assert "No space left on device" in line and "previous checkpoint is intact" in line
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 10
    assert not list(out.glob("*.tmp"))


def test_best_val_loss_is_never_replaced_by_a_worse_one(workdir):
    log = read_log(workdir / "reference" / "log.jsonl")
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    best = torch.load(workdir / "reference" / "best.pt", weights_only=True)
    latest = torch.load(workdir / "reference" / "ckpt.pt", weights_only=True)
    assert best["best_val_loss"] == latest["best_val_loss"] == min(vals)
    assert best["iter_num"] == 10 * (1 + vals.index(min(vals)))


def test_float16_with_grad_scaler_trains_saves_and_resumes_exactly(workdir):
    """dtype=float16, what dtype=auto picks on GPUs without bf16, runs on the CPU too: autocast in fp16
    and a GradScaler whose state goes into the checkpoint. Stopped at 4 and resumed to 8, the run
    equals an uninterrupted one, scaler included."""
    fp16 = ["--dataset=shakespeare_char", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
            "--batch_size=4", "--log_interval=1", "--eval_interval=4", "--eval_iters=2", "--warmup_iters=2",
            "--lr_decay_iters=8", "--dropout=0.1", "--final_eval=False", "--device=cpu", "--plot=False"]
    run("train.py", *fp16, "--dtype=float16", "--max_iters=8", "--out_dir=fp16_straight", cwd=workdir)
    run("train.py", *fp16, "--dtype=float32", "--max_iters=8", "--out_dir=fp32_straight", cwd=workdir)
    run("train.py", *fp16, "--dtype=float16", "--max_iters=4", "--out_dir=fp16_resumed", cwd=workdir)
    assert torch.load(workdir / "fp16_resumed" / "ckpt.pt", weights_only=False)["scaler"]["_growth_tracker"] == 4
    run("train.py", *fp16, "--dtype=float16", "--max_iters=8", "--out_dir=fp16_resumed", "--init_from=resume",
        cwd=workdir)
    straight, resumed = final_state(workdir / "fp16_straight"), final_state(workdir / "fp16_resumed")
    # 8 unskipped steps at the initial scale; a step whose gradients overflow would be skipped and restart the count
    assert straight["scaler"] == resumed["scaler"] and straight["scaler"]["_growth_tracker"] == 8
    assert losses_by_iter(workdir / "fp16_resumed") == losses_by_iter(workdir / "fp16_straight")
    assert all(torch.equal(resumed["model"][k], v) for k, v in straight["model"].items())
    # half precision for real: close to the float32 run, not equal to it
    fp16_loss = [v for [v] in losses_by_iter(workdir / "fp16_straight").values()]
    fp32_loss = [v for [v] in losses_by_iter(workdir / "fp32_straight").values()]
    assert fp16_loss != fp32_loss and fp16_loss == pytest.approx(fp32_loss, abs=1e-2)
