"""The project among other tools: Hugging Face GPT-2 folders both ways, fine-tuning through train.py,
wandb's offline log, the metrics log and plot, prompt files and the interactive sampler.
Every script runs as a real process of its own (conftest.run) in a scratch folder; nothing is mocked."""
import glob
import json
import math
import os
import pty
import select
import signal
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)

import conftest  # noqa: E402
from configurator import configure  # noqa: E402
from conftest import read_log  # noqa: E402
from hf import HF_TRANSPOSED, from_hf_gpt2, to_hf_gpt2  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

transformers = pytest.importorskip("transformers")

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--device=cpu", "--dtype=float32", "--final_eval=False", "--plot=False"]
CHAR = ["--dataset=shakespeare_char", *TINY]
TOL = 1e-4


def make_env(home):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HOME=str(home), HF_HOME=str(home / "hf_home"), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    return env


def run(script, *args, cwd, env=None, check=True):
    p = conftest.run(script, *args, cwd=cwd, env=env or make_env(cwd))
    if check:
        assert p.returncode == 0, f"{script} {args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p


def assert_refused(p, *words):
    """Exit status 2 and exactly one line on stderr, 'error: ...', mentioning every word given."""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, f"exit {p.returncode}, stderr:\n{p.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"want one 'error:' line, got:\n{p.stderr}"
    assert "Traceback" not in p.stdout + p.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def perturb(model, seed=0, scale=0.05):
    """Nudge every parameter, so that zero biases and unit norm gains are no longer special and a
    misplaced or untransposed tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def random_hf_gpt2(folder, safe=True, **kwargs):
    """A randomly initialised (then perturbed) GPT2LMHeadModel saved as a Hugging Face folder, its weights
    in model.safetensors or, with safe=False, in the older pytorch_model.bin."""
    torch.manual_seed(0)
    kwargs.setdefault("bos_token_id", kwargs["vocab_size"] - 1)
    kwargs.setdefault("eos_token_id", kwargs["vocab_size"] - 1)
    hf = perturb(transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs))).eval()
    hf.save_pretrained(folder, safe_serialization=safe)
    if not safe and not os.path.exists(os.path.join(folder, "pytorch_model.bin")):
        # transformers 5 always writes safetensors (safe_serialization=False is ignored), so write the
        # .bin as transformers 4 did: torch.save of the state dict, without the tied head
        state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
        os.remove(os.path.join(folder, "model.safetensors"))
    return hf


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def both_logits(model, hf, idx):
    """(this project's logits, transformers' logits) for the same tokens."""
    return model(idx, idx)[0], hf(idx).logits


@pytest.fixture(scope="module")
def work(tmp_path_factory, shakespeare_char):
    d = tmp_path_factory.mktemp("eco")
    shakespeare_char(d)
    run("prepare.py", "--num_proc=1", cwd=d)
    # a learning rate high enough that 20 steps clearly beat a fresh model
    run("train.py", *CHAR, "--max_iters=20", "--eval_interval=10", "--log_interval=1", "--learning_rate=1e-2",
        "--warmup_iters=2", "--lr_decay_iters=20", "--min_lr=1e-3", "--plot=True", "--out_dir=ck", cwd=d)
    return d


@pytest.fixture(scope="module")
def hf_folder(work):
    """A random GPT-2 with the real vocabulary and a 64-token context, as Hugging Face saves it."""
    folder = work / "hf_gpt2"
    random_hf_gpt2(folder, n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    return folder


# -----------------------------------------------------------------------------
# 1. Hugging Face -> this project

@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_import_hf_gpt2_same_logits(tmp_path, safe):
    hf = random_hf_gpt2(tmp_path, safe=safe, n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=333)
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).exists()
    assert not (tmp_path / ("pytorch_model.bin" if safe else "model.safetensors")).exists()
    model = from_hf_gpt2(str(tmp_path)).eval()
    assert model.config.block_size == 64 and model.config.vocab_size == 333 and model.config.n_layer == 2
    idx = torch.randint(333, (3, 64), generator=torch.Generator().manual_seed(1))
    ours, theirs = both_logits(model, hf, idx)
    diff = max_diff(ours, theirs)
    print(f"import ({'safetensors' if safe else 'pytorch_model.bin'}): max abs logit difference {diff:.3g}")
    assert ours.shape == theirs.shape == (3, 64, 333)
    assert diff <= TOL, f"imported GPT-2 logits differ from transformers' by {diff:.3g} (> {TOL})"


def test_norm_epsilon_and_mlp_width_survive_import_and_export(tmp_path):
    # eps 1e-2 dominates the variance of these small activations, and 48 hidden units are not 4 * 32
    hf = random_hf_gpt2(tmp_path / "in", n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=101,
                        layer_norm_epsilon=1e-2, n_inner=48)
    model = from_hf_gpt2(str(tmp_path / "in")).eval()
    idx = torch.randint(101, (2, 32), generator=torch.Generator().manual_seed(1))
    diff = max_diff(*both_logits(model, hf, idx))
    assert diff <= TOL, f"imported GPT-2 (eps 1e-2, n_inner 48) differs from transformers' by {diff:.3g}"
    to_hf_gpt2(model, str(tmp_path / "out"))
    again = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
    assert (again.config.layer_norm_epsilon, again.config.n_inner) == (1e-2, 48)
    diff = max_diff(*both_logits(model, again, idx))
    assert diff <= TOL, f"re-exported GPT-2 (eps 1e-2, n_inner 48) differs by {diff:.3g}"


def test_import_refuses_gpt2_settings_it_would_compute_differently(tmp_path):
    random_hf_gpt2(tmp_path, n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=101)
    plain = json.loads((tmp_path / "config.json").read_text())
    for key, value in (("activation_function", "relu"), ("scale_attn_weights", False),
                       ("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True),
                       ("tie_word_embeddings", False)):
        (tmp_path / "config.json").write_text(json.dumps({**plain, key: value}))
        with pytest.raises(ValueError, match=f"{key}={value}"):
            from_hf_gpt2(str(tmp_path))


# -----------------------------------------------------------------------------
# 2. this project -> Hugging Face

@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_export_round_trip_same_logits(tmp_path, bias):
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=4, n_embd=64, bias=bias, norm="layernorm")
    model = perturb(GPT(config)).eval()
    to_hf_gpt2(model, str(tmp_path))
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path), output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    idx = torch.randint(101, (3, 32), generator=torch.Generator().manual_seed(1))
    ours, theirs = both_logits(model, hf, idx)
    diff = max_diff(ours, theirs)
    print(f"export (bias={bias}): max abs logit difference {diff:.3g}")
    assert diff <= TOL, f"exported model's logits in transformers differ by {diff:.3g} (> {TOL})"


def test_export_refuses_rmsnorm(tmp_path, work):
    model = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=1, n_head=2, n_embd=32, norm="rmsnorm"))
    with pytest.raises(ValueError, match="rmsnorm"):
        to_hf_gpt2(model, str(tmp_path / "x"))
    assert not (tmp_path / "x" / "model.safetensors").exists()

    run("train.py", *CHAR, "--norm=rmsnorm", "--max_iters=2", "--eval_interval=2", "--out_dir=rms", cwd=work)
    p = run("export_hf.py", "--out_dir=rms", "--to=rms_hf", cwd=work, check=False)
    assert_refused(p, "rmsnorm")
    assert not (work / "rms_hf" / "model.safetensors").exists()


def test_export_script_on_a_trained_run(work):
    p = run("export_hf.py", "--out_dir=ck", "--to=ck_hf", cwd=work)
    assert "ck_hf" in p.stdout
    assert (work / "ck_hf" / "model.safetensors").exists() and (work / "ck_hf" / "meta.json").exists()
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(str(work / "ck_hf"), output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    ckpt = torch.load(work / "ck" / "ckpt.pt", map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    vocab = ckpt["model_args"]["vocab_size"]
    idx = torch.randint(vocab, (2, 32), generator=torch.Generator().manual_seed(2))
    diff = max_diff(*both_logits(model, hf, idx))
    print(f"export_hf.py on a trained run: max abs logit difference {diff:.3g}")
    assert diff <= TOL, f"exported checkpoint's logits differ by {diff:.3g}"
    assert json.loads((work / "ck_hf" / "meta.json").read_text())["tokenizer"] == "char"
    # a second export into the same folder is refused rather than overwriting
    assert_refused(run("export_hf.py", "--out_dir=ck", "--to=ck_hf", cwd=work, check=False))


# -----------------------------------------------------------------------------
# 3. fine-tuning through train.py

def test_finetune_from_hf_folder_crops_context(work, hf_folder):
    run("train.py", "--dataset=shakespeare", *TINY, "--max_iters=3", "--log_interval=1", "--eval_interval=3",
        "--learning_rate=1e-5", "--min_lr=1e-6", f"--init_from=hf:{hf_folder}", "--out_dir=ft_hf", cwd=work)
    ckpt = torch.load(work / "ft_hf" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["model_args"]["block_size"] == 32 and ckpt["model_args"]["vocab_size"] == 50257
    assert ckpt["model"]["transformer.wpe.weight"].shape == (32, 32)
    log = read_log(work / "ft_hf" / "log.jsonl")
    assert log[0]["iter"] == 1 and math.isfinite(log[0]["loss"]) and log[0]["loss"] < 12

    # every weight is the folder's (3 tiny Adam steps away), not a fresh initialisation; the blocks too,
    # since a model with only the folder's embeddings would give about the same loss as below
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(hf_folder)).eval()
    theirs = hf.state_dict()
    for name, ours in ckpt["model"].items():
        expected = theirs[name].t() if name.endswith(HF_TRANSPOSED) else theirs[name]
        if name == "transformer.wpe.weight":
            expected = expected[:32]
        assert max_diff(ours, expected) < 1e-3, name

    # and the first logged loss is the HF model's own loss on such data
    data = np.memmap(work / "data" / "shakespeare" / "train.bin", dtype=np.uint16, mode="r")
    starts = torch.randint(len(data) - 33, (8,), generator=torch.Generator().manual_seed(3)).tolist()
    x = torch.from_numpy(np.stack([data[s:s + 32] for s in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[s + 1:s + 33] for s in starts]).astype(np.int64))
    with torch.no_grad():
        hf_loss = hf(x, labels=None).logits.flatten(0, 1).log_softmax(-1).gather(1, y.view(-1, 1)).mean().neg().item()
    assert abs(log[0]["loss"] - hf_loss) < 0.5, (log[0]["loss"], hf_loss)


def test_finetune_from_checkpoint_file_starts_at_zero_with_its_weights(work):
    run("train.py", *CHAR, "--max_iters=3", "--log_interval=1", "--eval_interval=3", "--init_from=ck/ckpt.pt",
        "--out_dir=ft_ck", cwd=work)
    log = read_log(work / "ft_ck" / "log.jsonl")
    assert [r["iter"] for r in log] == [1, 2, 3]
    ckpt = torch.load(work / "ft_ck" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["iter_num"] == 3
    # ck was a scratch run with the same seed, batch and block size: its first step saw the same batch
    scratch_first = read_log(work / "ck" / "log.jsonl")[0]
    assert scratch_first["iter"] == 1
    assert log[0]["loss"] < scratch_first["loss"] - 0.5, (log[0]["loss"], scratch_first["loss"])


def test_finetune_checkpoint_on_other_tokenizer_is_refused(work):
    p = run("train.py", "--dataset=shakespeare", *TINY, "--max_iters=2", "--init_from=ck/ckpt.pt",
            "--out_dir=ft_bad", cwd=work, check=False)
    assert_refused(p, "tokenizer")
    assert not (work / "ft_bad" / "ckpt.pt").exists()


def test_hf_weights_need_gpt2_tokenizer(work, hf_folder):
    p = run("train.py", *CHAR, "--max_iters=2", f"--init_from=hf:{hf_folder}", "--out_dir=ft_bad2", cwd=work,
            check=False)
    assert_refused(p, "gpt2")
    assert not (work / "ft_bad2" / "ckpt.pt").exists()


def test_hf_weights_with_a_smaller_vocabulary_are_refused(work):
    folder = work / "hf_small_vocab"
    random_hf_gpt2(folder, n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=333)
    p = run("train.py", "--dataset=shakespeare", *TINY, "--max_iters=2", f"--init_from=hf:{folder}",
            "--out_dir=ft_bad4", cwd=work, check=False)
    assert_refused(p, "333 token embeddings", "50257 token ids")
    assert not (work / "ft_bad4" / "ckpt.pt").exists()


def test_gpt2_by_name_offline_says_what_to_do(work):
    p = run("train.py", "--dataset=shakespeare", *TINY, "--max_iters=2", "--init_from=gpt2", "--out_dir=ft_bad3",
            cwd=work, check=False)
    line = assert_refused(p, "could not download", "hf:FOLDER")
    assert "gpt2" in line


# -----------------------------------------------------------------------------
# 4. wandb, offline, with the real package

LEVELDB_BLOCK = 32768


def wandb_records(path):
    """The protobuf records of a .wandb file: wandb's leveldb-style log (a 7-byte ':W&B' header, then 32 KiB
    blocks of records: crc32 of type+data, uint16 length, uint8 type FULL/FIRST/MIDDLE/LAST, data).
    wandb 0.31 writes it from its Go core and ships no Python reader, so it is read here by the format."""
    from wandb.proto import wandb_internal_pb2
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos, pending, payloads = 7, b"", []
    while pos + 7 <= len(data):
        left = LEVELDB_BLOCK - pos % LEVELDB_BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if crc == length == kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert len(chunk) == length and zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad record at {pos}"
        pos += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
        else:
            raise AssertionError(f"unknown record type {kind} at {pos}")
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def test_wandb_offline_run_holds_the_logged_metrics(work):
    pytest.importorskip("wandb")
    p = run("train.py", *CHAR, "--max_iters=10", "--eval_interval=5", "--log_interval=5", "--wandb_log=True",
            "--out_dir=wb", cwd=work)
    assert "wandb sync" in p.stdout
    runs = glob.glob(str(work / "wb" / "wandb" / "offline-run-*"))
    assert len(runs) == 1, runs
    files = glob.glob(os.path.join(runs[0], "run-*.wandb"))
    assert len(files) == 1, os.listdir(runs[0])

    records = wandb_records(files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[0] == "header" and "run" in kinds and kinds[-1] == "exit", kinds
    history = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in r.history.item})
    log = read_log(work / "wb" / "log.jsonl")
    assert [h["_step"] for h in history] == [r["iter"] for r in log] == [5, 10]
    for h, r in zip(history, log, strict=True):
        for key in ("loss", "val_loss", "train_loss", "lr", "iter", "tokens"):
            assert h[key] == pytest.approx(r[key], rel=1e-12), (key, h, r)
    run_record = next(r for r in records if r.WhichOneof("record_type") == "run").run
    assert run_record.display_name == "wb"


def test_wandb_api_key_is_never_written(work):
    """The key stays in the environment: not in the checkpoint, the logs, eval.json or wandb's own files."""
    pytest.importorskip("wandb")
    secret = "k3y" + os.urandom(18).hex()
    env = dict(make_env(work), WANDB_API_KEY=secret, WANDB_MODE="offline")
    run("train.py", *CHAR, "--max_iters=4", "--eval_interval=4", "--wandb_log=True", "--final_eval=True",
        "--out_dir=wb_key", cwd=work, env=env)
    written = [os.path.join(root, f) for root, _, names in os.walk(work / "wb_key") for f in names]
    assert {"ckpt.pt", "log.jsonl", "eval.json"} <= {os.path.basename(f) for f in written}
    assert any(f.endswith(".wandb") for f in written), written  # holds the run's config and history
    for path in written:
        assert secret.encode() not in Path(path).read_bytes(), path


