"""Consolidate a sharded checkpoint (parallel/checkpoint/sharded.py) into one file, on one process.

    python consolidate.py out model.safetensors          # latest checkpoint of out/ -> one file
    python consolidate.py out/step_300 gpt2-dir --hf     # a Hugging Face GPT-2 directory
    python consolidate.py out model.safetensors --optim  # also the AdamW moments

Without --hf the file holds every parameter under this engine's names (the state dict of
models/gpt.py: ``GPT.load_state_dict`` takes it, ``sample.py --ckpt FILE`` samples from it)
and, in its safetensors metadata, the checkpoint's manifest (model config, tokenizer, step)
as JSON. With ``--optim`` it adds ``optim.<dtype>.exp_avg`` / ``.exp_avg_sq`` (the unpadded
flat buffers, one process's engine/flat.py order) and the metadata's manifest has the step
counts, ``optim {dtype: {step}}``, whatever the layout saved. With --hf, OUT is a
directory with model.safetensors and config.json (models/hf.py) that
``transformers.GPT2LMHeadModel.from_pretrained`` and ``sample.py --hf`` open. Every shard's
size and sha256 is verified first. An existing output is never replaced without
``--overwrite``; an output that cannot be written is refused before any shard is read. Bad
input: one line ``error: ...``, exit code 2.
"""
import argparse
import json
import os
import sys

from engine.io import CheckpointError, save_safetensors, unwritable
from parallel.checkpoint import consolidate

CONSOLIDATED = "mpi-transformer-engine/consolidated"
SKIP = ("shards", "per_rank", "params", "buffers", "pipeline")   # layout keys that mean nothing in one file


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


HF_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json")


def refuse_overwrite(out, hf):
    """ValueError (one line) if writing ``out`` would replace an existing file."""
    if hf and os.path.isdir(out):
        there = [f for f in HF_FILES if os.path.exists(os.path.join(out, f))]
        if there:
            raise ValueError(f"{out} already holds {there[0]}; pass --overwrite to replace it")
    elif os.path.exists(out):
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")


def write(ckpt, out, hf=False, optim=False, overwrite=False):
    """Consolidate ``ckpt`` into ``out`` (a .safetensors file, or with hf a directory); an
    existing output is replaced only with ``overwrite``."""
    if not overwrite:
        refuse_overwrite(out, hf)
    why = unwritable(out, "dir" if hf else "file")       # before the (long) consolidation, not after it
    if why:
        raise ValueError(f"{out} {why}")
    params, moments, manifest = consolidate(ckpt, with_optim=True)
    if hf:
        from models.gpt import GPT, GPTConfig
        from models.hf import save_hf
        try:
            config = GPTConfig(**manifest["config"]["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {ckpt}: its manifest has no usable model config "
                                  f"({type(e).__name__}: {e}), needed for --hf") from None
        if config.terraformer:                        # not a GPT: refuse before building one
            raise ValueError("--hf: Hugging Face GPT-2 has no Terraformer layers (reversible, LSH attention, "
                             "sparse loss); keep the engine checkpoint")
        model = GPT(config, rng=0)
        model.astype(next(iter(params.values())).dtype)
        model.load_state_dict(params)
        save_hf(model, out)
        return out
    tensors = dict(params)
    if optim:
        for dt, o in moments.items():
            tensors[f"optim.{dt}.exp_avg"], tensors[f"optim.{dt}.exp_avg_sq"] = o["m"], o["v"]
    meta = {k: v for k, v in manifest.items() if k not in SKIP}
    meta["format"] = CONSOLIDATED
    meta["optim"] = {dt: {"step": o["step"]} for dt, o in moments.items()}   # a pipeline manifest keeps it per stage
    save_safetensors(out, tensors, metadata={"format": CONSOLIDATED, "manifest": json.dumps(meta)})
    return out


def main(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="train.py out dir (follows latest) or a step_<N> dir")
    p.add_argument("out", help="output .safetensors file (with --hf: a directory)")
    p.add_argument("--hf", action="store_true", help="write a Hugging Face GPT-2 directory")
    p.add_argument("--optim", action="store_true", help="also write the AdamW moments")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (or --hf directory's files)")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
        if args.hf and args.optim:
            raise ValueError("--optim has no place in a Hugging Face directory")
        out = write(args.ckpt, args.out, hf=args.hf, optim=args.optim, overwrite=args.overwrite)
    except (ValueError, OSError) as e:            # CheckpointError is a ValueError
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
