"""galore-jax: GaLore (Gradient Low-Rank Projection) as composable optax transformations.

Modules, from the bottom up (each imports only those above it):

* `projection`: the projection math (side rules, matrix layouts, project / project back).
* `masks`: path-based leaf selection (`galore_mask_by_path`, `llama_galore_mask`).
* `adam`: transformers-style Adam and after-update weight decay (what `GaLoreAdamW` forks).
* `adam8bit`: bitsandbytes' block-wise 8-bit Adam core.
* `subspace`: the refresh's range finders (exact SVD, warm-started randomized, accuracy-controlled).
* `targets`: which leaves are projected, as what matrices, at what state cost
  (`galore_targets`).
* `transform`: `scale_by_galore`, its state and its options.
* `alias`: `galore`, `galore_adamw`, `adamw_8bit`, `galore_adamw_8bit`.
* `layerwise`: updating one leaf (or one layer of a stacked leaf) at a time, in place.
* `memory`: exact optimizer-state bytes.
* `sharding`: partition specs of parameters and optimizer states for a user's sharded loop.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024,
  https://arxiv.org/abs/2403.03507
"""

from galore_jax import (
  memory,
  projection,
  sharding,
  subspace,
)
from galore_jax.adam import (
  ScaleByTransformersAdamState,
  add_decayed_weights_after_update,
  scale_by_transformers_adam,
)
from galore_jax.adam8bit import (
  QuantizedMoment,
  ScaleByAdam8bitState,
  adam8bit_state_bytes,
  scale_by_adam_8bit,
)
from galore_jax.alias import adamw_8bit, galore, galore_adamw, galore_adamw_8bit
from galore_jax.masks import galore_mask_by_path, llama_galore_mask, llama_vocab_mask
from galore_jax.projection import GaLoreDimensionNumbers
from galore_jax.targets import Target, format_targets, galore_targets
from galore_jax.transform import (
  ON_REFRESH,
  PROJ_TYPES,
  STATIC_ARGS,
  SUBSPACE_METHODS,
  GaLoreOptions,
  GaLoreState,
  RefreshStats,
  galore_refresh_metrics,
  rotate_moments,
  scale_by_galore,
  static_args,
)

__all__ = [
  "ON_REFRESH",
  "PROJ_TYPES",
  "STATIC_ARGS",
  "SUBSPACE_METHODS",
  "Target",
  "GaLoreDimensionNumbers",
  "GaLoreOptions",
  "GaLoreState",
  "QuantizedMoment",
  "RefreshStats",
  "ScaleByAdam8bitState",
  "ScaleByTransformersAdamState",
  "adam8bit_state_bytes",
  "adamw_8bit",
  "add_decayed_weights_after_update",
  "galore",
  "galore_adamw",
  "galore_adamw_8bit",
  "galore_mask_by_path",
  "format_targets",
  "galore_refresh_metrics",
  "galore_targets",
  "llama_galore_mask",
  "llama_vocab_mask",
  "memory",
  "projection",
  "subspace",
  "rotate_moments",
  "scale_by_adam_8bit",
  "scale_by_galore",
  "scale_by_transformers_adam",
  "sharding",
  "static_args",
]

__version__ = "0.2.0"