# -----------------------------------------------------------------------------
# 5. metrics log and plot

def test_log_records_and_loss_plot(work):
    log = read_log(work / "ck" / "log.jsonl")
    assert [r["iter"] for r in log] == list(range(1, 21))
    for r in log:
        assert {"iter", "loss", "lr", "tokens_per_s", "mfu"} <= r.keys(), r
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["mfu"] >= 0 and r["lr"] > 0
    assert [r["iter"] for r in log if "val_loss" in r] == [10, 20]
    assert all(math.isfinite(r["val_loss"]) for r in log if "val_loss" in r)
    assert all(r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"])) for r in log if "val_loss" in r)

    png = work / "ck" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image
    image = matplotlib.image.imread(str(png))
    assert image.ndim == 3 and image.shape[1] > 400 and image.shape[0] > 200, image.shape
    assert image[..., :3].std() > 0.01  # not a blank canvas


# -----------------------------------------------------------------------------
# 6. prompt files

PROMPTS = ["ROMEO:", "JULIET:\nO", "KING"]
FIELDS = {"prompt", "completion", "temperature", "top_k", "top_p", "seed", "max_new_tokens"}


def generate(work, out, *extra):
    run("sample.py", "--out_dir=ck", "--prompts=prefixes.json", f"--out={out}", "--max_new_tokens=30",
        "--device=cpu", "--dtype=float32", *extra, cwd=work)
    with open(work / out, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_prompts_file_is_deterministic(work):
    (work / "prefixes.json").write_text(json.dumps(PROMPTS))
    first = generate(work, "gen.jsonl")
    generate(work, "gen2.jsonl")
    assert len(first) == 3
    for record, prompt in zip(first, PROMPTS, strict=True):
        assert record.keys() >= FIELDS, record
        assert record["prompt"] == prompt and record["max_new_tokens"] == 30 and record["seed"] == 1337
        assert 0 < len(record["completion"]) <= 30
    assert (work / "gen.jsonl").read_bytes() == (work / "gen2.jsonl").read_bytes()
    other = generate(work, "gen3.jsonl", "--seed=7")
    assert [r["prompt"] for r in other] == PROMPTS and other[0]["seed"] == 7
    assert [r["completion"] for r in other] != [r["completion"] for r in first]


def test_prompt_outside_vocabulary_is_refused(work):
    (work / "bad_prompts.json").write_text(json.dumps(["ROMEO:", "KING ~ of Denmark"]))
    p = run("sample.py", "--out_dir=ck", "--prompts=bad_prompts.json", "--out=bad.jsonl", "--device=cpu",
            cwd=work, check=False)
    assert_refused(p)
    assert not (work / "bad.jsonl").exists() and not (work / "bad.jsonl.tmp").exists()


# -----------------------------------------------------------------------------
# 7. the interactive sampler on a real terminal

class Terminal:
    """sample.py on a pseudo-terminal it controls, so Ctrl-D is end of input and Ctrl-C is SIGINT."""

    def __init__(self, cwd, *args, timeout=60):
        self.timeout, self.buffer, self.seen = timeout, b"", b""
        argv = [sys.executable, os.path.join(REPO, "sample.py"), *args]
        env = make_env(cwd)
        env["TERM"] = "dumb"
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec at once
            try:
                os.chdir(cwd)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)

    def expect(self, text):
        """Read until text appears after what earlier calls consumed; fail after the timeout."""
        text = text.encode()
        deadline = time.monotonic() + self.timeout
        while text not in self.buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, remaining))
            if not ready:
                raise AssertionError(f"no {text!r} within {self.timeout} s; output so far:\n"
                                     f"{self.seen.decode(errors='replace')}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"sample.py ended before {text!r}; output:\n{self.seen.decode(errors='replace')}")
            self.buffer += chunk
            self.seen += chunk
        self.buffer = self.buffer[self.buffer.index(text) + len(text):]

    def send(self, data):
        os.write(self.fd, data)

    def wait_until_reading(self):
        """Wait until the child sleeps (blocked reading its terminal) after printing a prompt. A signal that
        lands between Python writing input()'s prompt and its read() only sets a flag that nothing checks
        until the read returns, so a Ctrl-C sent that instant would be lost; a person cannot type that fast."""
        deadline, sleeping = time.monotonic() + 10, 0
        while time.monotonic() < deadline and sleeping < 5:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                return
            sleeping = sleeping + 1 if state == "S" else 0
            time.sleep(0.05)

    def finish(self):
        """Drain the output until the child closes the terminal, then its exit status."""
        if getattr(self, "exit_status", None) is not None:  # already reaped by running_after
            os.close(self.fd)
            return self.exit_status
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                break
            self.seen += chunk
        while time.monotonic() < deadline + 5:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        raise AssertionError(f"sample.py did not exit; output:\n{self.seen.decode(errors='replace')}")

    def running_after(self, seconds):
        """Drain output for up to `seconds`; True if the child is still running then."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exit_status = os.waitstatus_to_exitcode(status)
                return False
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:
                    pass
        return True

    def output(self):
        return self.seen.decode(errors="replace")


INTERACTIVE = ["--out_dir=ck", "--interactive", "--max_new_tokens=20", "--device=cpu", "--dtype=float32"]


def test_interactive_continue_new_and_ctrl_d(work):
    t = Terminal(work, *INTERACTIVE)
    t.expect("prompt> ")
    t.send(b"ROMEO:\n")
    t.expect("[c]ontinue")
    t.send(b"c\n")
    t.expect("[c]ontinue")
    t.send(b"n\n")
    t.expect("prompt> ")
    t.send(b"\x04")
    status = t.finish()
    assert status == 0 and "Traceback" not in t.output(), t.output()
    assert "ROMEO:" in t.output()


def test_interactive_ctrl_c_leaves_quietly(work):
    t = Terminal(work, *INTERACTIVE)
    t.expect("prompt> ")
    t.wait_until_reading()
    t.send(b"\x03")
    for _ in range(3):  # under heavy load the first Ctrl-C can still land in input()'s window; press again
        if not t.running_after(5):
            break
        t.send(b"\x03")
    status = t.finish()
    assert status == 0 and "Traceback" not in t.output(), t.output()


# -----------------------------------------------------------------------------
# 8. bare flags

def test_bare_boolean_flag_is_true_but_bare_value_is_an_error(work, capsys):
    defaults = {"interactive": False, "batch_size": 12, "out_dir": ""}
    assert configure(defaults, ["--interactive"])["interactive"] is True
    assert configure(defaults, ["--interactive", "--interactive=False"])["interactive"] is False
    with pytest.raises(SystemExit) as e:
        configure(defaults, ["--batch_size"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error:")
    with pytest.raises(SystemExit) as e:
        configure(defaults, ["--out_dir"])
    assert e.value.code == 2
    # and through a real script
    assert_refused(run("train.py", *CHAR, "--batch_size", "--out_dir=never", cwd=work, check=False), "--batch_size")
    assert not (work / "never").exists()


def test_exported_folder_names_the_tokenizer_and_its_end_of_text(work):
    """What a reader of the exported folder needs besides the weights: meta.json holds the dataset's tokenizer
    with its vocab_size and end-of-text id, and config.json names that id as GPT-2's bos and eos tokens, so
    that transformers' generate stops where sample.py does."""
    run("export_hf.py", "--out_dir=ck", "--to=ck_hf_tokens", cwd=work)
    dataset = json.loads((work / "data" / "shakespeare_char" / "meta.json").read_text())
    exported = json.loads((work / "ck_hf_tokens" / "meta.json").read_text())
    keys = ("tokenizer", "chars", "vocab_size", "eot_token")
    assert {k: exported.get(k) for k in keys} == {k: dataset[k] for k in keys}
    config = transformers.GPT2Config.from_pretrained(str(work / "ck_hf_tokens"))
    assert config.eos_token_id == config.bos_token_id == dataset["eot_token"]
