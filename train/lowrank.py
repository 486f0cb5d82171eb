"""The paper's low-rank baselines as a transformation of the parameter tree: LoRA, ReLoRA, W = BA.

GaLore's Table 2 compares it with three methods that change what is trained rather than how the
gradient is used. Each replaces every attention/MLP kernel ``W_IxO`` (``train.model``'s
``is_galore_target``) of the parameter tree by factors ``a_IxR`` and ``b_RxO`` (``[N, ...]``
stacked under ``scan_layers``), stored beside or instead of the kernel in that linear's dict:

* ``low_rank``: ``{"lora_a", "lora_b"}``, the kernel is ``a @ b`` (no full-rank weight at all),
  both factors trained from a random init whose product has the kernel's init std.
* ``lora``: ``{"kernel", "lora_a", "lora_b"}``, the kernel is ``W + (alpha / r) a @ b`` with
  ``W`` frozen (in pre-training it stays at its random init, as in the paper), ``a`` uniform in
  ``±1/sqrt(I)`` (peft's Kaiming-uniform with ``a = sqrt(5)``) and ``b = 0``, so the initial
  logits are the base model's, exactly.
* ``relora``: LoRA whose factors are merged into ``W`` every ``reset_every`` steps
  (``restart``): ``W += (alpha / r) a @ b``, ``a`` drawn afresh, ``b = 0``, the Adam moments of
  the factors zeroed (ReLoRA prunes 99% of them by magnitude; zeroing is the limit) and the
  learning rate restarted from 0 with a short linear warmup (``jagged_schedule``).

The embedding, LM head and norms stay full-rank and trainable, as in ReLoRA. The model itself is
unchanged: ``model_params`` turns the tree back into the model's own parameters (the kernels
materialised), which ``nnx.merge`` takes. Frozen kernels get no optimizer state:
``param_labels`` labels them ``"frozen"`` for ``optax.multi_transform`` with
``optax.set_to_zero()``.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685
  Lialin et al., "ReLoRA: High-Rank Training Through Low-Rank Updates",
  https://arxiv.org/abs/2307.05695
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (Table 2),
  https://arxiv.org/abs/2403.03507
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.model import is_galore_target

METHODS = ("lora", "relora", "low_rank")
FACTORS = ("lora_a", "lora_b")  # keys of the factors inside a targeted linear's dict


def _is_target_linear(path: tuple, node: Any) -> bool:
  """A model linear's dict whose kernel is a GaLore target (attention/MLP)."""
  return isinstance(node, dict) and "kernel" in node and is_galore_target((*path, "kernel"))


def _is_adapted_linear(path: tuple, node: Any) -> bool:
  return isinstance(node, dict) and "lora_a" in node


def _map_linears(tree: dict, match: Callable, fn: Callable, path: tuple = ()) -> dict:
  """A copy of a nested dict with `fn(path, node)` in place of every node that `match`es."""
  out = {}
  for key, node in tree.items():
    if match((*path, key), node):
      out[key] = fn((*path, key), node)
    elif isinstance(node, dict):
      out[key] = _map_linears(node, match, fn, (*path, key))
    else:
      out[key] = node
  return out


