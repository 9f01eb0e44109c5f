"""Sequence parallelism: a GPT whose sequence axis is sharded over the sp ranks.

Only attention mixes tokens, so everything else runs on the local tokens unchanged
(Korthikanti et al. 2022 call the LayerNorm/dropout half of this "sequence parallelism";
with ring attention or Ulysses the attention itself is sharded too, as in Liu et al. 2023
and Jacobs et al. 2023):

    x, y (B, T) global batch, the same on every sp rank
    shard_batch   x, y (B, T/N) local tokens, pos (T/N,) their global positions
                  zigzag for ring attention (causal balance), contiguous for Ulysses
    embed         wte[x] + wpe[pos]                         (B, T/N, C)
    blocks        LayerNorm, MLP, projections: local; attention: ring_attention.py or
                  ulysses.py, installed as each block's CausalSelfAttention.attention_fn
    head + loss   share_r = sum over local tokens of CE / n_targets (global count), so that
                  sum_r share_r = the one-process mean cross-entropy
    backward      share_r.backward() leaves rank r's part of every parameter gradient;
                  reduce_grads all-reduces (sum) them over sp, or over sp x dp at once with
                  scale = 1/dp (sum over sp, mean over dp), and the gradients mean what one
                  process's would.

Every rank of an sp group must pass the same (B, T) batch; data-parallel replicas pass
different batches. With pipeline parallelism, PipelineEngine(..., seq=this) shards each
micro-batch with shard_batch and takes the last stage's loss from ``loss`` (parallel/pipeline/executor.py). Dropout and the sparse FFN's noise are drawn at each token's
global position (engine/random.py), so they equal one process's.
"""
from collections import namedtuple

import numpy as np

from engine import backend
from engine.autograd import no_grad

from .ring_attention import ring_attention
from .split import SequenceParallelError, check_split, positions, shard
from .ulysses import ulysses_attention

MODES = ("ring", "ulysses")

SeqShard = namedtuple("SeqShard", "idx targets pos n_targets")
SeqShard.__doc__ = """A rank's part of a batch: idx, targets (B, T/N), pos (T/N,) global positions,
n_targets = targets != -1 counted over the WHOLE batch (the loss's denominator)."""


def layout_for(mode, sp):
    """The sequence layout a mode uses: zigzag for ring attention (causal balance)."""
    if mode not in MODES:
        raise SequenceParallelError(f"unknown sp attention {mode!r}; choose from {', '.join(MODES)}")
    return "zigzag" if mode == "ring" and sp > 1 else "contiguous"


def check_config(sp, mode, seq_len, n_head=None, block_size=None):
    """Raise SequenceParallelError (the same on every rank: it depends only on the
    configuration) unless seq_len splits over sp ranks in `mode` (and fits block_size
    positions). Ulysses handles any n_head (uneven head groups), so n_head is only checked
    to be positive."""
    if isinstance(sp, bool) or not isinstance(sp, (int, np.integer)) or sp < 1:
        raise SequenceParallelError(f"sp must be a positive integer, got {sp!r}")
    check_split(seq_len, sp, layout_for(mode, sp))
    if block_size is not None and seq_len > block_size:
        raise SequenceParallelError(f"sequence length {seq_len} > block_size {block_size} (learned positions)")
    if n_head is not None and n_head < 1:
        raise SequenceParallelError(f"n_head must be positive for sequence parallelism, got {n_head}")


