"""GLM-MoE-DSA layers: norms and rope (layers, rope), MLA + DSA attention (attention), MoE (moe), dense MLP
(mlp), decoder layers and the scanned stack (decoder), the MTP layer (mtp), and the whole model
(transformer)."""

from glmjax.model.options import ModelOptions
from glmjax.model.transformer import GlmMoeDsa, ModelOutput

__all__ = ["GlmMoeDsa", "ModelOptions", "ModelOutput"]
