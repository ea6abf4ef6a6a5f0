"""prepare.py on streamed corpora, end to end: a local C4 mirror, hashed hold-outs, token budgets,
parquet and .txt inputs, bad input, and what an interrupted or killed run leaves behind.

Every run is a real `python prepare.py ...` process (conftest.start) working offline in a temporary folder.
Independent runs are started together so the file stays fast on a small machine."""
import gzip
import json
import os
import signal
import time
from collections import Counter

import numpy as np
import pytest

import conftest
import tokenizer as tok

EOT = 50256
RUN_TIMEOUT = 120


# --------------------------------------------------------------------------- helpers

def _env(cwd):
    # HF_HOME in the test folder: a hub cache elsewhere on the machine cannot change the outcome
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=os.path.join(str(cwd), ".hf"))


def start(cwd, *args):
    return conftest.start("prepare.py", *args, cwd=cwd, env=_env(cwd))


def finish(proc, timeout=RUN_TIMEOUT):
    """Wait for a started run; (returncode, stdout, stderr). The process never outlives the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out, err


def run_all(cwd, *arg_lists):
    """Start several runs at once and wait for all of them."""
    procs = []
    try:
        for args in arg_lists:
            procs.append(start(cwd, *args))
        return [finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def ok(result):
    rc, out, err = result
    assert rc == 0, f"prepare.py failed with {rc}:\n{out}\n{err}"
    return result


def load(cwd, name):
    """(meta, train ids, val ids) of data/<name>, with the file sizes checked against meta."""
    d = os.path.join(str(cwd), "data", name)
    with open(os.path.join(d, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["dtype"] == "uint16"
    assert meta["eot_token"] == EOT
    train = np.fromfile(os.path.join(d, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(d, "val.bin"), dtype=np.uint16)
    assert os.path.getsize(os.path.join(d, "train.bin")) == 2 * meta["train_tokens"] == 2 * len(train)
    assert os.path.getsize(os.path.join(d, "val.bin")) == 2 * meta["val_tokens"] == 2 * len(val)
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
    return meta, train, val


def documents(ids, meta):
    """Decode a token file into its documents: every document is followed by exactly one end-of-text."""
    t = tok.from_meta(meta)
    assert t.eot_token == EOT
    ids = ids.tolist()
    assert ids and ids[-1] == EOT, "a complete split ends with end-of-text"
    docs, cur = [], []
    for i in ids:
        if i == EOT:
            docs.append(t.decode(cur))
            cur = []
        else:
            cur.append(i)
    return docs


def data_files(cwd, name):
    d = os.path.join(str(cwd), "data", name)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------- corpora

C4_SHARDS = (70, 85, 60)  # documents per train shard
C4_VAL = 45


def c4_text(kind, shard, j):
    extra = ["", " Ünïcödé — naïve café", " 日本語のテキスト", " emoji 🎭👑", "\nsecond line\n\n  indented"][j % 5]
    return f"{kind} shard {shard} document {j}: the quick brown fox.{extra}"


def write_c4_mirror(folder):
    """A copy of allenai/c4's layout: en/c4-train.0000N-of-00003.json.gz and one validation shard.
    Returns (train documents in file order, validation documents)."""
    en = os.path.join(str(folder), "en")
    os.makedirs(en)
    train, val = [], []

    def write(path, texts):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for k, text in enumerate(texts):
                f.write(json.dumps({"text": text, "timestamp": f"2019-04-{10 + k % 18}T12:57:54Z",
                                    "url": f"https://example.com/{k}"}) + "\n")

    for shard, n in enumerate(C4_SHARDS):
        texts = [c4_text("train", shard, j) for j in range(n)]
        write(os.path.join(en, f"c4-train.{shard:05d}-of-00003.json.gz"), texts)
        train += texts
    val = [c4_text("validation", 0, j) for j in range(C4_VAL)]
    write(os.path.join(en, "c4-validation.00000-of-00001.json.gz"), val)
    return train, val


def hashed_docs(n=400):
    return [f"record {i}: {'lorem ipsum dolor ' * (1 + i % 4)}ßøñ {i * 7919 % 1000} ✓" for i in range(n)]


def write_jsonl_folder(folder, docs, field="body", files=4):
    os.makedirs(str(folder))
    per = -(-len(docs) // files)
    for k in range(files):
        with open(os.path.join(str(folder), f"part-{k:02d}.jsonl"), "w", encoding="utf-8") as f:
            for d in docs[k * per:(k + 1) * per]:
                f.write(json.dumps({"id": k, field: d}, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- 1, 2: C4 from a local mirror

@pytest.fixture(scope="module")
def c4(tmp_path_factory):
    root = tmp_path_factory.mktemp("c4")
    train, val = write_c4_mirror(root / "mirror")
    mirror = str(root / "mirror")
    results = run_all(root,
                      ["--dataset=c4", f"--mirror={mirror}", "--out=c4a", "--num_proc=1", "--batch_docs=7"],
                      ["--dataset=c4", f"--mirror={mirror}", "--out=c4b", "--num_proc=2", "--batch_docs=7"])
    return root, train, val, results


def test_c4_mirror_round_trip(c4):
    root, train_docs, val_docs, (a, _) = c4
    ok(a)
    meta, train, val = load(root, "c4a")
    assert meta["tokenizer"] == "gpt2"
    assert documents(val, meta) == val_docs
    assert documents(train, meta) == train_docs
    assert int((val == EOT).sum()) == len(val_docs) and int((train == EOT).sum()) == len(train_docs)
    assert not set(val_docs) & set(documents(train, meta))
    assert meta["train_documents"] == len(train_docs) == sum(C4_SHARDS)
    assert meta["val_documents"] == len(val_docs) == C4_VAL
    assert meta["source"]["mirror"] == os.path.abspath(str(root / "mirror"))


def test_c4_num_proc_does_not_change_bytes(c4):
    root, _, _, (a, b) = c4
    ok(a), ok(b)
    load(root, "c4b")
    for f in ("train.bin", "val.bin"):
        assert read_bytes(root / "data" / "c4a" / f) == read_bytes(root / "data" / "c4b" / f)
    ma, mb = (json.loads((root / "data" / n / "meta.json").read_text()) for n in ("c4a", "c4b"))
    for key in ("train_tokens", "val_tokens", "train_documents", "val_documents"):
        assert ma[key] == mb[key]


# --------------------------------------------------------------------------- 3, 4: hashed hold-out, budgets

@pytest.fixture(scope="module")
def hashed(tmp_path_factory):
    root = tmp_path_factory.mktemp("hashed")
    docs = hashed_docs()
    write_jsonl_folder(root / "fwd", docs)
    write_jsonl_folder(root / "rev", docs[::-1], files=3)
    common = ["--text_field=body", "--val_fraction=0.2", "--num_proc=1", "--batch_docs=16"]
    results = run_all(root,
                      [f"--dataset={root / 'fwd'}", "--out=fwd", *common],
                      [f"--dataset={root / 'rev'}", "--out=rev", *common],
                      [f"--dataset={root / 'fwd'}", "--out=budget", "--max_tokens=1000", "--val_tokens=200",
                       *common])
    return root, docs, results


def test_hashed_hold_out_is_disjoint_and_position_free(hashed):
    root, docs, (fwd, rev, _) = hashed
    ok(fwd), ok(rev)
    meta, train, val = load(root, "fwd")
    train_docs, val_docs = documents(train, meta), documents(val, meta)
    assert val_docs, "val must not be empty"
    assert not set(train_docs) & set(val_docs)
    assert Counter(train_docs + val_docs) == Counter(docs)  # every document once, none lost
    # each split keeps the corpus order
    assert train_docs == [d for d in docs if d in set(train_docs)]
    assert val_docs == [d for d in docs if d in set(val_docs)]
    assert 0.1 < len(val_docs) / len(docs) < 0.3
    assert meta["train_documents"] == len(train_docs) and meta["val_documents"] == len(val_docs)

    rmeta, rtrain, rval = load(root, "rev")
    assert set(documents(rval, rmeta)) == set(val_docs)
    assert set(documents(rtrain, rmeta)) == set(train_docs)
    assert documents(rval, rmeta) == val_docs[::-1]


def test_token_budgets_are_exact(hashed):
    root, _, (fwd, _, budget) = hashed
    ok(fwd), ok(budget)
    meta, train, val = load(root, "budget")
    assert meta["train_tokens"] == len(train) == 1000
    assert meta["val_tokens"] == len(val) == 200
    assert meta["source"]["max_tokens"] == 1000 and meta["source"]["val_tokens"] == 200
    # the budgeted splits are the first tokens of the unbudgeted ones
    _, full_train, full_val = load(root, "fwd")
    assert np.array_equal(train, full_train[:1000])
    assert np.array_equal(val, full_val[:200])
    for ids, key in ((train, "train_documents"), (val, "val_documents")):
        assert meta[key] == int((ids == EOT).sum()) + int(ids[-1] != EOT)


def test_max_tokens_alone_stops_reading_the_corpus(tmp_path):
    """Without --val_tokens the validation split gets its held-out share of --max_tokens, and prepare.py
    stops streaming once both splits are full: a broken record at the end of the corpus is never read."""
    write_jsonl_folder(tmp_path / "jl", hashed_docs(), files=4)
    with open(tmp_path / "jl" / "part-99.jsonl", "w") as f:
        f.write("{this line is not json\n")
    common = [f"--dataset={tmp_path / 'jl'}", "--text_field=body", "--val_fraction=0.2", "--num_proc=1",
              "--batch_docs=16"]
    budget, whole = run_all(tmp_path, [*common, "--out=budget", "--max_tokens=1000"], [*common, "--out=whole"])
    ok(budget)
    meta, train, val = load(tmp_path, "budget")
    assert (meta["train_tokens"], meta["val_tokens"]) == (1000, 250)  # 250 / (1000 + 250) = 0.2
    assert (meta["source"]["max_tokens"], meta["source"]["val_tokens"]) == (1000, 250)
    # the broken record is real: reading everything meets it, and that ends in one clear line
    rc, _, err = whole
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"error: could not read {tmp_path / 'jl'}"), err
    assert not os.path.exists(tmp_path / "data" / "whole")  # the new folder is gone again


# --------------------------------------------------------------------------- 5: parquet and .txt

def test_parquet_txt_folder_and_txt_file_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_docs = [f"parquet row {i} — ñandú {'x' * (i % 13)} 🦜" for i in range(250)]
    pq.write_table(pa.table({"n": list(range(len(pq_docs))), "content": pq_docs}), tmp_path / "rows.parquet",
                   row_group_size=64)
    os.makedirs(tmp_path / "txt" / "sub")
    txt_docs = {}
    for i in range(60):
        name = os.path.join("sub" if i % 3 == 0 else "", f"doc{i:03d}.txt")
        text = f"Text file {i}.\nIt has lines — and ünicode 中文.\n\n  Indented line {i}.\n"
        txt_docs[name] = text
        with open(tmp_path / "txt" / name, "w", encoding="utf-8") as f:
            f.write(text)

    paragraphs = [f"Paragraph {i} of one long file.\nIts second line, ünicode 中文 {i * 31 % 97}." for i in range(150)]
    with open(tmp_path / "book.txt", "w", encoding="utf-8") as f:
        f.write("\n\n".join(paragraphs) + "\n")

    common = ["--val_fraction=0.3", "--num_proc=1"]
    pq_result, txt_result, book_result = run_all(
        tmp_path,
        [f"--dataset={tmp_path / 'rows.parquet'}", "--text_field=content", "--out=pq", *common],
        [f"--dataset={tmp_path / 'txt'}", "--out=txt", "--batch_docs=5", *common],
        [f"--dataset={tmp_path / 'book.txt'}", "--out=book", *common])
    ok(pq_result), ok(txt_result), ok(book_result)

    meta, train, val = load(tmp_path, "pq")
    tr, va = documents(train, meta), documents(val, meta)
    assert tr and va and not set(tr) & set(va)
    assert tr == [d for d in pq_docs if d in set(tr)]
    assert Counter(tr + va) == Counter(pq_docs)
    assert (meta["train_documents"], meta["val_documents"]) == (len(tr), len(va))

    meta, train, val = load(tmp_path, "txt")
    tr, va = documents(train, meta), documents(val, meta)
    assert tr and va and not set(tr) & set(va)
    assert Counter(tr + va) == Counter(txt_docs.values())  # each .txt file is one whole document
    assert (meta["train_documents"], meta["val_documents"]) == (len(tr), len(va))

    meta, train, val = load(tmp_path, "book")
    tr, va = documents(train, meta), documents(val, meta)
    assert tr and va and not set(tr) & set(va)
    assert Counter(d.strip() for d in tr + va) == Counter(paragraphs)  # a lone file splits at blank lines


# --------------------------------------------------------------------------- 6: bad input

def test_bad_input_fails_with_one_line(tmp_path):
    write_jsonl_folder(tmp_path / "jl", hashed_docs(50), files=2)
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "README.md").write_text("nothing to read here\n")
    (tmp_path / "empty" / "data.csv").write_text("a,b\n1,2\n")
    cases = {
        "tiny": ["--dataset=tinystories"],
        "missing": [f"--dataset={tmp_path / 'jl'}", "--text_field=missing"],
        "nowhere": ["--dataset=does/not/exist"],
        "empty": [f"--dataset={tmp_path / 'empty'}"],
    }
    results = dict(zip(cases, run_all(tmp_path, *[[*args, f"--out={name}", "--num_proc=1"]
                                                  for name, args in cases.items()]), strict=True))
    lines = {}
    for name, (rc, out, err) in results.items():
        assert rc != 0, f"{name}: should fail\n{out}\n{err}"
        assert "Traceback" not in err and "Traceback" not in out, f"{name}:\n{err}"
        nonempty = [line for line in err.splitlines() if line.strip()]
        assert len(nonempty) == 1, f"{name}: want one stderr line, got:\n{err}"
        assert nonempty[0].startswith("error:"), nonempty[0]
        lines[name] = nonempty[0]
        left = data_files(tmp_path, name)
        assert "meta.json" not in left and "train.bin" not in left, f"{name} left {left}"
    assert "TinyStories" in lines["tiny"] and "local files" in lines["tiny"], lines["tiny"]
    assert "missing" in lines["missing"] and "body" in lines["missing"] and "id" in lines["missing"]
    assert "does/not/exist" in lines["nowhere"]
    assert "empty" in lines["empty"]


# --------------------------------------------------------------------------- 7: interruption

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega river stone cloud ember harbor lantern meadow "
         "quartz velvet willow zephyr saffron tundra orchid marble falcon glacier").split()


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """~24 MB of jsonl: enough that prepare.py with --batch_docs=1 runs for many seconds."""
    root = tmp_path_factory.mktemp("big") / "corpus"
    os.makedirs(root)
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    for k in range(8):
        picks = words[rng.integers(0, len(words), size=(1500, 320))]
        with open(root / f"part-{k}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": f"doc {k}-{i} " + " ".join(row)}) + "\n"
                         for i, row in enumerate(picks.tolist()))
    return root


def wait_for_bytes(proc, path, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"prepare.py ended ({proc.returncode}) before writing anything:\n{out}\n{err}")
        try:
            if os.path.getsize(path) > 0:
                return
        except OSError:
            pass
        time.sleep(0.02)
    pytest.fail(f"{path} got no bytes within {timeout} s")


def test_sigint_leaves_nothing(tmp_path, big_corpus):
    proc = start(tmp_path, f"--dataset={big_corpus}", "--out=big", "--num_proc=1", "--batch_docs=1")
    try:
        wait_for_bytes(proc, tmp_path / "data" / "big" / "train.bin.tmp")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err[-2000:]
        assert "Traceback" not in err
        left = data_files(tmp_path, "big")
        assert not [f for f in left if f in ("train.bin", "val.bin", "meta.json") or f.endswith(".tmp")], left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_killed_rerun_keeps_previous_dataset(tmp_path, big_corpus):
    small = tmp_path / "small"
    write_jsonl_folder(small, hashed_docs(120), field="text", files=2)
    ok(finish(start(tmp_path, f"--dataset={small}", "--out=keep", "--val_fraction=0.2", "--num_proc=1")))
    keep = tmp_path / "data" / "keep"
    before = {f: read_bytes(keep / f) for f in ("meta.json", "train.bin", "val.bin")}
    load(tmp_path, "keep")

    proc = start(tmp_path, f"--dataset={big_corpus}", "--out=keep", "--num_proc=1", "--batch_docs=1")
    try:
        wait_for_bytes(proc, keep / "train.bin.tmp")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert {f: read_bytes(keep / f) for f in before} == before
