"""Optimizers and learning-rate schedules from a config, through galore_jax's public API.

Every function takes the `config.optimizer` section (`o` below) and, where it needs them, the
run's length and whether the fused layer-wise step is used, never the whole config.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

import galore_jax as gj
from train import lowrank

OPTIMIZERS = (
  "galore_adamw",
  "adamw",
  "galore",
  "adamw_8bit",
  "galore_adamw_8bit",
  *lowrank.METHODS,  # the paper's low-rank baselines (train/lowrank.py)
)
INNER_OPTIMIZERS = ("adam", "adafactor", "lion", "sgd")


def warmup_cosine_schedule(
  peak: float, num_steps: int, warmup_steps: int, min_ratio: float
) -> optax.Schedule:
  """The reference's schedule: `lr(0) = 0`, linear warmup, cosine to `min_ratio * peak`.

  Step s (0-based, the optimizer's count before the update) gets `peak * f(s)` with
  `f(s) = s / warmup` during warmup, then `min + (1 - min) (1 + cos(pi p)) / 2`,
  `p = (s - warmup) / (num_steps - warmup)` (peft_pretraining/training_utils.py, no restarts).
  """

  def schedule(count):
    s = jnp.asarray(count, jnp.float32)
    warm = s / max(1, warmup_steps)
    progress = (s - warmup_steps) / max(1, num_steps - warmup_steps)
    cosine = min_ratio + (1 - min_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(progress, 0, 1)))
    return peak * jnp.where(s < warmup_steps, warm, cosine)

  return schedule


def make_schedule(o: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """The learning-rate schedule of the optimizer section `o` over `num_steps` updates."""
  warmup = int(round(o.warmup_fraction * num_steps))
  schedule = warmup_cosine_schedule(o.learning_rate, num_steps, warmup, o.min_lr_ratio)
  if o.name == "relora":
    schedule = lowrank.jagged_schedule(schedule, o.relora_reset_every, o.relora_restart_warmup)
  return schedule


def galore_vocab_mask(params) -> Any:
  """GaLore's targets with `config.optimizer.galore_vocab`: the attention and MLP kernels, the
  token embedding and the LM head."""
  return jax.tree.map(operator.or_, gj.llama_galore_mask(params), gj.llama_vocab_mask(params))


def galore_mask(o: ml_collections.ConfigDict) -> Callable:
  """The GaLore mask of the optimizer section `o` (`galore_vocab`: embedding and head too)."""
  return galore_vocab_mask if o.get("galore_vocab", False) else gj.llama_galore_mask


def _galore_options(o: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(
    rank=o.rank,
    update_proj_gap=o.update_proj_gap,
    scale=o.scale,
    proj_type=o.proj_type,
    mask=galore_mask(o),
    projector_dtype=jnp.dtype(o.projector_dtype) if o.projector_dtype else None,
    subspace_method=o.subspace_method,
    oversample=o.oversample,
    power_iters=o.power_iters,
    on_refresh=o.on_refresh,
    align_signs=o.align_signs,
    # 0 (the config's "off"): fixed power_iters; else the certified fraction to reach.
    energy_tol=o.energy_tol or None,
    max_power_iters=o.max_power_iters,
  )


# Keys of `refresh_metrics` (`galore_jax.galore_refresh_metrics`) in the step's metrics.
REFRESH_PREFIX = "refresh_"


def refresh_metrics(opt_state: optax.OptState) -> dict[str, jax.Array]:
  """Iterations and certified energy of the latest GaLore refresh (`{}` without energy_tol)."""
  return gj.galore_refresh_metrics(opt_state)


def is_refresh_step(o: ml_collections.ConfigDict, count: int) -> bool:
  """Whether the update with optimizer count `count` (0-based) refreshed GaLore's subspaces."""
  return "galore" in o.name and count % o.update_proj_gap == 0


def adamw(lr: optax.ScalarOrSchedule, o: ml_collections.ConfigDict):
  """Full-rank AdamW with the same math as galore_adamw's non-GaLore leaves (GaLoreAdamW)."""
  return optax.chain(
    gj.scale_by_transformers_adam(o.b1, o.b2, o.eps),
    optax.scale_by_learning_rate(lr),
    gj.add_decayed_weights_after_update(o.weight_decay, lr),
  )


def make_optimizer(
  o: ml_collections.ConfigDict, num_steps: int, *, fused_update: bool = False
) -> optax.GradientTransformation:
  """Builds the optimizer named by `o.name` (the `config.optimizer` section; see OPTIMIZERS).

  * `galore_adamw`: the paper's setup: GaLore on attention and MLP kernels, the other leaves
    plain AdamW at the full learning rate (`galore_jax.galore_adamw`).
  * `adamw`: the full-rank baseline, transformers-style AdamW (same math as the above).
  * `galore`: GaLore over another optax optimizer (`config.optimizer.inner`), decay after it.
  * `adamw_8bit` / `galore_adamw_8bit`: 8-bit moments (galore_jax.adam8bit).
  * `lora` / `relora` / `low_rank`: AdamW on the trainable leaves of `train.lowrank`'s adapted
    tree; LoRA's frozen kernels get `optax.set_to_zero()` (no state, not clipped).
  Global-norm clipping (`grad_clip_norm > 0`) runs first, on the full-rank gradients (not with
  `fused_update`: the fused layer-wise step clips itself, it never holds the whole gradient).
  `num_steps` is the schedule's length (`config.train.num_steps`).
  `target_lr_scale` (adamw only) multiplies the attention/MLP kernels' updates, i.e. their
  learning rate (and decoupled weight decay, which is proportional to it).
  """
  lr = make_schedule(o, num_steps)
  if o.name in lowrank.METHODS:
    tx = adamw(lr, o)
    if o.grad_clip_norm > 0:
      tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, lowrank.param_labels)
  if o.name == "galore_adamw":
    tx = gj.galore_adamw(
      lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, **_galore_options(o)
    )
  elif o.name == "adamw":
    tx = adamw(lr, o)
    if o.target_lr_scale != 1.0:  # (absent at 1: the state and checkpoints stay as they were)
      tx = optax.chain(tx, optax.masked(optax.scale(o.target_lr_scale), gj.llama_galore_mask))
  elif o.name == "galore":
    if o.inner == "adam":
      inner = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    elif o.inner == "adafactor":
      inner = optax.adafactor(
        lr, decay_rate=0.8, multiply_by_parameter_scale=False, momentum=o.b1 or None
      )
    elif o.inner == "lion":
      inner = optax.lion(lr, b1=o.b1, b2=o.b2)
    elif o.inner == "sgd":
      inner = optax.sgd(lr, momentum=o.b1 or None)
    else:
      raise ValueError(f"config.optimizer.inner={o.inner!r} is not one of {INNER_OPTIMIZERS}.")
    tx = optax.chain(
      gj.galore(inner, **_galore_options(o)),
      gj.add_decayed_weights_after_update(o.weight_decay, lr),
    )
  elif o.name in ("adamw_8bit", "galore_adamw_8bit"):
    tx = _make_8bit(o, lr)
  else:
    raise ValueError(f"config.optimizer.name={o.name!r} is not one of {OPTIMIZERS}.")
  if o.grad_clip_norm > 0 and not fused_update:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx


