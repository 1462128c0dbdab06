"""Serving. For now: the no-cache greedy reference decoder (the yardstick for the KV-cache and speculative
decoders that come next)."""

from glmjax.serve.reference_decode import greedy_decode_reference

__all__ = ["greedy_decode_reference"]
