"""The fused layer-wise update (train/fused.py): the standard step's result, never its memory."""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.extend import core as jax_core

import galore_jax as gj
from galore_jax import adam8bit
from train import fused
from train.model import Llama, LlamaConfig, next_token_loss

# Three scanned blocks with D=32, F=48: q/k/v/o are square, gate/up wide and down tall, so all of
# GaLore's side cases occur; the embedding and LM head (64 x 32) are updated in two chunks.
CONFIG = LlamaConfig(
  vocab_size=64, hidden_dim=32, mlp_dim=48, num_heads=4, num_layers=3, scan_layers=True
)
RANK, GAP, STEPS = 8, 2, 4  # steps 0 and 2 refresh the subspace
# LLVM at -O0 for both steps: a third less compile time; XLA's HLO passes are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _optimizer(name: str) -> optax.GradientTransformation:
  galore = dict(rank=RANK, update_proj_gap=GAP, mask=gj.llama_galore_mask)
  # min_8bit_size=0 and 32-entry blocks: the tiny model's moments are really 8-bit.
  q8 = dict(min_8bit_size=0, block_size=32)
  return {
    "galore_adamw": lambda: gj.galore_adamw(1e-2, weight_decay=0.1, **galore),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "galore_adamw_8bit": lambda: adam8bit.galore_adamw_8bit(1e-2, weight_decay=0.1, **galore, **q8),
    "adamw_8bit": lambda: adam8bit.adamw_8bit(1e-2, weight_decay=0.1, **q8),
  }[name]()


def _tokens():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CONFIG.vocab_size, (4, 16))
  tokens[0, 10:] = 0  # right padding: masked targets, so the token count matters
  tokens[3, 5:] = 0
  return jnp.asarray(tokens, jnp.int32)


def _galore_projectors(state):
  is_galore = lambda x: isinstance(x, gj.GaLoreState)
  found = [x for x in jax.tree.leaves(state, is_leaf=is_galore) if is_galore(x)]
  return found[0].projectors if found else None


def _reference_step(tx, k: int, clip: float):
  """The standard step: `value_and_grad`, `tx.update`, `apply_updates`, float32 accumulation.

  With GaLore and k > 1, the fused step's documented semantics: every micro-batch's gradient of
  a GaLore matrix is projected on the subspace GaLore computes from micro-batch 0's gradient
  (the current one except on refresh steps) and the optimizer gets `P Σ_k Pᵀ G_k`.
  The model recomputes each block in the backward pass (remat "full"), as the fused step does;
  XLA then computes bit-identical gradients (without remat they differ by ~2e-7 relative,
  which Adam's normalisation and GaLore's SVD amplify to ~5e-6).
  """
  graph = nnx.split(
    Llama(dataclasses.replace(CONFIG, remat_policy="full"), rngs=nnx.Rngs(0)), nnx.Param
  )[0]
  is_p = lambda x: isinstance(x, (tuple, optax.MaskedNode))

  def loss(params, tokens):
    return next_token_loss(nnx.merge(graph, params)(tokens), tokens)

  def step(params, state, tokens):
    micro = tokens.reshape(k, -1, tokens.shape[-1])
    outs = [jax.value_and_grad(loss, has_aux=True)(params, micro[i]) for i in range(k)]
    loss_sum, count = sum(o[0][0] for o in outs), sum(o[0][1] for o in outs)
    grads = [o[1] for o in outs]
    acc = jax.tree.map(lambda *g: sum(x.astype(jnp.float32) for x in g), *grads)
    norm_tree = acc
    projectors = _galore_projectors(state)
    if k > 1 and projectors is not None:
      p0 = _galore_projectors(tx.update(grads[0], state, params)[1])

      def low(ps, *g):  # Σ_k Pᵀ G_k ("in": input axis reduced when out >= in) or Σ_k G_k P
        if isinstance(ps, optax.MaskedNode):
          return sum(x.astype(jnp.float32) for x in g)
        p = ps[0].astype(jnp.float32)
        if g[0].shape[-1] >= g[0].shape[-2]:
          return sum(jnp.einsum("...ir,...io->...ro", p, x.astype(jnp.float32)) for x in g)
        return sum(jnp.einsum("...io,...or->...ir", x.astype(jnp.float32), p) for x in g)

      def back(ps, a, param):  # P (Σ_k Pᵀ G_k) or (Σ_k G_k P) Pᵀ
        if isinstance(ps, optax.MaskedNode):
          return a
        p = ps[0].astype(jnp.float32)
        if param.shape[-1] >= param.shape[-2]:
          return jnp.einsum("...ir,...ro->...io", p, a)
        return jnp.einsum("...ir,...or->...io", a, p)

      norm_tree = jax.tree.map(low, p0, *grads, is_leaf=is_p)
      acc = jax.tree.map(back, p0, norm_tree, params, is_leaf=is_p)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda a, p: (a / denom).astype(p.dtype), acc, params)
    if clip > 0:
      norm = optax.global_norm(grads) if norm_tree is acc else optax.global_norm(norm_tree) / denom
      grads = jax.tree.map(lambda g: jax.lax.select(norm < clip, g, g / norm * clip), grads)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss_sum / denom

  return jax.jit(step)


def _compile(fn, *args, donate=()):
  return jax.jit(fn, donate_argnums=donate).lower(*args).compile(FAST_COMPILE)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


class _Setup(NamedTuple):
  model_config: Any
  tx: Any


class _State(NamedTuple):
  step: Any
  params: Any
  opt_state: Any
  rng: Any


