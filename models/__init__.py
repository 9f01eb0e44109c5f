"""models: networks built from engine.nn. gpt.py is GPT-2 (Radford et al. 2019) in the
Hugging Face parameter layout; generate.py decodes with a KV cache; hf.py converts to and from Hugging Face checkpoints."""
from .gpt import GPT, GPTConfig, Block, CausalSelfAttention, MLP  # noqa: F401