def _make_8bit(o: ml_collections.ConfigDict, lr: optax.Schedule):
  kw = dict(b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  kw["float32_mask"] = gj.llama_vocab_mask if o.float32_vocab_moments else None
  if o.name == "adamw_8bit":
    return gj.adamw_8bit(lr, **kw)
  return gj.galore_adamw_8bit(lr, **kw, **_galore_options(o))


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_optimizer_config(
  o: ml_collections.ConfigDict, params: Any, *, fused_update: bool = False
) -> None:
  """Errors naming the `config.optimizer` field, for settings of `o` that cannot work with
  `params` (and with the fused layer-wise step, if `fused_update`).

  Called by `trainer.build`, before compiling; each message starts with
  `config.optimizer.<field>=<value>`. The trainer checks its own fields here (learning-rate
  schedule, AdamW numbers, clipping, `target_lr_scale`, the adapters, and the config's spelling
  of `projector_dtype` and `energy_tol`); GaLore's options are checked once, by galore_jax,
  when `_check_galore_options` builds the optimizer.
  """

  def fail(field: str, why: str):
    raise ValueError(f"config.optimizer.{field}={o[field]!r} {why}")

  if o.name not in OPTIMIZERS:
    fail("name", f"is not one of {OPTIMIZERS}.")
  if o.name == "galore" and o.inner not in INNER_OPTIMIZERS:
    fail("inner", f"is not one of {INNER_OPTIMIZERS}.")
  ranges = {  # field: (low, high, low inclusive, high inclusive)
    "learning_rate": (0, math.inf, False, False),
    "warmup_fraction": (0, 1, True, True),
    "min_lr_ratio": (0, 1, True, True),
    "b1": (0, 1, True, False),
    "b2": (0, 1, True, False),
    "eps": (0, math.inf, False, False),
    "weight_decay": (0, math.inf, True, False),
    "grad_clip_norm": (0, math.inf, True, False),
    "target_lr_scale": (0, math.inf, False, False),
  }
  for field, (low, high, low_in, high_in) in ranges.items():
    v = o[field]
    if (
      not _number(v)
      or not (v >= low if low_in else v > low)
      or not (v <= high if high_in else v < high)
    ):
      fail(
        field,
        f"must be a number in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}.",
      )
  for field in ("float32_vocab_moments", "galore_vocab"):
    if not isinstance(o.get(field, False), bool):
      fail(field, "must be True or False.")
  if o.get("galore_vocab", False) and "galore" not in o.name:
    fail("galore_vocab", f"applies to the GaLore optimizers only (not {o.name!r}).")
  if o.target_lr_scale != 1.0 and o.name != "adamw":
    fail("target_lr_scale", f"applies to config.optimizer.name='adamw' only (not {o.name!r}).")
  if o.target_lr_scale != 1.0 and fused_update:
    fail("target_lr_scale", "is not supported with config.train.fused_update=True.")
  if o.name in lowrank.METHODS:
    _validate_adapter(o, params, fail, fused_update)
    return
  if "galore" not in o.name:
    return
  # The config's spellings, turned into the library's arguments by `_galore_options`.
  if o.projector_dtype not in PROJECTOR_DTYPES:
    fail("projector_dtype", f"is not one of {PROJECTOR_DTYPES}.")
  if not _number(o.energy_tol) or not 0 <= o.energy_tol < 1:
    fail("energy_tol", "must be a number in [0, 1) (0 = off: fixed power_iters).")
  # galore_jax accepts any scale (it may be injected); a training run needs a positive one.
  if not _number(o.scale) or o.scale <= 0:
    fail("scale", "must be a number > 0.")
  _check_galore_options(o, params, fail, fused_update)


# `config.optimizer.projector_dtype` values ("" = the parameters' dtype).
PROJECTOR_DTYPES = ("", "float32", "bfloat16", "float16")
# The config fields that `_galore_options` hands to galore_jax under their own names.
_GALORE_FIELDS = (
  "rank",
  "update_proj_gap",
  "scale",
  "proj_type",
  "projector_dtype",
  "subspace_method",
  "oversample",
  "power_iters",
  "on_refresh",
  "align_signs",
  "energy_tol",
  "max_power_iters",
)
# The library's hint for `optax.inject_hyperparams` users, which a config does not need.
_INJECT_HINT = re.compile(r"\s*[;(.]?\s*[Uu]nder optax\.inject_hyperparams.*", re.DOTALL)


def _check_galore_options(
  o: ml_collections.ConfigDict, params: Any, fail: Callable, fused_update: bool
) -> None:
  """GaLore's options, validated by galore_jax: the optimizer is built (which checks every
  option) and its plan made on `params` (`galore_jax.galore_targets`, from shapes only). A
  ValueError becomes `config.optimizer.<field>=<value> ...`, the field being the first option
  the library's message names.

  Ranks follow the library's rule: one above a matrix's smaller dimension is clipped (as the
  reference's thin SVD), with a warning where GaLore would then hold more state than Adam.
  """
  try:
    make_optimizer(o, num_steps=1, fused_update=fused_update)
    rows = gj.galore_targets(params, rank=o.rank, proj_type=o.proj_type, mask=galore_mask(o))
  except ValueError as e:
    message = str(e).removeprefix("galore: ")
    named = re.search(rf"\b({'|'.join(_GALORE_FIELDS)})\b", message)
    message = _INJECT_HINT.sub("", message).rstrip(".") + "."
    if named and named.group(1) == "energy_tol":  # the config spells the library's None as 0
      message = message.rstrip(".") + " (config.optimizer.energy_tol=0 means None)."
    fail(named.group(1) if named else "name", f"is refused by galore_jax: {message}")
  if not any(t.projected for t in rows):
    fail("name", "targets attn/mlp kernels but the model has none.")
  for t in rows:
    if t.note:
      logging.warning("config.optimizer.rank=%d: %s %s: %s", o.rank, t.path, t.shape, t.note)


def _check_rank(o: ml_collections.ConfigDict, params: Any, fail: Callable) -> None:
  """The low-rank baselines' rank (LoRA, ReLoRA, W = BA): at most every target's smaller side."""
  mask = gj.llama_galore_mask(params)
  dims = [min(p.shape[-2:]) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
  if not dims:
    fail("name", "targets attn/mlp kernels but the model has none.")
  rank_ok = isinstance(o.rank, int) and not isinstance(o.rank, bool) and o.rank >= 1
  # Factors wider than the matrix they replace would hold more than the matrix itself.
  if not rank_ok or gj.projection.effective_rank(o.rank, min(dims), min(dims)) < o.rank:
    fail(
      "rank",
      f"must be an int in [1, {min(dims)}]: the smallest GaLore-targeted matrix of this model "
      f"has min(in, out) = {min(dims)}.",
    )


def _validate_adapter(
  o: ml_collections.ConfigDict, params: Any, fail: Callable, fused_update: bool
) -> None:
  """The fields of `lora` / `relora` / `low_rank` (train/lowrank.py)."""
  if fused_update:
    fail("name", "does not run with config.train.fused_update=True (a GaLore/AdamW path only).")
  _check_rank(o, params, fail)
  if not _number(o.lora_alpha) or o.lora_alpha <= 0:
    fail("lora_alpha", "must be a number > 0.")
  if o.name != "relora":
    return
  every, warmup = o.relora_reset_every, o.relora_restart_warmup
  if not isinstance(every, int) or isinstance(every, bool) or every < 1:
    fail("relora_reset_every", "must be an int >= 1.")
  if not isinstance(warmup, int) or isinstance(warmup, bool) or not 0 <= warmup <= every:
    fail("relora_restart_warmup", f"must be an int in [0, {every}] (relora_reset_every).")


def state_bytes(tx: optax.GradientTransformation, params: Any) -> int:
  """Bytes of `tx`'s state for `params`, from shapes only (nothing allocated)."""
  return gj.memory.state_bytes(tx, params).total