# (optimizer, micro-batches, clipping threshold). Clipping at 0.5 is active: the gradient norm
# is 1-2; with K = 2 and GaLore it clips by the norm of the projected gradient. The fast cases
# cover each code path once: one pass with 8-bit GaLore, accumulation with GaLore and clipping,
# two passes (exact global clipping) without GaLore.
CASES = [
  ("galore_adamw_8bit", 1, 0.0, 1e-6),
  ("galore_adamw", 2, 0.5, 1e-6),
  ("adamw", 1, 0.5, 1e-6),
  pytest.param("galore_adamw", 1, 0.0, 1e-6, marks=pytest.mark.slow),
  # Accumulating P^T G per block and per micro-batch rounds differently from the reference's
  # stacked einsum (1 ulp); a 1-ulp change can move an 8-bit moment to the next code.
  pytest.param("galore_adamw_8bit", 2, 0.0, 2e-5, marks=pytest.mark.slow),
  pytest.param("adamw_8bit", 1, 0.0, 1e-6, marks=pytest.mark.slow),
  pytest.param("adamw", 2, 0.5, 1e-6, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, k, clip, rtol", CASES)
def test_fused_equals_standard_step(name, k, clip, rtol):
  tx = _optimizer(name)
  params = nnx.split(Llama(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)[1]
  tokens = _tokens()
  ref_params, ref_state = params, tx.init(params)
  reference = _reference_step(tx, k, clip).lower(params, ref_state, tokens).compile(FAST_COMPILE)
  train_step = fused.make_fused_train_step(
    _Setup(CONFIG, tx),
    k,
    grad_clip_norm=clip,
    clip_in_subspace=True,
    proj_type="std",
    check_optimizer=False,
  )
  state = _State(jnp.zeros([], jnp.int32), params, tx.init(params), jax.random.PRNGKey(0))
  train_step = _compile(train_step, state, {"tokens": tokens}, donate=(0,))
  for _ in range(STEPS):
    ref_params, ref_state, ref_loss = reference(ref_params, ref_state, tokens)
    state, metrics = train_step(state, {"tokens": tokens})
    # The gradients are bit-identical (see `_reference_step`); what remains is float32 rounding
    # of the optimizer's arithmetic in another fusion, amplified by Adam and GaLore's SVD.
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-6)
    for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(ref_params)[0], jax.tree.leaves(state.params)
    ):
      assert _rel(a, b) <= rtol, (jax.tree_util.keystr(path), _rel(a, b))
  assert int(state.step) == STEPS
  # Counts advanced once per step, and the state keeps `tx.init`'s structure and dtypes.
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(ref_state)
  for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(state.opt_state)):
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == jnp.int32:
      assert int(a) == int(b) == STEPS


def _svd_conds(jaxpr, inside_cond=False):
  """(SVDs inside a `cond` branch, SVDs outside any) in a jaxpr, recursively."""
  inside = outside = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "svd":
      inside, outside = inside + inside_cond, outside + (not inside_cond)
    for sub in jax_core.jaxprs_in_params(eqn.params):
      i, o = _svd_conds(sub, inside_cond or eqn.primitive.name == "cond")
      inside, outside = inside + i, outside + o
  return inside, outside


@pytest.mark.parametrize("k", [1, 2])
def test_refresh_svds_only_run_under_a_conditional(k):
  tx = _optimizer("galore_adamw")
  params = nnx.split(Llama(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)[1]
  update = fused.make_fused_update(CONFIG, tx, k, proj_type="std", check_optimizer=False)
  jaxpr = jax.make_jaxpr(update)(params, tx.init(params), _tokens()).jaxpr
  inside, outside = _svd_conds(jaxpr)
  assert inside > 0 and outside == 0


def _temp_bytes(fn, *args) -> int:
  return (
    jax.jit(fn, donate_argnums=(0, 1)).lower(*args).compile().memory_analysis().temp_size_in_bytes
  )


def test_fused_step_never_holds_all_gradients():
  """Compiled memory (nothing runs): the standard step's temporaries hold every block's
  gradient; the fused step's stay well below the gradient of the blocks."""
  config = dataclasses.replace(CONFIG, hidden_dim=128, mlp_dim=256, num_layers=8, vocab_size=128)
  abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))), nnx.Param)
  graph, params = (
    abstract[0],
    jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), abstract[1]),
  )
  tx = optax.sgd(1e-2)  # the gradients' lifetime does not depend on the optimizer
  state = jax.eval_shape(tx.init, params)
  tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
  block_bytes = sum(4 * int(np.prod(x.shape)) for x in jax.tree.leaves(params["layers"]))

  def standard(params, state, tokens):
    loss = lambda p: next_token_loss(nnx.merge(graph, p)(tokens), tokens)[0]
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  fused_update = fused.make_fused_update(config, tx, check_optimizer=False)
  assert _temp_bytes(standard, params, state, tokens) >= block_bytes
  assert _temp_bytes(fused_update, params, state, tokens) < 0.35 * block_bytes


def test_global_clipping_inside_the_optimizer_is_rejected():
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1e-2))
  with pytest.raises(ValueError, match="not separable"):
    fused.make_fused_update(CONFIG, tx)


def test_unsupported_settings_raise():
  galore = _optimizer("galore_adamw")
  with pytest.raises(ValueError, match="clip_in_subspace=True"):
    fused.make_fused_update(
      CONFIG, galore, 2, grad_clip_norm=1.0, proj_type="std", check_optimizer=False
    )
  with pytest.raises(ValueError, match="proj_type"):  # the side of square matrices is hidden
    fused.make_fused_update(CONFIG, galore, 2, check_optimizer=False)
  with pytest.raises(ValueError, match="scan_layers=True"):
    fused.make_fused_update(dataclasses.replace(CONFIG, scan_layers=False), _optimizer("adamw"))
