"""nanoGPT-style token files: ``.bin`` arrays of uint16 (or uint32) token ids and the meta
beside them (engine/data.py load_dataset reads datasets through this).

``meta.json`` (or nanoGPT's ``meta.pkl``) gives ``vocab_size``, the character table
(``chars`` or ``itos``) and optionally ``"dtype": "uint32"``. ``meta.pkl`` is read by an
unpickler that imports nothing (``find_class`` refuses every global), so only dicts, lists,
tuples, strings and numbers come out of it. A uint32 file read as uint16 (every second uint16
zero, or ids past the vocabulary) is refused with a hint.
"""
import io
import json
import os
import pickle

import numpy as np

from .io import DataError


def _meta_chars(meta):
    """The character table of a meta.json: "chars" (a string), or nanoGPT's "itos"
    (index -> character, as a list or an object with string keys, or int keys in meta.pkl);
    None if absent."""
    if isinstance(meta.get("chars"), str):
        return meta["chars"]
    itos = meta.get("itos")
    if isinstance(itos, list) and all(isinstance(c, str) for c in itos):
        return "".join(itos)
    if isinstance(itos, dict):
        table = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in itos.items()}
        if all(isinstance(table.get(i), str) for i in range(len(table))):
            return "".join(table[i] for i in range(len(table)))
    return None


META_PKL_MAX_BYTES = 64 * 2**20
_PLAIN = (dict, list, tuple, str, int, float, bool, type(None))


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: every global (class, function) is refused, so nothing is
    imported or called; dicts, lists, tuples, strings and numbers need no global."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent id")


def read_meta_pkl(path):
    """nanoGPT's meta.pkl (a dict of vocab_size, itos, stoi) as plain data, never running code;
    DataError with one line if it holds anything but dicts, lists, tuples, strings, numbers."""
    hint = "write the same keys to meta.json instead"
    size = os.path.getsize(path)
    if size > META_PKL_MAX_BYTES:
        raise DataError(f"{path} is {size} bytes, more than a vocabulary needs; not read ({hint})")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        meta = _PlainUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            MemoryError, RecursionError) as e:
        raise DataError(f"{path} is not plain pickled data ({type(e).__name__}: {' '.join(str(e).split())}); "
                        f"only dicts, lists, strings and numbers are read ({hint})") from None
    stack = [meta]
    while stack:                                              # everything inside is plain data too
        x = stack.pop()
        if not isinstance(x, _PLAIN):
            raise DataError(f"{path} holds a {type(x).__name__}; only dicts, lists, strings and numbers are "
                            f"read ({hint})")
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    if not isinstance(meta, dict):
        raise DataError(f"{path} holds a {type(meta).__name__}, not a dict of vocab_size, itos, stoi")
    return meta


def read_meta(bin_path):
    """(path, dict) of the meta.json, else the meta.pkl, beside a .bin; (None, {}) if neither."""
    here = os.path.dirname(os.path.abspath(bin_path))
    meta_path = os.path.join(here, "meta.json")
    if os.path.exists(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {meta_path}: {' '.join(str(e).split())}") from None
        return meta_path, meta
    pkl_path = os.path.join(here, "meta.pkl")
    if os.path.exists(pkl_path):
        return pkl_path, read_meta_pkl(pkl_path)
    return None, {}


_BIN_DTYPES = {"uint16": "<u2", "uint32": "<u4"}
UINT32_HINT = 'if it holds uint32 tokens, say so with "dtype": "uint32" in meta.json'


def read_bin(path, vocab_size):
    """(tokens, character table or None, vocab_size) of a nanoGPT-style .bin token file, its
    dtype and vocabulary from the meta beside it (or ``vocab_size``); DataError with one line
    for what cannot be right (an odd size, uint32 read as uint16, ids past the vocabulary)."""
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"data file {path} is empty (0 bytes)")
    meta_path, meta = read_meta(path)
    meta_vocab = meta.get("vocab_size")
    if meta_vocab is not None and (isinstance(meta_vocab, bool) or not isinstance(meta_vocab, int) or meta_vocab <= 0):
        raise DataError(f"{meta_path}: vocab_size must be a positive integer, got {meta_vocab!r}")
    dtype = meta.get("dtype", "uint16")
    if dtype not in _BIN_DTYPES:
        raise DataError(f"{meta_path}: dtype {dtype!r} is not one of {', '.join(_BIN_DTYPES)}")
    width = np.dtype(_BIN_DTYPES[dtype]).itemsize
    if size % width:
        raise DataError(f"token file {path} has {'an odd size' if width == 2 else 'a size not a multiple of 4'} "
                        f"({size} bytes); a .bin file holds {dtype} tokens")
    tokens = np.fromfile(path, dtype=_BIN_DTYPES[dtype])
    if dtype == "uint16":
        tokens = tokens.astype(np.uint16)
        if len(tokens) >= 16 and not tokens[1::2].any() and tokens[0::2].any():
            raise DataError(f"token file {path} looks like uint32 tokens read as uint16 (every second uint16 "
                            f"is 0); {UINT32_HINT}")
    elif tokens.size and tokens.max() >= 2**31:
        raise DataError(f"token file {path} holds token id {int(tokens.max())} >= 2^31")
    else:
        tokens = tokens.astype(np.uint16 if not tokens.size or tokens.max() < 2**16 else np.int32)
    vocab_size = vocab_size or meta_vocab
    chars = _meta_chars(meta) if meta else None
    if not vocab_size:
        raise DataError(f"token file {path}: give --vocab-size or a meta.json with vocab_size beside it")
    vocab_size = int(vocab_size)
    if tokens.max() >= vocab_size:
        hint = f" ({UINT32_HINT})" if dtype == "uint16" and size % 4 == 0 else ""
        raise DataError(f"token file {path} holds token id {int(tokens.max())} >= vocab size {vocab_size}{hint}")
    if chars is not None and not (len(chars) == vocab_size and len(set(chars)) == vocab_size
                                  and "".join(sorted(chars)) == chars):
        chars = None                                          # not a sorted table of every id: ids only
    return tokens, chars, vocab_size
