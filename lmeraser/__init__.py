"""lmeraser: exact, auditable unlearning for prompt-tuned vision transformers."""

from lmeraser.numerics import boot

__version__ = "0.1.0"

# Before torch, numpy or faiss load (they read their CPU pins then): lmeraser/numerics.py.
boot()
