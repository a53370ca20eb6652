"""Kept for old imports; the builders live in :mod:`monitor.testing`."""

from monitor.testing import random_sae, tied_sae, tiny_model, tiny_tokenizer  # noqa: F401
