"""A pipeline stage: the slice of a GPT that one pp rank holds, and the checks on the layout.

GPipe (Huang et al. 2019) and Megatron-LM (Narayanan et al. 2021) cut the layer stack into
pp stages; with the interleaved schedule every rank holds v chunks instead of one, chunk c
of rank r being virtual stage s = c pp + r of pp v:

    pp = 2, v = 1, 4 layers   rank 0: embed h.0 h.1           rank 1: h.2 h.3 ln_f head+loss
    pp = 2, v = 2, 4 layers   rank 0: [embed h.0] [h.2]        rank 1: [h.1] [h.3 ln_f head+loss]

The embedding lives on virtual stage 0, the final LayerNorm, the tied output layer and the
loss on the last one. Tied embeddings (Press & Wolf 2017): with pp > 1 the first and the
last rank each hold a copy of wte; both start equal (every rank builds the same GPT from one
seed) and stay equal because parallel/pipeline/executor.py all-reduces wte's gradient between them
before the update. Parameter names are the full model's (``transformer.h.3.ln_1.weight``),
so a stage's state_dict is a slice of the one-process checkpoint.
"""
from engine.nn import Module
from models.gpt import GPT, embed, head

from .schedules import SCHEDULES


class PipelineConfigError(ValueError):
    """The pipeline layout does not fit the model or the batch (callers exit with code 2)."""


def check_config(n_layer, pp, schedule, micro_batches, virtual_stages=1, batch_size=None):
    """Raise PipelineConfigError (one line, the same on every rank) if the layout is impossible."""
    if schedule not in SCHEDULES:
        raise PipelineConfigError(f"pipeline: unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    for name, v in (("pp", pp), ("micro_batches", micro_batches), ("virtual_stages", virtual_stages)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PipelineConfigError(f"pipeline: {name} must be a positive integer, got {v!r}")
    if pp > n_layer:
        raise PipelineConfigError(f"pipeline: pp={pp} stages need at least {pp} layers, the model has n_layer={n_layer}")
    if virtual_stages > 1 and schedule != "interleaved":
        raise PipelineConfigError(f"pipeline: virtual_stages={virtual_stages} needs the interleaved schedule, "
                                  f"not {schedule!r}")
    if schedule == "interleaved":
        if n_layer % (pp * virtual_stages):
            raise PipelineConfigError(f"pipeline: the interleaved schedule needs n_layer ({n_layer}) divisible by "
                                      f"pp x virtual_stages = {pp} x {virtual_stages}")
        if micro_batches % pp:
            raise PipelineConfigError(f"pipeline: the interleaved schedule needs micro_batches ({micro_batches}) "
                                      f"divisible by pp ({pp})")
    if batch_size is not None and batch_size % micro_batches:
        raise PipelineConfigError(f"pipeline: a batch of {batch_size} sequences does not split into "
                                  f"{micro_batches} equal micro-batches")


def layer_ranges(n_layer, pp, v=1):
    """[lo, hi) of the layers of each virtual stage s = 0 .. pp v - 1 (balanced, earlier
    stages one layer fewer when it does not divide)."""
    n = pp * v
    return [(s * n_layer // n, (s + 1) * n_layer // n) for s in range(n)]


class _Holder(Module):
    """A bare container, so the stage's parameters keep the full model's dotted names."""


class PipelineStage(Module):
    """The chunks of ``model`` (a GPT) that pp rank ``rank`` of ``pp`` runs; v chunks per rank
    for the interleaved schedule. ``forward_chunk(c, x, targets)`` runs local chunk c."""

    def __init__(self, model, rank, pp, virtual_stages=1):
        if not isinstance(model, GPT):
            raise TypeError(f"PipelineStage needs a GPT, got {type(model).__name__}")
        v = virtual_stages
        self.config, self.rank, self.pp, self.v = model.config, rank, pp, v
        self.noise = model.noise                               # the counter-based generator the layers share
        self.ranges = [layer_ranges(model.config.n_layer, pp, v)[c * pp + rank] for c in range(v)]
        self.is_first = rank == 0                              # holds virtual stage 0 (chunk 0)
        self.is_last = rank == pp - 1                          # holds the last virtual stage (chunk v-1)
        t = self.transformer = _Holder()
        if self.is_first or self.is_last:
            t.wte = model.transformer.wte                      # (V, C): input embedding and/or output layer
        if self.is_first:
            t.wpe = model.transformer.wpe
        t.h = _Holder()
        self.layers = {}
        for lo, hi in self.ranges:
            for i in range(lo, hi):
                setattr(t.h, str(i), model.blocks[i])          # global index: transformer.h.<i>
                self.layers[i] = model.blocks[i]
        if self.is_last:
            t.ln_f = model.transformer.ln_f

    @property
    def tied(self):
        """True when another rank holds a copy of wte (first and last stage, pp > 1)."""
        return self.pp > 1 and (self.is_first or self.is_last)

    def virtual_stage(self, c):
        return c * self.pp + self.rank

    def forward_chunk(self, c, x, targets=None, pos=None, loss_fn=None):
        """Local chunk c: token ids (B, T) on virtual stage 0, else activations (B, T, C);
        returns (B, T, C), or the mean cross-entropy on the last virtual stage. Under
        sequence parallelism T is this rank's T/sp tokens: ``pos`` (T/sp,) their global
        positions (virtual stage 0), ``loss_fn(logits (B, T/sp, V))`` this rank's share of the
        loss in place of the mean (the last virtual stage; parallel/sequence/model.py)."""
        s, t = self.virtual_stage(c), self.transformer
        if s == 0:                                             # (B, T) -> (B, T, C)
            x = embed(self.config, t.wte, t.wpe, x, pos, self.noise, self.training)
        lo, hi = self.ranges[c]
        for i in range(lo, hi):
            x = self.layers[i](x)                              # (B, T, C)
        if s == self.pp * self.v - 1:
            if loss_fn is not None:
                return loss_fn(head(t.ln_f, t.wte, x)[0])      # (B, T, V) -> scalar share
            return head(t.ln_f, t.wte, x, targets)[1]          # scalar loss
        return x
