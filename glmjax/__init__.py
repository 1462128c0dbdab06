"""glmjax: GLM-5.2 (glm_moe_dsa) in JAX."""

from glmjax.config import ConfigError, GlmMoeDsaConfig, load_config
from glmjax.model import GlmMoeDsa, ModelOptions, ModelOutput
from glmjax.weights import CheckpointError, load_pretrained, save_pretrained

__all__ = [
    "CheckpointError", "ConfigError", "GlmMoeDsa", "GlmMoeDsaConfig", "ModelOptions", "ModelOutput",
    "load_config", "load_pretrained", "save_pretrained",
]
