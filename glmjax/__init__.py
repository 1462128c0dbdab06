"""glmjax: GLM-5.2 (glm_moe_dsa) in JAX."""

from glmjax.config import GlmMoeDsaConfig, load_config
from glmjax.errors import CheckpointError, ConfigError, GlmjaxError, InputError
from glmjax.model import GlmMoeDsa, ModelOptions, ModelOutput
from glmjax.weights import load_pretrained, save_pretrained

__all__ = [
    "CheckpointError", "ConfigError", "GlmMoeDsa", "GlmMoeDsaConfig", "GlmjaxError", "InputError", "ModelOptions",
    "ModelOutput", "load_config", "load_pretrained", "save_pretrained",
]
