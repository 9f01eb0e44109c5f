"""The alpha-beta-gamma cost model and algo="auto".

Source: Hockney 1994 (t = alpha + n beta for one n-byte message); Thakur, Rabenseifner &
Gropp 2005, section 3 (gamma: time per byte of a local reduction), whose per-algorithm
formulas are repeated in each algorithm's module docstring.

    alpha  seconds per message step (latency, here including the Python cost of a step)
    beta   seconds per byte sent between two ranks (1 / point-to-point bandwidth)
    gamma  seconds per byte reduced or copied locally (1 / memory bandwidth of np.add)

A time is linear in the three: t = c_alpha alpha + c_beta beta + c_gamma gamma, and
`coefficients` gives (c_alpha, c_beta, c_gamma). For p ranks, n bytes (the whole vector:
all-reduce/reduce-scatter input, all-gather output, all-to-all send buffer),
lg = ceil(log2 p), q = the largest power of two <= p and f = 1 if p != q (the fold of
recursive_doubling.py) else 0:

    all_reduce     recursive_doubling  log2(q) (a + n b + n g) + f (2a + 2n b + n g)
                   ring                2(p-1) a + 2(p-1)/p n b + (p-1)/p n g
                   rabenseifner        2 log2(q) a + 2(q-1)/q n b + (q-1)/q n g + f (2a + 2n b + n g)
                   tree                2 lg a + 2 lg n b + lg n g
    reduce_scatter recursive_halving   log2(q) a + (q-1)/q n (b + g) + f (2a + n (b + g) + n/p b)
                   ring                (p-1) a + (p-1)/p n (b + g)
    all_gather     recursive_doubling  log2(q) a + (q-1)/q n b + f (2a + n b)
                   ring                (p-1) a + (p-1)/p n b
                   bruck               lg a + (p-1)/p n b + n g
    broadcast      tree                lg (a + n b)
    reduce         tree                lg (a + n b + n g)
    all_to_all     pairwise            (p-1) a + (p-1)/p n b
    barrier        dissemination       lg a

`choose` (algo="auto") takes the cheapest; ties go to the first listed. Every rank must
see the same parameters (they do: defaults, or the same environment under mpiexec).
DEFAULT was fitted by bench/collectives.py (least squares over every hand-written
algorithm's measured times) on the development machine (2 cores, MPICH shared memory,
2 ranks); ENGINE_COMM_COST="alpha,beta,gamma" (seconds, seconds/byte, seconds/byte)
overrides it with the fit the benchmark prints for your machine.
"""
import math
import os
from functools import lru_cache

DEFAULT = (1.7e-5, 1.6e-10, 5.6e-11)   # alpha, beta, gamma: the fit of bench_collectives_n2 (2 ranks)
_params = None


def params():
    """(alpha, beta, gamma) in use: set_params(), else ENGINE_COMM_COST, else DEFAULT."""
    global _params
    if _params is None:
        env = os.environ.get("ENGINE_COMM_COST")
        try:
            values = tuple(float(v) for v in env.split(",")) if env else DEFAULT
        except ValueError:
            values = ()
        if len(values) != 3:
            raise ValueError(f"ENGINE_COMM_COST must be 'alpha,beta,gamma' (three numbers), got {env!r}")
        _params = values
    return _params


def set_params(alpha, beta, gamma):
    global _params
    _params = (float(alpha), float(beta), float(gamma))
    _choose.cache_clear()


def _shape(p):
    lg = math.ceil(math.log2(p)) if p > 1 else 0
    q = 1 << (p.bit_length() - 1)
    return lg, q, math.log2(q), 1 if p != q else 0


def _all_reduce(p, n):
    lg, q, lq, f = _shape(p)
    fold = (2 * f, 2 * f * n, f * n)
    return {
        "recursive_doubling": (lq + fold[0], lq * n + fold[1], lq * n + fold[2]),
        "ring": (2 * (p - 1), 2 * (p - 1) / p * n, (p - 1) / p * n),
        "rabenseifner": (2 * lq + fold[0], 2 * (q - 1) / q * n + fold[1], (q - 1) / q * n + fold[2]),
        "tree": (2 * lg, 2 * lg * n, lg * n),
    }


def _reduce_scatter(p, n):
    lg, q, lq, f = _shape(p)
    return {
        "recursive_halving": (lq + 2 * f, (q - 1) / q * n + f * (n + n / p), (q - 1) / q * n + f * n),
        "ring": (p - 1, (p - 1) / p * n, (p - 1) / p * n),
    }


def _all_gather(p, n):
    lg, q, lq, f = _shape(p)
    return {
        "recursive_doubling": (lq + 2 * f, (q - 1) / q * n + f * n, 0.0),
        "ring": (p - 1, (p - 1) / p * n, 0.0),
        "bruck": (lg, (p - 1) / p * n, n),
    }


MODELS = {
    "all_reduce": _all_reduce,
    "reduce_scatter": _reduce_scatter,
    "all_gather": _all_gather,
    "broadcast": lambda p, n: {"tree": (_shape(p)[0], _shape(p)[0] * n, 0.0)},
    "reduce": lambda p, n: {"tree": (_shape(p)[0], _shape(p)[0] * n, _shape(p)[0] * n)},
    "all_to_all": lambda p, n: {"pairwise": (p - 1, (p - 1) / p * n, 0.0)},
    "barrier": lambda p, n: {"dissemination": (_shape(p)[0], 0.0, 0.0)},
}


def algorithms(op):
    """The hand-written algorithms of a collective, in tie-break order."""
    return tuple(MODELS[op](2, 1))


def coefficients(op, algo, p, nbytes):
    """(c_alpha, c_beta, c_gamma) of `algo` for collective `op` on p ranks and n bytes."""
    if p == 1:
        return (0.0, 0.0, 0.0)
    return MODELS[op](p, nbytes)[algo]


def predict(op, algo, p, nbytes, alpha_beta_gamma=None):
    """Predicted seconds for `algo` of collective `op` on p ranks and n bytes."""
    a, b, g = alpha_beta_gamma or params()
    ca, cb, cg = coefficients(op, algo, p, nbytes)
    return ca * a + cb * b + cg * g


@lru_cache(maxsize=8192)
def _choose(op, p, nbytes, abg):
    a, b, g = abg
    costs = {algo: ca * a + cb * b + cg * g for algo, (ca, cb, cg) in MODELS[op](p, nbytes).items()}
    return min(costs, key=costs.get)


def choose(op, p, nbytes, alpha_beta_gamma=None):
    """algo="auto": the algorithm the model predicts fastest (with params(), or the given ones)."""
    return _choose(op, p, nbytes, tuple(alpha_beta_gamma or params()))


class Choices:
    """algo="auto" for one communicator of p ranks: choose() per (collective, bytes), remembered."""
    LIMIT = 4096                          # remembered choices; beyond, start over

    def __init__(self, p):
        self.p, self.cache = p, {}

    def get(self, op, nbytes):
        key = (op, nbytes)
        algo = self.cache.get(key)
        if algo is None:
            if len(self.cache) > self.LIMIT:
                self.cache.clear()
            algo = self.cache[key] = choose(op, self.p, nbytes)
        return algo

    def made(self, op, nbytes):
        """The choice already made for (op, nbytes), or None."""
        return self.cache.get((op, nbytes))
