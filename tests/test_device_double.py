"""The device double (engine/device_double.py) is as strict as CuPy at the host/device boundary,
and its counters (transfers, device bytes) are right: the rest of the suite relies on both
when it runs under ENGINE_DEVICE=gpu-emulated."""
import gc

import numpy as np
import pytest

from engine import backend

cp = backend.use_double()              # also in a CPU run of the suite: backend.to_numpy etc. know it


def test_implicit_conversions_raise_like_cupy():
    d = cp.arange(6, dtype=np.float64).reshape(2, 3)
    host = np.ones((2, 3))
    for convert in (np.asarray, np.array, np.ascontiguousarray, lambda a: np.copyto(host, a)):
        with pytest.raises(TypeError):
            convert(d)
    for mix in (lambda: host + d, lambda: d + host, lambda: d @ host.T, lambda: np.maximum(d, host),
                lambda: np.concatenate([d, host]), lambda: cp.where(d > 1, d, host)):
        with pytest.raises(TypeError):
            mix()
    with pytest.raises(ValueError):
        cp.copyto(d, host)                         # CuPy: non-scalar numpy.ndarray cannot be used for copyto
    with pytest.raises(AttributeError):
        d.__array_interface__                      # noqa: B018  (CuPy exposes only __cuda_array_interface__)


def test_what_cupy_allows_still_works():
    d = cp.arange(6, dtype=np.float64).reshape(2, 3)
    s = d.sum()
    assert isinstance(s, cp.ndarray) and s.shape == () and float(s) == 15.0      # 0-d, not a NumPy scalar
    assert isinstance(d[0, 1], cp.ndarray) and int(d[0, 1]) == 1 and bool(d.any())
    assert isinstance(np.exp(d), cp.ndarray) and isinstance(np.concatenate([d, d]), cp.ndarray)
    assert isinstance(d * np.float32(2) + 1.5, cp.ndarray)                      # scalars mix freely
    e = d
    e += 1
    assert e is d and d.get()[0, 0] == 1.0                                       # in place keeps the object
    assert f"{d.max():.1f}" == "6.0"
    d[np.array([0])] = np.zeros(3)                                               # CuPy converts indices/values
    assert not d.get()[0].any() and cp.memory.implicit_h2d >= 2
    assert cp.get_array_module(d) is cp and cp.get_array_module(np.ones(1)) is np


def test_transfers_are_counted():
    cp.memory.reset()
    h = np.arange(10, dtype=np.float32)
    d = cp.asarray(h)
    d.set(h * 2)
    out = np.empty_like(h)
    d.get(out=out)
    back = cp.asnumpy(d)
    assert (cp.memory.h2d, cp.memory.h2d_bytes, cp.memory.d2h, cp.memory.d2h_bytes) == (2, 80, 2, 80)
    assert (out == h * 2).all() and (back == h * 2).all() and type(back) is np.ndarray
    assert backend.to_numpy(d).sum() == 90 and cp.memory.d2h == 3


def test_device_bytes_follow_owners_not_views():
    gc.collect()
    before = cp.memory.used
    a = cp.zeros((256, 256), dtype=np.float32)                                   # 256 KiB
    assert cp.memory.used - before == a.nbytes
    v = a.reshape(-1)[::2]
    w = a.T
    assert cp.memory.used - before == a.nbytes and v.base is a and w.base is a and a.base is None
    a2 = a.copy()
    assert cp.memory.used - before == 2 * a.nbytes
    cp.memory.reset_peak()
    del a, v, w, a2
    gc.collect()
    assert cp.memory.used == before and cp.memory.peak == before + 2 * 256 * 256 * 4
    assert cp.get_default_memory_pool().used_bytes() == cp.memory.used


def test_cuda_array_interface_is_the_memory_mpi_reads():
    d = cp.arange(4, dtype=np.int64)
    iface = d.__cuda_array_interface__
    assert iface["shape"] == (4,) and iface["typestr"] == "<i8" and iface["strides"] is None
    assert backend.is_device_array(d) and not backend.is_device_array(np.ones(1))
    from mpi4py import MPI
    out = cp.zeros(4, dtype=np.int64)
    MPI.COMM_SELF.Allreduce(d, out)                # mpi4py takes the pointer: what a CUDA-aware MPI gets
    assert (out.get() == [0, 1, 2, 3]).all()


def test_devices_streams_and_random():
    assert cp.cuda.runtime.getDeviceCount() >= 1
    cp.cuda.Device(0).use()
    before = cp.memory.syncs
    cp.cuda.get_current_stream().synchronize()
    assert cp.memory.syncs == before + 1
    with pytest.raises(RuntimeError):
        cp.cuda.Device(cp.cuda.runtime.getDeviceCount())
    u = cp.random.RandomState(3).random_sample((2, 2), dtype=np.float32)
    assert isinstance(u, cp.ndarray) and u.dtype == np.float32
    x = cp.zeros(3)
    cp.scatter_add(x, cp.asarray(np.array([0, 0, 2])), cp.ones(3))
    assert x.get().tolist() == [2.0, 0.0, 1.0]
    p = cp.empty_pinned((8,), np.float32)
    assert type(p) is np.ndarray and cp.memory.pinned_bytes >= 32
