"""Hugging Face safetensors checkpoints in (BF16, FP32, block-FP8) and out."""

from glmjax.weights.checkpoint import CheckpointError, HFCheckpoint, load_pretrained, save_pretrained

__all__ = ["CheckpointError", "HFCheckpoint", "load_pretrained", "save_pretrained"]
