"""Unlearning: requests and their journal, the exact rebuild, purge and scan."""
