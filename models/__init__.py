"""models: networks built from engine.nn. gpt.py is GPT-2 (Radford et al. 2019) in the
Hugging Face parameter layout, its attention in attention.py; generate.py decodes with a KV cache;
hf.py converts to and from Hugging Face checkpoints."""
from .attention import CausalSelfAttention  # noqa: F401
from .gpt import GPT, GPTConfig, Block, MLP  # noqa: F401
