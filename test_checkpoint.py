"""A checkpoint, a tokenizer file and a meta.json are data: loading one never runs what is inside it, and
no path inside one leads a script outside the folders the user named. Old checkpoints still load.

Every script runs as a real process (conftest.run) in a scratch folder; the malicious files are real
pickles whose unpickling would create a marker file."""
import hashlib
import json
import os
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch

import checkpoint as ckpt
import conftest
from hf import from_hf_gpt2
from optim import configure_optimizers, parts

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
TINY = ["--dataset=shakespeare_char", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--plot=False", "--final_eval=False"]
MARKER = "PWNED"


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


def run(script, *args, cwd):
    return conftest.run(script, *args, cwd=cwd, env=ENV)


def assert_refused(p, *words):
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    for word in words:
        assert word in lines[0], lines[0]


def files(d):
    return {os.path.relpath(os.path.join(root, f), d): os.path.getmtime(os.path.join(root, f))
            for root, _, names in os.walk(d) for f in names}


def losses(path):
    with open(path) as f:
        return [(r["iter"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def work(tmp_path_factory, shakespeare_char):
    d = tmp_path_factory.mktemp("checkpoints")
    shakespeare_char(d)
    # a short validation split keeps full evaluations quick
    data = d / "data" / "shakespeare_char"
    meta = json.loads((data / "meta.json").read_text())
    with open(data / "val.bin", "r+b") as f:
        f.truncate(20_000 * np.dtype(meta["dtype"]).itemsize)
    (data / "meta.json").write_text(json.dumps({**meta, "val_tokens": 20_000}))
    p = run("train.py", *TINY, "--max_iters=8", "--eval_interval=4", "--out_dir=run", cwd=d)
    assert p.returncode == 0, p.stderr
    # the same checkpoint, its model_args swapped for an object whose unpickling runs a command
    state = torch.load(d / "run" / "ckpt.pt", weights_only=True)
    (d / "evil").mkdir()
    torch.save({**state, "model_args": RunsCode()}, d / "evil" / "ckpt.pt")
    return d


@pytest.mark.parametrize("script,args", [
    ("sample.py", ["--out_dir=evil", "--max_new_tokens=5"]),
    ("train.py", [*TINY, "--out_dir=evil", "--init_from=resume"]),
    ("train.py", [*TINY, "--out_dir=evil", "--eval_only"]),
    ("train.py", [*TINY, "--out_dir=finetuned", "--init_from=evil/ckpt.pt"]),
    ("export_hf.py", ["--out_dir=evil", "--to=hf_out"]),
], ids=["sample", "resume", "eval-only", "init-from-file", "export-hf"])
def test_malicious_checkpoint_is_refused_before_it_runs(work, script, args):
    before = files(work)
    assert_refused(run(script, *args, cwd=work), "evil/ckpt.pt", "not plain data", "posix.system")
    assert not (work / MARKER).exists()
    assert files(work) == before  # nothing written


def test_a_checkpoint_is_plain_data(work):
    """What train.py writes loads with torch.load's weights_only=True alone, no allow-list."""
    state = torch.load(work / "run" / "ckpt.pt", weights_only=True)
    assert state["format"] == ckpt.FORMAT
    assert isinstance(state["rng"]["ranks"][0]["numpy"][1], list)


ADDED_SINCE = {"model_args": ("pos", "mlp", "qk_norm"),
               "config": ("pos", "mlp", "qk_norm", "optimizer", "muon_lr", "muon_momentum", "lr_schedule",
                          "decay_frac")}


def write_old_format(state, path):
    """A checkpoint as train.py wrote it before checkpoints had a format number: numpy's RNG state as
    np.random.get_state() returns it, an ndarray inside a tuple, and none of the keys added since."""
    old = {k: v for k, v in state.items() if k != "format"}
    for part, keys in ADDED_SINCE.items():
        old[part] = {k: v for k, v in state[part].items() if k not in keys}
    ranks = []
    for rng in state["rng"]["ranks"]:
        name, key, pos, has_gauss, gauss = rng["numpy"]
        ranks.append({**rng, "numpy": (name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss)})
    old["rng"] = {**state["rng"], "ranks": ranks}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(old, path)


def test_old_format_checkpoint_samples_and_resumes_like_the_new(work):
    old_dir, new_dir = work / "old_format", work / "new_format"
    shutil.copytree(work / "run", new_dir)
    write_old_format(torch.load(work / "run" / "ckpt.pt", weights_only=True), str(old_dir / "ckpt.pt"))
    shutil.copy(work / "run" / "log.jsonl", old_dir / "log.jsonl")
    samples = [run("sample.py", f"--out_dir={d.name}", "--max_new_tokens=40", "--num_samples=1", cwd=work)
               for d in (old_dir, new_dir)]
    assert all(p.returncode == 0 for p in samples), samples[0].stderr
    assert samples[0].stdout == samples[1].stdout and samples[0].stdout.strip("-\n")
    for d in (old_dir, new_dir):
        p = run("train.py", f"--out_dir={d.name}", "--init_from=resume", "--max_iters=12", cwd=work)
        assert p.returncode == 0, p.stderr
    assert losses(old_dir / "log.jsonl") == losses(new_dir / "log.jsonl")
    assert [i for i, _ in losses(new_dir / "log.jsonl")] == list(range(1, 13))


def test_resume_takes_the_runs_config_and_writes_only_where_told(work):
    """A checkpoint's config names another out_dir; the resumed run writes into the one on the command line,
    and needs no other flag: architecture, data and batch come from the checkpoint."""
    state = torch.load(work / "run" / "ckpt.pt", weights_only=True)
    (work / "moved").mkdir()
    torch.save({**state, "config": {**state["config"], "out_dir": "../escaped"}}, work / "moved" / "ckpt.pt")
    p = run("train.py", "--out_dir=moved", "--init_from=resume", "--max_iters=10", cwd=work)
    assert p.returncode == 0, p.stderr
    assert not (work.parent / "escaped").exists()
    assert torch.load(work / "moved" / "ckpt.pt", weights_only=True)["iter_num"] == 10


def test_eval_only_evaluates_what_init_from_names(work):
    """--eval_only with another run's checkpoint evaluates that model into a new folder, with the same result
    as evaluating the run in place."""
    for args in (["--out_dir=run"], ["--out_dir=evaluated", "--init_from=run/ckpt.pt", *TINY]):
        p = run("train.py", "--eval_only", *args, cwd=work)
        assert p.returncode == 0, p.stderr
    in_place, elsewhere = (json.loads((work / d / "eval.json").read_text()) for d in ("run", "evaluated"))
    assert in_place["val_loss"] == elsewhere["val_loss"] and in_place["tokens"] == elsewhere["tokens"] > 0
    assert not (work / "evaluated" / "ckpt.pt").exists()


def test_paths_inside_checkpoints_and_meta_stay_inside_data(work):
    state = torch.load(work / "run" / "ckpt.pt", weights_only=True)
    (work / "traversal").mkdir()
    torch.save({**state, "config": {**state["config"], "dataset": "../../outside"}}, work / "traversal" / "ckpt.pt")
    for script, args in (("sample.py", ["--out_dir=traversal"]),
                         ("train.py", ["--out_dir=traversal", "--init_from=resume"])):
        assert_refused(run(script, *args, cwd=work), "'../../outside' is not a folder under data/")
    # a shared dataset whose meta.json names a tokenizer file outside its folder
    data = work / "data"
    shutil.copytree(data / "shakespeare_char", data / "escaping_bpe")
    meta = json.loads((data / "escaping_bpe" / "meta.json").read_text())
    (data / "escaping_bpe" / "meta.json").write_text(json.dumps(
        {**meta, "tokenizer": "bpe", "tokenizer_file": "../../secret.tiktoken"}))
    p = run("train.py", *TINY, "--dataset=escaping_bpe", "--out_dir=unused", cwd=work)
    assert_refused(p, "'../../secret.tiktoken'", "refusing to read files outside")
    assert not (work / "unused").exists()


def test_tokenizer_file_and_meta_json_are_parsed_not_run(work):
    data = work / "data"
    meta = json.loads((data / "shakespeare_char" / "meta.json").read_text())
    shutil.copytree(data / "shakespeare_char", data / "code_in_bpe")
    code = f"__import__('os').system('touch {MARKER}')\n".encode()
    (data / "code_in_bpe" / "tokenizer.tiktoken").write_bytes(code)
    (data / "code_in_bpe" / "meta.json").write_text(json.dumps(
        {**meta, "tokenizer": "bpe", "tokenizer_file": "tokenizer.tiktoken",
         "tokenizer_sha256": hashlib.sha256(code).hexdigest()}))
    assert_refused(run("train.py", *TINY, "--dataset=code_in_bpe", "--out_dir=unused", cwd=work),
                   "is not a tiktoken rank file")
    shutil.copytree(data / "shakespeare_char", data / "code_in_meta")
    (data / "code_in_meta" / "meta.json").write_text(json.dumps({**meta, "tokenizer": code.decode()}))
    assert_refused(run("train.py", *TINY, "--dataset=code_in_meta", "--out_dir=unused", cwd=work),
                   "unknown tokenizer")
    assert not (work / MARKER).exists() and not (work / "unused").exists()


def test_hugging_face_pickle_is_read_as_weights_only(tmp_path, monkeypatch):
    """A pytorch_model.bin holding objects is refused; the import prefers model.safetensors anyway."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 32, "vocab_size": 64,
                                                      "n_layer": 1, "n_head": 2, "n_embd": 32}))
    torch.save({"wte.weight": RunsCode()}, tmp_path / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="not plain data"):
        from_hf_gpt2(str(tmp_path))
    assert not (tmp_path / MARKER).exists()


def write_sharded(state, folder, optimizer=None):
    """state (a ckpt.pt's contents) as a sharded checkpoint: the DCP files written by one process, here,
    state.pt beside them, and the link that names the directory."""
    import torch.distributed.checkpoint as dcp
    target = folder / f"ckpt.dcp.{state['iter_num']:07d}"
    with warnings.catch_warnings():  # that one process saves is meant
        warnings.simplefilter("ignore")
        dcp.save({"model": state["model"], "optimizer": optimizer or {}}, checkpoint_id=target, no_dist=True)
    torch.save({k: v for k, v in state.items() if k not in ("model", "optimizer")}, target / "state.pt")
    os.symlink(target.name, folder / "ckpt.dcp")


def test_sharded_checkpoint_reads_as_its_file_does(work):
    write_sharded(torch.load(work / "run" / "ckpt.pt", weights_only=True), work / "sharded")
    samples = [run("sample.py", f"--out_dir={d}", "--max_new_tokens=40", "--num_samples=1", cwd=work)
               for d in ("run", "sharded")]
    assert all(p.returncode == 0 for p in samples), samples[1].stderr
    assert samples[0].stdout == samples[1].stdout and samples[0].stdout.strip("-\n")


def test_malicious_sharded_checkpoint_is_refused_before_it_runs(work):
    """DCP unpickles its index (.metadata) and non-tensor values, such as an optimizer's learning rates,
    with plain pickle: a sharded checkpoint carrying code in either is refused, whichever script reads it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = torch.load(work / "run" / "ckpt.pt", weights_only=True)
    write_sharded(state, work / "evil_index")
    (work / "evil_index" / "ckpt.dcp" / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    # the optimizer state as a resumed run asks DCP for it, one learning rate replaced by code
    model = ckpt.model_from(state, "run")
    optimizer = parts(configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu"))
    optimizer_state = get_optimizer_state_dict(model, optimizer)
    optimizer_state["param_groups"][0]["lr"] = RunsCode()
    write_sharded(state, work / "evil_value", optimizer_state)
    cases = [("sample.py", ["--out_dir=evil_index", "--max_new_tokens=5"]),
             ("train.py", [*TINY, "--out_dir=evil_index", "--eval_only"]),
             ("train.py", [*TINY, "--out_dir=finetuned", "--init_from=evil_index/ckpt.dcp"]),
             ("export_hf.py", ["--out_dir=evil_index", "--to=hf_out"]),
             ("train.py", ["--out_dir=evil_value", "--init_from=resume", "--max_iters=10"])]
    for script, args in cases:
        before = files(work)
        assert_refused(run(script, *args, cwd=work), "ckpt.dcp", "not plain data", "posix.system")
        assert not (work / MARKER).exists()
        assert files(work) == before


def test_resumed_optimizer_keeps_the_learning_rates_configured_now(work):
    """Resuming may change muon_lr or learning_rate: Muon's groups then run at the new ratio of the two,
    not the one saved with the optimizer state."""
    state = torch.load(work / "run" / "ckpt.pt", weights_only=True)
    model = ckpt.model_from(state, "run")
    saved = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu", "muon", muon_lr=0.02)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    saved.step()
    resumed = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu", "muon", muon_lr=0.04)
    ckpt.restore_optimizer({"optimizer": saved.state_dict()}, model, resumed)
    assert [g["lr_scale"] for g in resumed.param_groups if "lr_scale" in g] == [pytest.approx(40.0)] * 2
    assert torch.equal(resumed.optimizers[1].state[model.transformer.h[0].attn.c_attn.weight]["momentum_buffer"],
                       saved.optimizers[1].state[model.transformer.h[0].attn.c_attn.weight]["momentum_buffer"])


def test_a_checkpoint_written_before_the_redesign_samples_and_resumes(tmp_path, shakespeare_char):
    """testdata/ckpt_before_redesign.pt was written by train.py before the code moved into its present files
    (Muon with AdamW, rope, swiglu, qk_norm, rmsnorm, dropout): it still samples, and resumes exactly.
    Resumed to iteration 4 it continues as the run that wrote it did (its losses, recorded beside it, agree
    to within what another CPU's float32 kernels change), and resuming it in two legs gives the same bits
    as in one."""
    shakespeare_char(tmp_path)
    with open(os.path.join(conftest.REPO, "testdata", "ckpt_before_redesign.json")) as f:
        recorded = json.load(f)
    for leg in ("one", "two"):
        os.makedirs(tmp_path / leg)
        shutil.copy(os.path.join(conftest.REPO, "testdata", "ckpt_before_redesign.pt"), tmp_path / leg / "ckpt.pt")
    for leg, stops in (("one", [4]), ("two", [3, 4])):
        for max_iters in stops:
            p = run("train.py", f"--out_dir={leg}", "--init_from=resume", f"--max_iters={max_iters}", cwd=tmp_path)
            assert p.returncode == 0, p.stderr
    one, two = losses(tmp_path / "one" / "log.jsonl"), losses(tmp_path / "two" / "log.jsonl")
    assert one == two
    assert dict(one) == pytest.approx({int(k): v for k, v in recorded["losses_when_resumed_to_4"].items()}, abs=1e-4)
    states = [torch.load(tmp_path / leg / "ckpt.pt", weights_only=True) for leg in ("one", "two")]
    assert states[0]["best_val_loss"] == pytest.approx(recorded["val_loss_at_4"], abs=1e-4)
    for name, t in states[0]["model"].items():
        assert torch.equal(t, states[1]["model"][name]), name
    p = run("sample.py", "--out_dir=one", "--max_new_tokens=20", "--num_samples=1", "--start=ROMEO:", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith("ROMEO:") and len(p.stdout) > 20, p.stderr


def test_a_fine_tuned_runs_config_is_its_source_architecture(work):
    """Fine-tuned from a checkpoint without architecture flags, a run saves the source's architecture in its
    config, not train.py's defaults: resumed with those values given, they agree with the run's."""
    source = torch.load(work / "run" / "ckpt.pt", weights_only=True)
    args = ["--dataset=shakespeare_char", "--block_size=32", "--batch_size=4", "--eval_iters=2", "--eval_interval=2",
            "--plot=False", "--final_eval=False", "--out_dir=finetuned_arch"]
    p = run("train.py", *args, "--init_from=run/ckpt.pt", "--max_iters=2", cwd=work)
    assert p.returncode == 0, p.stderr
    config = torch.load(work / "finetuned_arch" / "ckpt.pt", weights_only=True)["config"]
    architecture = {k: v for k, v in source["model_args"].items() if k in source["config"]}
    assert architecture["n_layer"] == 1  # not train.py's default
    assert {k: config.get(k) for k in architecture} == architecture
    p = run("train.py", *args, "--init_from=resume", "--max_iters=4", "--n_layer=1", "--n_head=2", "--n_embd=32",
            cwd=work)
    assert p.returncode == 0, p.stderr
    assert torch.load(work / "finetuned_arch" / "ckpt.pt", weights_only=True)["iter_num"] == 4


def test_the_newer_of_a_file_and_a_sharded_checkpoint_is_read(work):
    """A kill between writing NAME.pt and removing NAME.dcp (or the other way round) leaves both: the scripts
    read the one written last."""
    state = torch.load(work / "run" / "ckpt.pt", weights_only=True)
    folder = work / "both_formats"
    folder.mkdir()
    torch.save(state, folder / "ckpt.pt")
    write_sharded({**state, "iter_num": state["iter_num"] // 2}, folder)
    for newer, older, iter_num in (("ckpt.dcp", "ckpt.pt", state["iter_num"] // 2),
                                   ("ckpt.pt", "ckpt.dcp", state["iter_num"])):
        os.utime(folder / older, (1e9, 1e9))
        os.utime(folder / newer, (2e9, 2e9))
        p = run("train.py", f"--out_dir={folder.name}", "--eval_only", cwd=work)
        assert p.returncode == 0, p.stderr
        evaluation = json.loads((folder / "eval.json").read_text())
        assert evaluation["checkpoint"] == os.path.join(folder.name, newer) and evaluation["iter_num"] == iter_num
