"""Make the repository importable when pytest runs from a checkout without `pip install -e .`,
and the fixtures the train.py tests share."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# train.py's end-of-run plot and sample (train_ui.py) cost a second or two per run and the suite
# runs train.py many times: off here (and in every process the tests start), on in test_first_run.py
os.environ.setdefault("ENGINE_RUN_EXTRAS", "off")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small UTF-8 corpus (3000 lines "i squared is i*i."), written once per session; read only."""
    path = tmp_path_factory.mktemp("data") / "squares.txt"
    path.write_text("".join(f"{i} squared is {i * i}.\n" for i in range(3000)), encoding="utf-8")
    return str(path)


def _host_comparisons():
    """Under a device (ENGINE_DEVICE=gpu or gpu-emulated) the suite's NumPy assertions compare
    host copies: np.testing would refuse device arrays, as CuPy makes NumPy do. Only the
    assertions change; the code under test still has to keep its own arrays straight."""
    from engine import backend
    if backend.default_device() == "cpu":
        return

    def host(a):
        return backend.to_numpy(a) if backend.is_device_array(a) else a

    def wrap(assertion):
        def on_host(actual, desired, *args, **kwargs):
            return assertion(host(actual), host(desired), *args, **kwargs)
        on_host.__wrapped__ = assertion
        return on_host

    import numpy.testing as npt
    for name in ("assert_allclose", "assert_array_equal", "assert_equal", "assert_array_almost_equal",
                 "assert_array_less", "assert_almost_equal"):
        setattr(npt, name, wrap(getattr(npt, name)))


_host_comparisons()


# Test files with no device code path: under ENGINE_DEVICE=gpu-emulated (CI's second job,
# `-m "not cpu_only"`) they would run exactly what the CPU job runs. Everything else runs on
# both. The collectives' device buffers are tested by test_collectives_gpu.py, the watchdog
# and the supervisor by the CPU job: neither looks at where an array lives.
CPU_ONLY = {
    "test_bpe.py": "the tokenizer is pure Python on bytes",
    "test_schedules.py": "pipeline schedules are lists of actions, no arrays",
    "test_collectives_fuzz.py": "its cases build host buffers; device buffers: test_collectives_gpu.py",
    "test_collectives_hardening.py": "host buffers; device buffers: test_collectives_gpu.py",
    "test_comm_debug.py": "the arrival handshake moves host metadata only",
    "test_hang.py": "deadlines and blame on host messages; the watchdog never sees device arrays",
    "test_elastic.py": "the supervisor relaunches processes; replicas on a device: test_replicas.py",
    "test_elastic_ulfm.py": "Open MPI's ULFM job (pytest -m ulfm) runs on the CPU",
    "test_ulfm.py": "Open MPI's ULFM job (pytest -m ulfm) runs on the CPU",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = CPU_ONLY.get(os.path.basename(str(item.fspath)))
        if reason is not None:
            item.add_marker(pytest.mark.cpu_only(reason))
