"""Model components, each group a registry whose names match the config group's options."""
from ablate.models.attention import ATTENTIONS
from ablate.models.mlp import MLPS
from ablate.models.norms import NORMS
from ablate.models.positions import POSITIONS
from ablate.models.transformer import LanguageModel, count_params, matmul_params, positions_for

__all__ = ["ATTENTIONS", "MLPS", "NORMS", "POSITIONS", "LanguageModel", "count_params", "matmul_params",
           "positions_for"]
