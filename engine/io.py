"""Checkpoint files: our own safetensors reader and writer, atomic writes, checksums.

The safetensors format (Hugging Face, https://github.com/huggingface/safetensors):

    [ N: u64 little-endian ][ N bytes: JSON header, space-padded ][ raw little-endian data ]
    header = {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
              "__metadata__": {"str": "str"}}          offsets relative to the data start

Tensors are stored contiguously, without holes, in the order given except that wider dtypes
come first (as the reference writer does), so with the header padded to a multiple of 8
every tensor starts aligned to its item size. No pickle: a file is only ever parsed.

Loading trusts nothing: a short file, an absurd header length, bad JSON, an unknown dtype,
offsets out of range, overlapping, with holes or not matching the shape, each raise
``CheckpointError`` (a ValueError) with one line naming the file and the problem.
Writes are atomic: a temporary file in the same directory, flushed and fsynced, then
``os.replace``d over the target, so a reader sees the old file or the new one, whole.
Host-only (NumPy); GPU arrays are copied to the host on save.
"""
import contextlib
import hashlib
import json
import math
import os
import secrets
import struct
import tempfile

import numpy as np

from .autograd import Tensor
from .backend import bfloat16, to_numpy

MAX_HEADER = 100_000_000          # as the reference implementation


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as what it claims to be."""


class DataError(ValueError):
    """A data file or corpus that cannot be trained on (one-line message)."""


def _dtypes():
    table = {"F16": np.float16, "BF16": bfloat16(), "F32": np.float32, "F64": np.float64,
             "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64,
             "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}
    return {code: np.dtype(dt) for code, dt in table.items()}


DTYPES = _dtypes()                                  # "F32" -> np.dtype('float32')
CODES = {dt: code for code, dt in DTYPES.items()}   # np.dtype('float32') -> "F32"


# -- atomic files ---------------------------------------------------------------------

@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Open a temporary file beside ``path``; on a clean exit flush, fsync and rename it over
    ``path``. If the block raises, the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    d, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, f".{base}.tmp.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):     # best effort: not every platform can open a directory
        fsync_dir(d)


def fsync_dir(path):
    """fsync a directory, making the creations and renames in it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unwritable(path, kind="dir"):
    """Why ``path`` (a directory to create or fill, or with kind="file" a file to create or
    append to) cannot be written, in a few words; None if it can. Probes for real: a file is
    created and removed in the directory that would hold the writes (the deepest existing
    one), so a read-only filesystem, /proc or missing permissions are found, and nothing is
    left behind. An existing file is opened for appending, never truncated."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        if kind == "file":
            return "is a directory"
        where = path
    elif os.path.exists(path) and kind == "dir":
        return "is a file, not a directory"
    elif os.path.exists(path):
        try:
            with open(path, "ab"):
                return None
        except OSError as e:
            return f"cannot be opened for writing ({e.strerror or e})"
    else:
        where = os.path.dirname(path)
        while kind == "dir" and not os.path.exists(where):
            where = os.path.dirname(where)
        if not os.path.exists(where):
            return f"its directory {where} does not exist"
        if not os.path.isdir(where):
            return f"lies under {where}, which is a file"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=where)
    except OSError as e:
        return f"cannot be written: no file can be created in {where} ({e.strerror or e})"
    os.close(fd)
    os.unlink(probe)
    return None


def atomic_write_bytes(path, data):
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text):
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path, obj, indent=2):
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def load_json(path):
    """Parse a JSON file (a manifest); CheckpointError with one line if it cannot be."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {one_line(e)}") from None


def sha256_file(path, chunk=1 << 20):
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def one_line(e):
    """An exception's message on one line (errors are reported as one line)."""
    return " ".join(str(e).split())


# -- safetensors ----------------------------------------------------------------------

def save_safetensors(path, tensors, metadata=None):
    """Write {name: array} (NumPy, CuPy or Tensor) and optional {str: str} metadata, atomically."""
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise TypeError("save_safetensors: metadata must be a dict of str -> str")
    arrays = []
    for name, a in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"save_safetensors: invalid tensor name {name!r}")
        a = to_numpy(a.data if isinstance(a, Tensor) else a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        code = CODES.get(a.dtype)
        if code is None:
            raise ValueError(f"save_safetensors: tensor {name!r} has unsupported dtype {a.dtype}")
        arrays.append((name, code, a if a.flags.c_contiguous else a.copy(order="C")))
    arrays.sort(key=lambda x: -x[2].dtype.itemsize)          # stable: wider first, then as given
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    for name, code, a in arrays:
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)                       # 8 + N is a multiple of 8
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for _, _, a in arrays:
            if a.size:
                f.write(memoryview(a.reshape(-1).view(np.uint8)))


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise CheckpointError(f"duplicate key {k!r} in header")
        d[k] = v
    return d


def _parse_header(path, f, file_size):
    """Validate the header; return ({name: (dtype, shape, begin, end)}, metadata, data_start)."""
    def fail(problem):
        raise CheckpointError(f"{path}: {problem}")

    if file_size < 8:
        fail(f"file too short ({file_size} bytes) to be safetensors")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER or n > file_size - 8:
        fail(f"header length {n} is absurd for a file of {file_size} bytes (truncated or not safetensors)")
    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        fail(str(e))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"header is not valid JSON: {one_line(e)}")
    if not isinstance(header, dict):
        fail("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(v, str) for v in metadata.values())):
        fail("__metadata__ must map str to str")
    entries, data_size = {}, file_size - 8 - n
    for name, e in header.items():
        if not (isinstance(e, dict) and set(e) >= {"dtype", "shape", "data_offsets"}):
            fail(f"tensor {name!r}: entry needs dtype, shape and data_offsets")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in DTYPES:
            fail(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(_is_count(s) for s in shape)):
            fail(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_count(o) for o in offs)):
            fail(f"tensor {name!r}: bad data_offsets {offs!r}")
        begin, end = offs
        if begin > end or end > data_size:
            fail(f"tensor {name!r}: data_offsets [{begin}, {end}] out of range of the {data_size} data bytes")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if nbytes != end - begin:
            fail(f"tensor {name!r}: shape {shape} {dtype} needs {nbytes} bytes, data_offsets span {end - begin}")
        entries[name] = (DTYPES[dtype], tuple(shape), begin, end)
    pos = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < pos:
            fail(f"tensor {name!r}: data_offsets [{begin}, {end}] overlap the previous tensor")
        if begin > pos:
            fail(f"tensor {name!r}: data_offsets [{begin}, {end}] leave a hole after byte {pos}")
        pos = end
    if pos != data_size:
        fail(f"{data_size - pos} bytes after the last tensor (the header covers {pos} of {data_size})")
    return entries, metadata, 8 + n


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors_header(path):
    """({name: (np.dtype, shape, begin, end)}, metadata) without reading the data."""
    try:
        with open(path, "rb") as f:
            entries, metadata, _ = _parse_header(path, f, os.fstat(f.fileno()).st_size)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    return entries, metadata


def load_safetensors(path):
    """Read a safetensors file -> ({name: np.ndarray}, metadata dict or None), validated.

    The arrays are writable views of one buffer holding the file's data section."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            entries, metadata, start = _parse_header(path, f, size)
            buf = bytearray(size - start)
            got = f.readinto(buf)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if got != len(buf):
        raise CheckpointError(f"{path}: file changed while reading ({got} of {len(buf)} data bytes)")
    out = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if end == begin:
            out[name] = np.empty(shape, dtype=dtype)
        else:
            out[name] = np.frombuffer(buf, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                      offset=begin).reshape(shape)
    return out, metadata
