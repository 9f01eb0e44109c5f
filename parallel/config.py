"""The parallel layout as one dataclass, and every check that a layout fits the model and
the batch.

``ParallelConfig`` generates train.py's layout flags (engine/config.py: field ``dp`` ->
``--dp``); ``check_layout`` raises ``LayoutError`` with one line, the same on every rank
(it depends only on the configuration), before any message moves. parallel/step.py
composes what passed.

    ranks = dp * pp * sp * tp            (collectives/mesh.py lays them out, tp fastest)
    tp > 1: n_head % tp == 0, (4 n_embd) % tp == 0, no sparse layers; --tp-token-shards:
            block_size % tp == 0 (pp = sp = 1 for now)
    batch_size % dp == 0                 every replica takes B/dp rows of the global batch
    pp > 1: (B/dp) % micro_batches == 0, n_layer >= pp, interleaved: n_layer % (pp v) == 0
            and micro_batches % pp == 0; ZeRO 0-1 only (DeepSpeed likewise)
    sp > 1: block_size % sp == 0 (ulysses) or % 2 sp == 0 (ring: zigzag); no sparse QKV
    compressed communication (--quant-weights, --quant-grads, --comm-dtype bf16; ZeRO++):
            ZeRO >= 1, pp = tp = 1; --error-feedback needs --quant-grads; --quant-node-size
            divides dp * sp and needs compressed gradients; bf16 needs something left to carry
    Terraformer layers (--reversible, --attention lsh, --loss-sparsity): pp = sp = tp = 1
    --offload optimizer (ZeRO-Offload, parallel/data/offload.py): ZeRO 1 or 2, pp = sp = tp = 1, no
            compressed communication; --device gpu (check_offload_device: the device is train's)
    --recompute full|selective (engine/recompute.py, any ZeRO stage): pp = sp = tp = 1; full: not
            with --reversible (it recomputes already); selective: a GPT (no Terraformer layers)
"""
import math
from dataclasses import dataclass, field, replace

from .pipeline.schedules import SCHEDULES
from .pipeline.stage import PipelineConfigError, check_config as check_pipeline
from .sequence import SequenceParallelError, check_config as check_sequence
from .tensor.model import TensorParallelError, check_config as check_tensor


class LayoutError(ValueError):
    """A parallel layout that cannot run (one line; callers exit with code 2)."""


def _f(default, help, **meta):
    return field(default=default, metadata=dict(help=help, **meta))


