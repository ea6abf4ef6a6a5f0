"""tokenizer.py and prepare.py: encodings, round trips and the prepared dataset on disk."""
import json
import os

import numpy as np
import pytest

import conftest
import prepare
import tokenizer as tok

SAMPLES = [
    "Hello world",
    "",
    "To be, or not to be: that is the question.\n",
    "莎士比亚的戏剧 — 哈姆雷特",
    "emoji 🎭👑🗡️ and flags 🇬🇧",
    "mixed \t whitespace\r\n\n   \u00a0\u2003end  ",
    "control \x00\x01\x07\x1b[31m\x7f chars",
    "before <|endoftext|> after",
    "<|endoftext|>",
    "it's they're we've I'd 12345 ½ ﬁ",
]


@pytest.fixture(scope="module")
def gpt2():
    return tok.gpt2()


# --------------------------------------------------------------------------- gpt2

def test_gpt2_known_ids(gpt2):
    assert gpt2.name == "gpt2"
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.eot_token == 50256
    assert gpt2.vocab_size == 50257
    assert gpt2.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


@pytest.mark.parametrize("text", SAMPLES)
def test_gpt2_round_trip(gpt2, text):
    ids = gpt2.encode(text)
    assert all(0 <= i < gpt2.vocab_size for i in ids)
    assert gpt2.decode(ids) == text


def test_gpt2_literal_endoftext_is_ordinary_text(gpt2):
    ids = gpt2.encode("a <|endoftext|> b")
    assert gpt2.eot_token not in ids
    assert len(ids) > 3
    assert gpt2.encode_batch(["<|endoftext|>", "x"])[0] == gpt2.encode("<|endoftext|>")
    assert gpt2.eot_token not in gpt2.encode_batch(["<|endoftext|>"])[0]


def test_gpt2_encode_batch_matches_encode(gpt2):
    assert gpt2.encode_batch(SAMPLES) == [gpt2.encode(s) for s in SAMPLES]


# --------------------------------------------------------------------------- char

def test_char_round_trip_and_ids():
    chars = sorted(set("hello, world\n"))
    t = tok.char(chars)
    assert t.name == "char"
    assert t.vocab_size == len(chars) + 1
    assert t.eot_token == len(chars)
    text = "hello, world\nhold"
    ids = t.encode(text)
    assert ids == [chars.index(c) for c in text]
    assert max(ids) < t.eot_token
    assert t.decode(ids) == text
    assert t.decode(ids + [t.eot_token]) == text + "<|endoftext|>"
    assert t.encode_batch(["he", "lo"]) == [t.encode("he"), t.encode("lo")]


def test_char_unicode_round_trip():
    text = "莎士比亚 🎭 \t\x00"
    t = tok.char(sorted(set(text)))
    assert t.decode(t.encode(text)) == text


def test_char_unknown_character_raises():
    t = tok.char(list("abc"))
    with pytest.raises(tok.TokenizerError) as exc:
        t.encode("abz")
    assert "z" in str(exc.value)
    assert isinstance(exc.value, ValueError)
    with pytest.raises(tok.TokenizerError) as exc:
        t.encode("a🎭")
    assert "🎭" in str(exc.value)


# --------------------------------------------------------------------------- from_meta

def test_from_meta_gpt2(gpt2):
    again = tok.from_meta(json.loads(json.dumps(gpt2.meta)))
    assert again.name == "gpt2"
    assert again.vocab_size == gpt2.vocab_size and again.eot_token == gpt2.eot_token
    for s in SAMPLES:
        assert again.encode(s) == gpt2.encode(s)


def test_from_meta_char():
    chars = sorted(set("The quick brown fox 🦊\n"))
    t = tok.char(chars)
    again = tok.from_meta(json.loads(json.dumps(t.meta, ensure_ascii=False)))
    assert again.name == "char"
    assert again.vocab_size == t.vocab_size and again.eot_token == t.eot_token
    text = "The quick brown fox 🦊\n"
    assert again.encode(text) == t.encode(text)
    assert again.decode(t.encode(text)) == text


def test_from_meta_unknown_kind():
    with pytest.raises(tok.TokenizerError) as exc:
        tok.from_meta({"tokenizer": "wordpiece"})
    assert "wordpiece" in str(exc.value)
    with pytest.raises(tok.TokenizerError):
        tok.from_meta({})


# --------------------------------------------------------------------------- markdown_to_text

def test_markdown_to_text():
    md = "**HAMLET**  \nTo be, or not to be\n\n_Exit_\n"
    assert prepare.markdown_to_text(md) == "HAMLET:\nTo be, or not to be\n\nExit\n"


def test_markdown_to_text_headings_and_blank_runs():
    md = "# Hamlet\n\n\n\n## Act 1\n**FIRST  WITCH**\nWhen shall we three meet again\\?\n"
    assert prepare.markdown_to_text(md) == "Hamlet\n\nAct 1\nFIRST  WITCH:\nWhen shall we three meet again?\n"


# --------------------------------------------------------------------------- prepare.py end to end

