"""Generate text from a trained checkpoint, or from a Hugging Face GPT-2 directory.

    python sample.py --ckpt out                              # latest checkpoint of train.py's out dir
    python sample.py --ckpt out/step_300 --prompt "def " --max-new-tokens 300 --temperature 0.8 --top-k 40
    python sample.py --ckpt model.safetensors                # a file written by consolidate.py
    python sample.py --hf gpt2-dir --prompt "Hello, I'm a language model,"   # a Hugging Face GPT-2 directory
    mpiexec -n 2 python sample.py --ckpt out --tp 2             # tensor parallel: the same tokens as one process
    python sample.py --ckpt out --quantize int8                 # int8 weights, quantized at load
    python sample.py --ckpt out --quantize int8 --save-quantized q.safetensors   # write the int8 model once
    python sample.py --ckpt q.safetensors                       # ... and decode from it

The checkpoint's manifest carries the model config and the tokenizer (byte, char or ids),
so the text is encoded and decoded exactly as in training. --ckpt reads train.py's sharded
checkpoints (parallel/checkpoint/sharded.py ``consolidate``: the shards of any rank count are
assembled on this one process), the single-file checkpoints of engine/checkpoint.py, and
consolidate.py's .safetensors file (its metadata holds the manifest). Decoding uses the model's KV
cache (models/gpt.py ``generate``): temperature 0 is greedy, ``--top-k`` keeps the k most
likely tokens, ``--seed`` makes the samples reproducible. A Hugging Face directory
(config.json + model.safetensors, read by models/hf.py ``load_hf``) is tokenized with its
GPT-2 BPE files (vocab.json + merges.txt or tokenizer.json, engine/bpe.py); without them a
vocabulary of 256 is read as bytes (a byte-level model exported by ``save_hf``), any other
as token ids (``--prompt-ids``, output printed as ids). Bad input (a temperature that is
negative or not finite, text for a model that reads ids, --prompt with --prompt-ids): one
line ``error: ...``, exit code 2. A prompt longer than the model's block_size is cropped to
its last block_size tokens (a note on stderr says so).

``--quantize int8`` decodes with per-output-channel int8 weights for every matrix a token is
multiplied by, dense or sparse (models/quantized.py, engine/int8.py: a quarter of float32's weight
bytes, one float32 scale per row); ``--save-quantized FILE`` writes that model to one safetensors
file (codes, scales, the float parameters, the manifest) and exits, and ``--ckpt FILE`` decodes
from it as int8 (bitwise what quantizing at load gives). One process only (not with --tp).
"""
import argparse
import json
import math
import os
import sys

import numpy as np

from engine import backend
from engine.bpe import BPETokenizer
from engine.checkpoint import load_checkpoint, resolve
from engine.data import ByteTokenizer, DataError, IdTokenizer, tokenizer_from_json
from engine.io import CheckpointError, load_json, load_safetensors, unwritable
from collectives.launch import env_rank, env_world
from models.quantized import is_int8, load_int8, quantize_gpt, save_int8
from parallel.checkpoint import FORMAT as SHARDED, consolidate


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def parse_args(argv):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="DIR", help="train.py out dir (follows latest) or a step_<N> dir")
    src.add_argument("--hf", metavar="DIR", help="Hugging Face GPT-2 directory (config.json + model.safetensors)")
    p.add_argument("--prompt", default=None, help="text to continue (default: a newline)")
    p.add_argument("--prompt-ids", default=None, help="the prompt as whitespace-separated token ids instead")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy; finite, >= 0")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "gpu"), default=backend.default_device(),
                   help="cpu (NumPy) or gpu (CuPy); default: $ENGINE_DEVICE, else cpu")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (mpiexec -n TP): heads, MLP units and "
                   "the vocabulary split, the KV cache sharded by heads; the same tokens as one process")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="int8: per-channel int8 weights for every matrix-vector product (decoding only)")
    p.add_argument("--save-quantized", metavar="FILE", default=None,
                   help="with --ckpt and --quantize int8: write the int8 model to FILE (safetensors) and exit")
    return p.parse_args(argv)


