"""evaluate.py: HellaSwag scored as a plain transformers computation scores it, an example's choices packed
in one row scored as one forward per choice, bits per byte for three tokenizers on one scale, and the
script's interface."""
import json
import math
import os
import random
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import conftest
import tokenizer as tok
from evaluate import choice_losses, evaluate_split, load_task, multiple_choice
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
WORDS = ("the a man woman dog is are runs jumps slowly into water ball then, and. She He They It on bike "
         "café naïve piano — “quoted” 42 rope! kitchen knife sharpens cuts onion carefully Finally").split()
SHAKESPEARES = [w for w in WORDS if w.isascii()]  # characters all in the embedded corpus


def run(script, *args, cwd):
    p = conftest.run(script, *args, cwd=cwd, env=ENV)
    assert p.returncode == 0, p.stderr
    return p


def write_hellaswag(path, n, seed=0, extra="", vocabulary=WORDS):
    """n examples in the original repository's jsonl format, of random words and lengths."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(vocabulary) for _ in range(rng.randint(lo, hi)))
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            ctx_a, ctx_b = words(3, 30), words(1, 4)
            f.write(json.dumps({"ind": i, "activity_label": "Testing", "ctx_a": ctx_a, "ctx_b": ctx_b,
                                "ctx": f"{ctx_a} {ctx_b}" + extra * (i % 3 == 0), "split": "val",
                                "split_type": "indomain", "label": rng.randrange(4),
                                "endings": [words(1, 25) for _ in range(4)], "source_id": f"test~{i}"}) + "\n")


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A random-weight transformers GPT-2 folder and a HellaSwag fixture of 24 examples."""
    from transformers import GPT2Config, GPT2LMHeadModel
    d = tmp_path_factory.mktemp("hellaswag")
    torch.manual_seed(0)
    # weights wider than GPT-2's 0.02, so that choices' losses differ by far more than rounding does
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=256, initializer_range=0.3)
    GPT2LMHeadModel(config).save_pretrained(d / "hf")
    write_hellaswag(d / "hellaswag_val.jsonl", 24)
    return d


def test_hellaswag_scores_as_a_plain_transformers_computation(hf_gpt2):
    from transformers import GPT2LMHeadModel
    d = hf_gpt2
    hf = GPT2LMHeadModel.from_pretrained(d / "hf").eval()
    gpt2 = tok.gpt2()
    summed, mean, labels = [], [], []
    with torch.no_grad():
        for line in (d / "hellaswag_val.jsonl").read_text(encoding="utf-8").splitlines():
            example = json.loads(line)
            context = gpt2.encode(example["ctx"])
            labels.append(example["label"])
            for ending in example["endings"]:
                choice = gpt2.encode(" " + ending)
                logits = hf(torch.tensor([context + choice])).logits[0, len(context) - 1:-1]
                losses = F.cross_entropy(logits, torch.tensor(choice), reduction="none")
                summed.append(losses.sum().item())
                mean.append(losses.mean().item())
    summed, mean = np.reshape(summed, (-1, 4)), np.reshape(mean, (-1, 4))
    picks, picks_norm = summed.argmin(1), mean.argmin(1)
    assert (picks != picks_norm).sum() >= 3  # the fixture tells acc from acc_norm

    import checkpoint as ckpt
    _, encoded, skipped = load_task("hellaswag", gpt2, 0, str(d / "hellaswag_val.jsonl"))
    ours = choice_losses(ckpt.base_model(f"hf:{d / 'hf'}"), encoded, nullcontext(), "cpu")
    assert skipped == 0
    assert np.abs(ours[:, 0].reshape(-1, 4) - summed).max() < 1e-4
    assert np.allclose(ours[:, 0].reshape(-1, 4) / ours[:, 1].reshape(-1, 4), mean, atol=1e-5)

    run("evaluate.py", f"--init_from=hf:{d / 'hf'}", "--tasks=hellaswag", f"--hellaswag={d / 'hellaswag_val.jsonl'}",
        f"--out={d / 'result.json'}", "--device=cpu", "--dtype=float32", cwd=d)
    result = json.loads((d / "result.json").read_text())["hellaswag"]
    assert result == {"acc": float(np.mean(picks == labels)), "acc_norm": float(np.mean(picks_norm == labels)),
                      "examples": 24, "skipped": 0}


