"""engine.io: our safetensors reader/writer, its validation, atomic writes, checksums."""
import hashlib
import json
import os
import struct

import numpy as np
import pytest

from engine.backend import bfloat16
from engine.io import (CheckpointError, atomic_open, atomic_write_json, atomic_write_text, load_json,
                       load_safetensors, read_safetensors_header, save_safetensors, sha256_file)

DTYPES = [np.float16, bfloat16(), np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
          np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]


def _tensors():
    rng = np.random.default_rng(0)
    out = {}
    for i, dt in enumerate(DTYPES):
        name = np.dtype(dt).name
        out[f"{name}.matrix"] = (rng.standard_normal((3, i + 2)) * 50).astype(dt)
        out[f"{name}.scalar"] = np.array(7, dtype=dt)                 # 0-d
        out[f"{name}.empty"] = np.zeros((0, 4), dtype=dt)             # no bytes
    out["transposed"] = np.arange(12, dtype=np.float32).reshape(3, 4).T   # not contiguous
    out["big_endian"] = np.arange(5, dtype=">i4")
    return out


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_round_trip_every_dtype(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = _tensors()
    save_safetensors(path, tensors, metadata={"step": "12", "format": "pt"})
    loaded, meta = load_safetensors(path)
    assert meta == {"step": "12", "format": "pt"} and set(loaded) == set(tensors)
    for k, v in tensors.items():
        want = v.astype(v.dtype.newbyteorder("=")) if k == "big_endian" else v
        assert _same(loaded[k], want), k
    loaded["float32.matrix"][0, 0] = 1.0                             # writable arrays
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0 and raw[8:8 + n].rstrip(b" ").endswith(b"}")
    header, _ = read_safetensors_header(path)
    for name, (dt, shape, begin, end) in header.items():             # every tensor aligned
        assert begin % dt.itemsize == 0 and shape == tensors[name].shape
    assert load_safetensors(_write(tmp_path, {}))[0] == {}


def _write(tmp_path, tensors, name="x.safetensors", **kw):
    p = tmp_path / name
    save_safetensors(p, tensors, **kw)
    return p


def test_interop_with_the_safetensors_package(tmp_path):
    st_np = pytest.importorskip("safetensors.numpy", reason="the safetensors package (test oracle) is absent")
    tensors = {k: v for k, v in _tensors().items() if "bfloat16" not in k and k != "big_endian"}
    ours = _write(tmp_path, tensors, metadata={"a": "b"})
    theirs = st_np.load_file(str(ours))                              # ours -> theirs
    assert set(theirs) == set(tensors)
    for k, v in tensors.items():
        assert _same(theirs[k], v), k
    path = tmp_path / "theirs.safetensors"
    st_np.save_file({k: v.copy(order="C") for k, v in tensors.items()}, str(path), metadata={"x": "y"})
    loaded, meta = load_safetensors(path)                             # theirs -> ours
    assert meta == {"x": "y"}
    for k, v in tensors.items():
        assert _same(loaded[k], v), k


def test_bfloat16_interop_through_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is needed to read/write BF16 with the safetensors package")
    st_torch = pytest.importorskip("safetensors.torch", reason="the safetensors package is absent")
    x = np.random.default_rng(1).standard_normal((4, 5)).astype(bfloat16())
    t = st_torch.load_file(str(_write(tmp_path, {"w": x})))["w"]
    assert t.dtype == torch.bfloat16
    assert np.array_equal(t.view(torch.int16).numpy(), x.view(np.int16))
    path = tmp_path / "bf.safetensors"
    st_torch.save_file({"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)}, str(path))
    w = load_safetensors(path)[0]["w"]
    assert w.dtype == bfloat16() and np.array_equal(w.astype(np.float32), np.arange(6).reshape(2, 3))


def _tamper(tmp_path, header=None, data=b"", raw=None, hlen=None):
    """A file with a hand-made header (dict or bytes) and data section."""
    if raw is None:
        h = header if isinstance(header, bytes) else json.dumps(header).encode()
        raw = struct.pack("<Q", len(h) if hlen is None else hlen) + h + data
    p = tmp_path / "bad.safetensors"
    p.write_bytes(raw)
    return p


def _refused(path, match):
    with pytest.raises(CheckpointError, match=match) as e:
        load_safetensors(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and isinstance(e.value, ValueError)
    return msg


def test_truncated_files_are_refused(tmp_path):
    good = _write(tmp_path, {"a": np.arange(10, dtype=np.float32), "b": np.ones(3)}).read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    for cut in (0, 3, 8, 8 + n // 2, 8 + n, len(good) - 1):
        p = _tamper(tmp_path, raw=good[:cut])
        _refused(p, "too short|absurd|out of range|not valid JSON")
    _refused(_tamper(tmp_path, raw=good + b"\0" * 4), "bytes after the last tensor")


def test_tampered_headers_are_refused(tmp_path):
    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    cases = [
        (dict(header={"a": f32}, data=b"\0" * 8, hlen=10 ** 12), "header length .* absurd"),
        (dict(header=b"{not json", data=b""), "not valid JSON"),
        (dict(header=b"\xff\xfe", data=b""), "not valid JSON"),
        (dict(header=b"[1, 2]", data=b""), "not a JSON object"),
        (dict(header=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{}}', data=b"\0" * 8),
         "duplicate key 'a'"),
        (dict(header={"a": {**f32, "dtype": "F7"}}, data=b"\0" * 8), "unknown dtype 'F7'"),
        (dict(header={"a": {**f32, "data_offsets": [0, 16]}}, data=b"\0" * 8), "out of range"),
        (dict(header={"a": {**f32, "data_offsets": [8, 0]}}, data=b"\0" * 8), "out of range"),
        (dict(header={"a": {**f32, "shape": [3]}}, data=b"\0" * 8), "needs 12 bytes"),
        (dict(header={"a": {**f32, "shape": [-2]}}, data=b"\0" * 8), "bad shape"),
        (dict(header={"a": {"dtype": "F32", "shape": [2]}}, data=b"\0" * 8), "needs dtype, shape"),
        (dict(header={"a": f32, "b": {**f32, "data_offsets": [4, 12]}}, data=b"\0" * 12), "overlap"),
        (dict(header={"a": {**f32, "data_offsets": [4, 12]}}, data=b"\0" * 12), "hole"),
        (dict(header={"a": f32, "__metadata__": {"k": 1}}, data=b"\0" * 8), "__metadata__"),
    ]
    for kw, match in cases:
        _refused(_tamper(tmp_path, **kw), match)
    ok = _tamper(tmp_path, header={"a": f32, "__metadata__": {"k": "v"}}, data=np.ones(2, np.float32).tobytes())
    arrays, meta = load_safetensors(ok)
    assert meta == {"k": "v"} and np.array_equal(arrays["a"], [1, 1])


def test_missing_file_is_a_checkpoint_error(tmp_path):
    msg = _refused(tmp_path / "nope.safetensors", "cannot read")
    assert "nope.safetensors" in msg


def test_save_rejects_what_it_cannot_store(tmp_path):
    with pytest.raises(ValueError, match="unsupported dtype"):
        save_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex64)})
    with pytest.raises(TypeError, match="metadata"):
        save_safetensors(tmp_path / "m.safetensors", {}, metadata={"a": 1})
    with pytest.raises(ValueError, match="invalid tensor name"):
        save_safetensors(tmp_path / "n.safetensors", {"__metadata__": np.zeros(1)})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_when_writer_raises(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"w": np.ones(3, np.float32)})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_open(path) as f:
            f.write(b"half a checkpoint")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]       # no temp file left behind

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)                 # the data is written, fsync fails
    with pytest.raises(OSError, match="No space"):
        save_safetensors(path, {"a": np.zeros(1000, np.float64)})
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_text_json_and_sha256(tmp_path):
    p = tmp_path / "manifest.json"
    atomic_write_json(p, {"step": 3, "files": ["a"]})
    assert load_json(p) == {"step": 3, "files": ["a"]}
    atomic_write_text(p, "replaced")
    assert p.read_text() == "replaced"
    with pytest.raises(CheckpointError, match="not valid JSON") as e:
        load_json(p)
    assert str(p) in str(e.value)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_json(tmp_path / "absent.json")
    data = os.urandom(3 << 20)
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    assert sorted(os.listdir(tmp_path)) == ["blob", "manifest.json"]
