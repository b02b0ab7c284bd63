"""Data: sources, deterministic splits with stable ids, and the Great Expectations suite."""