def test_a_copy_of_the_hub_dataset_reads_as_the_original_file(hf_gpt2, tmp_path):
    """The hub's rows (labels as text) through datasets.load_dataset, the hub's own code path."""
    rows = [json.loads(line) for line in (hf_gpt2 / "hellaswag_val.jsonl").read_text(encoding="utf-8").splitlines()]
    (tmp_path / "hub").mkdir()
    with open(tmp_path / "hub" / "validation.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({**r, "label": str(r["label"])}) + "\n" for r in rows)
    gpt2 = tok.gpt2()
    from_file = load_task("hellaswag", gpt2, 10, str(hf_gpt2 / "hellaswag_val.jsonl"))
    assert load_task("hellaswag", gpt2, 10, str(tmp_path / "hub")) == from_file
    assert len(from_file[1]) == 10


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_choices_packed_in_a_row_score_as_one_forward_each(pos):
    """Contexts and choices of every length, some longer than the model's context (cropped as documented)."""
    torch.manual_seed(0)
    block = 16
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block, vocab_size=50, pos=pos,
                          dropout=0.5))
    rng = random.Random(0)
    encoded = [([rng.randrange(50) for _ in range(rng.randint(1, 30))],
                [[rng.randrange(50) for _ in range(rng.randint(1, 20))] for _ in range(rng.randint(2, 5))], 0)
               for _ in range(40)]
    got = choice_losses(model, encoded, nullcontext(), "cpu")  # in training mode, dropout 0.5: none is drawn
    assert model.training  # as it was
    expected = []
    with torch.no_grad():
        for context, choices, _ in encoded:
            for choice in choices:  # each sequence cropped from the left to the model's context
                sequence = (context + choice)[-(block + 1):]
                scored = min(len(choice), block)
                logits, _ = model.eval()(torch.tensor([sequence[:-1]]), torch.tensor([sequence[1:]]))
                expected.append(F.cross_entropy(logits[0, -scored:], torch.tensor(sequence[-scored:]),
                                                reduction="sum"))
    assert np.allclose(got[:, 0], torch.stack(expected).numpy(), rtol=1e-5, atol=1e-5)
    assert got[:, 1].tolist() == [min(len(c), block) for _, choices, _ in encoded for c in choices]


