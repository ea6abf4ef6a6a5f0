"""FSDP on CPU (gloo): two sharded processes against one, sharded checkpoints resumed by as many processes,
by one, and from one, a kill while a checkpoint is written, and the scripts that read a sharded checkpoint.

The two ranks are started as test_ddp.py starts them, with the environment torchrun gives its workers.
Every test starts real processes, so all are marked slow: deselect them with -m "not slow".
"""
import json
import os
import shutil
import signal
import time

import pytest
import torch

import checkpoint as ckpt
import conftest
from test_ddp import ENV, RUN8, TINY, launch, losses, max_abs_diff, start

pytestmark = pytest.mark.slow
FSDP = ["--parallel=fsdp"]
MUON = ["--optimizer=muon", "--pos=rope", "--mlp=swiglu"]
# clipping at every step, so that a norm over one process's shards instead of the whole would show
CLIPPED = [*TINY, "--grad_clip=0.1"]
EIGHT = [*CLIPPED, *RUN8]  # 8 iterations, 2 accumulation steps
TO12 = [*CLIPPED, "--gradient_accumulation_steps=2", "--max_iters=12", "--eval_interval=4", "--final_eval=False"]


def weights(path):
    """The weights of a checkpoint, sharded or not, as one process reads them."""
    return ckpt.model_from(ckpt.load(str(path)), str(path)).state_dict()


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a), \
        max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_char):
    """8 iterations of the same global batch in one process and in two sharded ones, with AdamW and with
    Muon; the sharded AdamW run's checkpoint is kept as it was at iteration 8."""
    d = tmp_path_factory.mktemp("fsdp")
    shakespeare_char(d)
    launch(([*EIGHT, "--out_dir=single"], "one"), ([*EIGHT, *FSDP, "--out_dir=fsdp"], "ranks"), cwd=d)
    launch(([*EIGHT, *MUON, "--out_dir=muon_single"], "one"),
           ([*EIGHT, *MUON, *FSDP, "--out_dir=muon_fsdp"], "ranks"), cwd=d)
    shutil.copytree(d / "fsdp", d / "fsdp8", symlinks=True)
    shutil.copytree(d / "single", d / "single8")
    return d


