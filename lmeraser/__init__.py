"""lmeraser: exact, auditable unlearning for prompt-tuned vision transformers."""

__version__ = "0.1.0"
