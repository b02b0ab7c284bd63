"""Lineage: signed, hash-chained records of every unlearning batch (in-toto Statements in DSSE
envelopes, Ed25519), and their verification."""
