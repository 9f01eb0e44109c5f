"""Training data on the host: tokenizers, the default corpus, datasets and the batcher.

Everything here is NumPy on the CPU; train.py moves each batch to the device.

- ``ByteTokenizer``: UTF-8 bytes, vocabulary 256 (any text, nothing to store).
- ``CharTokenizer``: the sorted set of characters of the corpus (nanoGPT's
  ``shakespeare_char``); serialised as JSON into the checkpoint manifest.
- ``IdTokenizer``: a ``.bin`` token file without a character table; text is token ids.
- ``default_corpus()``: the Python standard library sources of the running interpreter,
  so training needs no download and no file outside the install.
- ``load_dataset(path, tokenizer, val_fraction, block_size)``: a UTF-8 text file or a
  nanoGPT-style ``.bin`` of uint16 tokens (engine/token_files.py: the file, its meta.json
  or meta.pkl, read without running code), split into train and val (the last
  ``val_fraction`` of the tokens is validation, as nanoGPT's prepare scripts do). What the
  loader decided for the caller to print (val.bin used, so ``val_fraction`` does not
  apply) is in ``Dataset.notes``.
- ``Batcher``: random windows (x = tokens[i:i+T], y = tokens[i+1:i+T+1]) drawn by a seeded
  ``numpy.random.Generator``; its full state is JSON and goes into every checkpoint, so a
  resumed run draws exactly the batches the uninterrupted run would have drawn.

Bad data raises ``DataError`` with one line naming the file and the sizes.
"""
import os
import sysconfig
from dataclasses import dataclass, field

import numpy as np

from .io import DataError  # noqa: F401  (callers import it from here too)
from .token_files import read_bin

DEFAULT_CORPUS_BYTES = 8 * 2**20   # 8 MiB: ~700 stdlib files, loads in a fraction of a second
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


# ---------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """Text <-> UTF-8 bytes. Vocabulary 256; decoding replaces broken sequences."""
    vocab_size = 256

    def encode(self, text):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_json(self):
        return {"type": "byte"}


class CharTokenizer:
    """Text <-> index into the sorted characters of a corpus."""

    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(self.chars)
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.int64)  # sorted code points

    @classmethod
    def from_text(cls, text):
        counts = np.bincount(_code_points(text))
        return cls("".join(chr(c) for c in np.flatnonzero(counts)))

    def encode(self, text):
        codes = _code_points(text)
        lut = np.full(max(int(codes.max(initial=0)), int(self._codes.max(initial=0))) + 1, -1, np.int64)
        lut[self._codes] = np.arange(self.vocab_size)
        ids = lut[codes]                                   # code point -> index, -1 if unknown
        if (ids < 0).any():
            c = chr(int(codes[np.argmax(ids < 0)]))
            raise DataError(f"character {c!r} is not in the tokenizer's vocabulary of {self.vocab_size} characters")
        return ids.astype(np.uint16 if self.vocab_size <= 2**16 else np.int32)

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids)

    def to_json(self):
        return {"type": "char", "chars": self.chars}


class IdTokenizer:
    """For token files without a character table: text is whitespace-separated ids."""

    def __init__(self, vocab_size):
        self.vocab_size = int(vocab_size)

    def encode(self, text):
        words = text.split()
        bad = next((w for w in words if not (w.isascii() and w.lstrip("+-").isdigit())), None)
        if bad is not None:
            raise DataError(f"this tokenizer reads whitespace-separated token ids, not text: {bad[:20]!r} "
                            "is not an integer")
        ids = np.array([int(t) for t in words], dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise DataError(f"token ids must lie in [0, {self.vocab_size})")
        return ids

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)

    def to_json(self):
        return {"type": "ids", "vocab_size": self.vocab_size}


def _code_points(text):
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)


def tokenizer_from_json(d):
    if not isinstance(d, dict):
        raise DataError(f"a tokenizer is a JSON object with a type, got {type(d).__name__}")
    kind = d.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "ids":
        return IdTokenizer(d["vocab_size"])
    raise DataError(f"unknown tokenizer type {kind!r}")


