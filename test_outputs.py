"""What a run leaves in out_dir is what it claims to be: best.pt, eval.json, a fine-tuned model, and one
line instead of a traceback when those files cannot be written."""
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch

import conftest
from conftest import read_log
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))
# a 5,000-token validation split keeps every full evaluation cheap
TINY = ["--dataset=tiny", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--log_interval=1", "--eval_iters=4", "--device=cpu", "--dtype=float32", "--plot=False"]
# the warmup climbs towards a rate no model survives (0.06 more per step): the validation loss falls
# at first, then rises
SPIKE = [*TINY, "--eval_interval=5", "--final_eval=False", "--learning_rate=30", "--warmup_iters=500",
         "--lr_decay_iters=2000"]
EVALUATED = [*TINY, "--max_iters=10", "--eval_interval=10", "--warmup_iters=2", "--lr_decay_iters=10"]
SAMPLE = ["--start=ROMEO:", "--num_samples=1", "--max_new_tokens=30", "--device=cpu", "--dtype=float32"]


def run(script, *args, cwd, check=True, env=None):
    p = conftest.run(script, *args, cwd=cwd, env=env)
    assert not check or p.returncode == 0, p.stderr
    return p


def val_losses(out_dir):
    """Validation loss by iteration, as first logged (a resumed run logs replayed iterations again)."""
    evals = {}
    for r in read_log(out_dir / "log.jsonl"):
        if "val_loss" in r:
            evals.setdefault(r["iter"], r["val_loss"])
    return evals


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A small dataset, a finished run with its eval.json (evaluated/), and a run with
    always_save_checkpoint=False killed once an evaluation was worse than the best (spike/)."""
    d = tmp_path_factory.mktemp("outputs")
    run("prepare.py", "--tokenizer=char", "--num_proc=1", "--max_tokens=100000", "--val_tokens=5000", "--out=tiny",
        cwd=d)
    run("train.py", *EVALUATED, "--out_dir=evaluated", cwd=d)
    proc = conftest.start("train.py", *SPIKE, "--max_iters=1000", "--always_save_checkpoint=False", "--out_dir=spike",
                          cwd=d)

    def worse_after_best():
        try:
            evals = val_losses(d / "spike")
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return bool(evals) and max(evals) > min(evals, key=evals.get)
    try:
        deadline = time.time() + 120
        while not worse_after_best():
            assert proc.poll() is None and time.time() < deadline, "the validation loss never rose"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    return d


def sample(*args, cwd):
    return run("sample.py", *SAMPLE, *args, cwd=cwd).stdout


def test_best_pt_keeps_the_best_evaluation(workdir):
    evals = val_losses(workdir / "spike")
    best_iter, last = min(evals, key=evals.get), max(evals)
    assert last > best_iter  # the validation loss did rise after its best
    best = load(workdir / "spike" / "best.pt")
    assert best["iter_num"] == best_iter and best["best_val_loss"] == evals[best_iter]
    # always_save_checkpoint=False: the worse evaluations did not replace ckpt.pt either
    assert load(workdir / "spike" / "ckpt.pt")["iter_num"] == best_iter

    out = workdir / "spike_resumed"
    shutil.copytree(workdir / "spike", out)
    best_bytes = (out / "best.pt").read_bytes()
    best_sample = sample("--out_dir=spike_resumed", cwd=workdir)  # ckpt.pt holds the best weights here
    # resumed, saving ckpt.pt at every evaluation, up to the last one the killed run logged: all of
    # them since the best are worse, so best.pt must stay as it was
    run("train.py", *SPIKE, f"--max_iters={last}", "--out_dir=spike_resumed", "--init_from=resume", cwd=workdir)
    replayed = {r["iter"]: r["val_loss"] for r in read_log(out / "log.jsonl") if "val_loss" in r}
    assert replayed == evals
    latest = load(out / "ckpt.pt")
    assert latest["iter_num"] == last and latest["best_val_loss"] == evals[best_iter]
    assert (out / "best.pt").read_bytes() == best_bytes
    assert sample("--out_dir=spike_resumed", "--checkpoint_name=best.pt", cwd=workdir) == best_sample
    assert sample("--out_dir=spike_resumed", cwd=workdir) != best_sample


def independent_val_loss(ckpt, val_path):
    """Mean cross-entropy over val.bin in consecutive windows of block_size, one window at a time, every token
    predicted: the first after an end-of-text."""
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    data = torch.from_numpy(np.fromfile(val_path, dtype=np.uint16).astype(np.int64))
    data = torch.cat([torch.tensor([ckpt["meta"]["eot_token"]]), data])
    block = ckpt["model_args"]["block_size"]
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(data) - 1, block):
            x, y = data[s:s + block], data[s + 1:s + 1 + block]
            x = x[:len(y)]
            total += model(x[None], y[None])[1].item() * len(y)
            count += len(y)
    return total / count, count


def test_eval_only_reproduces_the_final_evaluation(workdir):
    out = workdir / "evaluated"
    final = json.loads((out / "eval.json").read_text())
    ckpt_bytes, best_bytes = (out / "ckpt.pt").read_bytes(), (out / "best.pt").read_bytes()
    expected, count = independent_val_loss(load(out / "ckpt.pt"), workdir / "data" / "tiny" / "val.bin")
    assert final["tokens"] == count == 5000
    assert final["val_loss"] == pytest.approx(expected, rel=1e-5)
    (out / "eval.json").unlink()
    run("train.py", *EVALUATED, "--out_dir=evaluated", "--eval_only=True", cwd=workdir)
    again = json.loads((out / "eval.json").read_text())
    assert (again["val_loss"], again["tokens"], again["iter_num"]) == (final["val_loss"], count, 10)
    assert (out / "ckpt.pt").read_bytes() == ckpt_bytes and (out / "best.pt").read_bytes() == best_bytes


def test_fine_tuning_crops_positions_and_resumes_exactly(workdir):
    """From evaluated/ckpt.pt (block_size 32) at block_size 16, at a learning rate small enough that the
    weights stay within 1e-3 of the source's: stopped at 4 and resumed to 8, or run straight to 8."""
    ft = [*TINY, "--block_size=16", "--learning_rate=1e-5", "--min_lr=1e-6", "--warmup_iters=2", "--lr_decay_iters=8",
          "--eval_interval=4", "--dropout=0.1", "--final_eval=False"]
    source = workdir / "evaluated" / "ckpt.pt"
    run("train.py", *ft, f"--init_from={source}", "--max_iters=8", "--out_dir=ft_straight", cwd=workdir)
    run("train.py", *ft, f"--init_from={source}", "--max_iters=4", "--out_dir=ft_resumed", cwd=workdir)
    run("train.py", *ft, "--init_from=resume", "--max_iters=8", "--out_dir=ft_resumed", cwd=workdir)

    src, straight = load(source)["model"], load(workdir / "ft_straight" / "ckpt.pt")
    assert straight["model_args"]["block_size"] == 16 and straight["iter_num"] == 8
    wpe = straight["model"]["transformer.wpe.weight"]
    assert wpe.shape == (16, 32)
    assert torch.allclose(wpe, src["transformer.wpe.weight"][:16], atol=1e-3)  # the first 16 positions
    assert all(torch.allclose(v, src[k], atol=1e-3) for k, v in straight["model"].items() if "wpe" not in k)
    log = read_log(workdir / "ft_straight" / "log.jsonl")
    assert [r["iter"] for r in log] == list(range(1, 9))  # a fresh schedule, not the source's

    resumed = load(workdir / "ft_resumed" / "ckpt.pt")
    assert [r["loss"] for r in read_log(workdir / "ft_resumed" / "log.jsonl")] == [r["loss"] for r in log]
    assert all(torch.equal(resumed["model"][k], v) for k, v in straight["model"].items())


FILE_SIZE_LIMIT = """
import os, resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
limit = int(os.environ["FILE_SIZE_LIMIT"])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("name", ["log.jsonl", "eval.json", "loss.png"])
def test_a_file_that_cannot_be_written_stops_the_run_in_one_line(workdir, name):
    """No file may grow past a limit (RLIMIT_FSIZE, as a full disk would stop it): each of the files a
    run writes besides its checkpoints, in turn, is the first to reach it."""
    out = workdir / f"limited_{name}"
    shutil.copytree(workdir / "spike", out)
    (workdir / "file_size_limit.py").write_text(FILE_SIZE_LIMIT)
    log_size = (out / "log.jsonl").stat().st_size
    if name == "log.jsonl":  # the first line appended
        limit, args = log_size, ["--max_iters=1000"]
    elif name == "eval.json":  # about 1 kB
        limit, args = 512, ["--eval_only=True"]
    else:  # ckpt.pt holds the best evaluation and the next is worse, so only the log and the plot are written
        limit, args = 20_000, ["--max_iters=1000", "--always_save_checkpoint=False", "--plot=True"]
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    p = run(workdir / "file_size_limit.py", os.path.join(REPO, "train.py"), *SPIKE, f"--out_dir={out.name}",
            "--init_from=resume", *args, cwd=workdir, check=False, env=dict(os.environ, FILE_SIZE_LIMIT=str(limit)))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    line, = p.stderr.strip().splitlines()
    assert f"could not write {out.name}/{name} (File too large)" in line and "ckpt.pt is intact" in line
    after = {f: (out / f).read_bytes() for f in os.listdir(out)}
    if name == "loss.png":  # one log line more, and whole
        assert len(after["log.jsonl"]) > log_size
        read_log(out / "log.jsonl")
        before["log.jsonl"] = after["log.jsonl"]
    assert after == before  # the checkpoints as they were, no torn log line, no temporary file left


def test_the_last_iteration_is_saved_even_when_it_is_not_the_best(workdir):
    """always_save_checkpoint=False saves ckpt.pt at an improvement, and once more at max_iters whatever
    the validation loss, so that a finished run's ckpt.pt is its last state. Resumed from the spike's best
    evaluation to its last, whose validation loss is worse, the run ends with ckpt.pt at that last iteration."""
    evals = val_losses(workdir / "spike")
    best_iter, last = min(evals, key=evals.get), max(evals)
    out = workdir / "spike_to_the_end"
    shutil.copytree(workdir / "spike", out)
    best_bytes = (out / "best.pt").read_bytes()
    run("train.py", *SPIKE, f"--max_iters={last}", "--always_save_checkpoint=False", f"--out_dir={out.name}",
        "--init_from=resume", cwd=workdir)
    replayed = {r["iter"]: r["val_loss"] for r in read_log(out / "log.jsonl") if "val_loss" in r}
    assert replayed[last] == evals[last] > evals[best_iter]
    latest = load(out / "ckpt.pt")
    assert latest["iter_num"] == last and latest["best_val_loss"] == evals[best_iter]
    assert (out / "best.pt").read_bytes() == best_bytes
