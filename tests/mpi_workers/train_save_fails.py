"""train.py whose checkpoint save fails at step FAIL_AT, as a full disk or a read-only out dir would:

    mpiexec -n N python tests/mpi_workers/train_save_fails.py FAIL_AT RANK MODE [train.py flags...]

MODE enospc: rank RANK's shard write raises OSError(ENOSPC) after writing 4 KiB of its
(temporary) file. MODE erofs: creating the checkpoint's temporary directory raises
OSError(EROFS) (rank 0 creates it). The hooks wrap parallel/checkpoint/sharded.py's
save_safetensors and begin_write from outside, so production code carries no test hooks.
"""
import errno
import os
import sys

import parallel.checkpoint.sharded as sharded
import train
from engine.io import atomic_open

fail_at, fail_rank, mode, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
now = {}
save, write, begin = train.save_checkpoint, sharded.save_safetensors, sharded.begin_write


def tracking(run, rec):
    now.update(step=run.step, rank=run.rank)
    return save(run, rec)


def full_disk(path, tensors, metadata=None):
    if now.get("step") == fail_at and now.get("rank") == fail_rank:
        with atomic_open(path) as f:
            f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return write(path, tensors, metadata)


def read_only(out_dir, step, pid=None):
    if now.get("step") == fail_at:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), out_dir)
    return begin(out_dir, step, pid)


train.save_checkpoint = tracking
sharded.save_safetensors, sharded.begin_write = full_disk, read_only
if mode not in ("enospc", "erofs"):
    sys.exit(f"unknown MODE {mode}")
if mode == "enospc":
    sharded.begin_write = begin
else:
    sharded.save_safetensors = write
sys.exit(train.main(argv))