# ---------------------------------------------------------------------------- corpus
def default_corpus_files(root=None):
    """Sorted relative paths of the stdlib ``*.py`` files that make up the default corpus
    (test packages and site-packages skipped)."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for f in filenames:
            if f.endswith(".py"):
                files.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return root, sorted(files)


def default_corpus(max_bytes=DEFAULT_CORPUS_BYTES):
    """The standard library of this interpreter as one text, deterministic for a given
    install: files in sorted path order, each preceded by a ``# file: path`` line, added
    whole while the total stays within ``max_bytes`` (8 MiB); undecodable files skipped."""
    root, files = default_corpus_files()
    parts, total = [], 0
    for rel in files:
        try:
            with open(os.path.join(root, rel), "rb") as f:
                raw = f.read()
            raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        chunk = b"# file: " + rel.encode() + b"\n" + raw + b"\n"
        if total + len(chunk) > max_bytes:
            break
        parts.append(chunk)
        total += len(chunk)
    if not parts:
        raise DataError(f"no Python sources found under {root} for the default corpus")
    return b"".join(parts).decode("utf-8")


# ---------------------------------------------------------------------------- datasets
@dataclass
class Dataset:
    train: np.ndarray          # 1-D uint16 (or int32 for vocabularies above 65536)
    val: np.ndarray
    tokenizer: object
    vocab_size: int
    source: str                # file path, or "stdlib:<dir>"
    notes: list = field(default_factory=list)   # one-line remarks for the caller to print (val.bin used, ...)


def _read_text(path):
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise DataError(f"data file {path} is empty (0 bytes)")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"data file {path} looks binary (NUL byte at offset {nul}); give UTF-8 text or a .bin token file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (invalid byte at offset {e.start})") from None


def load_dataset(path=None, tokenizer="byte", val_fraction=0.1, block_size=None, vocab_size=None):
    """Tokenised train/val splits of ``path`` (or of the default corpus when None).

    ``.bin`` files are nanoGPT-style uint16 tokens; a sibling ``val.bin`` next to a
    ``train.bin`` is used as the validation split (``val_fraction`` is then unused, which
    ``Dataset.notes`` says). ``block_size`` (if given) checks that
    each split holds at least one window plus its target (block_size + 1 tokens)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if tokenizer not in ("byte", "char"):
        raise DataError(f"tokenizer must be 'byte' or 'char', got {tokenizer!r}")
    val, notes = None, []
    if path is None:
        text = default_corpus()
        source = "stdlib:" + sysconfig.get_paths()["stdlib"]
    else:
        source = path
        if not os.path.exists(path):
            raise DataError(f"data file {path} does not exist")
        if not os.path.isfile(path):
            raise DataError(f"data path {path} is not a file")
    if path is not None and path.endswith(".bin"):
        tokens, chars, vocab = read_bin(path, vocab_size)               # engine/token_files.py
        tok = CharTokenizer(chars) if chars is not None else IdTokenizer(vocab)
        sibling = os.path.join(os.path.dirname(path), "val.bin")
        if os.path.basename(path) == "train.bin" and os.path.exists(sibling):
            val, _, _ = read_bin(sibling, vocab)
            notes.append(f"validation split: {sibling} ({len(val)} tokens); val_fraction {val_fraction} "
                         "does not apply")
    else:
        if path is not None:
            text = _read_text(path)
        tok = ByteTokenizer() if tokenizer == "byte" else CharTokenizer.from_text(text)
        tokens, vocab = tok.encode(text), tok.vocab_size
    if val is None:
        n_val = int(round(len(tokens) * val_fraction))
        tokens, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    need = (block_size or 0) + 1
    if len(tokens) < need or len(val) < need:
        raise DataError(f"data {source} is too short: {len(tokens)} train + {len(val)} val tokens, "
                        f"each split needs at least block_size+1 = {need}")
    return Dataset(np.ascontiguousarray(tokens), np.ascontiguousarray(val), tok, vocab, source, notes)


# ---------------------------------------------------------------------------- batches
class Batcher:
    """Random windows of ``tokens``: x (B, T) and its next-token targets y (B, T), int64.

    Window starts are ``rng.integers(0, len - T, size=B)`` from a ``numpy.random.Generator``
    seeded with ``seed``; ``state_dict()`` holds the generator's full state and the number
    of batches drawn, and ``load_state_dict`` restores both exactly."""

    def __init__(self, tokens, batch_size, block_size, seed):
        if len(tokens) < block_size + 1:
            raise DataError(f"{len(tokens)} tokens cannot fill one window of {block_size}+1")
        self.tokens = tokens
        self.batch_size, self.block_size = batch_size, block_size
        self.rng = np.random.default_rng(seed)
        self.position = 0                       # batches drawn so far
        self._offsets = np.arange(block_size + 1)

    def next(self):
        starts = self.rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        w = self.tokens[starts[:, None] + self._offsets].astype(np.int64)  # (B, T+1)
        self.position += 1
        return w[:, :-1], w[:, 1:]                                           # (B, T), (B, T)

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state, "position": self.position}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
        self.position = int(state["position"])
