"""Every user-facing mistake ends the same way: a non-zero exit, one line on stderr that starts with
'error:' and says what is wrong and what to do, no traceback, and nothing written, moved or removed.

One table, each case the real script run in a scratch folder that holds a prepared dataset, a real
(tiny) checkpoint and a few deliberately broken files."""
import json
import os
import shutil

import pytest
import torch

import conftest
from model import GPT, GPTConfig
from test_checkpoint import write_sharded

ENV = dict(os.environ, HF_HUB_OFFLINE="1")
TINY = ["--dataset=shakespeare_char", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4"]
# for cases that get as far as a model: should a check ever let one through, it trains nothing and writes nothing
NO_STEPS = [*TINY, "--max_iters=2", "--eval_iters=1", "--final_eval=False", "--plot=False"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so --device=cuda is valid")


def run(script, *args, cwd, timeout=300):
    return conftest.run(script, *args, cwd=cwd, env=ENV, timeout=timeout)


def snapshot(d):
    """{path: (size, mtime_ns)} of every file, and every folder by name: a created, removed or touched
    file shows, and so does a left-behind empty folder."""
    state = {}
    for root, dirs, files in os.walk(d):
        for name in dirs:
            state[os.path.join(root, name)] = "dir"
        for name in files:
            st = os.stat(os.path.join(root, name))
            state[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns)
    return state


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shakespeare_char):
    d = tmp_path_factory.mktemp("bad_input")
    shakespeare_char(d)
    p = run("train.py", *TINY, "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--final_eval=False",
            "--out_dir=ck", cwd=d)
    assert p.returncode == 0, p.stderr
    (d / "raises.py").write_text("batch_size = 1 / 0\n")
    (d / "unknown_key.py").write_text("batch_size = 4\nlearning_rat = 1e-3\n")
    (d / "bogus").mkdir()
    (d / "bogus" / "ckpt.pt").write_bytes(b"not a checkpoint")
    ckpt = torch.load(d / "ck" / "ckpt.pt", map_location="cpu", weights_only=False)
    ckpt["model_args"]["n_layer"] = -1  # edited by hand
    (d / "negative_layers").mkdir()
    torch.save(ckpt, d / "negative_layers" / "ckpt.pt")
    # a sharded checkpoint whose shards hold a wider model than its state.pt describes
    state = torch.load(d / "ck" / "ckpt.pt", map_location="cpu", weights_only=True)
    (d / "wider_shards").mkdir()
    write_sharded({**state, "model": GPT(GPTConfig(**{**state["model_args"], "n_embd": 64})).state_dict()},
                  d / "wider_shards")
    question = {"context": "ROMEO:", "choices": ["Good night.", "Farewell."], "label": 0}
    (d / "mc_ok.jsonl").write_text(json.dumps(question) + "\n")
    (d / "mc_not_json.jsonl").write_text(json.dumps(question) + "\n{'context': 'single quotes'}\n")
    (d / "mc_one_choice.jsonl").write_text(json.dumps({**question, "choices": ["Alone."]}) + "\n")
    (d / "mc_bad_label.jsonl").write_text(json.dumps({**question, "label": 2}) + "\n")
    (d / "mc_no_context.jsonl").write_text(json.dumps({"prompt": "ROMEO:", "choices": ["a", "b"], "label": 0}) + "\n")
    (d / "not_json.txt").write_text("notes, not results\n")
    data = d / "data"
    shutil.copytree(data / "shakespeare_char", data / "truncated")
    with open(data / "truncated" / "train.bin", "r+b") as f:
        f.truncate(os.path.getsize(data / "truncated" / "train.bin") - 1)
    shutil.copytree(data / "shakespeare_char", data / "other_vocab")
    meta = json.loads((data / "other_vocab" / "meta.json").read_text(encoding="utf-8"))
    meta["chars"] = meta["chars"][:-1]  # one character fewer: a different vocabulary
    meta["vocab_size"] -= 1
    meta["eot_token"] -= 1
    (data / "other_vocab" / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    shutil.copytree(data / "shakespeare_char", data / "swapped_chars")
    meta = json.loads((data / "swapped_chars" / "meta.json").read_text(encoding="utf-8"))
    meta["chars"] = meta["chars"][1] + meta["chars"][0] + meta["chars"][2:]  # same size, other ids
    (data / "swapped_chars" / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    shutil.copytree(data / "shakespeare_char", data / "damaged_meta")
    text = (data / "damaged_meta" / "meta.json").read_text(encoding="utf-8")
    (data / "damaged_meta" / "meta.json").write_text(text[:len(text) // 2], encoding="utf-8")  # cut mid-write
    shutil.copytree(data / "shakespeare_char", data / "no_train_bin")
    os.remove(data / "no_train_bin" / "train.bin")
    return d


CASES = [
    # configurator, through the scripts' command lines
    pytest.param("train.py", ["--batch_sise=3"], "did you mean batch_size", id="config-unknown-key-suggests"),
    pytest.param("train.py", ["--batch_size=3.5"], "batch_size must be int", id="config-wrong-type"),
    pytest.param("train.py", ["--compile=1"], "compile must be bool", id="config-bool-as-int"),
    pytest.param("train.py", ["--batch_size"], "write --key=value", id="config-malformed"),
    pytest.param("train.py", ["--target_flops=1e12", "--max_iters=5"], "leave max_iters out",
                 id="target-flops-and-max-iters"),
    pytest.param("train.py", ["--target_flops=1e6"], "raise target_flops or lower warmup_iters",
                 id="target-flops-too-small"),
    pytest.param("train.py", ["nope.py"], "config file 'nope.py' not found", id="config-file-missing"),
    pytest.param("train.py", ["raises.py"], "raised ZeroDivisionError", id="config-file-raises"),
    pytest.param("train.py", ["unknown_key.py"], "in unknown_key.py: unknown config key 'learning_rat'",
                 id="config-file-unknown-key"),
    pytest.param("sample.py", ["--temprature=0.5"], "did you mean temperature", id="config-sample-unknown-key"),
    pytest.param("prepare.py", ["--num_proc=two"], "num_proc must be int", id="config-prepare-wrong-type"),
    # train.py
    pytest.param("train.py", ["--learning_rate=-1"], "learning_rate must be positive", id="train-negative-lr"),
    pytest.param("train.py", ["--batch_size=0"], "batch_size must be at least 1", id="train-batch-size-0"),
    pytest.param("train.py", ["--n_embd=33", "--n_head=2"], "must be divisible by n_head", id="train-n-embd-n-head"),
    pytest.param("train.py", ["--block_size=99999999"], "lower --block_size", id="train-block-size-above-data"),
    pytest.param("train.py", [*NO_STEPS, "--init_from=ck/ckpt.pt", "--out_dir=ft", "--block_size=64"],
                 "exceeds the checkpoint's 32", id="train-block-size-above-checkpoint"),
    pytest.param("train.py", [*NO_STEPS, "--init_from=resume", "--out_dir=ck", "--n_layer=2"],
                 "n_layer cannot change when a run is resumed", id="train-resume-other-architecture"),
    pytest.param("train.py", ["--init_from=resume", "--out_dir=ck", "--dataset=other_vocab"],
                 "dataset cannot change when a run is resumed", id="train-resume-other-dataset"),
    pytest.param("train.py", ["--dataset=nothing_here"], "python prepare.py", id="train-missing-dataset"),
    pytest.param("train.py", [*NO_STEPS, "--out_dir=empty", "--init_from=resume"], "no checkpoint at",
                 id="train-resume-missing-checkpoint"),
    pytest.param("train.py", [*NO_STEPS, "--out_dir=bogus", "--init_from=resume"], "not a checkpoint",
                 id="train-resume-junk-checkpoint"),
    pytest.param("train.py", [*NO_STEPS, "--init_from=ck/ckpt.pt", "--out_dir=ft", "--dataset=other_vocab"],
                 "prepared with the checkpoint's tokenizer", id="train-finetune-other-vocabulary"),
    pytest.param("train.py", [*NO_STEPS, "--init_from=ck/ckpt.pt", "--out_dir=ft", "--dataset=swapped_chars"],
                 "prepared with the checkpoint's tokenizer", id="train-finetune-same-size-other-vocabulary"),
    pytest.param("train.py", [*NO_STEPS, "--dataset=truncated"], "prepare the dataset again", id="train-truncated-bin"),
    pytest.param("train.py", [*NO_STEPS, "--dataset=damaged_meta"], "meta.json is damaged", id="train-damaged-meta"),
    pytest.param("train.py", [*NO_STEPS, "--out_dir=ck"], "--init_from=resume", id="train-scratch-over-existing-run"),
    pytest.param("train.py", ["--dtype=float8"], "unknown dtype 'float8'", id="train-unknown-dtype"),
    pytest.param("train.py", ["--device=cuda"], "use --device=cpu", id="train-device-cuda-absent", marks=no_cuda),
    pytest.param("train.py", ["--device=tpu"], "unknown device 'tpu'", id="train-unknown-device"),
    pytest.param("train.py", ["--norm=batchnorm"], "unknown norm 'batchnorm'", id="train-unknown-norm"),
    pytest.param("train.py", ["--pos=alibi"], "unknown pos 'alibi'; use learned or rope", id="train-unknown-pos"),
    pytest.param("train.py", ["--mlp=geglu"], "unknown mlp 'geglu'; use gelu, swiglu or relu2",
                 id="train-unknown-mlp"),
    pytest.param("train.py", ["--optimizer=sgd"], "unknown optimizer 'sgd'; use adamw or muon",
                 id="train-unknown-optimizer"),
    pytest.param("train.py", ["--lr_schedule=step"], "unknown lr_schedule 'step'; use cosine or wsd",
                 id="train-unknown-lr-schedule"),
    pytest.param("train.py", ["--decay_frac=0"], "decay_frac must be in (0, 1]", id="train-decay-frac-0"),
    pytest.param("train.py", ["--dropout=1.5"], "dropout must be in [0, 1)", id="train-dropout-out-of-range"),
    pytest.param("train.py", ["--init_from=gpt7"], "use scratch, resume", id="train-unknown-init-from"),
    pytest.param("train.py", ["--parallel=fsdp"], "needs several: start train.py with torchrun",
                 id="train-fsdp-without-torchrun"),
    pytest.param("train.py", ["--parallel=zero3"], "unknown parallel 'zero3'; use ddp or fsdp",
                 id="train-unknown-parallel"),
    pytest.param("train.py", ["--out_dir=wider_shards", "--init_from=resume"],
                 "wider_shards/ckpt.dcp does not fit this model (ValueError: Size mismatch",
                 id="train-resume-sharded-other-shape"),
    pytest.param("train.py", ["--gradient_accumulation_steps=0"], "gradient_accumulation_steps must be at least 1",
                 id="train-grad-accum-0"),
    pytest.param("train.py", ["--lora_rank=8"], "lora_rank needs a trained model to adapt",
                 id="train-lora-from-scratch"),
    pytest.param("train.py", [*NO_STEPS, "--init_from=ck/ckpt.pt", "--out_dir=ft", "--lora_rank=33"],
                 "lora_rank 33 must be between 1 and the smaller side of the c_attn matrix, 32",
                 id="train-lora-rank-above-matrix"),
    pytest.param("train.py", [*NO_STEPS, "--init_from=ck/ckpt.pt", "--out_dir=ft", "--lora_rank=4",
                              "--lora_targets=c_attn,q_proj"],
                 "q_proj matches no layer; valid names: c_attn, c_proj, c_fc", id="train-lora-unknown-target"),
    pytest.param("train.py", [*NO_STEPS, "--init_from=ck/ckpt.pt", "--out_dir=ft", "--lora_rank=4",
                              "--optimizer=muon"], "use adamw with lora_rank", id="train-lora-with-muon"),
    # sample.py
    pytest.param("sample.py", ["--out_dir=ck", "--start="], "the prompt is empty", id="sample-empty-prompt"),
    pytest.param("sample.py", ["--out_dir=ck", "--start=日本"], "not in this dataset",
                 id="sample-prompt-outside-vocab"),
    pytest.param("sample.py", ["--out_dir=ck", "--start=FILE:nope.txt"], "prompt file 'nope.txt' not found",
                 id="sample-missing-prompt-file"),
    pytest.param("sample.py", ["--out_dir=nowhere"], "no checkpoint at", id="sample-missing-checkpoint"),
    pytest.param("sample.py", ["--out_dir=bogus"], "not a checkpoint", id="sample-junk-checkpoint"),
    pytest.param("sample.py", ["--out_dir=ck", "--temperature=-1"], "temperature >= 0",
                 id="sample-negative-temperature"),
    pytest.param("sample.py", ["--out_dir=ck", "--top_p=0"], "0 < top_p <= 1", id="sample-top-p-0"),
    pytest.param("sample.py", ["--out_dir=ck", "--dtype=float8"], "unknown dtype 'float8'", id="sample-unknown-dtype"),
    pytest.param("sample.py", ["--out_dir=ck", "--compile=yes"], "compile must be bool", id="sample-compile-not-bool"),
    pytest.param("sample.py", ["--out_dir=ck", "--device=cuda"], "use --device=cpu", id="sample-device-cuda-absent",
                 marks=no_cuda),
    pytest.param("sample.py", ["--out_dir=ck", "--max_new_tokens=0"], "max_new_tokens >= 1",
                 id="sample-no-new-tokens"),
    pytest.param("sample.py", [], "no checkpoint found under checkpoint/", id="sample-no-checkpoint-anywhere"),
    pytest.param("sample.py", ["--out_dir=wider_shards"], "wider_shards/ckpt.dcp does not fit this model",
                 id="sample-sharded-other-shape"),
    pytest.param("sample.py", ["--out_dir=negative_layers"], "n_layer must be at least 1, got -1",
                 id="sample-checkpoint-with-negative-layers"),
    # bench.py
    pytest.param("bench.py", ["--iters=0"], "iters, batch_size and block_size must be at least 1", id="bench-iters-0"),
    pytest.param("bench.py", ["--dataset=nothing"], "--synthetic=True", id="bench-missing-dataset"),
    pytest.param("bench.py", ["--dataset=damaged_meta"], "meta.json is damaged", id="bench-damaged-meta"),
    pytest.param("bench.py", ["--dataset=no_train_bin"], "train.bin is missing", id="bench-missing-train-bin"),
    pytest.param("bench.py", ["--block_size=99999999"], "lower --block_size", id="bench-block-size-above-data"),
    pytest.param("bench.py", ["--n_embd=33", "--n_head=2"], "must be divisible by n_head", id="bench-n-embd-n-head"),
    pytest.param("bench.py", ["--dtype=float8"], "unknown dtype 'float8'", id="bench-unknown-dtype"),
    pytest.param("bench.py", ["--n_layer=-1"], "n_layer must be at least 1, got -1", id="bench-negative-layers"),
    pytest.param("bench.py", ["--n_head=0"], "n_head must be at least 1, got 0", id="bench-no-heads"),
    pytest.param("bench.py", ["--dropout=1.5"], "dropout must be in [0, 1)", id="bench-dropout-out-of-range"),
    pytest.param("bench.py", ["--norm=batchnorm"], "unknown norm 'batchnorm'", id="bench-unknown-norm"),
    pytest.param("train.py", ["--eval_tasks=val"], "eval_tasks names multiple-choice tasks", id="train-eval-tasks-val"),
    pytest.param("train.py", [*NO_STEPS, "--eval_tasks=mc:nope.jsonl"], "cannot read nope.jsonl",
                 id="train-eval-tasks-missing-file"),
    pytest.param("train.py", ["--eval_examples=-1"], "eval_examples must be 0 (all) or more",
                 id="train-negative-eval-examples"),
    # evaluate.py
    pytest.param("evaluate.py", [], "evaluate a run with --out_dir=RUN or a model with --init_from",
                 id="evaluate-nothing-to-evaluate"),
    pytest.param("evaluate.py", ["--out_dir=ck", "--tasks=val,winogrande"],
                 "unknown task 'winogrande'; the tasks are val, hellaswag and mc:PATH", id="evaluate-unknown-task"),
    pytest.param("evaluate.py", ["--out_dir=ck", "--tasks=mc:nope.jsonl"], "cannot read nope.jsonl",
                 id="evaluate-missing-task-file"),
    pytest.param("evaluate.py", ["--out_dir=ck", "--tasks=mc:mc_not_json.jsonl"],
                 "mc_not_json.jsonl line 2 is not JSON", id="evaluate-malformed-line"),
    pytest.param("evaluate.py", ["--out_dir=ck", "--tasks=mc:mc_one_choice.jsonl"],
                 "line 1: 1 choice(s); a question needs at least 2", id="evaluate-one-choice"),
    pytest.param("evaluate.py", ["--out_dir=ck", "--tasks=mc:mc_bad_label.jsonl"],
                 "line 1: label 2 is not the index of one of its 2 choices", id="evaluate-label-out-of-range"),
    pytest.param("evaluate.py", ["--out_dir=ck", "--tasks=mc:mc_no_context.jsonl"], "line 1: needs 'context'",
                 id="evaluate-missing-field"),
    pytest.param("evaluate.py", ["--out_dir=ck", "--tasks=hellaswag"],
                 "pass --hellaswag=FILE (hellaswag_val.jsonl from github.com/rowanz/hellaswag) or --hellaswag=FOLDER",
                 id="evaluate-hellaswag-offline"),
    pytest.param("evaluate.py", ["--out_dir=ck", "--tasks=hellaswag", "--hellaswag=nope"],
                 "--hellaswag=nope is neither a file nor a folder", id="evaluate-hellaswag-missing"),
    pytest.param("evaluate.py", ["--init_from=ck/ckpt.pt", "--dataset=other_vocab"],
                 "prepared with a char tokenizer that is not the model's", id="evaluate-other-vocabulary"),
    pytest.param("evaluate.py", ["--out_dir=ck", "--eval_examples=-1"], "eval_examples must be 0 (all) or more",
                 id="evaluate-negative-examples"),
    pytest.param("evaluate.py", ["--out_dir=ck", "--tasks=mc:mc_ok.jsonl", "--out=not_json.txt"],
                 "not_json.txt is not a JSON object, not of ck/ckpt.pt at iteration 2", id="evaluate-out-not-json"),
    pytest.param("evaluate.py", ["--out_dir=ck", "--tasks=mc:mc_ok.jsonl", "--out=nowhere/results.json"],
                 "there is no folder nowhere", id="evaluate-out-in-missing-folder"),
    pytest.param("evaluate.py", ["--out_dir=ck", "--tasks=mc:mc_ok.jsonl,mc:bogus/mc_ok.jsonl"],
                 "tasks names mc:mc_ok twice", id="evaluate-task-named-twice"),
    # prepare.py
    pytest.param("prepare.py", ["--tokenizer=wordpiece"], "unknown tokenizer 'wordpiece'",
                 id="prepare-unknown-tokenizer"),
    pytest.param("prepare.py", ["--dataset=no_such_corpus"], "unknown dataset 'no_such_corpus'",
                 id="prepare-unknown-dataset"),
    pytest.param("prepare.py", ["--tokenizer=bpe", "--vocab_size=100"], "at least 257",
                 id="prepare-bpe-vocab-too-small"),
    pytest.param("prepare.py", ["--tokenizer=bpe:nope.tiktoken"], "tokenizer file nope.tiktoken not found",
                 id="prepare-missing-bpe-file"),
    pytest.param("prepare.py", ["--tokenizer=bpe:raises.py"], "raises.py is not a tiktoken rank file",
                 id="prepare-bpe-file-not-ranks"),
    pytest.param("prepare.py", ["--num_proc=0"], "num_proc >= 1", id="prepare-num-proc-0"),
    pytest.param("prepare.py", ["--dataset=c4", "--mirror=nope"], "--mirror=nope is not a folder",
                 id="prepare-missing-mirror"),
]


@pytest.mark.parametrize("script,args,needle", CASES)
def test_bad_input_one_clear_line(workdir, script, args, needle):
    before = snapshot(workdir)
    p = run(script, *args, cwd=workdir, timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode != 0, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert needle in lines[0], lines[0]
    assert snapshot(workdir) == before  # nothing created, removed or touched