@dataclass
class ParallelConfig:
    """The parallel layout: dp * pp * sp * tp must equal the number of MPI ranks."""
    dp: int = _f(1, "data-parallel replicas (the global batch is split among them)")
    zero: int = _f(0, "ZeRO stage over the dp (x sp) ranks: 0 DDP, 1 optimizer state, 2 + gradients, "
                      "3 + parameters",
                   choices=(0, 1, 2, 3))
    pp: int = _f(1, "pipeline stages: the layers are cut into pp stages, each batch into micro-batches "
                    "(ZeRO stage 0 or 1 over dp x sp)")
    micro_batches: int = _f(0, "micro-batches per batch in the pipeline (0: pp); batch_size / dp must divide by it",
                            metavar="M")
    schedule: str = _f("1f1b", "pipeline schedule: gpipe (all forwards, then all backwards), 1f1b, interleaved "
                               "(--virtual-stages chunks per rank), zb-h1 (zero bubble: backward split in B and W)",
                       choices=SCHEDULES)
    virtual_stages: int = _f(1, "model chunks per pp rank (the interleaved schedule; n_layer must divide by pp * v)",
                             metavar="V")
    sp: int = _f(1, "sequence-parallel ranks: each sequence's block_size tokens are split over them "
                    "(block_size must divide by sp for ulysses, by 2 sp for ring); ZeRO then shards over dp*sp")
    sp_attention: str = _f("ring", "attention across the sp ranks: ring (K/V blocks pass around a ring, zigzag "
                                   "split) or ulysses (all-to-all to head sharding; any head count)",
                           choices=("ring", "ulysses"))
    tp: int = _f(1, "tensor-parallel ranks (Megatron-LM): every weight matrix split over them, attention heads and "
                    "MLP units and the vocabulary; n_head and 4 n_embd must divide by tp")
    tp_token_shards: bool = _f(False, "with --tp: shard the residual stream, LayerNorm and dropout along tokens "
                                      "over the tp ranks (Korthikanti et al. 2022's 'sequence parallelism'; not --sp, "
                                      "which splits attention itself over other ranks); block_size must divide by tp")
    vocab_granule: int = _f(1, "with --tp: pad the vocabulary to a multiple of tp x this (Megatron's "
                               "make-vocab-size-divisible-by); padded rows never change a loss or a gradient")
    bucket_mb: float = _f(1.0, "gradient bucket size in MiB (each bucket is reduced as soon as backward fills it)")
    quant_weights: str = _f("none", "ZeRO >= 1: the parameter all-gathers carry int8 blockwise codes (ZeRO++ qwZ; "
                                    "~1.02 bytes per element at block 256 instead of 4): every rank computes with the "
                                    "dequantized weights (error <= max|block| / 254 per element), AdamW updates the "
                                    "owner's float32 master shard", choices=("none", "int8"))
    quant_grads: str = _f("none", "ZeRO >= 1: the gradient reduce-scatter runs as an all-to-all of int8 or int4 "
                                  "blockwise codes (ZeRO++ qgZ; ~1.02 or ~0.52 bytes per element at block 256 instead "
                                  "of 4), dequantized and averaged in float32 (error <= max|block| / 254 or / 14 per "
                                  "element and rank)", choices=("none", "int8", "int4"))
    comm_dtype: str = _f("fp32", "ZeRO >= 1: gathered weights and reduced gradients not quantized above travel as "
                                 "bfloat16 (2 bytes per element; relative error <= 2^-9), gradients summed in float32",
                         choices=("fp32", "bf16"))
    quant_block: int = _f(256, "elements per float32 scale of --quant-weights / --quant-grads (4 bytes per block "
                               "on the wire; smaller blocks: less error, more bytes)", metavar="N")
    error_feedback: bool = _f(False, "with --quant-grads: add each step's quantization residual to the next step's "
                                     "gradient (1-bit Adam), so the error summed over steps stays one step's; "
                                     "+4 bytes per parameter per rank")
    quant_node_size: int = _f(0, "with compressed gradients: reduce them in two hops, inside nodes of this many "
                                 "consecutive dp ranks, then across (ZeRO++ hierarchical qgZ; 1/G of the bytes cross "
                                 "nodes); 0: one all-to-all", metavar="G")
    offload: str = _f("none", "ZeRO-Offload (Ren et al. 2021), with --zero 1 or 2 on --device gpu: the master "
                              "parameters' AdamW state (m, v) and the update live on the host, the parameters, "
                              "activations and gradients on the device; each gradient bucket goes to the host as "
                              "its reduce-scatter completes, the updated shard comes back (device: 4P bytes at "
                              "--zero 2, float32)", choices=("none", "optimizer"))
    recompute: str = _f("none", "activation recomputation, any --zero: none (keep every activation), full (each "
                                "block recomputed in backward from its input: +1 forward, activations of one "
                                "block), selective (only the attention probabilities, (B, heads, T, T) per block, "
                                "recomputed blockwise in backward); --pp, --sp and --tp: none only",
                        choices=("none", "full", "selective"))
    comm_timeout: float = _f(300.0, "seconds a collective waits for a missing rank before aborting the job, "
                                    "when there are several ranks (0: no watchdog)")

    @property
    def world(self):
        return self.dp * self.pp * self.sp * self.tp


def need(ok, msg):
    if not ok:
        raise LayoutError(msg)


