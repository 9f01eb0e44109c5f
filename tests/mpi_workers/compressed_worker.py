"""collectives/compressed.py against a reference built from every rank's input (gathered with
the MPI library's own all-gather, decoded here in the same order): bitwise equal for int8,
int4 and bf16, even and uneven blocks (zero-sized included), one hop and, where N = 4, two
hops over nodes of 2; the all-gather's output identical on every rank; error feedback keeps
the error accumulated over 80 reductions within one quantization's bound, while without it
the error grows past ten times that bound. Prints "case ... ok" lines and "N failures"."""
import sys

import numpy as np

from collectives import Communicator
from collectives.codecs import Codec
from collectives.compressed import ErrorFeedback, all_gather, reduce_scatter, two_hop_groups
from collectives.buffers import offsets

comm = Communicator()
N, r = comm.size, comm.rank
failures = []


def report(name, ok, detail=""):
    ok = bool(comm.all_reduce(np.array([0 if ok else 1], np.int64), algo="mpi")[0] == 0)
    if r == 0:
        print(f"case {name} {'ok' if ok else 'FAIL ' + detail}", flush=True)
    if not ok:
        failures.append(name)


def everyone(x):
    """(N, x.size): every rank's x."""
    return comm.all_gather(np.ascontiguousarray(x), algo="mpi").reshape(N, -1)


def dec(codec, x):
    out = np.empty(x.size, np.float32)
    return codec.decode(codec.encode(x), out)


def expect_one_hop(codec, xs, counts, op):
    offs = offsets(counts)
    acc = dec(codec, xs[0][offs[r]:offs[r + 1]])
    for k in range(1, N):
        acc += dec(codec, xs[k][offs[r]:offs[r + 1]])
    return acc / N if op == "avg" else acc


def expect_two_hop(codec, xs, counts, g):
    M, offs = N // g, offsets(counts)
    m, l = divmod(r, g)

    def chunk(x, ll):                                # hop 1's chunk for local rank ll
        return np.concatenate([x[offs[mm * g + ll]:offs[mm * g + ll + 1]] for mm in range(M)])
    acc = None
    for mm in range(M):                              # node mm's partial for local rank l
        part = None
        for ll in range(g):
            d = dec(codec, chunk(xs[mm * g + ll], l))
            part = d if part is None else part + d
        poff = offsets([counts[k * g + l] for k in range(M)])
        d = dec(codec, part[poff[m]:poff[m + 1]])
        acc = d if acc is None else acc + d
    return acc / N


rng = np.random.default_rng(7 + r)
shapes = {"even": [37] * N, "uneven": [5 + 11 * k for k in range(N)], "zeros": [0] + [300] * (N - 1)}
for kind in ("int8", "int4", "bf16"):
    codec = Codec(kind, block=16)
    for shape, counts in shapes.items():
        x = (rng.standard_normal(sum(counts)) * (1 + 10 * rng.random(sum(counts)))).astype(np.float32)
        xs = everyone(x)
        for op in ("avg", "sum"):
            got = reduce_scatter(comm, x, codec, counts=counts, op=op)
            want = expect_one_hop(codec, xs, counts, op)
            report(f"reduce_scatter {kind} {shape} {op} N={N}", np.array_equal(got, want))
        h = reduce_scatter(comm, x, codec, counts=counts, async_op=True)
        report(f"reduce_scatter {kind} {shape} async N={N}", np.array_equal(h.wait(), expect_one_hop(
            codec, xs, counts, "avg")))
        if N == 4:
            hops = two_hop_groups(comm, 2)
            got = reduce_scatter(comm, x, codec, counts=counts, hops=hops)
            report(f"reduce_scatter {kind} {shape} two hops N={N}", np.array_equal(got, expect_two_hop(
                codec, xs, counts, 2)))
        mine = x[:counts[r]]
        out = np.empty(sum(counts), np.float32)
        all_gather(comm, mine, out, codec, counts=counts)
        offs = offsets(counts)
        want = np.concatenate([dec(codec, xs[k][:counts[k]]) for k in range(N)]) if sum(counts) else out
        same = everyone(out.view(np.uint32).astype(np.float64))
        report(f"all_gather {kind} {shape} N={N}", np.array_equal(out, want) and (same == same[0]).all())


def accumulated(codec, feedback, hops, steps=80):
    """max over t of |sum_{s <= t} (exact mean - reduced)|, and one quantization's bound."""
    g = np.random.default_rng(100 + r)
    x = (g.standard_normal(64 * N) + 0.3).astype(np.float32)       # the same gradient every step: a bias
    counts = [64] * N
    exact = everyone(x).astype(np.float64).mean(axis=0)[r * counts[0]:(r + 1) * counts[0]]
    ef = ErrorFeedback() if feedback else None
    total, worst = np.zeros(counts[0]), 0.0
    for _ in range(steps):
        total += exact - reduce_scatter(comm, x, codec, counts=counts, feedback=ef, hops=hops)
        worst = max(worst, float(np.abs(total).max()))
    # |e| <= scale/2 = max|x + e| / 14, so |e| <= max|x| / 13; hop 2 quantizes node sums of
    # g values of x + e (plus its own residual); float32 adds: steps * 1e-6 * max|x|
    X = float(np.abs(everyone(x)).max())
    bound = X / 13 * (1 + 14 / 13 if hops else 1) + steps * 1e-6 * X
    return worst, bound


for hops_name in ("one hop", "two hops") if N == 4 else ("one hop",):
    hops = two_hop_groups(comm, 2) if hops_name == "two hops" else None
    codec = Codec("int4", block=16)
    with_fb, bound = accumulated(codec, True, hops)
    without, _ = accumulated(codec, False, hops)
    report(f"error feedback {hops_name} N={N}", with_fb <= bound and without > 10 * bound,
           f"with {with_fb:.3g} without {without:.3g} bound {bound:.3g}")
    if r == 0 and "-v" in sys.argv:
        print(f"with {with_fb:.3g} without {without:.3g} bound {bound:.3g}")

if r == 0:
    print(f"{len(failures)} failures", flush=True)