def read_checkpoint(path):
    """(path, manifest, {name: array}) from a sharded checkpoint, an engine/checkpoint.py one,
    or a consolidated .safetensors file; one-line CheckpointError otherwise."""
    if os.path.isfile(path):
        tensors, meta = load_safetensors(path)
        try:
            manifest = json.loads((meta or {})["manifest"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: no manifest in its metadata (not written by consolidate.py: "
                                  f"{type(e).__name__})") from None
        return path, manifest, {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    step_dir = resolve(path)
    manifest = load_json(os.path.join(step_dir, "manifest.json"))
    if isinstance(manifest, dict) and manifest.get("good") is False:       # train.py: its loss had diverged
        print(f"note: checkpoint {step_dir} is not a good one (loss {manifest.get('metrics', {}).get('loss')}, "
              f"the run's lowest {manifest.get('best_loss')}); give --ckpt an earlier step_<N>", file=sys.stderr)
    if isinstance(manifest, dict) and manifest.get("format") == SHARDED:
        return step_dir, manifest, consolidate(step_dir)
    ckpt = load_checkpoint(step_dir)
    return ckpt.path, ckpt.manifest, ckpt.model


def load(args):
    """(model, tokenizer, manifest) from --ckpt or --hf (manifest None); int8 if the file is."""
    from models.gpt import GPTConfig
    from models.terraformer import build_model
    if args.ckpt:
        path, manifest, params = read_checkpoint(args.ckpt)
        try:
            config = GPTConfig(**manifest["config"]["model"])
            tokenizer = tokenizer_from_json(manifest["tokenizer"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path}: bad manifest ({type(e).__name__}: {e})") from None
        model = build_model(config, np.random.default_rng(0))
        dtype = manifest.get("config", {}).get("train", {}).get("dtype", "float32")
        if dtype != "float32":
            model.astype(dtype)
        try:
            if is_int8(manifest):
                load_int8(model, params)
            else:
                model.load_state_dict(params)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
        return model, tokenizer, manifest
    from models.hf import load_hf
    try:
        model = load_hf(args.hf)
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    vocab = model.config.vocab_size
    try:
        bpe = BPETokenizer.from_dir(args.hf)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{args.hf}: cannot read its tokenizer files ({type(e).__name__}: {e})") from None
    return model, bpe or (ByteTokenizer() if vocab == 256 else IdTokenizer(vocab)), None


def check_args(args):
    """One-line ValueError for a flag value that cannot mean anything."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    if args.prompt is not None and args.prompt_ids is not None:
        raise ValueError("give the prompt as --prompt (text) or --prompt-ids (token ids), not both")
    if args.quantize != "none" and args.tp > 1:
        raise ValueError(f"--quantize {args.quantize} decodes on one process: it cannot be combined with --tp {args.tp}")
    if args.save_quantized is not None:
        if args.quantize != "int8" or not args.ckpt:
            raise ValueError("--save-quantized needs --ckpt and --quantize int8")
        if os.path.exists(args.save_quantized):
            raise ValueError(f"{args.save_quantized} already exists; give --save-quantized a new file")
        why = unwritable(args.save_quantized, "file")
        if why:
            raise ValueError(f"--save-quantized {args.save_quantized} {why}")


def encode_prompt(args, model, tokenizer):
    """The prompt's token ids (1-D), checked against the model's vocabulary."""
    vocab = model.config.vocab_size
    ids_only = isinstance(tokenizer, IdTokenizer)
    if args.prompt_ids is not None:
        prompt = IdTokenizer(vocab).encode(args.prompt_ids)
    else:
        try:
            prompt = tokenizer.encode("\n" if args.prompt is None else args.prompt)
        except DataError as e:
            if not ids_only:
                raise
            raise ValueError(f"this model has no text tokenizer (token ids 0..{vocab - 1}): give the prompt as ids "
                             f"with --prompt-ids, e.g. --prompt-ids \"0 1 2\" ({e})") from None
    if len(prompt) == 0:
        raise ValueError("the prompt is empty" + (" (this model reads token ids: give --prompt-ids)"
                                                  if ids_only else ""))
    if int(np.max(prompt)) >= vocab:
        raise ValueError(f"prompt token {int(np.max(prompt))} >= vocab size {vocab}")
    return prompt


def tensor_parallel(model, tp):
    """--tp > 1: cut the model into this rank's Megatron slices (parallel/tensor/model.py); every
    rank decodes the same tokens (the logits are gathered, the generator seeded alike). Returns
    whether this rank prints."""
    if tp == 1 and env_world() == 1:
        return True
    from collectives import Communicator
    from parallel.tensor import shard_gpt
    comm = Communicator()
    if comm.size != tp:
        raise ValueError(f"--tp {tp} needs mpiexec -n {tp}; the job has {comm.size} ranks")
    if tp > 1:
        shard_gpt(model, comm)
    return comm.rank == 0


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        check_args(args)
        backend.set_device(args.device)
        if args.device == "gpu" and env_world() > 1:            # --tp ranks: local rank % GPUs
            from collectives.devices import select_gpu
            select_gpu()
        model, tokenizer, manifest = load(args)
        if is_int8(manifest) and args.tp > 1:
            raise ValueError(f"{args.ckpt} holds int8 weights, which decode on one process: drop --tp {args.tp}")
        if args.quantize == "int8" and type(model).__name__ == "Terraformer":
            raise ValueError("--quantize int8 decodes the GPT and its sparse FFN and QKV, not the Terraformer's "
                             "reversible, LSH or sparse-loss layers yet")
        if args.quantize == "int8" and not is_int8(manifest):
            quantize_gpt(model)
        if args.save_quantized is not None:
            save_int8(args.save_quantized, model, manifest)
            print(f"wrote {args.save_quantized}")
            return 0
        prompt = encode_prompt(args, model, tokenizer)
        main_rank = tensor_parallel(model, args.tp)
    except (ValueError, RuntimeError, DataError, CheckpointError, OSError) as e:
        if env_rank() == 0:                                  # every rank fails alike
            print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    bs = model.config.block_size
    if len(prompt) > bs and main_rank:
        print(f"note: the prompt has {len(prompt)} tokens, more than the model's block_size {bs}: "
              f"it sees only the last {bs}", file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    idx = np.tile(np.asarray(prompt, dtype=np.int64)[None], (args.num_samples, 1))    # (S, T0)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, rng=rng)
    for i, row in enumerate(out if main_rank else ()):
        if i:
            print("\n" + "-" * 40)
        print(tokenizer.decode(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
