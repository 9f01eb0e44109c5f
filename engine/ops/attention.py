"""Scaled dot-product attention, blockwise with an online softmax (FlashAttention).

    O = softmax(scale * Q K^T + mask) V,      LSE_i = log sum_j exp(scale * q_i . k_j + mask_ij)

Forward (Dao et al. 2022, FlashAttention, Alg. 1; online softmax of Milakov & Gimelshein
2018): keys and values are visited in blocks of ``block_size``; each query row keeps a
running max m, a running sum l and an unnormalised output acc, and a new block rescales
them by exp(m_old - m_new). At the end O = acc / l and LSE = m + log l. Only a
(B, H, Tq, block) score tile exists at a time.

Backward (Dao 2023, FlashAttention-2, Alg. 2): nothing but O and LSE is kept; each block
recomputes P = exp(S - LSE) and, with D_i = rowsum(dO_i * O_i),
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - D),   dQ = scale dS K,   dK = scale dS^T Q.

Causal masks compare GLOBAL positions, query q_offset + i sees key k_offset + j iff
q_offset + i >= k_offset + j, so a rank holding one chunk of a sequence (ring attention,
parallel/sequence/model.py) calls the same kernels; blocks entirely in a row's future are skipped,
and a row that sees no key at all gets O = 0 and LSE = -inf. Partial results over disjoint
key sets combine with ``merge_attention`` (the LSE rule, as in picotron's ring attention):
    LSE = log(e^LSE1 + e^LSE2),   O = e^(LSE1 - LSE) O1 + e^(LSE2 - LSE) O2.

When all keys fit in one block (T <= block_size, the usual case for small models) the
``attention`` Function takes a single-block path and keeps P from the forward pass, so its
backward needs no recomputation. On the host that path shifts each (sequence, head)'s scores
by their overall max rather than each row's (``_shift``: any shift gives the same softmax, and
NumPy's max along short rows costs as much as the exp), falling back to row maxes when a row
would underflow.
"""
import math

import numpy as np

from ..autograd import Function, is_grad_enabled
from ..backend import get_array_module

_NEG_INF = float("-inf")
_ROW_FLOOR = math.exp(-60.0)   # a row whose exps sum below this sits 60 under the shift: shift it by its own max


def _blocks(Tq, Tk, causal, q_offset, k_offset, block_size):
    """Each key block [kb, ke) some query sees, as (i0, kb, ke, masked): rows i0: see at least
    key kb; ``masked`` says some of those rows do not see the whole block (diagonal block)."""
    out = []
    for kb in range(0, Tk, block_size):
        ke = min(kb + block_size, Tk)
        i0, masked = 0, False
        if causal:
            i0 = max(0, k_offset + kb - q_offset)          # first row whose position >= key kb's
            if i0 >= Tq:                                   # this block and all later: the future
                break
            masked = q_offset + i0 < k_offset + ke - 1     # row i0 misses the block's last key
        out.append((i0, kb, ke, masked))
    return out


def _rowsum(a):
    """Sum over the last axis, keeping it: a BLAS matrix-vector product with ones, several
    times faster than NumPy's reduction over short rows."""
    return (a @ get_array_module(a).ones(a.shape[-1], dtype=a.dtype))[..., None]


def _scores(q, k, scale, mask_at=None):
    """scale * q k^T, plus -inf where a query's global position precedes a key's.
    q (B, H, nq, D), k (B, H, nk, D) -> (B, H, nq, nk); ``mask_at`` = (q0, k0) global starts."""
    xp = get_array_module(q)
    kt = k.swapaxes(-1, -2)                                # (B, H, D, nk)
    if xp is np:                                           # OpenBLAS: a contiguous k^T makes the stacked GEMM
        s = q @ np.multiply(kt, scale, dtype=kt.dtype, order="C")   # ~1.3x faster (T 64, D 32); the copy scales
    else:
        s = q @ kt                                         # (B, H, nq, nk)
        s *= scale
    if mask_at is not None:
        nq, nk = s.shape[-2:]
        qi = xp.arange(mask_at[0], mask_at[0] + nq)[:, None]
        kj = xp.arange(mask_at[1], mask_at[1] + nk)[None, :]
        bias = xp.zeros((nq, nk), dtype=s.dtype)
        bias[qi < kj] = _NEG_INF                           # (nq, nk) additive causal mask
        s += bias
    return s


