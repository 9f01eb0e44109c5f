"""consolidate.py (parallel/checkpoint.py ``consolidate``) on an interleaved-pipeline checkpoint:
rank 0 of pp = 2 with v = 2 holds h.0 and h.2, rank 1 h.1 and h.3, yet the exported AdamW
moments are in one process's flat order, equal to a one-process run's within 1e-9 (float64),
and the file's manifest has the step counts of the moments."""
import json

import numpy as np

from mpi_util import TRAIN, describe, run_mpi

TINY = ["--n-layer", "4", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "8",
        "--eval-iters", "1", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup", "2", "--dtype", "float64",
        "--max-steps", "2", "--eval-interval", "2", "--ckpt-interval", "0", "--keep", "0"]


def test_interleaved_pipeline_moments_consolidate_in_one_process_order(tmp_path):
    from consolidate import write
    from engine.io import load_safetensors
    data = tmp_path / "squares.txt"
    data.write_text("".join(f"{i} squared is {i * i}.\n" for i in range(500)), encoding="utf-8")
    runs = {"one": (1, []), "pp": (2, ["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "2"])}
    files = {}
    for tag, (n, args) in runs.items():
        proc = run_mpi(n, TRAIN, "--data", data, *TINY, *args, "--out-dir", tmp_path / tag, timeout=180)
        assert proc.returncode == 0, describe(proc)
        files[tag], meta = load_safetensors(write(str(tmp_path / tag), str(tmp_path / f"{tag}.safetensors"),
                                                  optim=True))
        assert json.loads(meta["manifest"])["optim"] == {"float64": {"step": 2}}, tag   # pipeline too
    want, got = files["one"], files["pp"]
    assert sorted(got) == sorted(want) and "optim.float64.exp_avg" in want
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-14, err_msg=name)


def test_an_existing_output_is_replaced_only_with_overwrite(tmp_path, capsys):
    import consolidate
    (tmp_path / "model.safetensors").write_bytes(b"someone's model")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text("{}")
    for argv, words in (([tmp_path / "model.safetensors"], "model.safetensors already exists; pass --overwrite"),
                        ([tmp_path / "gpt2", "--hf"], "gpt2 already holds config.json; pass --overwrite")):
        assert consolidate.main([str(tmp_path / "no-ckpt"), *map(str, argv)]) == 2    # refused before reading
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1
    assert (tmp_path / "model.safetensors").read_bytes() == b"someone's model"
    assert consolidate.main([str(tmp_path / "no-ckpt"), str(tmp_path / "model.safetensors"), "--overwrite"]) == 2
    assert "no-ckpt" in capsys.readouterr().err               # with --overwrite it gets to the checkpoint


def test_an_unwritable_output_is_refused_before_any_shard_is_read(tmp_path, capsys):
    import consolidate
    (tmp_path / "a-file").write_text("x")
    for out, words in (("/proc/model.safetensors", "no file can be created in /proc"),
                       (str(tmp_path / "a-file" / "m.safetensors"), "which is a file"),
                       (str(tmp_path / "a-file" / "gpt2"), "which is a file")):
        hf = ["--hf"] if out.endswith("gpt2") else []
        assert consolidate.main([str(tmp_path / "no-ckpt"), out, *hf]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out} ") and words in err and err.count("\n") == 1, err
