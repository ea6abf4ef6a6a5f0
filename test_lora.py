"""LoRA fine-tuning: adapters beside a frozen base, trained by train.py, and every reader of a LoRA run
(resume, --eval_only, sample.py, export_hf.py) rebuilding base plus adapters; the PEFT export checked
with the real peft and transformers. Tiny models, each script a real process (conftest.run)."""
import copy
import json
import os
import shutil

import pytest
import torch

import checkpoint as ckpt
import conftest
from hf import to_hf_gpt2
from model import GPT, LORA_TARGETS, GPTConfig

TINY = ["--dataset=shakespeare_char", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--device=cpu", "--dtype=float32", "--plot=False",
        "--final_eval=False"]
# a high constant rate, so that a few steps move the adapters far enough to tell them from the base
LORA = [*TINY, "--init_from=base/ckpt.pt", "--lora_rank=4", "--learning_rate=1e-2", "--decay_lr=False"]
ALL_TARGETS = ["--lora_targets=c_attn,c_proj,c_fc", "--lora_dropout=0.1"]
TOL = 1e-4


def run(script, *args, cwd, check=True):
    p = conftest.run(script, *args, cwd=cwd, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    if check:
        assert p.returncode == 0, f"{script} {args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p


def assert_refused(p, *words):
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and "Traceback" not in p.stdout + p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert all(word in lines[0] for word in words), lines[0]


def files(d):
    return {os.path.join(root, f): os.stat(os.path.join(root, f)).st_mtime_ns
            for root, _, names in os.walk(d) for f in names}


def read_log(out_dir):
    with open(out_dir / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    return {r["iter"]: r["loss"] for r in read_log(out_dir) if "loss" in r}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    run("prepare.py", "--tokenizer=char", "--num_proc=1", "--max_tokens=100_000", cwd=d)  # a short full evaluation
    run("train.py", *TINY, "--max_iters=10", "--eval_interval=10", "--learning_rate=1e-2", "--decay_lr=False",
        "--out_dir=base", cwd=d)
    run("train.py", *LORA, "--max_iters=12", "--eval_interval=12", "--final_eval=True", "--out_dir=lora", cwd=d)
    run("train.py", *LORA, *ALL_TARGETS, "--max_iters=6", "--eval_interval=3", "--out_dir=straight", cwd=d)
    return d


def test_adapters_start_as_the_base_and_merge_into_it():
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16)).eval()
    adapted = copy.deepcopy(base)
    adapted.add_lora(4, 8.0, 0.0, list(LORA_TARGETS))
    idx = torch.randint(50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(adapted(idx, idx)[0], base(idx, idx)[0])  # B = 0: exactly the base
        for p in adapted.adapters().values():
            p.normal_(std=0.1)
        trained = adapted(idx, idx)[0]
        assert (trained - base(idx, idx)[0]).abs().max() > 1e-2
        assert len(adapted.adapters()) == 2 * 4 * 2  # 2 blocks, 4 matmuls each, A and B beside each
        # trained as train.py trains them, the frozen base's weights get no gradients: 4 FLOPs each, not 6
        adapted.requires_grad_(False)
        trained_params = sum(p.requires_grad_(True).numel() for p in adapted.adapters().values())
        assert adapted.flops_per_token() == base.flops_per_token() - 2 * base.num_params() + 6 * trained_params
        merged = adapted.merge_lora()(idx, idx)[0]
    assert not adapted.adapters() and (merged - trained).abs().max() < 1e-5


def test_first_step_computes_the_base_model(work):
    # the first logged loss is taken before any update; a full fine-tune from the same base sees the same batch
    run("train.py", *LORA, "--lora_rank=0", "--max_iters=1", "--eval_interval=1", "--out_dir=full", cwd=work)
    assert losses(work / "lora")[1] == losses(work / "full")[1]


def test_checkpoint_holds_adapters_their_optimizer_and_the_base_identity(work, monkeypatch):
    monkeypatch.chdir(work)  # where the run names its base from
    state = ckpt.load(work / "lora" / "ckpt.pt")
    names = {f"transformer.h.{i}.attn.c_attn.lora_{m}" for i in range(2) for m in "AB"}
    assert state["model"].keys() == names  # the default target, and none of the base's weights
    assert len(state["optimizer"]["state"]) == len(names)
    base = ckpt.model_from(ckpt.load(work / "base" / "ckpt.pt"), "base")
    assert state["lora"]["base"] == "base/ckpt.pt"
    assert state["lora"]["base_sha256"] == ckpt.weights_sha256(base)
    print(f"checkpoint: base {os.path.getsize(work / 'base' / 'ckpt.pt'):,} bytes, "
          f"LoRA {os.path.getsize(work / 'lora' / 'ckpt.pt'):,}")
    assert os.path.getsize(work / "lora" / "ckpt.pt") < os.path.getsize(work / "base" / "ckpt.pt") / 5

    # the base stayed frozen: merged, only the adapted matrices differ from it
    merged = ckpt.model_from(state, "lora").state_dict()
    for name, w in base.state_dict().items():
        assert torch.equal(merged[name], w) != name.endswith("c_attn.weight"), name
    # and the adapters learned: evaluated on the same batches as the base at its end, the loss is lower
    base_val, lora_val = (read_log(work / d)[-1]["val_loss"] for d in ("base", "lora"))
    assert lora_val < base_val - 0.01, (lora_val, base_val)


def test_resume_is_bitwise(work):
    run("train.py", *LORA, *ALL_TARGETS, "--max_iters=3", "--eval_interval=3", "--out_dir=resumed", cwd=work)
    run("train.py", "--init_from=resume", "--max_iters=6", "--out_dir=resumed", cwd=work)
    assert losses(work / "straight") == losses(work / "resumed") and len(losses(work / "straight")) == 6
    a, b = ckpt.load(work / "straight" / "ckpt.pt"), ckpt.load(work / "resumed" / "ckpt.pt")
    assert a["model"].keys() == b["model"].keys() and len(a["model"]) == 2 * 2 * 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_eval_only_and_sample_load_base_plus_adapters(work, monkeypatch):
    trained = json.loads((work / "lora" / "eval.json").read_text())["val_loss"]  # by the model in memory
    run("train.py", "--out_dir=lora", "--eval_only", cwd=work)
    assert json.loads((work / "lora" / "eval.json").read_text())["val_loss"] == pytest.approx(trained, rel=1e-6)

    # adapters large enough to change what is sampled, and the same model saved whole
    monkeypatch.chdir(work)
    state = ckpt.load("lora/ckpt.pt")
    state["model"] = {name: t * 30 if name.endswith("lora_B") else t for name, t in state["model"].items()}
    os.makedirs("strong")
    ckpt.save(state, "strong/ckpt.pt")
    os.makedirs("whole")
    merged = ckpt.model_from(state, "strong", merge=False).merge_lora()  # not through the readers' path
    whole = {k: v for k, v in state.items() if k != "lora"} | {"model": merged.state_dict()}
    ckpt.save(whole, "whole/ckpt.pt")
    args = ["--start=ROMEO:", "--num_samples=2", "--max_new_tokens=30", "--device=cpu", "--dtype=float32"]
    adapted, whole = (run("sample.py", f"--out_dir={d}", *args, cwd=work).stdout for d in ("strong", "whole"))
    assert adapted == whole


def test_export_merged_and_as_peft_adapter(work, monkeypatch):
    monkeypatch.chdir(work)
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    to_hf_gpt2(ckpt.base_model("base/ckpt.pt"), "hf_base")
    run("export_hf.py", "--out_dir=straight", "--to=hf_merged", cwd=work)
    run("export_hf.py", "--out_dir=straight", "--to=hf_adapter", "--adapter_only", cwd=work)
    assert sorted(os.listdir(work / "hf_adapter")) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "meta.json"]
    state = ckpt.load(work / "straight" / "ckpt.pt")
    ours = ckpt.model_from(state, "straight", merge=False).eval()  # as it trained, adapters beside the base
    idx = torch.randint(ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    merged = transformers.GPT2LMHeadModel.from_pretrained(str(work / "hf_merged")).eval()
    base = transformers.GPT2LMHeadModel.from_pretrained(str(work / "hf_base"))
    adapted = peft.PeftModel.from_pretrained(base, str(work / "hf_adapter")).eval()
    with torch.no_grad():
        logits = ours(idx, idx)[0]
        for what, hf in (("merged", merged), ("PEFT adapter", adapted)):
            diff = (hf(idx).logits - logits).abs().max().item()
            print(f"{what}: max abs logit difference {diff:.3g}")
            assert diff <= TOL, f"{what}: logits differ from ours by {diff:.3g}"
        # training drops the adapter path's input in both: the same random draws give the same logits
        ours.train(), adapted.train()
        torch.manual_seed(3)
        ours_dropped = ours(idx, idx)[0]
        torch.manual_seed(3)
        diff = (adapted(idx).logits - ours_dropped).abs().max().item()
        assert diff <= TOL and (ours_dropped - logits).abs().max() > 1e-3, diff


def test_changed_base_is_refused(work):
    shutil.copytree(work / "base", work / "base2")
    run("train.py", *LORA, "--init_from=base2/ckpt.pt", "--max_iters=1", "--eval_interval=1", "--out_dir=lora2",
        cwd=work)
    state = torch.load(work / "base2" / "ckpt.pt", weights_only=True)
    state["model"]["transformer.ln_f.weight"][0] += 1e-3  # retrained, say: same shapes, other weights
    torch.save(state, work / "base2" / "ckpt.pt")
    before = files(work)
    assert_refused(run("train.py", "--init_from=resume", "--max_iters=2", "--out_dir=lora2", cwd=work, check=False),
                   "base2/ckpt.pt", "sha256")
    assert_refused(run("sample.py", "--out_dir=lora2", cwd=work, check=False), "sha256")
    assert files(work) == before


def test_adapter_only_export_of_what_gpt2_cannot_hold_is_refused(work):
    run("train.py", *TINY, "--norm=rmsnorm", "--max_iters=1", "--eval_interval=1", "--out_dir=rms", cwd=work)
    run("train.py", *LORA, "--init_from=rms/ckpt.pt", "--max_iters=1", "--eval_interval=1", "--out_dir=rms_lora",
        cwd=work)
    before = files(work)
    assert_refused(run("export_hf.py", "--out_dir=rms_lora", "--to=rms_adapter", "--adapter_only", cwd=work,
                       check=False), "norm=rmsnorm")
    assert_refused(run("export_hf.py", "--out_dir=base", "--to=base_adapter", "--adapter_only", cwd=work,
                       check=False), "not a LoRA run")
    assert files(work) == before


def test_adapter_only_export_is_never_written_over(work):
    """A second --adapter_only export into a folder that holds one is refused and leaves it as it was."""
    run("export_hf.py", "--out_dir=straight", "--to=hf_adapter_once", "--adapter_only", cwd=work)
    before = files(work / "hf_adapter_once")
    assert_refused(run("export_hf.py", "--out_dir=straight", "--to=hf_adapter_once", "--adapter_only", cwd=work,
                       check=False), "hf_adapter_once", "PEFT adapter")
    assert files(work / "hf_adapter_once") == before