def _shift(s, rescore):
    """exp(s - m) of the scores s (B, H, nq, nk), its row sums l and the shift m (B, H, nq, 1).
    Softmax is the same for any shift of a row; the row max only keeps exp from overflowing.
    The max over a whole head's scores does too, and NumPy finds it ~13x faster than the max
    of each short row (its reductions along a 64-long last axis cost as much as the exp); one
    shift per (sequence, head) keeps the result independent of how sequences are cut over
    threads. A row lying more than 60 below its head's max would lose its exps to underflow;
    then ``rescore()`` recomputes the scores and every row gets its own max (each row sees a
    key: its max is finite)."""
    head_max = s.reshape(s.shape[:-2] + (-1,)).max(axis=-1)[..., None, None]   # (B, H, 1, 1)
    s -= head_max
    np.exp(s, out=s)
    l = _rowsum(s)                                         # (B, H, nq, 1), each >= exp(row max - head max)
    if l.min() >= _ROW_FLOOR:
        m = np.empty_like(l)
        m[...] = head_max
        return s, m, l
    return _row_shift(rescore())


def _row_shift(s):
    """exp(s - m) in place with m each row's own max (B, H, nq, 1), finite since each row sees a
    key; returns (exp, m, row sums)."""
    m = s.max(axis=-1, keepdims=True)
    s -= m
    get_array_module(s).exp(s, out=s)
    return s, m, _rowsum(s)


def _dense(q, k, v, scale, causal, q_offset, k_offset):
    """Single-block attention: (o, lse, p, i0) with p = softmax rows i0: (B, H, Tq - i0, Tk);
    rows above i0 see no key (o = 0, lse = -inf) and p is None when no row sees any."""
    xp = get_array_module(q)
    B, H, Tq, _ = q.shape
    blocks = _blocks(Tq, k.shape[2], causal, q_offset, k_offset, max(k.shape[2], 1))
    if not blocks or k.shape[2] == 0:
        return (xp.zeros((B, H, Tq, v.shape[-1]), q.dtype), xp.full((B, H, Tq), _NEG_INF, q.dtype), None, Tq)
    i0, _, _, masked = blocks[0]
    mask_at = (q_offset + i0, k_offset) if masked else None
    p = _scores(q[:, :, i0:], k, scale, mask_at)
    if xp is np:                                           # host: one shift per head (see _shift)
        p, m, l = _shift(p, lambda: _scores(q[:, :, i0:], k, scale, mask_at))
    else:
        p, m, l = _row_shift(p)                            # m (B, H, Tq - i0, 1)
    p *= 1.0 / l                                           # softmax
    m += xp.log(l)                                         # lse = m + log l
    if i0 == 0:
        return p @ v, m[..., 0], p, 0
    o = xp.zeros((B, H, Tq, v.shape[-1]), q.dtype)
    lse = xp.full((B, H, Tq), _NEG_INF, q.dtype)
    o[:, :, i0:] = p @ v
    lse[:, :, i0:] = m[..., 0]
    return o, lse, p, i0