class SequenceParallel:
    """Run `model` (models/gpt.py GPT) with its sequence sharded over `sp_comm`.
    Installs the sharded attention in every block (undo with .uninstall()). block_size: the
    attention kernel's key block. loss_scale multiplies each rank's loss share: leave 1 when
    gradients are SUMMED over sp (reduce_grads); set it to sp when a DDP/ZeRO layer AVERAGES
    them over a communicator spanning sp x dp."""

    def __init__(self, sp_comm, model, mode="ring", block_size=256, loss_scale=1.0):
        self.comm, self.model, self.mode, self.loss_scale = sp_comm, model, mode, float(loss_scale)
        self.layout = layout_for(mode, sp_comm.size)
        self.block_size = block_size
        attend = ring_attention if mode == "ring" else ulysses_attention
        comm, layout = sp_comm, self.layout

        def attention_fn(q, k, v):                           # (B, nh, T/N, hs) each -> (B, nh, T/N, hs)
            return attend(q, k, v, comm, causal=True, layout=layout, block_size=block_size)
        self.attention_fn = attention_fn
        for block in model.blocks:
            block.attn.attention_fn = attention_fn

    def uninstall(self):
        """Give the model back its one-process attention (for sampling, say)."""
        for block in self.model.blocks:
            block.attn.attention_fn = None

    def check(self, seq_len):
        check_config(self.comm.size, self.mode, seq_len, block_size=self.model.config.block_size)

    # -- data ---------------------------------------------------------------------------------
    def shard_batch(self, x, y=None):
        """This rank's SeqShard of a global batch x, y (B, T) (host or device ints)."""
        T = x.shape[1]
        self.check(T)
        n, r = self.comm.size, self.comm.rank
        n_targets = None if y is None else int((backend.to_numpy(y) != -1).sum())
        pos = positions(T, r, n, self.layout)                 # (T/N,)
        return SeqShard(shard(x, r, n, self.layout), None if y is None else shard(y, r, n, self.layout),
                        pos, n_targets)

    # -- forward, loss, backward --------------------------------------------------------------
    def embed(self, s):
        """Token plus position embeddings of the local tokens: (B, T/N, C). (A pipeline's first
        stage does the same with s.pos in PipelineStage.forward_chunk.)"""
        return self.model.embed(backend.to_device(s.idx), pos=backend.to_device(s.pos))

    def loss(self, logits, s):
        """This rank's share of the one-process mean loss: sum of local CE / n_targets
        (times loss_scale)."""
        total = self.model.transformer.wte.cross_entropy(logits, backend.to_device(s.targets), reduction="sum")
        return total * (self.loss_scale / max(s.n_targets, 1))

    def forward(self, s):
        """(logits (B, T/N, V), share of the loss or None) for a SeqShard."""
        with self.model.noise.located(pos=s.pos):             # noise drawn at the global positions
            x = self.embed(s)                                 # (B, T/N, C)
            for block in self.model.blocks:
                x = block(x)                                  # (B, T/N, C)
            logits, _ = self.model.head(x)                    # (B, T/N, V)
        return logits, (None if s.targets is None else self.loss(logits, s))

    def global_loss(self, share):
        """The one-process loss value: the shares summed over sp (a float)."""
        v = np.array([float(share.item() if hasattr(share, "item") else share) / self.loss_scale])
        return float(self.comm.all_reduce(v)[0]) if self.comm.size > 1 else float(v[0])

    def forward_backward(self, x, y, grads=None, reduce=True):
        """Shard x, y (B, T), forward, backward; with grads (flat gradient arrays) and
        reduce, all-reduce them over sp. Returns the one-process loss value."""
        s = self.shard_batch(x, y)
        _, share = self.forward(s)
        share.backward()
        if reduce and grads is not None:
            self.reduce_grads(grads)
        return self.global_loss(share)

    def evaluate(self, x, y):
        """The one-process mean loss of a batch x, y (B, T), without recording a graph."""
        with no_grad():
            return self.global_loss(self.forward(self.shard_batch(x, y))[1])

    def reduce_grads(self, grads, comm=None, scale=1.0):
        """All-reduce (sum) gradient arrays in place over sp (or `comm`, e.g. sp x dp
        together, with scale=1/dp to average over the data-parallel replicas)."""
        comm = self.comm if comm is None else comm
        for g in grads:
            if comm.size > 1:
                comm.all_reduce(g)
            if scale != 1.0:
                g *= scale
