"""train.py --offload optimizer against train.py without it, and resumed from its own step_2,
in ONE mpiexec launch under ENGINE_DEVICE=gpu-emulated (tests/test_offload.py).

    ENGINE_DEVICE=gpu-emulated mpiexec -n 2 python tests/mpi_workers/offload_train_cli.py OUT DATA [flags]

Cases run one after the other on the whole world (train_cases.Launch: the peak-FLOP/s matmul
skipped, the watchdog armed alike); rank 0 prints "CASE <tag> rc=<rc> offloaded=<bool>",
offloaded: whether the start-up layout line says the optimizer runs on the host, then "DONE".
"""
import contextlib
import io
import sys

from train_cases import Launch, train

CASES = {"off": ["--offload", "optimizer", "--ckpt-interval", "2", "--keep", "0"], "plain": [],
         "resumed": ["--offload", "optimizer", "--resume", "{out}/off/step_2"]}

launch, failed = Launch(sys.argv), False
for tag, args in CASES.items():
    argv = ["--data", launch.data, *launch.common, *(a.format(out=launch.out) for a in args),
            "--out-dir", launch.path(tag), "--metrics", launch.path(tag + ".jsonl")]
    log, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(err):
        rc = train.main(argv)
    if rc != 0:
        failed = True
        print(f"rank {launch.rank} case {tag} rc={rc}\n{log.getvalue()[-2000:]}\n{err.getvalue()[-2000:]}", flush=True)
    if launch.rank == 0:
        print(f"CASE {tag} rc={rc} offloaded={'optimizer offloaded to the host' in log.getvalue()}", flush=True)
if launch.rank == 0:
    print("DONE", flush=True)
sys.exit(1 if failed else 0)