def check_compression(par):
    """The compressed-communication flags (parallel/data/wire.py) against the layout."""
    qw, qg, bf = par.quant_weights != "none", par.quant_grads != "none", par.comm_dtype == "bf16"
    need(isinstance(par.quant_block, int) and par.quant_block >= 1, f"quant_block must be >= 1, got {par.quant_block}")
    need(not par.error_feedback or qg, "--error-feedback needs --quant-grads int8 or int4: it feeds back the "
         "residual of the gradients' quantization")
    for on, what in ((qw, f"--quant-weights {par.quant_weights}"), (qg, f"--quant-grads {par.quant_grads}"),
                     (bf, "--comm-dtype bf16")):
        if not on:
            continue
        need(par.zero >= 1, f"{what} needs --zero 1, 2 or 3: ZeRO stage 0 all-reduces full gradients and gathers "
             "no parameters, so there is no gather or reduce-scatter to compress")
        need(par.pp == 1 and par.tp == 1, f"{what} with --pp or --tp is not supported: the tied wte copies of the "
             "first and last stage, and each tp rank's slices, would be quantized at different block boundaries")
    need(not (bf and qw and qg), "--comm-dtype bf16 with both --quant-weights and --quant-grads leaves nothing to "
         "carry as bfloat16; drop one of them")
    g, group = par.quant_node_size, par.dp * par.sp
    need(isinstance(g, int) and g >= 0, f"quant_node_size must be >= 0, got {g}")
    if g:
        need(qg or bf, f"--quant-node-size {g} needs compressed gradients (--quant-grads or --comm-dtype bf16): it "
             "splits their reduce into two hops")
        need(group % g == 0, f"--quant-node-size {g} does not divide the {group} ranks of the ZeRO group (dp x sp)")


def check_offload(par):
    """--offload against the layout (the device is checked by check_offload_device)."""
    if par.offload == "none":
        return
    need(par.zero in (1, 2), f"--offload {par.offload} needs --zero 1 or 2: the host keeps this rank's shard of "
         f"the optimizer state (ZeRO-Offload partitions it as ZeRO-2), got --zero {par.zero}")
    for n, what in ((par.pp, "--pp"), (par.sp, "--sp"), (par.tp, "--tp")):
        need(n == 1, f"--offload {par.offload} with {what} {n} is not supported yet: it is built and tested over "
             "dp with ZeRO 1-2 only")
    need(par.quant_weights == "none" and par.quant_grads == "none" and par.comm_dtype == "fp32",
         f"--offload {par.offload} with compressed communication (--quant-weights, --quant-grads, --comm-dtype "
         "bf16) is not supported yet")


def check_offload_device(par, device):
    """--offload optimizer moves the optimizer off a GPU: refused on the CPU."""
    need(par.offload == "none" or device == "gpu", f"--offload {par.offload} needs --device gpu: on the CPU the "
         "optimizer state already lives in host memory")


def check_recompute(par, get):
    """--recompute against the layout and the model (get: the model's field getter)."""
    mode = par.recompute
    need(mode in ("none", "full", "selective"), f"recompute must be none, full or selective, got {mode!r}")
    if mode == "none":
        return
    for n, what in ((par.pp, "--pp"), (par.sp, "--sp"), (par.tp, "--tp")):
        need(n == 1, f"--recompute {mode} with {what} {n} is not supported yet: it is built and tested over dp "
             "with ZeRO 0-3 only")
    need(not (mode == "full" and get("reversible")), "--recompute full with --reversible: the reversible stack "
         "recomputes every layer already; use --recompute none")
    terra = get("reversible") or get("attention") == "lsh" or get("loss_sparsity")
    need(not (mode == "selective" and terra), "--recompute selective needs a GPT without Terraformer layers "
         "(--reversible, --attention lsh, --loss-sparsity): it drops the dense attention's probabilities")


