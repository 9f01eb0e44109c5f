"""LSH self-attention (Kitaev et al. 2020, "Reformer: The Efficient Transformer", arXiv 2001.04451,
section 2): causal, shared query-key, chunked, several hash rounds.

    k_j = q_j / |q_j|                              shared QK: keys are the unit queries (2.2)
    h_r(x) = argmax([x R_r ; -x R_r])              R_r (d, n_buckets/2) random rotation of round r (2.1)
    per round r: sort the tokens by (h_r, position), cut the sorted order into chunks of c tokens;
    query i sees key j iff  h_r(j) = h_r(i),  chunk(j) in {chunk(i), chunk(i) - 1},  j <= i
    scores s_ij = q_i . k_j / sqrt(d); per round o_r = softmax(s) v and lse_r = log sum_j e^{s_ij}
    rounds combined by their log-sum-exp (2.3):  LSE = log sum_r e^{lse_r},  O = sum_r e^{lse_r - LSE} o_r

A token attends to itself only when it sees nothing else (2.2; Trax lowers the self score by
1e5). Here the self key is dropped from a row that sees another key (e^{-1e5} is 0 in float64
anyway), and a round in which the token sees only itself ("lone") has its lse lowered by 1e5
unless every round is lone: the same function, without the 1e5 in any lse, whose rounding
(1e5 eps = 1e-11) would otherwise leak into the round weights.

A key seen in two rounds is counted twice (no duplicate correction). Backward by recomputation
from O and each round's lse (the FlashAttention-2 rule of engine/ops/attention.py): with
w_r = e^{lse_r - LSE} and D = rowsum(dO * O), each round's scores get

    dS_r = w_r P_r (dO V^T - D),   dQ = scale dS K,   dK = scale dS^T Q,   dV = w_r P_r^T dO

and dK flows into dQ through the normalisation, dq += (dk - k (k . dk)) / |q|. The buckets are
piecewise constant in q: no gradient through the hash.

Cost per round: a sort of T keys, B H T 2c D multiply-adds for the scores and as many for the
values (against B H T^2 D for full attention); memory: one (B, H, T/c, c, 2c) score tile per
round, and for backward q, v, O, LSE and each round's sort and lse. Any T: the sequence is
padded to a multiple of c with tokens in a bucket after every real one, so they sort last and
move no real token's chunk. ``reference=True`` computes the same function as full (T, T)
attention under the bucket-and-chunk mask, by ordinary autograd on engine ops (for tests).
The rotations are the caller's (models/terraformer.py draws them from the counter-based
generator), so the buckets, and every output, are functions of the seed and the token alone:
independent of how the batch is split.
"""
import math

import numpy as np

from ..autograd import Function, Tensor
from ..backend import get_array_module

SELF_PENALTY = 1e5                     # Reformer: the weight of a round where a token sees only itself
_NEG_INF = float("-inf")


def lsh_buckets(x, rotations):
    """Bucket ids (R, B, H, T) of x (B, H, T, D) under rotations (R, D, n_buckets/2); None: one
    bucket, (1, B, H, T) zeros."""
    xp = get_array_module(x)
    if rotations is None:
        return xp.zeros((1,) + x.shape[:3], dtype=np.int64)
    rot = xp.asarray(rotations, dtype=x.dtype)
    proj = xp.einsum("bhtd,rdn->rbhtn", x, rot)                       # (R, B, H, T, nb/2)
    return xp.concatenate([proj, -proj], axis=-1).argmax(axis=-1).astype(np.int64)   # (R, B, H, T)


def unit_keys(q):
    """k = q / |q| on arrays (B, H, T, D); also returns |q| (B, H, T, 1), floored at 1e-30."""
    xp = get_array_module(q)
    norm = xp.maximum(xp.sqrt((q * q).sum(axis=-1, keepdims=True)), 1e-30)
    return q / norm, norm


def _take(a, perm):
    """a (B, H, T, ...) reordered along T by perm (B, H, T)."""
    idx = perm.reshape(perm.shape + (1,) * (a.ndim - 3))
    return get_array_module(a).take_along_axis(a, idx, axis=2)


