"""Backends: each serves the normalised problem of peer_attention.problem (see base.py)."""
