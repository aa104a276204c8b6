"""The bench suite of peer_attention: run `python -m bench --help` from the repository root."""