def attention_forward(q, k, v, causal=True, scale=None, q_offset=0, k_offset=0, block_size=256):
    """Blockwise attention forward. q (B, H, Tq, D), k, v (B, H, Tk, D) -> (o, lse):
    o (B, H, Tq, D), lse (B, H, Tq) in q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    Tq, Tk = q.shape[2], k.shape[2]
    if Tk <= block_size:
        return _dense(q, k, v, scale, causal, q_offset, k_offset)[:2]
    xp = get_array_module(q)
    B, H = q.shape[:2]
    o = xp.zeros((B, H, Tq, v.shape[-1]), q.dtype)
    lse = xp.full((B, H, Tq), _NEG_INF, q.dtype)
    blocks = _blocks(Tq, Tk, causal, q_offset, k_offset, block_size)
    if not blocks:
        return o, lse
    r0 = blocks[0][0]                                      # rows above r0 see no key at all
    m = xp.full((B, H, Tq - r0, 1), _NEG_INF, q.dtype)     # running max
    l = xp.zeros((B, H, Tq - r0, 1), q.dtype)              # running sum of exp(s - m)
    acc = xp.zeros((B, H, Tq - r0, v.shape[-1]), q.dtype)  # running unnormalised output
    for i0, kb, ke, masked in blocks:
        r = i0 - r0
        s = _scores(q[:, :, i0:], k[:, :, kb:ke], scale,
                    (q_offset + i0, k_offset + kb) if masked else None)   # (B, H, Tq - i0, ke - kb)
        m_new = xp.maximum(m[:, :, r:], s.max(axis=-1, keepdims=True))  # finite: each row sees key kb
        alpha = xp.exp(m[:, :, r:] - m_new)                # rescales the old sum and output
        s -= m_new
        xp.exp(s, out=s)
        l[:, :, r:] *= alpha
        l[:, :, r:] += _rowsum(s)
        acc[:, :, r:] *= alpha
        acc[:, :, r:] += s @ v[:, :, kb:ke]
        m[:, :, r:] = m_new
    acc /= l
    o[:, :, r0:] = acc
    m += xp.log(l)
    lse[:, :, r0:] = m[..., 0]
    return o, lse


def _block_grads(p, q, k, v, do, dvec, scale):
    """FlashAttention-2 backward of one tile given its probabilities p (B, H, nq, nk):
    returns dq (B, H, nq, D), dk (B, H, nk, D), dv (B, H, nk, D)."""
    xp = get_array_module(p)
    vt = v.swapaxes(-1, -2)                                # (B, H, D, nk)
    dv = p.swapaxes(-1, -2) @ do                           # P^T dO
    ds = do @ (np.ascontiguousarray(vt) if xp is np else vt)   # dP = dO V^T (B, H, nq, nk); see _scores
    ds -= dvec
    ds *= p                                                # dS = P * (dP - D)
    ds *= scale
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv


def attention_backward(q, k, v, o, lse, do, causal=True, scale=None, q_offset=0, k_offset=0,
                       block_size=256):
    """Gradients (dq, dk, dv) of attention_forward by blockwise recomputation from o and lse."""
    xp = get_array_module(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    Tq, Tk = q.shape[2], k.shape[2]
    dq, dk, dv = xp.zeros_like(q), xp.zeros_like(k), xp.zeros_like(v)
    dvec = _rowsum(do * o)                                 # (B, H, Tq, 1) D = rowsum(dO * O)
    for i0, kb, ke, masked in _blocks(Tq, Tk, causal, q_offset, k_offset, block_size):
        qi, doi = q[:, :, i0:], do[:, :, i0:]
        p = _scores(qi, k[:, :, kb:ke], scale, (q_offset + i0, k_offset + kb) if masked else None)
        p -= lse[:, :, i0:, None]
        xp.exp(p, out=p)                                   # P = exp(S - LSE), (B, H, Tq - i0, ke - kb)
        dqi, dk[:, :, kb:ke], dv[:, :, kb:ke] = _block_grads(p, qi, k[:, :, kb:ke], v[:, :, kb:ke],
                                                             doi, dvec[:, :, i0:], scale)
        dq[:, :, i0:] += dqi
    return dq, dk, dv


def merge_attention(o1, lse1, o2, lse2):
    """Combine attention over two disjoint key sets: LSE = log(e^LSE1 + e^LSE2),
    O = e^(LSE1 - LSE) O1 + e^(LSE2 - LSE) O2 (rows with LSE = -inf on both sides give O = 0)."""
    xp = get_array_module(o1)
    lse = xp.logaddexp(lse1, lse2)                         # (B, H, Tq), stable
    safe = lse.copy()
    safe[lse == _NEG_INF] = 0                              # rows no key reaches: avoid -inf - -inf
    o = o1 * xp.exp(lse1 - safe)[..., None]
    o += o2 * xp.exp(lse2 - safe)[..., None]
    return o, lse


class AttentionState:
    """What the backward of one attention call needs: the inputs, O and LSE, the options, and
    on the single-block path the probabilities P (rows above i0 see no key)."""
    __slots__ = ("q", "k", "v", "o", "lse", "opts", "block_size", "p", "i0")

    def __init__(self, q, k, v, o, lse, opts, block_size, p=None, i0=0):
        self.q, self.k, self.v, self.o, self.lse = q, k, v, o, lse
        self.opts, self.block_size, self.p, self.i0 = opts, block_size, p, i0


def attention_fwd(q, k, v, causal=True, scale=None, q_offset=0, k_offset=0, block_size=256, keep_probs=False):
    """The forward kernel with its state: (o (B, H, Tq, D), lse (B, H, Tq), AttentionState).
    When all keys fit in one block it takes the dense path and, with ``keep_probs``, keeps P
    so that ``attention_bwd`` needs no recomputation."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    opts = dict(causal=causal, scale=scale, q_offset=q_offset, k_offset=k_offset)
    if k.shape[2] <= block_size:                           # single block
        o, lse, p, i0 = _dense(q, k, v, scale, causal, q_offset, k_offset)
        return o, lse, AttentionState(q, k, v, o, lse, opts, block_size, p if keep_probs else None, i0)
    o, lse = attention_forward(q, k, v, block_size=block_size, **opts)
    return o, lse, AttentionState(q, k, v, o, lse, opts, block_size)