def test_ties_go_to_the_lower_index():
    """Two equal choices score equally: the first is picked, right when the label is 0 and wrong when it is 1."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20))
    encoded = [([1, 2, 3], [[4, 5], [4, 5]], label) for label in (0, 1)]
    result = multiple_choice(model, encoded, 0, nullcontext(), "cpu")
    assert result == {"acc": 0.5, "acc_norm": 0.5, "examples": 2, "skipped": 0}


DOCS = ["The café's naïve piano — “quoted” twice.\nA second line, and 42 numbers.",
        "日本語のテキスト and English mixed.\n\nParagraphs too.",
        "Plain ASCII only here. " * 20,
        "Émile wrote: «Voilà!»\nThen left.",
        "Short one.",
        "Another document with ümlauts: Müller, Größe, and emoji-free text."]


@pytest.fixture(scope="module")
def three_tokenizers(tmp_path_factory):
    """A corpus of six documents with multi-byte characters, prepared with char, gpt2 and a trained BPE."""
    d = tmp_path_factory.mktemp("bpb")
    (d / "corpus").mkdir()
    for i, text in enumerate(DOCS):
        (d / "corpus" / f"{i}.txt").write_text(text, encoding="utf-8")
    for tokenizer in ("--tokenizer=char", "--tokenizer=gpt2", "--tokenizer=bpe --vocab_size=300"):
        run("prepare.py", "--dataset=corpus", *tokenizer.split(), "--val_fraction=0.5", "--num_proc=1", cwd=d)
    return d


def test_bits_per_byte_counts_the_val_texts_bytes_and_its_loss(three_tokenizers, monkeypatch):
    monkeypatch.chdir(three_tokenizers)
    from dataloader import Dataset
    names = sorted(os.listdir("data"))
    assert len(names) == 3
    for name in names:
        data = Dataset(name, 1)
        tokens, eot = data.tokens("val"), data.tokenizer.eot_token
        text = data.tokenizer.decode([t for t in tokens.tolist() if t != eot])
        assert len(text.encode("utf-8")) > len(text)  # multi-byte characters: bytes are not characters
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=len(tokens),
                              vocab_size=data.meta["vocab_size"]))
        result = evaluate_split(model, tokens, len(tokens), 1, data.byte_lengths, eot, nullcontext(), "cpu")
        assert result["bytes"] == len(text.encode("utf-8")), name
        assert result["tokens"] == len(tokens)  # every token predicted, the first after an end-of-text
        # one forward of the whole split, the first token predicted after an end-of-text
        y = torch.from_numpy(tokens.astype(np.int64))[None]
        x = torch.cat([torch.tensor([[eot]]), y[:, :-1]], dim=1)
        with torch.no_grad():
            losses = F.cross_entropy(model(x, y)[0][0], y[0], reduction="none")
        assert result["val_bpb"] * math.log(2) * result["bytes"] == pytest.approx(losses[y[0] != eot].sum().item(),
                                                                                   rel=1e-5)
        assert result["val_loss"] == pytest.approx(losses.mean().item(), rel=1e-5)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, shakespeare_char):
    d = tmp_path_factory.mktemp("evaluate")
    shakespeare_char(d)
    run("train.py", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4", "--max_iters=4",
        "--eval_interval=2", "--eval_iters=1", f"--eval_tasks=mc:{REPO}/tasks/shakespeare.jsonl", "--eval_examples=8",
        "--out_dir=run", cwd=d)
    return d


def test_training_scores_eval_tasks_at_every_evaluation(char_run):
    evaluations = [r for r in conftest.read_log(char_run / "run" / "log.jsonl") if "val_loss" in r]
    assert [r["iter"] for r in evaluations] == [2, 4]
    assert all(0 <= r["mc:shakespeare/acc_norm"] <= 1 and r["val_bpb"] > 0 for r in evaluations)
    final = json.loads((char_run / "run" / "eval.json").read_text())
    assert final["mc:shakespeare"]["examples"] == 8 and final["val_bpb"] > 0
    assert (char_run / "run" / "loss.png").stat().st_size > 0  # with a panel for the task
    # the same 8 examples scored by evaluate.py on the same weights (the run's dtype: auto)
    run("evaluate.py", "--out_dir=run", f"--tasks=mc:{REPO}/tasks/shakespeare.jsonl", "--eval_examples=8",
        "--out=tasks8.json", cwd=char_run)
    alone = json.loads((char_run / "tasks8.json").read_text())["mc:shakespeare"]
    assert alone == final["mc:shakespeare"]
    assert {m: evaluations[-1][f"mc:shakespeare/{m}"] for m in ("acc", "acc_norm")} == \
        {m: alone[m] for m in ("acc", "acc_norm")}


def test_the_script_adds_val_and_tasks_to_the_runs_eval_json(char_run):
    d = char_run
    before = json.loads((d / "run" / "eval.json").read_text())
    # every third context has characters the embedded corpus lacks
    write_hellaswag(d / "hs.jsonl", 12, extra=" {café}", vocabulary=SHAKESPEARES)
    p = run("evaluate.py", "--out_dir=run", f"--tasks=val,hellaswag,mc:{REPO}/tasks/shakespeare.jsonl",
            "--hellaswag=hs.jsonl", "--eval_examples=9", cwd=d)
    after = json.loads((d / "run" / "eval.json").read_text())
    assert after["iter_num"] == before["iter_num"] and after["config"] == before["config"]  # earlier keys kept
    for key in ("val_loss", "perplexity", "val_bpb", "tokens", "bytes"):
        assert after[key] == pytest.approx(before[key], rel=1e-6), key
    assert after["hellaswag"]["examples"] + after["hellaswag"]["skipped"] == 9
    assert after["hellaswag"]["skipped"] == 3 and "3 skipped" in p.stdout
    assert after["mc:shakespeare"]["examples"] == 9 and 0 <= after["mc:shakespeare"]["acc"] <= 1


def test_bits_per_byte_puts_a_char_and_a_gpt2_model_on_one_scale(char_run, monkeypatch):
    """The character model of char_run, and a GPT-2-token model trained here on the same plays."""
    run("prepare.py", "--tokenizer=gpt2", "--num_proc=1", cwd=char_run)
    run("train.py", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4", "--max_iters=8",
        "--eval_interval=8", "--eval_iters=1", "--learning_rate=3e-3", "--final_eval=False", "--plot=False",
        "--dataset=shakespeare", "--out_dir=gpt2", cwd=char_run)
    monkeypatch.chdir(char_run)
    import checkpoint as ckpt
    from dataloader import Dataset
    gpt2, char = Dataset("shakespeare", 1), Dataset("shakespeare_char", 1)
    # the same text in both: the gpt2 split's first 3000 tokens, and as many characters of the char split
    piece = gpt2.tokens("val")[:3000]
    text = gpt2.tokenizer.decode(piece.tolist())
    assert char.tokenizer.decode(char.tokens("val")[:len(text)].tolist()) == text
    results = {}
    for name, path, data, tokens in (("gpt2", "gpt2/ckpt.pt", gpt2, piece),
                                     ("char", "run/ckpt.pt", char, char.tokens("val")[:len(text)])):
        model = ckpt.model_from(ckpt.load(path), path)
        results[name] = r = evaluate_split(model, tokens, 64, 8, data.byte_lengths, data.tokenizer.eot_token,
                                           nullcontext(), "cpu")
        # no end-of-text in the piece: the loss per byte is the loss per token spread over the text's bytes
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * r["tokens"] / math.log(2) / r["bytes"], rel=1e-9)
    # per token the two losses are in units of different lengths; per byte both measure the same text
    assert results["gpt2"]["bytes"] == results["char"]["bytes"] == len(text.encode("utf-8"))
    assert results["char"]["tokens"] > 3 * results["gpt2"]["tokens"]
    assert results["gpt2"]["val_loss"] > 2 * results["char"]["val_loss"]
    print({name: f"{r['val_loss']:.3f} nats/token, {r['val_bpb']:.3f} bits/byte" for name, r in results.items()})