@pytest.mark.parametrize("one,two", [("single", "fsdp"), ("muon_single", "muon_fsdp")], ids=["adamw", "muon"])
def test_two_sharded_processes_match_one(runs, one, two):
    d = runs
    single, sharded = losses(d / one / "log.jsonl"), losses(d / two / "log.jsonl")
    assert sorted(single) == sorted(sharded) == list(range(1, 9))
    print(f"\nFSDP equivalence ({two}, 2 processes vs 1, gradient_accumulation_steps=2): "
          f"max |loss diff| {max_abs_diff(single, sharded):.3e} over 8 iterations")
    assert max_abs_diff(single, sharded) <= 1e-5
    # every rank wrote its own shard into the directory the link points to; nothing else was left
    files = sorted(os.listdir(d / two))
    assert files == ["best.dcp", "best.dcp.0000008", "ckpt.dcp", "ckpt.dcp.0000008", "log.jsonl", "loss.png"]
    assert os.readlink(d / two / "ckpt.dcp") == "ckpt.dcp.0000008"
    assert sorted(os.listdir(d / two / "ckpt.dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]
    state = torch.load(d / two / "ckpt.dcp" / "state.pt", weights_only=True)
    assert state["iter_num"] == 8 and len(state["rng"]["ranks"]) == 2 and "model" not in state
    saved = ckpt.read_index(str(d / two / "ckpt.dcp")).state_dict_metadata
    assert "model.transformer.wte.weight" in saved and "model.lm_head.weight" not in saved  # tied: stored once
    assert_same_weights(weights(d / one / "ckpt.pt"), weights(d / two / "ckpt.dcp"), atol=1e-5)


def test_activation_checkpointing_under_fsdp(runs):
    """Two sharded processes that recompute each block in the backward pass (gathering its weights again)
    train as one process that keeps every activation."""
    d = runs
    launch(([*EIGHT, *MUON, *FSDP, "--activation_checkpointing", "--out_dir=muon_fsdp_recompute"], "ranks"), cwd=d)
    single, sharded = losses(d / "muon_single" / "log.jsonl"), losses(d / "muon_fsdp_recompute" / "log.jsonl")
    assert sorted(sharded) == list(range(1, 9)) and max_abs_diff(single, sharded) <= 1e-5
    assert_same_weights(weights(d / "muon_single" / "ckpt.pt"), weights(d / "muon_fsdp_recompute" / "ckpt.dcp"),
                        atol=1e-5)


def test_sharded_resume_by_two_one_and_from_one(runs):
    """Iteration 8 resumed to 12: by two sharded processes, bitwise as an uninterrupted sharded run; by one
    process (DCP reshards 2 -> 1), and from one process's ckpt.pt by two sharded ones (1 -> 2), each
    within 1e-4 of one process running 12 straight.

    The first resumes a copy that followed the link (ckpt.dcp a directory, as scp -r leaves it) in a folder
    whose name is a glob pattern matching a sibling's; the sibling's checkpoint must survive its saves."""
    d = runs
    shutil.copytree(d / "fsdp8", d / "two[2]")
    shutil.copytree(d / "fsdp8", d / "two2", symlinks=True)
    shutil.copytree(d / "fsdp8", d / "two_one", symlinks=True)
    shutil.copytree(d / "single8", d / "one_two")
    launch(([*TO12, *FSDP, "--out_dir=fsdp12"], "ranks"), ([*TO12, "--out_dir=single12"], "one"), cwd=d)
    resume = [*TO12, "--init_from=resume"]
    launch(([*resume, "--out_dir=two[2]"], "ranks"), ([*resume, "--out_dir=two_one"], "one"), cwd=d)
    launch(([*resume, *FSDP, "--out_dir=one_two"], "ranks"), cwd=d)
    straight_fsdp, straight = losses(d / "fsdp12" / "log.jsonl"), losses(d / "single12" / "log.jsonl")
    later = range(9, 13)
    two_two = losses(d / "two[2]" / "log.jsonl")
    assert [two_two[i] for i in later] == [straight_fsdp[i] for i in later]
    assert weights(d / "two[2]" / "ckpt.dcp").keys() == weights(d / "fsdp12" / "ckpt.dcp").keys()
    assert all(torch.equal(a, b) for a, b in zip(weights(d / "two[2]" / "ckpt.dcp").values(),
                                                 weights(d / "fsdp12" / "ckpt.dcp").values(), strict=True))
    assert sorted(n for n in os.listdir(d / "two[2]") if n.startswith("ckpt")) == ["ckpt.dcp", "ckpt.dcp.0000012"]
    assert os.readlink(d / "two[2]" / "ckpt.dcp") == "ckpt.dcp.0000012"
    assert sorted(os.listdir(d / "two2")) == sorted(os.listdir(d / "fsdp8"))  # the sibling, untouched
    for name in ("two_one", "one_two"):
        resumed = losses(d / name / "log.jsonl")
        diff = max(abs(resumed[i] - straight[i]) for i in later)
        print(f"\nFSDP resume {name}: max |loss diff| at iterations 9..12 {diff:.3e}")
        assert diff <= 1e-4
    # each run keeps one checkpoint, in the format of the processes that last saved it
    assert sorted(os.listdir(d / "two_one")) == ["best.pt", "ckpt.pt", "log.jsonl", "loss.png"]
    assert torch.load(d / "two_one" / "ckpt.pt", weights_only=True)["config"]["parallel"] == "ddp"  # what ran
    assert {"ckpt.dcp", "ckpt.dcp.0000012"} <= set(os.listdir(d / "one_two"))
    assert "ckpt.pt" not in os.listdir(d / "one_two")
    assert_same_weights(weights(d / "two_one" / "ckpt.pt"), weights(d / "single12" / "ckpt.pt"), atol=1e-4)


def test_kill_while_a_checkpoint_is_written_leaves_the_previous_and_resumes_bitwise(runs):
    """Both ranks are killed while they write a checkpoint (caught by stopping them once a directory newer
    than the linked one appears). The link still names the previous checkpoint, whole; resuming from it
    goes on exactly as a run that was never killed."""
    d = runs
    bigger = [*TINY, "--n_layer=2", "--n_embd=128", "--gradient_accumulation_steps=2", "--final_eval=False",
              "--plot=False", *FSDP]
    run = d / "killed"
    procs = start([*bigger, "--max_iters=100000", "--eval_interval=1", "--out_dir=killed"], "ranks", d)
    pids = [p.pid for p, _ in procs]

    def writing():
        """The iteration of a directory newer than the one linked, or None."""
        try:
            linked = int(os.readlink(run / "ckpt.dcp").split(".")[-1].rstrip("b"))
            newer = [int(n.split(".")[-1].rstrip("b")) for n in os.listdir(run) if n.startswith("ckpt.dcp.")]
        except (OSError, ValueError):
            return None
        return max([i for i in newer if i > linked], default=None)

    try:
        deadline, caught = time.time() + 120, None
        while caught is None:
            assert all(p.poll() is None for p, _ in procs) and time.time() < deadline, procs[0][1]()[-3000:]
            if writing() is not None:
                for pid in pids:
                    os.kill(pid, signal.SIGSTOP)
                caught = writing()  # still mid-write, now that neither can move on
                for pid in pids:
                    os.kill(pid, signal.SIGKILL if caught is not None else signal.SIGCONT)
    finally:
        for p, _ in procs:
            p.kill()
            p.wait(30)
    linked = torch.load(run / "ckpt.dcp" / "state.pt", weights_only=True)["iter_num"]
    assert linked < caught
    print(f"\nkilled while iteration {caught}'s checkpoint was written; ckpt.dcp still at {linked}")
    until = linked + 6
    launch(([*bigger, f"--max_iters={until}", "--eval_interval=1", "--out_dir=killed", "--init_from=resume"], "ranks"),
           ([*bigger, f"--max_iters={until}", f"--eval_interval={until}", "--out_dir=straight"], "ranks"), cwd=d)
    resumed, straight = losses(run / "log.jsonl"), losses(d / "straight" / "log.jsonl")
    assert [resumed[i] for i in range(linked + 1, until + 1)] == [straight[i] for i in range(linked + 1, until + 1)]
    assert sorted(n for n in os.listdir(run) if n.startswith("ckpt")) == ["ckpt.dcp", f"ckpt.dcp.{until:07d}"]


def test_scripts_read_a_sharded_checkpoint(runs):
    """--eval_only (by two sharded processes, by one, and with init_from naming the link), sample.py and
    export_hf.py read a sharded checkpoint."""
    d, short = runs, runs / "short_val"
    # 129 windows of 32 tokens in three forwards of up to 64: rank 0 runs the first and the third, rank 1 the
    # second and a spare one, as it must join rank 0's third forward, whose weights are gathered from both
    data = short / "data" / "shakespeare_char"
    shutil.copytree(d / "data" / "shakespeare_char", data)
    meta = json.loads((data / "meta.json").read_text())
    with open(data / "val.bin", "r+b") as f:
        f.truncate(4098 * 2)
    (data / "meta.json").write_text(json.dumps({**meta, "val_tokens": 4098}))
    for name in ("eval_two", "eval_one"):
        shutil.copytree(d / "fsdp8", short / name, symlinks=True)
    evaluate = [*TINY, "--eval_only=True", "--init_from=resume"]
    launch(([*evaluate, "--gradient_accumulation_steps=2", *FSDP, "--out_dir=eval_two"], "ranks"),
           ([*evaluate, "--out_dir=eval_one"], "one"), cwd=short, timeout=60)
    two, one = (json.loads((short / name / "eval.json").read_text()) for name in ("eval_two", "eval_one"))
    assert two["tokens"] == one["tokens"] == 4098
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert two["checkpoint"].endswith("ckpt.dcp")

    p = conftest.run("sample.py", "--out_dir=fsdp8", "--max_new_tokens=20", "--num_samples=1", cwd=d, env=ENV)
    assert p.returncode == 0 and p.stdout.strip("-\n"), p.stderr
    p = conftest.run("export_hf.py", "--out_dir=fsdp8", "--to=hf", cwd=d, env=ENV)
    assert p.returncode == 0, p.stderr
    from transformers import GPT2LMHeadModel
    x = torch.randint(0, 65, (2, 32))
    ours = ckpt.model_from(ckpt.load(str(d / "fsdp8" / "ckpt.dcp")), "fsdp8").eval()
    with torch.no_grad():
        assert torch.allclose(GPT2LMHeadModel.from_pretrained(d / "hf").eval()(x).logits[..., :ours.config.vocab_size],
                              ours(x, x)[0], atol=1e-4)
    shutil.copytree(d / "fsdp8", short / "fsdp8", symlinks=True)
    launch(([*TINY, "--eval_only=True", "--init_from=fsdp8/ckpt.dcp", "--out_dir=elsewhere"], "one"), cwd=short)
    assert json.loads((short / "elsewhere" / "eval.json").read_text())["val_loss"] == one["val_loss"]