def attention_bwd(state, do):
    """(dq, dk, dv) of the call ``state`` came from, for the output gradient do (B, H, Tq, D)."""
    q, k, v, o = state.q, state.k, state.v, state.o
    if state.p is None:                                    # blockwise recomputation (or no row sees a key)
        return attention_backward(q, k, v, o, state.lse, do, block_size=state.block_size, **state.opts)
    i0 = state.i0                                          # rows above i0 see no key: zero grads
    dvec = _rowsum(do[:, :, i0:] * o[:, :, i0:])
    dqi, dk, dv = _block_grads(state.p, q[:, :, i0:], k, v, do[:, :, i0:], dvec, state.opts["scale"])
    if i0 == 0:
        return dqi, dk, dv
    dq = get_array_module(q).zeros_like(q)
    dq[:, :, i0:] = dqi
    return dq, dk, dv


class Attention(Function):
    """softmax(scale QK^T + causal mask) V over q (B, H, Tq, D), k, v (B, H, Tk, D); its second
    output, the log-sum-exp (B, H, Tq), is not differentiated (``Function.apply_aux``)."""
    has_aux = True

    def forward(self, q, k, v, causal=True, scale=None, q_offset=0, k_offset=0, block_size=256):
        keep = is_grad_enabled() and any(self.needs_input_grad)
        o, lse, self.state = attention_fwd(q, k, v, causal, scale, q_offset, k_offset, block_size, keep_probs=keep)
        return o, lse

    def backward(self, g):
        return attention_bwd(self.state, g)


def attention(q, k, v, causal=True, scale=None, q_offset=0, k_offset=0, block_size=256, return_lse=False):
    """Differentiable attention on Tensors (B, H, T, D) -> (B, H, Tq, D); with ``return_lse``,
    (output, the (B, H, Tq) log-sum-exp array)."""
    out, lse = Attention.apply_aux(q, k, v, causal=causal, scale=scale, q_offset=q_offset, k_offset=k_offset,
                                   block_size=block_size)
    return (out, lse) if return_lse else out
