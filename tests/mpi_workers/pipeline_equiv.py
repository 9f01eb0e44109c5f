"""Pipeline equivalence worker: every schedule on this launch's pp (x dp) ranks against one process.

    mpiexec -n N python tests/mpi_workers/pipeline_equiv.py PP [DP]      (N = PP * DP)

For each case (schedule, micro-batches, virtual stages) trains a tiny float64 GPT for 5 steps:
the stage's parameters in a FlatParameters, PipelineEngine.step_grads on this replica's rows
of the global batch (one seeded Batcher on every rank), with dp > 1 the flat gradient
averaged over dp by a plain Communicator.all_reduce, the global gradient norm clipped
(PipelineEngine.clip_grad_norm), AdamW. The single-process reference (whole GPT, same seed,
same batches) runs on every rank; each stage parameter (both copies of the tied wte
included) and each loss must match within 1e-10 relative (max |a - b| / max |b|). Then the
bad layouts: each must raise PipelineConfigError with the same line on every rank. Prints
"case ..." and "bad ..." lines from rank 0 and "N failures" at the end; exit 1 if any.
"""
import sys

import numpy as np

from collectives import Mesh
from engine.data import Batcher
from engine.flat import FlatParameters
from engine.optim import AdamW, clip_grad_norm_
from models.gpt import GPT, GPTConfig
from parallel.pipeline import PipelineConfigError, PipelineEngine, PipelineStage
from compare import rel

PP = int(sys.argv[1])
DP = int(sys.argv[2]) if len(sys.argv) > 2 else 1
CFG = GPTConfig(block_size=8, vocab_size=37, n_layer=8, n_head=2, n_embd=12)
B, STEPS, SEED, CLIP, TOL, DT = 24, 5, 3, 0.5, 1e-10, "float64"
OPT = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, size=3000).astype(np.uint16)
CASES = [("gpipe", 4, 1), ("1f1b", 3, 1), ("1f1b", 6, 1), ("interleaved", 4, 2), ("zb-h1", 6, 1), ("zb-h1", 2, 1)]
mesh = Mesh(dp=DP, pp=PP)
R = mesh.world.rank


def lr_at(step):
    return OPT["lr"] * (step + 1) / STEPS


def reference():
    m = GPT(CFG, np.random.default_rng(SEED)).astype(DT)
    flat = FlatParameters(m.named_parameters())
    opt = AdamW(flat.data[DT], flat.grad[DT], flat.decay_mask[DT], **OPT)
    batcher, losses = Batcher(TOKENS, B, CFG.block_size, SEED), []
    for step in range(STEPS):
        flat.zero_grad()
        x, y = batcher.next()
        loss = m(x, y)[1]
        loss.backward()
        clip_grad_norm_(flat.grad[DT], CLIP)
        opt.step(lr_at(step))
        losses.append(loss.item())
    return losses, {n: p.data.copy() for n, p in m.named_parameters()}


def pipelined(schedule, micro, v):
    stage = PipelineStage(GPT(CFG, np.random.default_rng(SEED)).astype(DT), mesh.pp_rank, PP, v)
    flat = FlatParameters(stage.named_parameters())
    opt = AdamW(flat.data[DT], flat.grad[DT], flat.decay_mask[DT], **OPT)
    eng = PipelineEngine(mesh, CFG, stage, schedule, micro, v)
    batcher, losses, b = Batcher(TOKENS, B, CFG.block_size, SEED), [], B // DP
    d = mesh.dp_rank
    for step in range(STEPS):
        flat.zero_grad()
        x, y = batcher.next()                                           # (B, T): the global batch
        loss = eng.step_grads(x[d * b:(d + 1) * b], y[d * b:(d + 1) * b])   # (B/dp, T): this replica
        if DP > 1:
            mesh.dp_comm.all_reduce(flat.grad[DT], op="avg")
            loss = float(mesh.dp_comm.all_reduce(np.array([loss]), op="avg")[0])
        eng.clip_grad_norm(CLIP)
        opt.step(lr_at(step))
        losses.append(loss)
    return losses, {n: p.data.copy() for n, p in stage.named_parameters()}, eng



failures = 0
ref_losses, ref_params = reference()
for schedule, micro, v in CASES:
    losses, params, eng = pipelined(schedule, micro, v)
    err_loss = rel(losses, ref_losses)
    err_param = max(rel(params[n], ref_params[n]) for n in params)
    ok = err_loss <= TOL and err_param <= TOL and all(n in ref_params for n in params)
    # every parameter of the model lives on some stage of each replica
    names = mesh.pp_comm.all_gather(np.array([len(params) - (1 if eng.stage.tied and eng.stage.is_last else 0)]))
    ok = ok and int(names.sum()) == len(ref_params)
    bad = mesh.world.all_reduce(np.array([0 if ok else 1]))[0]
    failures += int(bad > 0)
    if R == 0:
        print(f"case pp={PP} dp={DP} {schedule} m={micro} v={v}: loss rel err {err_loss:.2e}, "
              f"param rel err {err_param:.2e}, peak held {eng.peak_held} {'ok' if bad == 0 else 'FAIL'}", flush=True)


def bad_case(what, fn):
    global failures
    try:
        fn()
        msg = "no error"
    except PipelineConfigError as e:
        msg = str(e)
    lines = mesh.world.all_gather(np.frombuffer(msg.encode().ljust(200)[:200], dtype=np.uint8).copy())
    same = all(bytes(lines[i * 200:(i + 1) * 200]) == bytes(lines[:200]) for i in range(mesh.world.size))
    ok = same and msg != "no error" and "\n" not in msg
    failures += int(not ok)
    if R == 0:
        print(f"bad {what}: {msg} {'ok' if ok else 'FAIL'}", flush=True)


def engine_for(cfg, schedule, micro, v):
    stage = PipelineStage(GPT(cfg, np.random.default_rng(SEED)), mesh.pp_rank, PP, v)
    return PipelineEngine(mesh, cfg, stage, schedule, micro, v)


small = GPTConfig(block_size=8, vocab_size=37, n_layer=PP - 1, n_head=2, n_embd=12)
bad_case("pp>layers", lambda: engine_for(small, "1f1b", 2, 1))
bad_case("interleaved layers", lambda: engine_for(CFG, "interleaved", PP, 3))
bad_case("batch split", lambda: engine_for(CFG, "1f1b", 5, 1).step_grads(np.zeros((12, 8), np.int64),
                                                                          np.zeros((12, 8), np.int64)))
bad_case("schedule name", lambda: engine_for(CFG, "pipedream", 2, 1))
if R == 0:
    print(f"{failures} failures", flush=True)
sys.exit(1 if failures else 0)