def run_prepare(cwd, *args):
    proc = conftest.run("prepare.py", "--tokenizer=char", *args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    run_prepare(root, "--num_proc=1")
    data_dir = root / "data" / "shakespeare_char"
    with open(data_dir / "meta.json", encoding="utf-8") as f:
        meta = json.load(f)
    return root, data_dir, meta


def load_bin(path, meta):
    return np.fromfile(path, dtype=np.dtype(meta["dtype"]))


def test_prepare_writes_only_the_dataset(prepared):
    root, data_dir, _ = prepared
    assert sorted(os.listdir(root)) == ["data"]
    assert "shakespeare_char" in os.listdir(root / "data")
    assert sorted(os.listdir(data_dir)) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_meta(prepared):
    _, data_dir, meta = prepared
    assert meta["format"] == 1
    assert meta["tokenizer"] == "char"
    assert meta["vocab_size"] == len(meta["chars"]) + 1
    assert meta["eot_token"] == meta["vocab_size"] - 1
    assert meta["dtype"] == "uint16"
    assert meta["train_tokens"] == os.path.getsize(data_dir / "train.bin") // 2
    assert meta["val_tokens"] == os.path.getsize(data_dir / "val.bin") // 2
    assert os.path.getsize(data_dir / "train.bin") % 2 == 0
    assert meta["train_tokens"] > meta["val_tokens"] > 0
    assert tok.read_meta(str(data_dir)) == meta


@pytest.mark.parametrize("damage", ["cut", "no_vocab_size", "dtype"])
def test_read_meta_refuses_a_damaged_file(prepared, tmp_path, damage):
    _, data_dir, meta = prepared
    text = json.dumps({k: v for k, v in meta.items() if not (damage == "no_vocab_size" and k == "vocab_size")})
    if damage == "dtype":
        text = json.dumps(dict(meta, dtype="float64"))
    (tmp_path / "meta.json").write_text(text[:len(text) // 2] if damage == "cut" else text)
    with pytest.raises(tok.TokenizerError, match="meta.json is damaged.*prepare the dataset again"):
        tok.read_meta(str(tmp_path))


def test_prepare_one_eot_after_each_document(prepared):
    _, data_dir, meta = prepared
    for split in ("train", "val"):
        ids = load_bin(data_dir / f"{split}.bin", meta)
        assert ids.max() < meta["vocab_size"]
        assert int((ids == meta["eot_token"]).sum()) == meta[f"{split}_documents"]
        assert ids[-1] == meta["eot_token"]
        assert ids[0] != meta["eot_token"]


def test_prepare_split_is_by_whole_play(prepared):
    _, data_dir, meta = prepared
    plays = prepare.shakespeare_plays()
    val_names = meta["source"]["val_documents"]
    assert val_names and set(val_names) <= set(plays)
    train_names = sorted(set(plays) - set(val_names))
    assert set(train_names).isdisjoint(val_names)
    assert meta["train_documents"] == len(train_names)
    assert meta["val_documents"] == len(val_names)
    # each bin holds exactly its plays, in name order, each followed by one end-of-text
    t = tok.from_meta(meta)
    for split, names in (("train", train_names), ("val", sorted(val_names))):
        expected = []
        for n in names:
            expected += t.encode(plays[n]) + [t.eot_token]
        assert np.array_equal(load_bin(data_dir / f"{split}.bin", meta), np.array(expected, dtype=np.uint16)), split


def test_prepare_text_is_plain(prepared):
    _, data_dir, meta = prepared
    t = tok.from_meta(meta, str(data_dir))
    for split in ("train", "val"):
        plays = t.decode(load_bin(data_dir / f"{split}.bin", meta).tolist()).split("<|endoftext|>")
        assert plays[-1] == "" and len(plays) - 1 == meta[f"{split}_documents"]
        for markup in ("*", "_", "#", "\\"):  # bold speakers, italic stage directions, headings, escapes
            assert not [p for p in plays if markup in p], (split, markup)
    text = plays[0]
    assert any(line.endswith(":") and line[:-1].strip() and line[:-1].upper() == line[:-1]
               for line in text.splitlines()), text


def test_prepare_is_independent_of_num_proc(prepared):
    root, data_dir, meta = prepared
    run_prepare(root, "--num_proc=2", "--out=other", "--batch_docs=3")
    other = root / "data" / "other"
    assert sorted(os.listdir(other)) == ["meta.json", "train.bin", "val.bin"]
    for name in ("train.bin", "val.bin"):
        assert (other / name).read_bytes() == (data_dir / name).read_bytes(), name
    with open(other / "meta.json", encoding="utf-8") as f:
        assert json.load(f) == meta


def test_prepare_rerun_replaces_cleanly(prepared):
    root, data_dir, meta = prepared
    before = (data_dir / "val.bin").read_bytes()
    run_prepare(root, "--num_proc=1")
    assert sorted(os.listdir(data_dir)) == ["meta.json", "train.bin", "val.bin"]
    assert (data_dir / "val.bin").read_bytes() == before
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
