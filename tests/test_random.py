"""engine/random.py: counter-based draws are a pure function of (seed, step, micro, layer,
site, row, token, feature), so every split of rows and tokens draws one process's numbers."""
import numpy as np
import pytest

from engine.random import SITES, CounterRNG, key_of, mix, mix_int
from parallel.sequence.split import positions


def test_mixer_on_arrays_equals_the_python_int_version():
    z = np.array([0, 1, 2**63, 2**64 - 1, 12345678901234567], dtype=np.uint64)
    assert [int(v) for v in mix(z)] == [mix_int(int(v)) for v in z]
    assert key_of(1, 2, 3) != key_of(1, 3, 2) != key_of(2, 1, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_uniforms_are_in_range_and_look_uniform(dtype):
    u = CounterRNG(7).uniform(0, SITES["attn"], (16, 64, 128), dtype=dtype)
    assert u.dtype == dtype and u.shape == (16, 64, 128)
    assert u.min() >= 0 and u.max() < 1
    counts = np.histogram(u, bins=16, range=(0, 1))[0]
    expected = u.size / 16                                   # chi-square, 15 dof: 99.9% below 37.7
    assert ((counts - expected) ** 2 / expected).sum() < 37.7
    assert abs(np.corrcoef(u[:, :, :-1].ravel(), u[:, :, 1:].ravel())[0, 1]) < 0.01   # neighbours


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_device_draws_are_the_host_draws(dtype):
    """like= a device array draws on the device (the path dropout and the sparse layers take):
    bit for bit the host's numbers, for a located slice of rows and tokens too."""
    from engine.backend import get_array_module, to_device, to_numpy
    rng, like = CounterRNG(3), to_device(np.zeros(1, np.float32))
    with rng.located(rows=[1, 2], pos=[0, 3]):
        host = rng.uniform(1, SITES["attn"], (2, 2, 5), dtype=dtype)
        dev = rng.uniform(1, SITES["attn"], (2, 2, 5), dtype=dtype, like=like)
    assert get_array_module(dev) is get_array_module(like) and dev.dtype == dtype
    np.testing.assert_array_equal(to_numpy(dev), host)


def test_every_key_part_changes_the_draws():
    rng = CounterRNG(1)
    base = rng.uniform(2, 1, (2, 3, 4))
    rng.set_step(1)
    assert not np.array_equal(rng.uniform(2, 1, (2, 3, 4)), base)
    rng.set_step(0, micro=1)
    assert not np.array_equal(rng.uniform(2, 1, (2, 3, 4)), base)
    rng.set_step(0)
    assert np.array_equal(rng.uniform(2, 1, (2, 3, 4)), base)              # no hidden state
    assert not np.array_equal(rng.uniform(3, 1, (2, 3, 4)), base)          # layer
    assert not np.array_equal(rng.uniform(2, 2, (2, 3, 4)), base)          # site
    assert not np.array_equal(CounterRNG(2).uniform(2, 1, (2, 3, 4)), base)   # seed
    assert len(np.unique(base)) == base.size


def test_any_split_of_rows_and_tokens_draws_the_whole_batch_numbers():
    rng = CounterRNG(3)
    rng.set_step(5, micro=1)
    B, T, C = 6, 8, 5
    whole = rng.uniform(4, 2, (B, T, C))
    for lo, hi in ((0, 3), (3, 6), (2, 5)):                     # dp replicas, micro-batches
        with rng.located(rows=np.arange(lo, hi)):
            np.testing.assert_array_equal(rng.uniform(4, 2, (hi - lo, T, C)), whole[lo:hi])
    for layout in ("contiguous", "zigzag"):                      # sp ranks
        for r in range(2):
            pos = positions(T, r, 2, layout)
            with rng.located(rows=np.arange(1, 3), pos=pos):
                np.testing.assert_array_equal(rng.uniform(4, 2, (2, len(pos), C)), whole[1:3][:, pos])
    with rng.located(rows=[0, 1]):
        with pytest.raises(ValueError, match="rows"):
            rng.uniform(4, 2, (3, T, C))


def test_scalar_is_per_step_and_layer_only():
    rng = CounterRNG(9)
    a = rng.scalar(1, SITES["ffn_coin"])
    with rng.located(rows=[5, 6], pos=[3]):
        assert rng.scalar(1, SITES["ffn_coin"]) == a
    assert rng.scalar(2, SITES["ffn_coin"]) != a
    rng.set_step(1)
    assert rng.scalar(1, SITES["ffn_coin"]) != a
    assert 0 <= a < 1
