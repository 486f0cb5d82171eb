"""Ready-made optimizers: GaLore around any optax optimizer, GaLoreAdamW, and the 8-bit ones.

Each alias is a chain of the library's transforms:

* `galore(inner, ...)`: `scale_by_galore(inner, ...)` (any optax optimizer in the low-rank space).
* `galore_adamw`: `galore_torch.GaLoreAdamW`: GaLore around the transformers-style Adam, then the
  learning rate, then the reference's after-update weight decay.
* `adamw_8bit`: bitsandbytes' `AdamW8bit`.
* `galore_adamw_8bit`: `galore_torch.GaLoreAdamW8bit`.

GaLore's options (`GaLoreOptions`: `dimension_numbers`, `projector_dtype`, `subspace_method`,
`oversample`, `power_iters`, `seed`, `on_refresh`, `align_signs`, ...) are documented once, in
`scale_by_galore`; every GaLore alias takes them by keyword and shows them in its signature.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024,
  https://arxiv.org/abs/2403.03507
  Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022,
  https://arxiv.org/abs/2110.02861
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from galore_jax.adam import add_decayed_weights_after_update, scale_by_transformers_adam
from galore_jax.adam8bit import DEFAULT_BLOCK_SIZE, DEFAULT_MIN_8BIT_SIZE, scale_by_adam_8bit
from galore_jax.transform import _DEFAULTS, scale_by_galore, with_galore_options


@with_galore_options
def galore(
  inner: optax.GradientTransformation,
  rank: int = _DEFAULTS.rank,
  update_proj_gap: int = _DEFAULTS.update_proj_gap,
  scale: float = _DEFAULTS.scale,
  proj_type: str = _DEFAULTS.proj_type,
  **options,
) -> optax.GradientTransformation:
  """Wraps any optax optimizer so that it runs in GaLore's low-rank space.

  Use this instead of `optax.chain(galore(...), adam(...))`: in a chain, `adam` would be
  initialised on the full-size params and would receive the already projected-back updates.
  Here `inner` is initialised on the low-rank shapes and runs on the projected gradients.

  Args:
    inner: any optax optimizer, e.g. `optax.adam(1e-3)`, `optax.adafactor(1e-2)`,
      `optax.lion(1e-4)`. If it reads `params` (weight decay, Adafactor's parameter scale), it
      gets each projected leaf's low-rank coordinates `Pᵀ W` (so `update` needs `params`):
      decay inside `inner` shrinks the weight's component in the subspace, times `scale`. For
      the reference's decay of the whole weight, use `galore_adamw(weight_decay=...)` or chain
      `gj.add_decayed_weights_after_update(wd, lr)` after `galore`.
    rank: subspace rank.
    update_proj_gap: refresh period in steps.
    scale: multiplies the projected-back update of targeted leaves.
    proj_type: see `scale_by_galore`.
    **options: GaLore's other options (`mask`, `dimension_numbers`, ...; see `scale_by_galore`).

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import optax, galore_jax as gj
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  gj.galore(optax.adam(1e-3), rank=128, update_proj_gap=200, scale=0.25))

  References:
    Zhao et al., https://arxiv.org/abs/2403.03507
  """
  return scale_by_galore(inner, rank, update_proj_gap, scale, proj_type, **options)


@with_galore_options
def galore_adamw(
  learning_rate: optax.ScalarOrSchedule,
  rank: int = _DEFAULTS.rank,
  update_proj_gap: int = _DEFAULTS.update_proj_gap,
  scale: float = _DEFAULTS.scale,
  proj_type: str = _DEFAULTS.proj_type,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  weight_decay: float = 0.0,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  **options,
) -> optax.GradientTransformation:
  """`galore_torch.GaLoreAdamW`, exactly.

  Transformers-style Adam (`scale_by_transformers_adam`: eps on `sqrt` of the uncorrected second
  moment, bias correction folded into the step size) on the low-rank gradients of the masked
  leaves and at full rank on the others; `scale` only on projected leaves; decoupled weight decay
  `lr * wd * p` on every leaf, applied after the update; moments kept across refreshes.

  Args:
    learning_rate: learning rate or schedule.
    rank: subspace rank.
    update_proj_gap: refresh period in steps.
    scale: GaLore's `α`.
    proj_type: see `scale_by_galore`.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to `sqrt(v)` (reference default 1e-6).
    weight_decay: decoupled decay coefficient.
    mask: which leaves are projected (see `scale_by_galore`); `galore_jax.llama_galore_mask`
      reproduces the paper's attention + MLP selection.
    **options: GaLore's other options (`dimension_numbers`, ...; see `scale_by_galore`).

  Under `optax.inject_hyperparams`, declare the shape-fixing arguments static:
  `static_args=galore_jax.static_args(galore_adamw)`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import galore_jax as gj
    >>> tx = gj.galore_adamw(1e-2, rank=128, update_proj_gap=200, scale=0.25,
    ...                      mask=gj.llama_galore_mask)

  References:
    Zhao et al., https://arxiv.org/abs/2403.03507
  """
  return optax.chain(
    scale_by_galore(
      scale_by_transformers_adam(b1, b2, eps),
      rank,
      update_proj_gap,
      scale,
      proj_type,
      mask=mask,
      **options,
    ),
    optax.scale_by_learning_rate(learning_rate),
    add_decayed_weights_after_update(weight_decay, learning_rate),
  )


def adamw_8bit(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 1e-2,
  *,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  block_size: int = DEFAULT_BLOCK_SIZE,
  min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
  float32_mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
  r"""bitsandbytes' `AdamW8bit`: 8-bit Adam, then decoupled weight decay after the step.

  bitsandbytes' CUDA kernel (the one the GaLore reference ran) first applies the Adam step and
  then multiplies the parameter by `1 - lr * wd`:

  .. math::
    p_{t} = (p_{t-1} - \eta\, u_t)(1 - \eta\lambda)

  (its CPU and Triton kernels decay first, `p (1 - ηλ) - η u`, which differs by `η²λ u`). This
  chain reproduces the CUDA placement with `add_decayed_weights_after_update`.

  Args:
    learning_rate: `η`, a float or a schedule.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: `ε` (on `sqrt(v̂)`; see `scale_by_adam_8bit`).
    weight_decay: `λ` (bitsandbytes' AdamW8bit default 1e-2).
    mask: which leaves decay: a pytree of bools or a callable `params -> pytree` (default all).
    block_size: quantisation block size (static).
    min_8bit_size: smaller leaves keep float32 moments (static).
    float32_mask: leaves whose moments stay float32 (see `scale_by_adam_8bit`).

  Returns:
    An `optax.GradientTransformation`; `update` needs `params`.

  Example:
    >>> import jax.numpy as jnp, optax, galore_jax as gj
    >>> tx = gj.adamw_8bit(optax.cosine_decay_schedule(1e-3, 1000), weight_decay=0.1)
    >>> params = {"w": jnp.ones((64, 128))}
    >>> updates, state = tx.update({"w": jnp.ones((64, 128))}, tx.init(params), params)

  References:
    Dettmers et al., "8-bit Optimizers via Block-wise Quantization",
    https://arxiv.org/abs/2110.02861
  """
  return optax.chain(
    scale_by_adam_8bit(
      b1, b2, eps, block_size=block_size, min_8bit_size=min_8bit_size, float32_mask=float32_mask
    ),
    optax.scale_by_learning_rate(learning_rate),
    add_decayed_weights_after_update(weight_decay, learning_rate, mask),
  )


@with_galore_options
def galore_adamw_8bit(
  learning_rate: optax.ScalarOrSchedule,
  rank: int = _DEFAULTS.rank,
  update_proj_gap: int = _DEFAULTS.update_proj_gap,
  scale: float = _DEFAULTS.scale,
  proj_type: str = _DEFAULTS.proj_type,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  *,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  block_size: int = DEFAULT_BLOCK_SIZE,
  min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
  float32_mask: Any | Callable[[optax.Params], Any] | None = None,
  **options,
) -> optax.GradientTransformation:
  r"""`galore_torch.GaLoreAdamW8bit`: GaLore with 8-bit low-rank Adam moments.

  Masked leaves: the gradient is projected to rank `rank`, 8-bit Adam (`scale_by_adam_8bit`)
  runs on the low-rank gradient (its moments are 8-bit when the *low-rank* shape has at least
  `min_8bit_size` entries, as in the reference), the result is projected back times `scale`.
  Other leaves: full-rank 8-bit Adam. Then, for every leaf,

  .. math::
    p_t = (p_{t-1} - \eta\, \tilde u_t)(1 - \eta\lambda)

  which is both the reference's placement for GaLore leaves (decay stashed, applied after the
  update on the full weight) and bitsandbytes' CUDA in-kernel placement for plain leaves, so one
  chain is exact for both.

  Args:
    learning_rate: `η`, a float or a schedule.
    rank: subspace rank (static).
    update_proj_gap: refresh period in steps (static).
    scale: GaLore's `α`.
    proj_type: see `galore_jax.scale_by_galore`.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: `ε` (bitsandbytes' default 1e-8; on `sqrt(v̂)`).
    weight_decay: `λ` (the reference's class default is 1e-2; its training script passes its own).
    mask: which leaves GaLore projects (see `scale_by_galore`);
      `galore_jax.llama_galore_mask` is the paper's attention + MLP selection.
    block_size: quantisation block size (static).
    min_8bit_size: smaller (low-rank) leaves keep float32 moments (static).
    float32_mask: leaves whose moments stay float32 (see `scale_by_adam_8bit`); a callable gets
      the tree of (low-rank) moment shapes, laid out like the params, so path-based masks such as
      `llama_vocab_mask` work unchanged.
    **options: GaLore's other options (`dimension_numbers`, `projector_dtype`,
      `subspace_method`, ...; see `scale_by_galore`). `on_refresh` must stay `"keep"` (the
      reference): resetting or rotating 8-bit moments is not implemented.

  Returns:
    An `optax.GradientTransformation`; `update` needs `params`.

  Example:
    >>> import galore_jax as gj
    >>> tx = gj.galore_adamw_8bit(1e-2, rank=128, update_proj_gap=200, scale=0.25,
    ...                           mask=gj.llama_galore_mask)

  References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    https://arxiv.org/abs/2403.03507
  """
  if options.get("on_refresh", "keep") != "keep":
    raise ValueError(
      f"galore_adamw_8bit: on_refresh={options['on_refresh']!r} is not supported with "
      "8-bit moments (they are stored as codes + scales); use on_refresh='keep'."
    )
  inner = scale_by_adam_8bit(
    b1, b2, eps, block_size=block_size, min_8bit_size=min_8bit_size, float32_mask=float32_mask
  )
  return optax.chain(
    scale_by_galore(inner, rank, update_proj_gap, scale, proj_type, mask=mask, **options),
    optax.scale_by_learning_rate(learning_rate),
    add_decayed_weights_after_update(weight_decay, learning_rate),
  )
