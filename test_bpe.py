"""A byte-level BPE trained on the corpus, stored and used through tiktoken."""
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import conftest
import prepare
import tokenizer as tok

# a narrow made-up domain: words GPT-2 has never seen as units
WORDS = ["zorblax", "quenthari", "mivvelun", "drakkenhoff", "the", "glimmered", "over", "snarvik", "and",
         "prellotine", "was", "beneath", "kwazzle", "ostrovenka"]


def domain_text(n_docs, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + ".\n" for _ in range(n_docs)]


CORPUS = domain_text(300, 0) + ["Unicode too: 世界 🎉 naïve café — ok\t\n", "x" * 50]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bpe") / "tokenizer.tiktoken")
    return tok.train_bpe(iter(CORPUS), 600, path), path


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_round_trip_arbitrary_unicode(trained, text):
    t, _ = trained
    assert t.decode(t.encode(text)) == text


@pytest.mark.parametrize("text", ["中文字符和标点。", "emoji 🎉👩‍👩‍👧 flags 🇫🇷", " \t\n\r\x0b\x0c  mixed  whitespace ",
                                  "\x00\x01\x1f control", "zorblax quenthari<|endoftext|>mivvelun"])
def test_round_trip_generated_set(trained, text):
    t, _ = trained
    assert t.decode(t.encode(text)) == text


def test_end_of_text_is_one_special_token_never_merged(trained):
    t, path = trained
    # the tiny corpus runs out of pairs to merge before 600 ids; the end-of-text id is always the last
    assert 300 < t.vocab_size <= 600 and t.eot_token == t.vocab_size - 1
    assert t.decode([t.eot_token]) == "<|endoftext|>"
    assert t.eot_token not in t.encode("a <|endoftext|> b")  # text that looks like it stays text
    ranks = tok.read_ranks(path)
    assert max(ranks.values()) == t.eot_token - 1 and b"<|endoftext|>" not in ranks


def test_training_is_deterministic(trained, tmp_path):
    _, path = trained
    tok.train_bpe(iter(CORPUS), 600, str(tmp_path / "again.tiktoken"))
    assert (tmp_path / "again.tiktoken").read_bytes() == Path(path).read_bytes()


def test_file_reloads_to_the_same_encoding(trained):
    t, path = trained
    again = tok.bpe(path)
    text = "".join(domain_text(20, 1))
    assert again.encode(text) == t.encode(text) and again.vocab_size == t.vocab_size
    assert tok.from_meta(json.loads(json.dumps(t.meta)), os.path.dirname(path)).encode(text) == t.encode(text)


def test_tiktoken_splits_held_out_text_as_the_trained_model_does(trained):
    # the round trips above hold for any rank table with the 256 bytes; this one needs the merges, their
    # order and the byte mapping all carried over. Every character here was merged whole in training, so
    # each of the model's tokens covers whole characters and its offsets give the pieces
    t, _ = trained
    model = tok.train_tokenizers_bpe(iter(CORPUS), 600)
    # new words spliced from the domain's split into pieces only in the order the merges were learned
    spliced = " snarblax quenthoff drakkenvik glimmerlun prellovenka kwazzari ostrothe mivvelkwaz overglim"
    held_out = "".join(domain_text(30, 3)) + spliced + "\nok: café naïve — 世界 🎉!\n\n\tzorblax's  snarvik  \n"
    pieces = [held_out[a:b] for a, b in model.encode(held_out).offsets]
    assert [t.decode([i]) for i in t.encode(held_out)] == pieces
    assert len(pieces) < 0.5 * len(held_out.encode())  # merged, not byte by byte


def test_compresses_in_domain_text_better_than_gpt2(trained):
    t, _ = trained
    held_out = "".join(domain_text(50, 2))  # same domain, unseen documents
    assert len(t.encode(held_out)) < 0.6 * len(tok.gpt2().encode(held_out))


def test_bad_input(tmp_path):
    with pytest.raises(tok.TokenizerError, match="at least 257"):
        tok.train_bpe(iter(["abc"]), 200, str(tmp_path / "x.tiktoken"))
    with pytest.raises(tok.TokenizerError, match="does not exist"):
        tok.bpe(str(tmp_path / "missing.tiktoken"))
    (tmp_path / "junk.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(tok.TokenizerError, match="not a tiktoken rank file"):
        tok.bpe(str(tmp_path / "junk.tiktoken"))


def test_prepare_train_and_sample_with_a_trained_bpe(tmp_path):
    p = conftest.run("prepare.py", "--tokenizer=bpe", "--vocab_size=2048", "--num_proc=1", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "bytes/token" in p.stdout and "GPT-2" in p.stdout  # the comparison report
    data = tmp_path / "data" / "shakespeare_bpe2048"
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 2048 and meta["eot_token"] == 2047
    train = np.fromfile(data / "train.bin", dtype=np.uint16)
    assert train.max() < 2048 and (train == 2047).sum() == meta["train_documents"]
    t = tok.from_meta(meta, str(data))
    # each bin holds its split's plays, in name order, each followed by end-of-text
    plays = prepare.shakespeare_plays()
    val_names = meta["source"]["val_documents"]
    train_names = sorted(set(plays) - set(val_names))
    for split, names in (("train", train_names), ("val", val_names)):
        ids = np.fromfile(data / f"{split}.bin", dtype=np.uint16).tolist()
        assert t.decode(ids) == "".join(plays[n] + tok.EOT for n in names), split
    # and the BPE saw the training plays alone: trained on just those, it is the same file
    tok.train_bpe((plays[n] for n in train_names), 2048, str(tmp_path / "train_only.tiktoken"))
    assert (tmp_path / "train_only.tiktoken").read_bytes() == (data / "tokenizer.tiktoken").read_bytes()

    # reuse the trained file for another dataset folder: same tokens
    p = conftest.run("prepare.py", f"--tokenizer=bpe:{data / 'tokenizer.tiktoken'}", "--out=reuse",
            "--num_proc=1", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "data" / "reuse" / "train.bin").read_bytes() == (data / "train.bin").read_bytes()

    tiny = ["--dataset=shakespeare_bpe2048", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
            "--batch_size=4", "--max_iters=5", "--eval_interval=5", "--eval_iters=1", "--out_dir=ck",
            "--final_eval=False"]
    p = conftest.run("train.py", *tiny, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    p = conftest.run("sample.py", "--out_dir=ck", "--start=KING:", "--max_new_tokens=20",
            "--num_samples=1", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith("KING:"), p.stderr

    # a tokenizer file that is not the dataset's own is refused before training
    (data / "tokenizer.tiktoken").write_bytes((tmp_path / "data" / "reuse" / "tokenizer.tiktoken").read_bytes()[:-20])
    p = conftest.run("train.py", *tiny, "--out_dir=ck2", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "sha256" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "ck2").exists()
