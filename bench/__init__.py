"""bench: benchmarks that run their baseline in the same launch and report ratios.
train_step.py: one GPT training step, this engine against PyTorch eager."""
