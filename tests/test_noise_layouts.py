"""The invariant with randomness on: dropout 0.1 and the sparse FFN's coin and Gumbel noise
(and the sparse QKV layer where sp allows it) under dp, ZeRO 1-3, sp ring and Ulysses, pp with
every schedule, grad-accum, and pp x sp x dp on 8 ranks: 5 steps in float64 give one
process's losses, gradient norms, validation losses and final parameters within 1e-10
relative (tests/mpi_workers/noise_cli.py runs every case in ONE 8-rank launch)."""
import re

from mpi_util import describe, metrics, run_errors, run_mpi

TINY = ["--n-layer", "4", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "12",
        "--eval-iters", "2", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup", "2", "--dtype", "float64",
        "--max-steps", "5", "--eval-interval", "2", "--ckpt-interval", "0", "--keep", "0",
        "--dropout", "0.1", "--ffn-sparsity", "8", "--ffn-lowrank", "8", "--ffn-temperature", "0.5",
        "--ffn-hard-prob", "0.5"]
AGAINST = {"dp2-z1": "ref", "dp3-z3": "ref", "dp2sp2-ring-z2": "ref", "sp2-ulysses": "ref", "pp2-gpipe": "ref",
           "pp2-1f1b-ga2": "ref-ga2", "pp2-interleaved": "ref", "pp2-zb-h1": "ref", "dp2-z2-ga2": "ref-ga2",
           "pp4-1f1b": "ref", "dp2-qkv-z3": "ref-qkv", "sp2-ring-z3": "ref", "pp2dp2-qkv-z1": "ref-qkv",
           "sp4-ulysses-z1": "ref", "pp2sp2dp2-ring-1f1b-z1": "ref", "pp2sp2dp2-ulysses-interleaved-ga2": "ref-ga2"}
KEYS = ("loss", "grad_norm", "val_loss")
# The sparse QKV's key bias (``.bk``) is left out of the parameter comparison: adding q.bk to
# every logit of a row leaves the softmax unchanged, so its exact gradient is 0 and what it gets
# is rounding noise (1e-18), which AdamW's m / sqrt(v) scales up to steps of size lr in either
# direction; its value is noise on every layout alike, one process included.


def test_dropout_and_sparse_noise_equal_one_process_on_every_layout(corpus, tmp_path):
    from parallel.checkpoint import consolidate
    proc = run_mpi(8, "noise_cli.py", tmp_path, corpus, *TINY, timeout=420)
    assert proc.returncode == 0 and "DONE" in proc.stdout, describe(proc)
    rcs = dict(re.findall(r"^CASE (\S+) rc=(\d+)$", proc.stdout, re.M))
    assert rcs == {t: "0" for t in ["ref", "ref-ga2", "ref-qkv", *AGAINST]}, describe(proc)
    refs = {t: metrics(tmp_path / f"{t}.jsonl") for t in ("ref", "ref-ga2", "ref-qkv")}
    params = {t: consolidate(str(tmp_path / t)) for t in refs}
    assert refs["ref"][5]["loss"] != refs["ref-ga2"][5]["loss"] != refs["ref-qkv"][5]["loss"]
    worst = {}
    for tag, against in AGAINST.items():
        assert sorted(refs[against]) == [1, 2, 3, 4, 5], tag
        err, perr = run_errors(str(tmp_path), tag, refs[against], params[against], KEYS, lambda n: n.endswith(".bk"))
        worst[tag] = (err, perr)
        assert err < 1e-10 and perr < 1e-10, (tag, err, perr)
    print(worst)
