"""A supervisor that keeps a training job going when ranks die: python -m elastic (supervisor.py)."""
