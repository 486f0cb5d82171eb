"""galore-jax: GaLore (Gradient Low-Rank Projection) as composable optax transformations.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024,
  https://arxiv.org/abs/2403.03507
"""

from galore_jax import memory
from galore_jax.adam8bit import (
  QuantizedMoment,
  ScaleByAdam8bitState,
  adam8bit_state_bytes,
  adamw_8bit,
  galore_adamw_8bit,
  llama_vocab_mask,
  scale_by_adam_8bit,
)
from galore_jax.transform import (
  ON_REFRESH,
  PROJ_TYPES,
  SUBSPACE_METHODS,
  GaLoreDimensionNumbers,
  GaLoreState,
  RefreshStats,
  ScaleByTransformersAdamState,
  add_decayed_weights_after_update,
  galore,
  galore_adamw,
  galore_mask_by_path,
  galore_refresh_metrics,
  llama_galore_mask,
  rotate_moments,
  scale_by_galore,
  scale_by_transformers_adam,
)

__all__ = [
  "ON_REFRESH",
  "PROJ_TYPES",
  "SUBSPACE_METHODS",
  "QuantizedMoment",
  "ScaleByAdam8bitState",
  "adam8bit_state_bytes",
  "adamw_8bit",
  "galore_adamw_8bit",
  "llama_vocab_mask",
  "scale_by_adam_8bit",
  "GaLoreDimensionNumbers",
  "GaLoreState",
  "RefreshStats",
  "ScaleByTransformersAdamState",
  "add_decayed_weights_after_update",
  "galore",
  "galore_adamw",
  "galore_mask_by_path",
  "galore_refresh_metrics",
  "llama_galore_mask",
  "memory",
  "rotate_moments",
  "scale_by_galore",
  "scale_by_transformers_adam",
]

__version__ = "0.1.0"
