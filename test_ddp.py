"""DDP on CPU (gloo): two processes against one, rank-0 duties, resume, evaluation, failure.

torchrun starts the runs that compare two processes with one and the run whose worker is killed. The
resume and evaluation runs start their two ranks directly, with the environment torchrun gives its
workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as any other launcher would; that
spares each run the 5-7 s torchrun takes here to start itself and two fresh interpreters.

Every test starts real processes, so all are marked slow: deselect them with -m "not slow".
"""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import conftest
from conftest import read_log
from test_evaluate import SHAKESPEARES, write_hellaswag

REPO = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(REPO, "train.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
TINY = ["--dataset=shakespeare_char", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--device=cpu", "--dtype=float32", "--log_interval=1", "--eval_iters=2",
        "--warmup_iters=2", "--lr_decay_iters=20", "--dropout=0.0"]
RUN8 = ["--gradient_accumulation_steps=2", "--max_iters=8", "--eval_interval=8", "--final_eval=False"]
TASK_LIST = f"hellaswag,mc:{REPO}/tasks/shakespeare.jsonl"  # hs.jsonl is written by the runs fixture
TASKS = [f"--eval_tasks={TASK_LIST}", "--hellaswag=hs.jsonl"]
TOL = dict(rel=1e-5, abs=1e-5)
TIMEOUT = 240
ENV = dict(os.environ, OMP_NUM_THREADS="1")

pytestmark = pytest.mark.slow


def children(pid):
    """Direct children of a process, read from /proc (empty once it is gone)."""
    kids = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                kids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return kids


def is_worker(pid):
    """A live (not zombie) process running train.py: a worker of ours that has not ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return state != "Z" and TRAIN.encode() in f.read()
    except OSError:
        return False


def kill_tree(proc, workers=()):
    """Kill a torchrun started in its own session and its workers (torchrun gives each its own session)."""
    pids = set(workers) | set(children(proc.pid))
    for pgid in [proc.pid, *pids]:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def torchrun(args, cwd):
    """train.py under torchrun with two workers; (process, its output as a function)."""
    # not a pipe: a full pipe would stall a process not yet waited for; read() reads it while the run lives
    output = tempfile.TemporaryFile("w+")  # noqa: SIM115
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node=2", TRAIN, *args], cwd=cwd, env=ENV,
                            stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def read():
        output.seek(0)
        return output.read()
    return proc, read


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, how, cwd, script="train.py"):
    """train.py (or script) as "one" process, as two "ranks" given the environment torchrun gives its
    workers, or train.py under "torchrun"; a list of (process, its output as a function)."""
    if how == "torchrun":
        return [torchrun(args, cwd)]
    if how == "one":
        procs = [conftest.start(script, *args, cwd=cwd, env=ENV)]
    else:
        env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        procs = [conftest.start(script, *args, cwd=cwd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
                 for r in range(2)]
    return [(p, lambda p=p: "\n".join(p.output())) for p in procs]


def launch(*runs, cwd, timeout=TIMEOUT):
    """Run (args, how) or (args, how, script) side by side (see start); all must succeed."""
    procs = []
    try:
        for args, how, *script in runs:
            procs += [(f"{' '.join(script) or 'train.py'} {' '.join(args)} ({how})", p, read)
                      for p, read in start(args, how, cwd, *script)]
        deadline = time.time() + timeout
        for cmd, proc, read in procs:
            proc.wait(timeout=max(1, deadline - time.time()))
            assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{read()[-5000:]}"
    finally:
        for _, proc, _ in procs:
            if proc.poll() is not None:
                continue
            if isinstance(proc, subprocess.Popen):  # torchrun: its workers are in sessions of their own
                kill_tree(proc)
            else:
                proc.kill()


def losses(path):
    return {r["iter"]: r["loss"] for r in read_log(path)}


def max_abs_diff(a, b):
    return max(abs(a[k] - b[k]) for k in a)


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_char):
    """One prepared dataset; 8 iterations of the same global batch in one process (single/) and in two (ddp/),
    both scoring two multiple-choice tasks at iteration 8."""
    d = tmp_path_factory.mktemp("ddp")
    shakespeare_char(d)
    write_hellaswag(d / "hs.jsonl", 200, vocabulary=SHAKESPEARES)  # several forwards to share
    launch(([*TINY, *RUN8, *TASKS, "--out_dir=single"], "one"), ([*TINY, *RUN8, *TASKS, "--out_dir=ddp"], "torchrun"),
           cwd=d)
    # what the 8-iteration ddp run left, before any test adds to it
    files = sorted(os.listdir(d / "ddp"))
    shutil.copy(d / "ddp" / "ckpt.pt", d / "ddp_ckpt8.pt")
    return d, files


def test_two_processes_match_one_with_the_same_global_batch(runs):
    d, _ = runs
    single, ddp = losses(d / "single" / "log.jsonl"), losses(d / "ddp" / "log.jsonl")
    assert sorted(single) == sorted(ddp) == list(range(1, 9))
    loss_diff = max_abs_diff(single, ddp)
    a, b = weights(d / "single"), weights(d / "ddp")
    assert a.keys() == b.keys()
    weight_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    report = f"max |loss diff| {loss_diff:.3e} over 8 iterations, max |weight diff| {weight_diff:.3e}"
    print(f"\nDDP equivalence (2 processes vs 1, gradient_accumulation_steps=2): {report}")
    assert [ddp[i] for i in sorted(ddp)] == pytest.approx([single[i] for i in sorted(single)], **TOL), report
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), report


def test_eval_tasks_scored_by_two_processes_as_by_one(runs):
    """The 8-iteration run's scores, its two processes sharing the forwards, are exactly those evaluate.py
    gives its checkpoint in one process."""
    d, _ = runs
    logged = next(r for r in read_log(d / "ddp" / "log.jsonl") if r["iter"] == 8 and "val_loss" in r)
    p = conftest.run("evaluate.py", "--init_from=ddp_ckpt8.pt", f"--tasks={TASK_LIST}", "--hellaswag=hs.jsonl",
                     "--device=cpu", "--dtype=float32", "--out=ddp_tasks.json", cwd=d, env=ENV)
    assert p.returncode == 0, p.stderr
    one = json.loads((d / "ddp_tasks.json").read_text())
    assert one["hellaswag"]["examples"] == 200
    assert {k: v for k, v in logged.items() if "/" in k} == {
        f"{task}/{m}": one[task][m] for task in ("hellaswag", "mc:shakespeare") for m in ("acc", "acc_norm")}


def test_muon_two_processes_match_one(runs):
    """Every rank orthogonalises the same averaged gradients, so Muon keeps DDP equal to one process."""
    d, _ = runs
    muon = [*TINY, *RUN8, "--optimizer=muon", "--pos=rope", "--mlp=swiglu"]
    launch(([*muon, "--out_dir=muon_single"], "one"), ([*muon, "--out_dir=muon_ddp"], "ranks"), cwd=d)
    single, ddp = losses(d / "muon_single" / "log.jsonl"), losses(d / "muon_ddp" / "log.jsonl")
    assert sorted(single) == sorted(ddp) == list(range(1, 9))
    assert [ddp[i] for i in sorted(ddp)] == pytest.approx([single[i] for i in sorted(single)], **TOL)
    a, b = weights(d / "muon_single"), weights(d / "muon_ddp")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_only_rank0_writes_and_ddp_resume_matches_single_process_resume(runs):
    d, files = runs
    assert files == ["best.pt", "ckpt.pt", "log.jsonl", "loss.png"]  # nothing per rank, no temporaries left
    assert [r["iter"] for r in read_log(d / "ddp" / "log.jsonl")] == list(range(1, 9))  # one writer
    resume = [*TINY, "--gradient_accumulation_steps=2", "--max_iters=12", "--eval_interval=8",
              "--final_eval=False", "--init_from=resume"]
    launch(([*resume, "--out_dir=single"], "one"), ([*resume, "--out_dir=ddp"], "ranks"), cwd=d)
    assert sorted(os.listdir(d / "ddp")) == ["best.pt", "ckpt.pt", "log.jsonl", "loss.png"]
    single, ddp = losses(d / "single" / "log.jsonl"), losses(d / "ddp" / "log.jsonl")
    assert [r["iter"] for r in read_log(d / "ddp" / "log.jsonl")] == list(range(1, 13))
    assert sorted(single) == list(range(1, 13))
    later = list(range(9, 13))
    report = f"max |loss diff| at iterations 9..12: {max(abs(single[i] - ddp[i]) for i in later):.3e}"
    print(f"\nDDP resume: {report}")
    assert [ddp[i] for i in later] == pytest.approx([single[i] for i in later], **TOL), report
    ckpt = torch.load(d / "ddp" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter_num"] == 12
    a, b = weights(d / "single"), ckpt["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_ddp_resume_with_dropout_is_exact(runs):
    """Each process draws its own dropout masks; a resumed run must restore every process's stream,
    so stopping at 8 and resuming to 12 gives the same losses and weights as running 12 straight."""
    d, _ = runs
    drop = [*TINY, "--dropout=0.1", "--gradient_accumulation_steps=2", "--eval_interval=4", "--final_eval=False"]
    launch(([*drop, "--max_iters=12", "--out_dir=drop_straight"], "ranks"),
           ([*drop, "--max_iters=8", "--out_dir=drop_resumed"], "ranks"), cwd=d)
    launch(([*drop, "--max_iters=12", "--out_dir=drop_resumed", "--init_from=resume"], "ranks"), cwd=d)
    straight, resumed = losses(d / "drop_straight" / "log.jsonl"), losses(d / "drop_resumed" / "log.jsonl")
    assert sorted(straight) == sorted(resumed) == list(range(1, 13))
    assert straight == resumed, {i: (straight[i], resumed[i]) for i in straight if straight[i] != resumed[i]}
    a, b = weights(d / "drop_straight"), weights(d / "drop_resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_evaluation_averages_over_ranks(runs):
    d, _ = runs
    for name in ("eval_ddp", "eval_single"):
        os.makedirs(d / name)
        shutil.copy(d / "ddp_ckpt8.pt", d / name / "ckpt.pt")
    # gradient_accumulation_steps plays no part in an evaluation, but under torchrun it must still be
    # a multiple of the number of processes (the default 1 is refused)
    evaluate = [*TINY, "--eval_only=True", "--init_from=resume"]
    launch(([*evaluate, "--gradient_accumulation_steps=2", "--out_dir=eval_ddp"], "ranks"),
           ([*evaluate, "--out_dir=eval_single"], "one"), cwd=d)
    two = json.loads((d / "eval_ddp" / "eval.json").read_text())
    one = json.loads((d / "eval_single" / "eval.json").read_text())
    meta = json.loads((d / "data" / "shakespeare_char" / "meta.json").read_text())
    assert one["tokens"] == meta["val_tokens"]
    assert two["tokens"] == one["tokens"]  # every val token counted once across the ranks
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5), (two["val_loss"], one["val_loss"])
    assert two["iter_num"] == one["iter_num"] == 8
    # evaluate.py: the whole split and both kinds of multiple-choice task, exactly the numbers of one process
    tasks = [f"--tasks=val,hellaswag,mc:{REPO}/tasks/shakespeare.jsonl", "--hellaswag=hs.jsonl", "--device=cpu",
             "--dtype=float32"]
    launch(([*tasks, "--out_dir=eval_ddp", "--out=two.json"], "ranks", "evaluate.py"),
           ([*tasks, "--out_dir=eval_single", "--out=one.json"], "one", "evaluate.py"), cwd=d)
    two, one = (json.loads((d / name).read_text()) for name in ("two.json", "one.json"))
    assert two.pop("checkpoint") != one.pop("checkpoint")
    assert two == one and two["hellaswag"]["examples"] == 200 and two["bytes"] > 0


def test_killed_worker_ends_the_whole_run(runs):
    d, _ = runs
    args = [*TINY, "--gradient_accumulation_steps=2", "--max_iters=100000", "--eval_interval=100000",
            "--final_eval=False", "--ddp_timeout=30", "--out_dir=killed"]
    log_path = d / "killed" / "log.jsonl"
    proc, output = torchrun(args, d)
    workers = []
    try:
        deadline = time.time() + 120
        while not (log_path.exists() and len(log_path.read_text().splitlines()) >= 3):
            assert proc.poll() is None, f"torchrun ended early ({proc.returncode}): {output()}"
            assert time.time() < deadline, "no training iterations logged within 120 s"
            time.sleep(0.2)
        workers = children(proc.pid)
        ranks = {}
        for pid in workers:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                ranks[pid] = int(env.get(b"RANK", b"-1"))
            except (OSError, ValueError):
                pass
        assert len(ranks) == 2 and sorted(ranks.values()) == [0, 1], ranks
        victim = next(pid for pid, r in ranks.items() if r == 1)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("torchrun still running 60 s after one worker was killed")
        elapsed = time.time() - killed_at
        print(f"\ntorchrun exited {proc.returncode} {elapsed:.1f} s after rank 1 was killed")
        assert proc.returncode != 0, output()[-3000:]
        assert not [pid for pid in workers if is_worker(pid)], "a worker outlived torchrun"
    finally:
        if proc.poll() is None or any(is_worker(pid) for pid in workers):
            kill_tree(proc, [pid for pid in workers if is_worker(pid)])


def test_resume_with_fewer_processes_continues_the_same_run(runs):
    """The 2-process checkpoint at 8, resumed in one process, goes on as one process running 12 straight:
    the global batch, the sampler and the optimizer state do not depend on the process count."""
    d, _ = runs
    os.makedirs(d / "two_then_one")
    shutil.copy(d / "ddp_ckpt8.pt", d / "two_then_one" / "ckpt.pt")
    args = [*TINY, "--gradient_accumulation_steps=2", "--max_iters=12", "--eval_interval=4", "--final_eval=False"]
    launch(([*args, "--out_dir=two_then_one", "--init_from=resume"], "one"), ([*args, "--out_dir=one_straight"], "one"),
           cwd=d)
    resumed, straight = losses(d / "two_then_one" / "log.jsonl"), losses(d / "one_straight" / "log.jsonl")
    assert sorted(resumed) == [9, 10, 11, 12]
    assert [resumed[i] for i in sorted(resumed)] == pytest.approx([straight[i] for i in sorted(resumed)], **TOL)
    a, b = weights(d / "two_then_one"), weights(d / "one_straight")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_sigint_to_one_rank_stops_every_rank_at_the_same_iteration(runs):
    d, _ = runs
    args = [*TINY, "--gradient_accumulation_steps=2", "--max_iters=100000", "--eval_interval=100000",
            "--final_eval=False", "--ddp_timeout=30", "--out_dir=interrupted"]
    log_path = d / "interrupted" / "log.jsonl"
    procs = start(args, "ranks", d)
    try:
        deadline = time.time() + 120
        while not (log_path.exists() and len(log_path.read_text().splitlines()) >= 3):
            assert all(p.poll() is None for p, _ in procs) and time.time() < deadline, procs[0][1]()
            time.sleep(0.05)
        procs[1][0].send_signal(signal.SIGINT)  # rank 1 only, as a scheduler might deliver it
        for p, output in procs:
            p.wait(60)
            assert p.returncode == 0, output()[-3000:]
    finally:
        for p, _ in procs:
            p.kill()
    stdout = procs[0][1]()
    assert "a stop request received" in stdout
    assert "Continue with: torchrun --nproc_per_node=2 train.py --out_dir=interrupted --init_from=resume" in stdout
    assert sorted(os.listdir(d / "interrupted")) == ["ckpt.pt", "log.jsonl"]  # one checkpoint, no temporaries
    ckpt = torch.load(d / "interrupted" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["iter_num"] == read_log(log_path)[-1]["iter"]
    assert len(ckpt["rng"]["ranks"]) == 2  # both ranks took part in the save


def test_dropout_with_two_processes_draws_the_same_data_with_other_masks(runs):
    """What the README promises with dropout: the same global batches as one process, but each process
    draws its own dropout masks, so the losses are close without being equal."""
    d, _ = runs
    drop = [*TINY, "--dropout=0.1", "--gradient_accumulation_steps=2", "--max_iters=4", "--eval_interval=4",
            "--final_eval=False"]
    launch(([*drop, "--out_dir=drop_one"], "one"), ([*drop, "--out_dir=drop_two"], "ranks"), cwd=d)
    one, two = (torch.load(d / name / "ckpt.pt", map_location="cpu", weights_only=False)
                for name in ("drop_one", "drop_two"))
    assert torch.equal(one["rng"]["sampler"], two["rng"]["sampler"])  # the same batches drawn
    a, b = losses(d / "drop_one" / "log.jsonl"), losses(d / "drop_two" / "log.jsonl")
    assert a != b and [b[i] for i in sorted(b)] == pytest.approx([a[i] for i in sorted(a)], abs=0.05), (a, b)
