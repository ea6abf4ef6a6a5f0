"""
The one place that knows how text becomes tokens and tokens become text.

A dataset's meta.json names its tokenizer; `from_meta` rebuilds exactly that
tokenizer, so prepare.py, train.py, sample.py and bench.py never guess.
  gpt2  GPT-2's byte-level BPE through tiktoken (50257 ids, <|endoftext|> = 50256)
  char  one id per character seen in the corpus, plus one id for end-of-text
  bpe   a byte-level BPE trained on the corpus, stored as a tiktoken rank file

Training a BPE uses the `tokenizers` library; its result is converted to tiktoken's
rank format, so encoding and decoding always go through tiktoken.
"""
import base64
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import tiktoken

from configurator import InputError

EOT = "<|endoftext|>"
# GPT-2's pre-tokenisation regex: contractions, letters, digits, other symbols, whitespace
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(InputError):
    """Text or a tokenizer description that cannot be used; the message says why."""


@dataclass
class Tokenizer:
    name: str
    vocab_size: int
    eot_token: int
    encode: Callable[[str], list]  # plain text; a literal "<|endoftext|>" in it is just text
    decode: Callable[[list], str]
    encode_batch: Callable[[list], list]
    token_bytes: Callable[[int], bytes]  # the UTF-8 bytes one id stands for (part of a character, for a BPE)
    meta: dict  # the fields that go into meta.json to rebuild this tokenizer


def _tiktoken(name, ranks, meta):
    eot = len(ranks)
    enc = tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: eot})
    return Tokenizer(
        name=meta["tokenizer"], vocab_size=enc.n_vocab, eot_token=eot,
        encode=enc.encode_ordinary, decode=enc.decode,
        encode_batch=lambda texts: enc.encode_ordinary_batch(texts, num_threads=1),
        token_bytes=enc.decode_single_token_bytes, meta=meta)


def dataset_dir(name):
    """data/<name>, the folder prepare.py wrote. Names also come from checkpoints, which may come from
    anyone, so a name that leads outside data/ is refused."""
    if not name or os.path.isabs(name) or ".." in name.split("/"):
        raise TokenizerError(f"dataset {name!r} is not a folder under data/; give the name of a folder "
                             f"prepare.py wrote")
    return os.path.join("data", name)