def check_layout(par, model, batch_size):
    """Raise LayoutError unless ``par`` can train ``model`` (a GPTConfig, or a dict of its
    fields) on global batches of ``batch_size`` sequences. Fills par.micro_batches = pp when 0."""
    get = model.get if isinstance(model, dict) else (lambda k, d=None: getattr(model, k, d))
    for name in ("dp", "pp", "sp", "tp", "vocab_granule"):
        v = getattr(par, name)
        need(isinstance(v, int) and v >= 1, f"{name} must be >= 1, got {v}")
    need(par.micro_batches >= 0, f"micro_batches must be >= 0, got {par.micro_batches}")
    need(par.virtual_stages >= 1, f"virtual_stages must be >= 1, got {par.virtual_stages}")
    need(batch_size % par.dp == 0, f"batch_size {batch_size} is not divisible by dp {par.dp}: each "
         "data-parallel rank takes an equal slice of the global batch")
    need(par.bucket_mb > 0 and math.isfinite(par.bucket_mb), f"bucket_mb must be positive, got {par.bucket_mb}")
    need(par.comm_timeout >= 0, f"comm_timeout must be >= 0, got {par.comm_timeout}")
    check_compression(par)
    check_offload(par)
    check_recompute(par, get)
    terra = [f for f, on in (("--reversible", get("reversible")), ("--attention lsh", get("attention") == "lsh"),
                             ("--loss-sparsity", get("loss_sparsity"))) if on]
    if terra:                             # the Terraformer (models/terraformer.py) trains under dp and ZeRO 0-3
        need(par.pp == 1, f"--pp {par.pp} with {terra[0]} is not supported yet: a pipeline stage would cut the "
             "reversible stack and its two streams; use --dp (any ZeRO stage)")
        need(par.sp == 1, f"--sp {par.sp} with {terra[0]} is not supported yet: LSH buckets and chunks span the "
             "whole sequence; use --dp (any ZeRO stage)")
        need(par.tp == 1, f"--tp {par.tp} with {terra[0]} is not supported yet: no Megatron slices of the "
             "Terraformer's layers; use --dp (any ZeRO stage)")
    block = get("block_size")
    try:                                  # every window of block_size tokens is split over the sp ranks
        check_sequence(par.sp, par.sp_attention, block, block_size=block)
    except SequenceParallelError as e:
        raise LayoutError(f"--sp {par.sp} --sp-attention {par.sp_attention} splits each window of --block-size "
                          f"{block} tokens: {e}") from None
    if par.tp > 1:
        try:
            check_tensor(model, par.tp)
        except TensorParallelError as e:
            raise LayoutError(str(e)) from None
    if par.tp_token_shards and par.tp > 1:
        need(block % (par.tp * par.sp) == 0, f"--tp-token-shards splits each window of --block-size {block} "
             f"tokens over tp = {par.tp}{f' within sp = {par.sp}' if par.sp > 1 else ''}: it must divide by "
             f"{par.tp * par.sp}")
        need(par.sp == 1 and par.pp == 1, "--tp-token-shards with --sp or --pp is not supported yet; use --tp "
             "alone there")
        need(not get("ffn_sparsity"), "--tp-token-shards with a sparse FFN (--ffn-sparsity) is not supported; "
             "use --tp alone")
    need(par.sp == 1 or not get("qkv_modules"), f"--sp {par.sp} with --qkv-modules {get('qkv_modules')}: the "
         "sparse QKV layer convolves over neighbouring positions, which sequence shards split; use --sp 1")
    if par.micro_batches == 0:            # default: one micro-batch per stage
        par.micro_batches = par.pp
    if par.pp == 1:
        need(par.micro_batches == 1, f"--micro-batches {par.micro_batches} needs --pp > 1; without a pipeline, "
             "accumulate gradients with --grad-accum (each step then draws that many batches)")
        need(par.virtual_stages == 1, f"--virtual-stages {par.virtual_stages} needs --pp > 1 and "
             "--schedule interleaved")
        return
    need(par.zero < 2, f"--zero {par.zero} with --pp {par.pp} is not supported: ZeRO-2/3 reduce-scatter the "
         "gradients during every backward, once per micro-batch, and shard the tied wte at different offsets "
         "on the first and last stage; use --zero 1 (DeepSpeed likewise allows only ZeRO-1 with pipeline "
         "parallelism)")
    batch_per_replica = batch_size // par.dp
    try:
        check_pipeline(get("n_layer"), par.pp, par.schedule, par.micro_batches, par.virtual_stages)
        try:
            check_pipeline(get("n_layer"), par.pp, par.schedule, par.micro_batches, par.virtual_stages,
                           batch_size=batch_per_replica)
        except PipelineConfigError as e:
            raise PipelineConfigError(f"{e} (batch_size / dp = {batch_per_replica} sequences per replica)") from None
    except PipelineConfigError as e:
        raise LayoutError(str(e)) from None


def shrunk_sizes(par, model, batch_size, n_max):
    """{n: dp} for every rank count n <= n_max that fits a layout, by the elastic layout rule:
    keep pp, sp and tp (the model's shape sets them) and shrink dp, to the largest dp <= n / (pp
    sp tp) that check_layout accepts (python -m elastic and --on-failure shrink use it)."""
    per, out = par.pp * par.sp * par.tp, {}
    for n in range(1, n_max + 1):
        for dp in range(n // per, 0, -1):
            try:
                check_layout(replace(par, dp=dp), model, batch_size)
            except LayoutError:
                continue
            out[n] = dp
            break
    return out
