"""Integrations with other libraries; each imports its library only when used
(e.g. peer_attention.integrations.transformers.register())."""