def read_meta(data_dir):
    """A prepared dataset's meta.json, with the fields the scripts rely on checked: a file cut short
    or edited by hand is refused here, not met later as a KeyError."""
    path = os.path.join(data_dir, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        missing = [k for k in ("tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens") if k not in meta]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        if meta["dtype"] not in ("uint16", "uint32"):  # the two prepare.py writes
            raise ValueError(f"token dtype {meta['dtype']!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"{path} is damaged ({type(e).__name__}: {e}); prepare the dataset again") from None
    return meta


def read_ranks(path):
    """A tiktoken rank file: one `base64(token bytes) rank` per line. Read directly, because
    tiktoken's own loader caches files by path name, so a changed file at an old path goes unseen."""
    with open(path, "rb") as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


def gpt2_ranks_path():
    """GPT-2's rank file as shipped inside the openai-whisper package (found, never imported)."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "assets", "gpt2.tiktoken")
    return path if os.path.exists(path) else None


def gpt2():
    path = gpt2_ranks_path()
    if path is None:  # no local asset: tiktoken's own download, which needs the internet
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise TokenizerError("GPT-2's BPE file is not installed and cannot be downloaded "
                                 f"({type(e).__name__}); run: pip install --no-deps openai-whisper") from None
        ranks = enc._mergeable_ranks
    else:
        ranks = read_ranks(path)
    return _tiktoken("gpt2", ranks, {"tokenizer": "gpt2"})


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def bpe(path, expected_sha256=None):
    """A byte-level BPE stored in tiktoken's rank format; end-of-text follows the last rank."""
    if not os.path.exists(path):
        raise TokenizerError(f"tokenizer file {path} does not exist; train one with "
                             "prepare.py --tokenizer=bpe or give the right path")
    digest = file_sha256(path)
    if expected_sha256 and digest != expected_sha256:
        raise TokenizerError(f"{path} is not the tokenizer this dataset was made with (its sha256 differs "
                             f"from meta.json's); prepare the dataset again")
    try:
        ranks = read_ranks(path)
        assert sorted(ranks.values()) == list(range(len(ranks))) and len(ranks) >= 256
    except Exception:
        raise TokenizerError(f"{path} is not a tiktoken rank file (lines of base64 token and rank)") from None
    return _tiktoken(os.path.basename(path), ranks, {"tokenizer": "bpe", "tokenizer_file": os.path.basename(path),
                                                    "tokenizer_sha256": digest})


def train_tokenizers_bpe(texts, vocab_size):
    """The `tokenizers` library's byte-level BPE trained on a stream of texts, with vocab_size ids once
    end-of-text is added. train_bpe converts it; the tests check that tiktoken then encodes as it does."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    if vocab_size < 257:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs 256 byte ids "
                             f"plus end-of-text, so at least 257")
    bpe_model = Tokenizer(models.BPE())
    # GPT-2's split, then bytes shown as printable characters: the same pieces tiktoken will merge
    bpe_model.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe_model.train_from_iterator(texts, trainer)
    return bpe_model


def train_bpe(texts, vocab_size, path):
    """Train a byte-level BPE of vocab_size ids (end-of-text included) on a stream of texts and
    write it to path in tiktoken's rank format: the 256 bytes, then each merge in the order learned."""
    merges = json.loads(train_tokenizers_bpe(texts, vocab_size).to_str())["model"]["merges"]
    # ByteLevel shows byte b as a printable character; invert that to get the raw bytes back
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = sorted(set(range(256)) - set(printable))
    shown = {**{b: b for b in printable}, **{b: 256 + i for i, b in enumerate(hidden)}}
    to_byte = {chr(c): b for b, c in shown.items()}
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in (m.split(" ") if isinstance(m, str) else m for m in merges):
        ranks.setdefault(bytes(to_byte[c] for c in left + right), len(ranks))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())
    os.replace(tmp, path)
    return bpe(path)


def char(chars):
    """Character level. The end-of-text id is the last one and decodes to "<|endoftext|>"."""
    stoi = {c: i for i, c in enumerate(chars)}
    eot = len(chars)

    def encode(text):
        try:
            return [stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - stoi.keys())
            raise TokenizerError(f"characters {''.join(unknown)!r} are not in this dataset's "
                                 f"{len(chars)}-character vocabulary") from None

    def decode(ids):
        return "".join(chars[i] if i < eot else EOT for i in ids)

    return Tokenizer(name="char", vocab_size=eot + 1, eot_token=eot, encode=encode, decode=decode,
                     encode_batch=lambda texts: [encode(t) for t in texts],
                     token_bytes=lambda i: decode([i]).encode(), meta={"tokenizer": "char", "chars": "".join(chars)})


def byte_lengths(t):
    """How many UTF-8 bytes of text each id stands for, end-of-text none: the denominator of bits per byte."""
    lengths = [len(t.token_bytes(i)) for i in range(t.vocab_size)]
    lengths[t.eot_token] = 0
    return lengths


def from_meta(meta, data_dir="."):
    """Rebuild the tokenizer a dataset (or a checkpoint's copy of its meta) was made with."""
    kind = meta.get("tokenizer")
    if kind == "gpt2":
        return gpt2()
    if kind == "char":
        return char(list(meta["chars"]))
    if kind == "bpe":
        name = meta.get("tokenizer_file")
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
            raise TokenizerError(f"meta.json names tokenizer file {name!r}, which is not a file name in the "
                                 f"dataset's folder; refusing to read files outside it")
        return bpe(os.path.join(data_dir, name), meta.get("tokenizer_sha256"))
    raise TokenizerError(f"unknown tokenizer {kind!r} in meta.json; expected gpt2, char or bpe")