def _factor_a(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """LoRA's `a_IxR`: peft's Kaiming-uniform (a = sqrt(5)) on torch's `(R, I)`: U(±1/sqrt(I))."""
  bound = 1.0 / math.sqrt(shape[-2])
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Adapter:
  """One of `METHODS` with its static settings (resolved from the config before `jit`).

  Attributes:
    method: "lora", "relora" or "low_rank".
    rank: R, the rank of every factor pair.
    alpha: LoRA's alpha; the factors' product is scaled by `alpha / rank` (low_rank: by 1).
    init_std: the model's kernel init std; low_rank's product `a @ b` starts with this std.
    reset_every: ReLoRA's merge period in steps (0: never; only relora merges).
  """

  method: str
  rank: int
  alpha: float = 32.0
  init_std: float = 0.02
  reset_every: int = 0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"Adapter.method={self.method!r} is not one of {METHODS}.")

  @property
  def scale(self) -> float:
    """Multiplier of `a @ b` in the kernel."""
    return 1.0 if self.method == "low_rank" else self.alpha / self.rank

  def init(self, params: dict, key: jax.Array) -> dict:
    """The adapted tree from the model's pure-dict parameters (`nnx.to_pure_dict`)."""
    counter = iter(range(1 << 30))

    def adapt(path, node):
      w = node["kernel"]
      k_a, k_b = jax.random.split(jax.random.fold_in(key, next(counter)))
      shape_a, shape_b = (*w.shape[:-1], self.rank), (*w.shape[:-2], self.rank, w.shape[-1])
      out = {k: v for k, v in node.items() if k != "kernel"}
      if self.method == "low_rank":
        # std(a @ b) = std_a std_b sqrt(R) = init_std with std_a = std_b.
        std = math.sqrt(self.init_std / math.sqrt(self.rank))
        out["lora_a"] = (std * jax.random.normal(k_a, shape_a, jnp.float32)).astype(w.dtype)
        out["lora_b"] = (std * jax.random.normal(k_b, shape_b, jnp.float32)).astype(w.dtype)
      else:
        out.update(kernel=w, lora_a=_factor_a(k_a, shape_a, w.dtype))
        out["lora_b"] = jnp.zeros(shape_b, w.dtype)
      return out

    return _map_linears(params, _is_target_linear, adapt)

  def kernel(self, node: dict) -> jax.Array:
    """The effective kernel of an adapted linear: `W + s a @ b`, or `a @ b` (low_rank)."""
    a, b = node["lora_a"], node["lora_b"]
    delta = jnp.matmul(a, b, preferred_element_type=jnp.float32)
    if "kernel" not in node:
      return delta.astype(a.dtype)
    w = node["kernel"]
    # b = 0 gives `W + 0`: exactly W (LoRA at init, ReLoRA after a merge).
    return (w.astype(jnp.float32) + self.scale * delta).astype(w.dtype)

  def model_params(self, tree: dict) -> dict:
    """The model's own pure-dict parameters (for `nnx.merge`), kernels materialised."""

    def plain(path, node):
      out = {k: v for k, v in node.items() if k not in FACTORS}
      out["kernel"] = self.kernel(node)
      return out

    return _map_linears(tree, _is_adapted_linear, plain)

  def merge(self, tree: dict, key: jax.Array) -> dict:
    """ReLoRA's merge-and-reinit: `W <- W + s a @ b` (this exact `kernel`), fresh `a`, `b = 0`."""
    counter = iter(range(1 << 30))

    def merged(path, node):
      k = jax.random.fold_in(key, next(counter))
      a, b = node["lora_a"], node["lora_b"]
      out = dict(node, kernel=self.kernel(node), lora_a=_factor_a(k, a.shape, a.dtype))
      out["lora_b"] = jnp.zeros_like(b)
      return out

    return _map_linears(tree, _is_adapted_linear, merged)

  def restart(self, tree: dict, opt_state: Any, key: jax.Array) -> tuple[dict, Any]:
    """ReLoRA's reset: merged tree and the optimizer state with the factors' moments zeroed."""
    return self.merge(tree, key), reset_factor_moments(opt_state)


def reset_factor_moments(opt_state: Any) -> Any:
  """Zeros every floating-point state leaf that belongs to a factor (its path names one).

  Optax states mirror the parameter tree, so a factor's moments sit under its `lora_a` /
  `lora_b` key; step counters and the other parameters' moments are left as they are.
  """

  def reset(path, x):
    names = {getattr(k, "key", None) for k in path}
    floating = hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
    return jnp.zeros_like(x) if floating and names & set(FACTORS) else x

  return jax.tree_util.tree_map_with_path(reset, opt_state)


def param_labels(tree: Any) -> Any:
  """`"frozen"` on LoRA's base kernels (the targeted kernels still in the tree), else `"train"`."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "frozen" if is_galore_target(path) else "train", tree
  )


def trainable_mask(tree: Any) -> Any:
  """True on the leaves the optimizer trains."""
  return jax.tree.map(lambda label: label == "train", param_labels(tree))


def jagged_schedule(base: optax.Schedule, reset_every: int, warmup: int) -> optax.Schedule:
  """ReLoRA's jagged cosine: `base`, times `(s mod reset_every) / warmup` for the first
  `warmup` steps after each restart (step s = k * reset_every, k >= 1, gets learning rate 0)."""

  def schedule(count):
    s = jnp.asarray(count, jnp.int32)
    since = s % reset_every
    ramp = jnp.minimum(1.0, since.astype(jnp.float32) / max(1, warmup))
    return base(count) * jnp.where((s >= reset_every) & (since < warmup), ramp, 1.0)

  return schedule


def count(tree: Any) -> dict[str, int]:
  """Entries and bytes of an adapted tree (arrays or `ShapeDtypeStruct`s).

  Returns:
    `{"trainable": ..., "frozen": ..., "weight_bytes": ...}` (`weight_bytes` counts every
    stored parameter, frozen ones included).
  """
  out = {"trainable": 0, "frozen": 0, "weight_bytes": 0}
  for x, label in zip(jax.tree.leaves(tree), jax.tree.leaves(param_labels(tree))):
    size = int(np.prod(x.shape))
    out["trainable" if label == "train" else "frozen"] += size
    out["weight_bytes"] += size * jnp.dtype(x.dtype).itemsize
  return out
