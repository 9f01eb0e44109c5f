"""Argument errors never leave a rank waiting, and every rank gets the same bits
(tests/mpi_workers/hardening_worker.py, one launch per group)."""
import pytest

from mpi_util import describe, run_mpi


@pytest.mark.parametrize("group, n, env", [("debug", 3, {"ENGINE_COMM_DEBUG": "1"}), ("debug", 2, {"ENGINE_COMM_DEBUG": "1"}),
                                           ("local", 3, {}), ("pair", 2, {}), ("pair", 3, {})])
def test_hardening(group, n, env):
    proc = run_mpi(n, "hardening_worker.py", group, env=env, timeout=90)
    assert proc.returncode == 0 and f"hardening {group} N={n}: 0 failures" in proc.stdout, describe(proc)


def test_bad_timeout_variable_names_it():
    proc = run_mpi(1, "hardening_worker.py", "debug", env={"ENGINE_COMM_TIMEOUT": "abc"}, timeout=60)
    assert proc.returncode != 0 and "ENGINE_COMM_TIMEOUT must be a number of seconds, got 'abc'" in proc.stderr, \
        describe(proc)


def test_bad_cost_variable_names_it():
    proc = run_mpi(1, "hardening_worker.py", "local", env={"ENGINE_COMM_COST": "1e-5,abc,1e-10"}, timeout=60)
    assert proc.returncode != 0 and "ENGINE_COMM_COST must be 'alpha,beta,gamma'" in proc.stderr, describe(proc)
