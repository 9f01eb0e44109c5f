"""Training under sequence parallelism equals one process, float64, in ONE 4-rank launch:

    mpiexec -n 4 python tests/mpi_workers/sp_train_worker.py

Layouts, each with ring attention and with Ulysses (3 heads: uneven over 2 and 4 ranks):
    sp=2        the world split into two sp pairs, each training the same model
    sp=4        the whole world one sp ring
    sp=2 x dp=2 Mesh(dp=2, sp=2); each dp replica takes half of the global batch; the flat
                gradients are all-reduced ONCE over all 4 ranks with scale 1/dp
    sp=2xdp=2avg the same, averaged over the 4 ranks (as a DDP/ZeRO over sp x dp would) with
                the loss share scaled by sp (SequenceParallel(loss_scale=sp))
Five AdamW steps with gradient clipping (as train.py) of a 2-layer GPT; every rank also
runs the one-process reference on the global batch and compares the losses and the
updated parameters, and the loss of a batch evaluated after training (sp.evaluate). Rank 0 prints "<layout> <mode> loss_err=<e> param_err=<e>" per run
and "DONE max_err=<e>".
"""
import numpy as np

from collectives import Communicator, Mesh
from engine.flat import FlatParameters
from engine.optim import AdamW, clip_grad_norm_
from models.gpt import GPT, GPTConfig
from parallel.sequence import SequenceParallel

world = Communicator()
R = world.rank
CFG = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=3, n_embd=12)
STEPS, B, T = 5, 4, 16
data = np.random.default_rng(7)
BATCHES = [(data.integers(0, 32, (B, T)), data.integers(0, 32, (B, T))) for _ in range(STEPS)]


def setup():
    model = GPT(CFG, rng=3).astype("float64")
    flat = FlatParameters(model.named_parameters())
    opt = AdamW(flat.data["float64"], flat.grad["float64"], flat.decay_mask["float64"], lr=3e-2,
                betas=(0.9, 0.99), weight_decay=0.1)
    return model, flat, opt


def step(flat, opt):
    clip_grad_norm_([flat.grad["float64"]], 1.0)
    opt.step()


def reference():
    model, flat, opt = setup()
    losses = []
    for x, y in BATCHES:
        flat.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        step(flat, opt)
    losses.append(model(*BATCHES[0])[1].item())
    return np.array(losses), flat.data["float64"].copy()


def sharded(sp_comm, mode, dp_rank=0, dp=1, grad_comm=None, average=False):
    """average: DDP/ZeRO style, gradients averaged over sp x dp, the loss share scaled by sp."""
    model, flat, opt = setup()
    sp = SequenceParallel(sp_comm, model, mode=mode, loss_scale=sp_comm.size if average else 1.0)
    losses = []
    rows = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)   # this dp replica's part of the batch
    for x, y in BATCHES:
        flat.zero_grad()
        loss = sp.forward_backward(x[rows], y[rows], reduce=False)
        scale = 1.0 / (dp * sp_comm.size) if average else 1.0 / dp
        sp.reduce_grads([flat.grad["float64"]], comm=grad_comm, scale=scale)
        if dp > 1:                                            # the logged loss: mean over replicas
            loss = float(grad_comm.all_reduce(np.array([loss]))[0]) / (dp * sp_comm.size)
        losses.append(loss)
        step(flat, opt)
    x, y = BATCHES[0]                                          # evaluation under sp, after training
    losses.append(sp.evaluate(x, y))
    return np.array(losses), flat.data["float64"]


ref_losses, ref_params = reference()
worst = 0.0
for mode in ("ring", "ulysses"):
    runs = [("sp=2", lambda: sharded(world.split(R // 2), mode)),
            ("sp=4", lambda: sharded(world, mode))]
    if world.size == 4:
        mesh = Mesh(dp=2, sp=2, world=world)
        runs.append(("sp=2xdp=2", lambda: sharded(mesh.sp_comm, mode, mesh.dp_rank, 2, world)))
        runs.append(("sp=2xdp=2avg", lambda: sharded(mesh.sp_comm, mode, mesh.dp_rank, 2, world, True)))
    for name, run in runs:
        losses, params = run()
        le = float(np.abs(losses - ref_losses).max() / np.abs(ref_losses).max())
        pe = float(np.abs(params - ref_params).max() / np.abs(ref_params).max())
        moved = float(np.abs(params - setup()[1].data["float64"]).max())
        le, pe = (float(world.all_reduce(np.array([e]), op="max")[0]) for e in (le, pe))
        worst = max(worst, le, pe)
        if R == 0:
            print(f"{name} {mode} loss_err={le:.3e} param_err={pe:.3e} moved={moved:.3e} "
                  f"losses={np.round(losses, 6).tolist()}", flush=True)
if R == 0:
    print(f"DONE max_err={worst:.3e}", flush=True)
