"""Prefect 3 flows: thin wrappers that run lmeraser's stage functions as tasks and track them."""
