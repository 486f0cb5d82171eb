"""The transformers-style Adam that `galore_torch.GaLoreAdamW` forks, and its weight decay.

`scale_by_transformers_adam` differs from `optax.scale_by_adam` only in where `eps` goes (on the
square root of the *uncorrected* second moment) and in folding the bias correction into the step
size; `add_decayed_weights_after_update` is the reference's decoupled decay, applied after the
update. Together (with a learning rate between them) they are transformers' legacy `AdamW`.

References:
  Loshchilov & Hutter, "Decoupled Weight Decay Regularization", https://arxiv.org/abs/1711.05101
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024,
  https://arxiv.org/abs/2403.03507
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_jax.masks import resolve_tree


def _one_minus_pow(beta, t: jax.Array) -> jax.Array:
  """`1 - beta**t` without float32 cancellation: `-expm1(t log(beta))`, `log` in float64 when
  `beta` is a Python number (`1 - 0.999**1` in float32 is off by 1.3e-5 relative; the reference
  computes it in double precision)."""
  t = t.astype(jnp.float32)
  if isinstance(beta, (int, float)):
    return -jnp.expm1(t * math.log(beta)) if beta > 0 else jnp.ones_like(t)
  return -jnp.expm1(t * jnp.log(jnp.asarray(beta, jnp.float32)))


class ScaleByTransformersAdamState(NamedTuple):
  """State of `scale_by_transformers_adam`."""

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_transformers_adam(
  b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, mu_dtype: Any = None
) -> optax.GradientTransformation:
  r"""Adam as in transformers' legacy `AdamW` (the optimizer `galore_torch.GaLoreAdamW` forks).

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
    u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t} + \epsilon}

  `ε` is added to the square root of the *uncorrected* second moment, so it acts like
  `ε / sqrt(1-β₂ᵗ)` in `optax.scale_by_adam`'s placement. Moments are kept in the gradient's dtype
  (bf16 in the paper's pure-bf16 runs) unless `mu_dtype` is given for the first moment.

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to `sqrt(v)`; the reference's default is 1e-6.
    mu_dtype: optional dtype of the first moment.

  Returns:
    An `optax.GradientTransformation` (no learning rate; chain `optax.scale_by_learning_rate`).

  References:
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", https://arxiv.org/abs/1711.05101
  """

  def init_fn(params):
    mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype or jnp.asarray(p).dtype), params)
    nu = jax.tree.map(jnp.zeros_like, params)
    return ScaleByTransformersAdamState(jnp.zeros([], jnp.int32), mu, nu)

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: (b1 * m + (1 - b1) * g).astype(m.dtype), state.mu, updates)
    nu = jax.tree.map(lambda v, g: (b2 * v + (1 - b2) * g * g).astype(v.dtype), state.nu, updates)
    count = optax.safe_increment(state.count)
    step = jnp.sqrt(_one_minus_pow(b2, count)) / _one_minus_pow(b1, count)
    new = jax.tree.map(
      lambda m, v, g: (step * m / (jnp.sqrt(v) + eps)).astype(g.dtype), mu, nu, updates
    )
    return new, ScaleByTransformersAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def add_decayed_weights_after_update(
  weight_decay: float = 0.0,
  learning_rate: optax.ScalarOrSchedule = 1.0,
  mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
  """Decoupled weight decay applied *after* the update, as `GaLoreAdamW` does.

  The reference runs `p <- p + u` then `p <- p - lr * wd * p`. As one update that is
  `u - lr * wd * (p + u)`. Place it last in a chain, after the learning rate was applied.

  Args:
    weight_decay: decay coefficient `wd`.
    learning_rate: the (unscaled) learning rate or schedule, evaluated at the same step count as
      `optax.scale_by_learning_rate` in the same chain.
    mask: optional pytree/callable of bools: which leaves decay (default: all).

  Returns:
    An `optax.GradientTransformation` that needs `params`.
  """

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_decayed_weights_after_update needs `params` in update().")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    mask_tree = resolve_tree(mask, params)
    if mask_tree is None:
      mask_tree = jax.tree.map(lambda _: True, params)

    def decay(u, p, m):
      if not m:
        return u
      return (u - lr * weight_decay * (p + u)).astype(u.dtype)

    new = jax.tree.map(decay, updates, params, mask_tree)
    return new, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
