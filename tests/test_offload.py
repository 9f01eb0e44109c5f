"""ZeRO-Offload (parallel/data/offload.py, --offload optimizer) under the device double
(ENGINE_DEVICE=gpu-emulated, engine/device_double.py): one worker launch per rank count for
exactness, resume and the device-byte formulas (tests/mpi_workers/offload_equiv.py); train.py
with the flag against train.py without it, and resumed from its own checkpoint; the refusals
(CPU, ZeRO 0/3, pp/sp/tp, compression), one line and exit 2 on every rank, in one launch."""
import json

import numpy as np
import pytest

from mpi_util import describe, losses, run_mpi

EMULATED = {"ENGINE_DEVICE": "gpu-emulated"}
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--eval-iters", "1", "--eval-interval", "0", "--dtype", "float64", "--seed", "3", "--mem-trace-interval",
        "1000", "--max-steps", "4"]


@pytest.mark.parametrize("n", [1, 2])
def test_offload_is_exact_resumes_and_meets_the_device_formulas(n):
    proc = run_mpi(n, "offload_equiv.py", timeout=180, env=EMULATED)
    assert proc.returncode == 0, describe(proc)
    cases = [line for line in proc.stdout.splitlines() if line.startswith("case ")]
    assert len(cases) == 4 + 1 + 6 and all(line.endswith(" ok") for line in cases), describe(proc)
    assert sum("bytes stage=" in line for line in cases) == 6 and "0 failures" in proc.stdout, describe(proc)


def test_train_with_offload_equals_train_without_and_resumes(tmp_path, corpus):
    """train.py --dp 2 --zero 2 in float64, 4 steps: with --offload optimizer (checkpoints at 2
    and 4), without it, and with it resumed from its step_2: the same losses and final
    parameters within 1e-10."""
    from parallel.checkpoint import consolidate
    proc = run_mpi(2, "offload_train_cli.py", tmp_path, corpus, *TINY, "--dp", "2", "--zero", "2", timeout=180,
                   env=EMULATED)
    assert proc.returncode == 0 and "DONE" in proc.stdout, describe(proc)
    for tag, on in (("off", True), ("plain", False), ("resumed", True)):
        assert f"CASE {tag} rc=0 offloaded={on}" in proc.stdout, describe(proc)
    got = {tag: [loss for _, (loss, _) in sorted(losses(str(tmp_path / f"{tag}.jsonl")).items())]
           for tag in ("off", "plain", "resumed")}
    assert len(got["off"]) == 4 and len(got["resumed"]) == 2
    np.testing.assert_allclose(got["off"], got["plain"], rtol=1e-10, atol=0)
    np.testing.assert_allclose(got["resumed"], got["off"][2:], rtol=1e-10, atol=0)
    params = {tag: consolidate(str(tmp_path / tag / "step_4")) for tag in ("off", "plain", "resumed")}
    for tag in ("plain", "resumed"):
        assert params[tag].keys() == params["off"].keys()
        for name, ref in params["off"].items():
            np.testing.assert_allclose(params[tag][name], ref, rtol=1e-10, atol=1e-12, err_msg=f"{tag} {name}")


REFUSED = [("on the cpu", ["--dp", "2", "--zero", "2", "--offload", "optimizer"], "needs --device gpu"),
           ("zero 3", ["--dp", "2", "--zero", "3", "--offload", "optimizer"], "needs --zero 1 or 2"),
           ("zero 0", ["--dp", "2", "--offload", "optimizer"], "needs --zero 1 or 2"),
           ("pp", ["--pp", "2", "--zero", "1", "--offload", "optimizer"], "with --pp 2 is not supported yet"),
           ("sp", ["--sp", "2", "--zero", "1", "--offload", "optimizer"], "with --sp 2 is not supported yet"),
           ("tp", ["--tp", "2", "--zero", "1", "--offload", "optimizer"], "with --tp 2 is not supported yet"),
           ("compressed", ["--dp", "2", "--zero", "2", "--quant-grads", "int8", "--offload", "optimizer"],
            "with compressed communication")]


def test_offload_refusals_are_one_line_on_every_rank(tmp_path):
    """Under ENGINE_DEVICE=cpu (the default device cpu): each case exits 2 with one line on both
    ranks and writes nothing; every layout refusal comes before the device check."""
    cases = [{"name": name, "argv": [*argv, "--out-dir", str(tmp_path / "out")], "watch": [str(tmp_path)]}
             for name, argv, _ in REFUSED]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = run_mpi(2, "bad_inputs.py", tmp_path / "cases.json", timeout=120, env={"ENGINE_DEVICE": "cpu"})
    assert proc.returncode == 0, describe(proc)
    results = {r["name"]: r for r in (json.loads(line[5:]) for line in proc.stdout.splitlines()
                                      if line.startswith("CASE "))}
    assert sorted(results) == sorted(name for name, _, _ in REFUSED), describe(proc)
    for name, _, words in REFUSED:
        r = results[name]
        lines = r["lines"][0]
        assert r["rcs"] == [2, 2] and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r
        assert all(ls == lines for ls in r["lines"]) and r["same"] and r["stdout"] == ["", ""], r