def _chunks(a, c):
    """a (B, H, n c, ...) -> its chunks (B, H, n, c, ...), a view."""
    B, H, T = a.shape[:3]
    return a.reshape((B, H, T // c, c) + a.shape[3:])


def _window(a, c, fill):
    """Each chunk of a (B, H, n c, ...) behind the chunk before it, (B, H, n, 2c, ...), in one
    array; chunk 0's look-back is ``fill``."""
    ch = _chunks(a, c)                                                 # (B, H, n, c, ...)
    out = get_array_module(a).empty(ch.shape[:3] + (2 * c,) + ch.shape[4:], dtype=a.dtype)
    out[:, :, :, c:] = ch
    out[:, :, 1:, :c] = ch[:, :, :-1]                                  # chunk j-1 in front of chunk j
    out[:, :, 0, :c] = fill
    return out


class _Round:
    """One hash round on padded arrays: the sort, the chunk windows, the masked scores.

    Within one bucket the sorted order is the position order, so a window key (sorted index
    (j-1) c + kk, query jc + qq) of the query's bucket precedes it iff kk <= c + qq: the causal
    mask is one static (c, 2c) pattern, and the self key of query qq is window key c + qq."""

    def __init__(self, b, c):
        xp = get_array_module(b)
        T = b.shape[-1]
        self.c = c
        self.perm = xp.argsort(b * T + xp.arange(T), axis=-1, kind="stable")   # (B, H, T) by (bucket, pos)
        self.inv = xp.argsort(self.perm, axis=-1)
        sb = _take(b, self.perm)
        self.bw, self.bc = _window(sb, c, -1), _chunks(sb, c)          # buckets of keys / queries
        self.future = xp.arange(2 * c)[None, :] > c + xp.arange(c)[:, None]   # (c, 2c)

    def scores(self, q, k, scale, mask_self):
        """Masked scores (B, H, n, c, 2c) of the sorted queries against their windows' keys, the
        chunked queries (B, H, n, c, D), the windows' keys (B, H, n, 2c, D) and the lone rows."""
        xp, c = get_array_module(q), self.c
        qc = _chunks(_take(q, self.perm), c)                          # (B, H, n, c, D)
        kw = _window(_take(k, self.perm), c, 0)                        # (B, H, n, 2c, D)
        s = qc @ kw.swapaxes(-1, -2)                                   # (B, H, n, c, 2c)
        s *= scale
        unseen = self.bw[..., None, :] != self.bc[..., :, None]       # another bucket (or no look-back)
        unseen |= self.future
        lone = None
        if mask_self:                                                  # the self key only where nothing else
            lone = unseen.sum(axis=-1) == 2 * c - 1                    # (B, H, n, c)
            qq = xp.arange(c)
            s[..., qq, c + qq] = xp.where(lone, s[..., qq, c + qq], _NEG_INF)
        s[unseen] = _NEG_INF
        return s, qc, kw, lone

    def values(self, v):
        return _window(_take(v, self.perm), self.c, 0)                 # (B, H, n, 2c, D)

    def unsort(self, a):
        """(B, H, n, c, ...) in sorted order -> (B, H, T, ...) in position order."""
        B, H = a.shape[:2]
        return _take(a.reshape((B, H, -1) + a.shape[4:]), self.inv)

    def unsort_keys(self, dw):
        """Gradients (B, H, n, 2c, D) of the windows' keys -> (B, H, T, D) in position order."""
        c = self.c
        d = dw[:, :, :, c:].copy()                                     # each chunk as itself
        d[:, :, :-1] += dw[:, :, 1:, :c]                               # ... and as the next one's look-back
        return _take(d.reshape(d.shape[:2] + (-1, d.shape[-1])), self.inv)


def self_rule(seen, is_self, mask_self):
    """(seen without the self key in rows that see another key, lone (...,): rows that see only
    themselves); mask_self False: (seen, None)."""
    if not mask_self:
        return seen, None
    lone = ~(seen & ~is_self).any(axis=-1)
    return seen & ~(is_self & ~lone[..., None]), lone


def lone_penalty(lone, dtype):
    """-1e5 (as dtype) for each round (R, ...) in which a token is lone, unless it is lone in every round."""
    if lone is None:
        return 0.0
    return (lone & ~lone.all(axis=0)).astype(dtype) * dtype.type(-SELF_PENALTY)


def _pad(qk, v, buckets, c):
    """Pad T to a multiple of c: zero tokens in bucket max + 1, after every real token."""
    xp = get_array_module(qk)
    T = qk.shape[2]
    extra = -T % c
    if not extra:
        return qk, v, buckets
    z = xp.zeros(qk.shape[:2] + (extra, qk.shape[3]), qk.dtype)
    sentinel = xp.full(buckets.shape[:-1] + (extra,), int(buckets.max()) + 1, dtype=buckets.dtype)
    return (xp.concatenate([qk, z], axis=2), xp.concatenate([v, z], axis=2),
            xp.concatenate([buckets, sentinel], axis=-1))


class LSHAttention(Function):
    """qk, v (B, H, T, D) -> O (B, H, T, D); options: buckets (R, B, H, T) ints, chunk c, mask_self."""

    def forward(self, qk, v, buckets=None, chunk=64, mask_self=True):
        xp = get_array_module(qk)
        self.T, self.c, self.mask_self = qk.shape[2], int(chunk), mask_self
        q, v, b = _pad(qk, v, buckets, self.c)
        k, _ = unit_keys(q)
        self.scale = 1.0 / math.sqrt(q.shape[-1])
        outs, lses, lones = [], [], []
        for r in range(b.shape[0]):
            rnd = _Round(b[r], self.c)
            s, _, _, lone = rnd.scores(q, k, self.scale, mask_self)
            m = s.max(axis=-1, keepdims=True)                          # finite: every token sees a key
            s -= m
            xp.exp(s, out=s)
            l = s.sum(axis=-1, keepdims=True)
            s /= l                                                     # P (B, H, n, c, 2c)
            outs.append(rnd.unsort(s @ rnd.values(v)))                 # (B, H, T, D)
            lses.append(rnd.unsort((m + xp.log(l))[..., 0]))           # (B, H, T)
            lones.append(None if lone is None else rnd.unsort(lone))
        lse = xp.stack(lses)                                           # (R, B, H, T): each round's softmax
        eff = lse + lone_penalty(None if not mask_self else xp.stack(lones), lse.dtype)
        LSE = xp.logaddexp.reduce(eff, axis=0)                         # (B, H, T)
        w = xp.exp(eff - LSE)                                          # (R, B, H, T) round weights
        o = sum(w[r][..., None] * outs[r] for r in range(len(outs)))   # (B, H, T, D)
        self.saved = (q, v, b, o, lse, w)
        return o[:, :, :self.T]

    def backward(self, g):
        xp = get_array_module(g)
        q, v, b, o, lse, w = self.saved
        do = xp.zeros_like(o)
        do[:, :, :self.T] = g                                          # padded rows: no gradient
        dvec = (do * o).sum(axis=-1)                                   # D = rowsum(dO * O), (B, H, T)
        k, norm = unit_keys(q)
        dq, dk, dv = xp.zeros_like(q), xp.zeros_like(q), xp.zeros_like(v)
        for r in range(b.shape[0]):
            rnd = _Round(b[r], self.c)
            s, qc, kw, _ = rnd.scores(q, k, self.scale, self.mask_self)
            chunked = lambda a: _chunks(_take(a, rnd.perm), self.c)    # (B, H, T, ...) -> (B, H, n, c, ...)
            s -= chunked(lse[r])[..., None]
            p = xp.exp(s, out=s)                                       # P_r (B, H, n, c, 2c)
            p *= chunked(w[r])[..., None]                              # w_r P_r
            doc = chunked(do)                                          # (B, H, n, c, D)
            dv += rnd.unsort_keys(p.swapaxes(-1, -2) @ doc)            # w_r P_r^T dO
            ds = doc @ rnd.values(v).swapaxes(-1, -2)                  # dO V^T
            ds -= chunked(dvec)[..., None]
            ds *= p
            ds *= self.scale                                           # dS / scale folded in
            dq += rnd.unsort(ds @ kw)
            dk += rnd.unsort_keys(ds.swapaxes(-1, -2) @ qc)
        dq += (dk - k * (k * dk).sum(axis=-1, keepdims=True)) / norm   # through k = q / |q|
        return dq[:, :, :self.T], dv[:, :, :self.T]


def lsh_mask(buckets, c, mask_self=True):
    """The bucket-and-chunk mask of each round as an additive bias (R, B, H, T, T), 0 where
    query i sees key j and -inf where it does not, and each round's lone_penalty (R, B, H, T)."""
    xp = get_array_module(buckets)
    R, B, H, T = buckets.shape
    pos = xp.arange(T)
    perm = xp.argsort(buckets * T + pos, axis=-1, kind="stable")
    chunk = xp.argsort(perm, axis=-1) // c                             # (R, B, H, T): chunk of each token
    dc = chunk[..., :, None] - chunk[..., None, :]
    seen = (buckets[..., :, None] == buckets[..., None, :]) & ((dc == 0) | (dc == 1)) & (pos[None, :] <= pos[:, None])
    seen, lone = self_rule(seen, xp.eye(T, dtype=bool), mask_self)
    return xp.where(seen, 0.0, _NEG_INF), lone_penalty(lone, np.dtype(np.float64)) + xp.zeros(buckets.shape)


def lsh_reference(qk, v, buckets, chunk, mask_self=True):
    """The same function as LSHAttention by full (T, T) attention under ``lsh_mask``, each
    round's softmax and the LSE combination written with engine ops (autograd backward)."""
    from . import basic as F
    xp = get_array_module(qk.data)
    norm = F.pow(F.sum(F.mul(qk, qk), axis=-1, keepdims=True), 0.5)
    k = F.div(qk, norm)                                                # unit keys
    s = F.mul(F.matmul(qk, F.swapaxes(k, -1, -2)), 1.0 / math.sqrt(qk.shape[-1]))   # (B, H, T, T)
    outs, lses = [], []
    for bias, pen in zip(*lsh_mask(buckets, chunk, mask_self)):
        sr = F.add(s, bias.astype(qk.dtype))
        m = Tensor(sr.data.max(axis=-1, keepdims=True))                # a constant shift: softmax ignores it
        e = F.exp(F.sub(sr, m))
        l = F.sum(e, axis=-1, keepdims=True)                           # (B, H, T, 1)
        outs.append(F.div(F.matmul(e, v), l))
        lses.append(F.add(F.log(l), m.data + pen[..., None]))
    M = Tensor(xp.max(xp.stack([t.data for t in lses]), axis=0))
    total = F.add(F.log(sum(F.exp(F.sub(t, M)) for t in lses)), M)    # LSE (B, H, T, 1)
    return sum(F.mul(F.exp(F.sub(t, total)), o) for t, o in zip(lses, outs))


def lsh_attention(qk, v, buckets, chunk, mask_self=True, reference=False):
    """LSH attention on Tensors qk, v (B, H, T, D) with bucket ids (R, B, H, T) (lsh_buckets):
    the chunked kernel, or with ``reference`` the full-mask computation."""
    if reference:
        return lsh_reference(qk, v, buckets, chunk, mask_self)
    return LSHAttention.apply(qk, v, buckets=buckets, chunk=chunk, mask_self=mask_self)


def lsh_decode(q, k_all, v_all, b_q, b_all, start, mask_self=True):
    """Attention of new tokens q (B, H, Tn, D) at positions start.. against the cache: unit keys
    k_all, v_all (B, H, t, D) and their buckets b_all (R, B, H, t), the new ones included last
    (b_q (R, B, H, Tn) are those). Each round a query sees every earlier key of its own bucket,
    the set the chunks approximate in training (equal to it when a window is one chunk);
    rounds combined by LSE. Arrays in, (B, H, Tn, D) out."""
    xp = get_array_module(q)
    t, Tn = k_all.shape[2], q.shape[2]
    qpos, kpos = xp.arange(start, start + Tn), xp.arange(t)
    s = q @ k_all.swapaxes(-1, -2) / math.sqrt(q.shape[-1])           # (B, H, Tn, t)
    outs, lses, lones = [], [], []
    for r in range(b_all.shape[0]):
        seen = (b_all[r][:, :, None, :] == b_q[r][..., None]) & (kpos[None, :] <= qpos[:, None])
        seen, lone = self_rule(seen, kpos[None, :] == qpos[:, None], mask_self)
        sr = xp.where(seen, s, _NEG_INF)
        m = sr.max(axis=-1, keepdims=True)
        p = xp.exp(sr - m)
        l = p.sum(axis=-1, keepdims=True)
        outs.append((p / l) @ v_all)                                   # (B, H, Tn, D)
        lses.append((m + xp.log(l))[..., 0])
        lones.append(lone)
    eff = xp.stack(lses) + lone_penalty(xp.stack(lones) if mask_self else None, q.dtype)
    w = xp.exp(eff - xp.logaddexp.reduce(eff, axis=0))                # (R, B, H, Tn)
    return sum(w[r][..., None] * o for r, o in enumerate(outs))
