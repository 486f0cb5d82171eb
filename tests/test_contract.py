"""The contract every public galore-jax transform keeps: it works wherever a JAX user puts it.

One shared suite (as optax tests its optimizers): each transform of `TRANSFORMS` runs through
`jax.jit`, `flax.nnx.Optimizer` (eager and under `nnx.jit`), a Linen `TrainState` loop,
`optax.MultiSteps`, `optax.inject_hyperparams`, `optax.apply_if_finite` and an orbax save and
restore mid-run, on a small model whose kernels are all GaLore targets, for enough steps to
cross several refreshes. A new transform joins by adding one line to `TRANSFORMS`.

Tolerances: paths that run the same operations in the same order (eager vs eager, one jitted
program vs the same program) must agree exactly. Where two different XLA programs compute the
same math (a jitted step vs the NNX step's own jit), fusion may reassociate float32 sums: each
of the ~50 float32 operations of a step then contributes a rounding of at most one ulp
(eps = 1.2e-7) relative, and the SVD's subspace moves by at most that over the gap between
the r-th and (r+1)-th singular values (well separated in `_grads`' spectra), so 6 steps stay
below `6 * 50 * eps * 2 ≈ 7e-5` relative; we assert 1e-4 relative on parameters of norm ~1.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen, nnx
from flax.training import train_state

import galore_jax as gj

STEPS = 6
GAP = 2  # refreshes at steps 0, 2, 4
RANK = 4
D_IN, D_HID, D_OUT = 16, 24, 8
EXACT = dict(rtol=0, atol=0)
# See the module docstring: two XLA programs of the same float32 math over 6 steps.
REASSOCIATED = dict(rtol=1e-4, atol=1e-6)

# name -> factory; every kernel of the model (ndim 2) is a GaLore target by default.
TRANSFORMS = {
  "galore_adamw": lambda: gj.galore_adamw(1e-2, rank=RANK, update_proj_gap=GAP, weight_decay=0.1),
  "galore_adamw_full": lambda: gj.galore_adamw(
    1e-2, rank=RANK, update_proj_gap=GAP, proj_type="full"
  ),
  "galore_adamw_randomized": lambda: gj.galore_adamw(
    1e-2, rank=RANK, update_proj_gap=GAP, subspace_method="randomized", energy_tol=0.9
  ),
  "galore_adamw_rotate": lambda: gj.galore_adamw(
    1e-2, rank=RANK, update_proj_gap=GAP, on_refresh="rotate", align_signs=True
  ),
  "galore_adamw_8bit": lambda: gj.galore_adamw_8bit(
    1e-2, rank=RANK, update_proj_gap=GAP, weight_decay=0.1, min_8bit_size=16, block_size=16
  ),
  "adamw_8bit": lambda: gj.adamw_8bit(1e-2, min_8bit_size=16, block_size=16),
  "galore_adafactor": lambda: gj.galore(optax.adafactor(1e-2), rank=RANK, update_proj_gap=GAP),
  "galore_lion": lambda: gj.galore(
    optax.lion(1e-3, weight_decay=0.1), rank=RANK, update_proj_gap=GAP
  ),
  "galore_adamw_inner": lambda: gj.galore(
    optax.adamw(1e-2, weight_decay=0.1), rank=RANK, update_proj_gap=GAP
  ),
  "galore_sgd_momentum": lambda: gj.galore(
    optax.sgd(1e-1, momentum=0.9), rank=RANK, update_proj_gap=GAP
  ),
  "galore_contrib_muon": lambda: gj.galore(
    optax.contrib.muon(1e-2), rank=RANK, update_proj_gap=GAP
  ),
}
NAMES = list(TRANSFORMS)


def _params(seed: int = 0) -> dict:
  k = jax.random.split(jax.random.key(seed), 4)
  return {
    "dense1": {
      "kernel": jax.random.normal(k[0], (D_IN, D_HID)) / np.sqrt(D_IN),
      "bias": jnp.zeros((D_HID,)),
    },
    "dense2": {
      "kernel": jax.random.normal(k[1], (D_HID, D_OUT)) / np.sqrt(D_HID),
      "bias": jnp.zeros((D_OUT,)),
    },
  }


def _matrices(params):
  return jax.tree.map(lambda x: x.ndim == 2, params)


def _batch(step: int) -> tuple[jax.Array, jax.Array]:
  k1, k2 = jax.random.split(jax.random.key(100 + step))
  return jax.random.normal(k1, (32, D_IN)), jax.random.normal(k2, (32, D_OUT))


def _loss(params, x, y):
  h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  return jnp.mean((h @ params["dense2"]["kernel"] + params["dense2"]["bias"] - y) ** 2)


def _functional_step(tx):
  def step(params, state, x, y):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _functional_run(tx, steps=STEPS, jit=True):
  step = _functional_step(tx)
  step = jax.jit(step) if jit else step
  params = _params()
  state = tx.init(params)
  for t in range(steps):
    params, state = step(params, state, *_batch(t))
  return params, state


def _assert_trees(a, b, tol):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(
      np.asarray(x, np.float64),
      np.asarray(y, np.float64),
      err_msg=jax.tree_util.keystr(path),
      **tol,
    )


@pytest.fixture(scope="module")
def reference():
  """Per transform, the functional `jax.jit` loop's params after STEPS steps (and eager's)."""
  return {}


def _ref(reference, name, jit=True):
  key = (name, jit)
  if key not in reference:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      reference[key] = _functional_run(TRANSFORMS[name](), jit=jit)[0]
  return reference[key]


@pytest.mark.parametrize("name", NAMES)
def test_jit_trains_and_keeps_its_state_structure(name, reference):
  tx = TRANSFORMS[name]()
  params = _params()
  state = tx.init(params)
  step = jax.jit(_functional_step(tx))
  loss0 = float(_loss(params, *_batch(0)))
  structure = jax.tree.structure(state)
  dtypes = [x.dtype for x in jax.tree.leaves(state)]
  for t in range(STEPS):
    params, state = step(params, state, *_batch(t))
    assert jax.tree.structure(state) == structure
    assert [x.dtype for x in jax.tree.leaves(state)] == dtypes
  assert float(_loss(params, *_batch(0))) < loss0
  _assert_trees(params, _ref(reference, name), EXACT)


class _NnxModel(nnx.Module):
  def __init__(self, params):
    self.dense1 = nnx.Linear(D_IN, D_HID, rngs=nnx.Rngs(0))
    self.dense2 = nnx.Linear(D_HID, D_OUT, rngs=nnx.Rngs(0))
    for layer in ("dense1", "dense2"):
      for field in ("kernel", "bias"):
        getattr(getattr(self, layer), field).value = params[layer][field]

  def __call__(self, x):
    return self.dense2(jnp.tanh(self.dense1(x)))


def _nnx_params(model) -> dict:
  return {
    layer: {f: getattr(getattr(model, layer), f).value for f in ("kernel", "bias")}
    for layer in ("dense1", "dense2")
  }


def _nnx_loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


@pytest.mark.parametrize("name", NAMES)
def test_nnx_optimizer_eager_and_jit_give_the_functional_numbers(name, reference):
  for jit in (False, True):
    model = _NnxModel(_params())
    opt = nnx.Optimizer(model, TRANSFORMS[name](), wrt=nnx.Param)

    def step(model, opt, x, y):
      grads = nnx.grad(_nnx_loss)(model, x, y)
      opt.update(model, grads)

    step = nnx.jit(step) if jit else step
    for t in range(STEPS):
      step(model, opt, *_batch(t))
    # Eager NNX runs the eager functional loop's operations one by one: exactly equal. Under
    # nnx.jit the step is another XLA program of the same math (see the module docstring).
    want = _ref(reference, name, jit=jit)
    _assert_trees(_nnx_params(model), want, REASSOCIATED if jit else EXACT)


class _LinenModel(linen.Module):
  @linen.compact
  def __call__(self, x):
    h = jnp.tanh(linen.Dense(D_HID, name="dense1")(x))
    return linen.Dense(D_OUT, name="dense2")(h)


@pytest.mark.parametrize("name", NAMES)
def test_linen_train_state_loop_gives_the_functional_numbers(name, reference):
  model = _LinenModel()
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=_params(), tx=TRANSFORMS[name]()
  )

  @jax.jit
  def step(state, x, y):
    loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  for t in range(STEPS):
    state = step(state, *_batch(t))
  _assert_trees(state.params, _ref(reference, name), REASSOCIATED)


@pytest.mark.parametrize("name", NAMES)
def test_multi_steps_of_equal_micro_batches_equal_one_step(name):
  """`optax.MultiSteps(tx, 2)` fed the same gradient twice applies it once, as tx would:
  the mean of two equal float32 values is exact."""
  tx = TRANSFORMS[name]()
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  params, mparams = _params(), _params()
  state, mstate = tx.init(params), multi.init(mparams)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  mstep = jax.jit(
    lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*multi.update(g, s, p))
  )
  for t in range(3):
    g = jax.grad(_loss)(params, *_batch(t))
    params, state = step(params, state, g)
    mparams, mstate = mstep(mparams, mstate, g)
    mparams, mstate = mstep(mparams, mstate, g)
  _assert_trees(mparams, params, REASSOCIATED)


def _factory(name):
  """The alias behind `TRANSFORMS[name]` and its keyword arguments, for inject_hyperparams."""
  if name.startswith("galore_adamw_8bit"):
    return gj.galore_adamw_8bit, dict(
      learning_rate=1e-2, rank=RANK, update_proj_gap=GAP, weight_decay=0.1, min_8bit_size=16,
      block_size=16,
    )  # fmt: skip
  if name == "adamw_8bit":
    return gj.adamw_8bit, dict(learning_rate=1e-2, min_8bit_size=16, block_size=16)
  if name == "galore_adamw_randomized":
    return gj.galore_adamw, dict(
      learning_rate=1e-2, rank=RANK, update_proj_gap=GAP, subspace_method="randomized",
      energy_tol=0.9,
    )  # fmt: skip
  return None, None


@pytest.mark.parametrize("name", ["galore_adamw_8bit", "adamw_8bit", "galore_adamw_randomized"])
def test_inject_hyperparams_with_static_args_matches_and_can_change_the_rate(name, reference):
  factory, kwargs = _factory(name)
  tx = optax.inject_hyperparams(factory, static_args=gj.static_args(factory))(**kwargs)
  params = _params()
  state = tx.init(params)
  assert "learning_rate" in state.hyperparams
  step = jax.jit(_functional_step(tx))
  for t in range(STEPS):
    params, state = step(params, state, *_batch(t))
  _assert_trees(params, _ref(reference, name), REASSOCIATED)
  # A zero learning rate, set in the state, stops training (weight decay scales with it too).
  state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
  new, _ = step(params, state, *_batch(STEPS))
  _assert_trees(new, params, EXACT)


def test_inject_hyperparams_injects_numeric_galore_options():
  """scale, power_iters, seed, energy_tol and max_power_iters are injectable."""
  factory = gj.galore_adamw
  tx = optax.inject_hyperparams(factory, static_args=gj.static_args(factory))(
    1e-2, rank=RANK, update_proj_gap=GAP, subspace_method="randomized", energy_tol=0.9
  )
  state = tx.init(_params())
  for option in ("scale", "power_iters", "seed", "energy_tol", "max_power_iters"):
    assert option in state.hyperparams, option
  params = _params()
  step = jax.jit(_functional_step(tx))
  params, state = step(params, state, *_batch(0))
  state.hyperparams["scale"] = jnp.zeros_like(state.hyperparams["scale"])
  new, _ = step(params, state, *_batch(1))
  for layer in ("dense1", "dense2"):  # scale 0: projected kernels stop, biases still train
    np.testing.assert_array_equal(new[layer]["kernel"], params[layer]["kernel"])
    assert not np.array_equal(new[layer]["bias"], params[layer]["bias"])


def test_inject_hyperparams_errors_name_the_option():
  kw = dict(rank=RANK, update_proj_gap=GAP, subspace_method="randomized")
  make = optax.inject_hyperparams(gj.galore_adamw, static_args=("rank", "update_proj_gap"))
  with pytest.raises(ValueError, match="oversample.*static_args"):
    make(1e-2, **kw).init(_params())
  # A mask of bools left out of static_args: inject_hyperparams keeps a tree as it is (only
  # numeric scalars are injected), so it works as when listed; a traced mask (a jitted factory
  # call) gets an error that names `mask`.
  mask = jax.tree.map(lambda x: x.ndim == 2, _params())
  static = tuple(a for a in gj.static_args(gj.galore_adamw) if a != "mask")
  tx = optax.inject_hyperparams(gj.galore_adamw, static_args=static)(1e-2, mask=mask, **kw)
  params = _params()
  jax.jit(_functional_step(tx))(params, tx.init(params), *_batch(0))
  traced = lambda m: gj.galore_adamw(1e-2, mask=m, **kw).init(params)
  with pytest.raises(ValueError, match="mask.*static_args"):
    jax.jit(traced)(jax.tree.map(jnp.asarray, mask))


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_skips_a_nan_step_without_touching_the_state(name):
  tx = optax.apply_if_finite(TRANSFORMS[name](), max_consecutive_errors=3)
  params = _params()
  state = tx.init(params)
  step = jax.jit(_functional_step(tx))
  params, state = step(params, state, *_batch(0))
  x, y = _batch(1)
  new_params, new_state = step(params, state, x.at[0, 0].set(jnp.nan), y)
  _assert_trees(new_params, params, EXACT)
  _assert_trees(new_state.inner_state, state.inner_state, EXACT)
  assert int(new_state.notfinite_count) == 1
  new_params, _ = step(new_params, new_state, *_batch(2))
  assert np.all(np.isfinite(jax.tree.leaves(new_params)[0]))


@pytest.mark.parametrize("name", NAMES)
def test_orbax_save_and_restore_mid_run_continues_bit_identically(name, tmp_path):
  tx = TRANSFORMS[name]()
  step = jax.jit(_functional_step(tx))
  params = _params()
  state = tx.init(params)
  for t in range(3):
    params, state = step(params, state, *_batch(t))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
    ckpt.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state})
    restored = ckpt.restore(tmp_path / "ckpt", abstract)
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state)
  a, sa = params, state
  b, sb = restored["params"], restored["opt_state"]
  for t in range(3, STEPS):
    a, sa = step(a, sa, *_batch(t))
    b, sb = step(b, sb, *_batch(t))
  _assert_trees(b, a, EXACT)
  _assert_trees(sb, sa, EXACT)


@functools.cache
def _sharding_rows():
  return gj.galore_targets(_params(), rank=RANK)


def test_galore_targets_lists_every_leaf_and_the_state_it_costs():
  rows = _sharding_rows()
  assert [r.path for r in rows] == [
    "dense1/bias",
    "dense1/kernel",
    "dense2/bias",
    "dense2/kernel",
  ]
  k1, k2 = rows[1], rows[3]
  assert k1.projected and k1.side == "in" and k1.rank == RANK  # 16 x 24: O >= I, reduce I
  assert k2.projected and k2.side == "out" and k2.rank == RANK  # 24 x 8: reduce O
  # Projector D x r plus two low-rank moments, float32.
  assert k1.galore_bytes == 4 * (D_IN * RANK + 2 * RANK * D_HID)
  assert k1.adam_bytes == 4 * 2 * D_IN * D_HID
  state = gj.galore_adamw(1e-2, rank=RANK).init(_params())
  total = gj.memory.split_state_bytes(state)
  assert total.moments + total.projectors == sum(r.galore_bytes for r in rows)
  assert "total" in gj.format_targets(rows)


def test_a_users_sharded_loop_matches_one_device_and_explicit_meshes_are_refused():
  """tests/user_loop_worker.py on 4 CPU devices: params and state sharded with
  `galore_jax.sharding` over an Auto `fsdp` axis. Summing the batch's gradient over shards
  reassociates float32 sums: 3 steps stay within 1e-5 relative (as tests/test_sharding.py's
  RTOL derives)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  worker = Path(__file__).resolve().parent / "user_loop_worker.py"
  out = subprocess.run(
    [sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["devices"] == 4
  for name in ("galore_adamw", "galore_adamw_8bit"):
    assert report[name]["rel_diff"] <= 1e-5, report[name]
    # The kept axis: attn [32, 64] keeps O (64), mlp [64, 16] keeps I (64), norm its only axis.
    assert report[name]["param_specs"] == ["P(None, 'fsdp')", "P('fsdp', None)", "P('fsdp',)"]
  assert "Explicit mesh axes" in report["explicit_error"]
  assert "AxisType.Auto" in report["explicit_error"]


def test_errors_and_warnings_name_the_leaf_and_the_argument():
  params = _params()
  with pytest.raises(ValueError, match=r"`mask` must be a pytree with the params' structure"):
    gj.galore_adamw(1e-2, mask={"dense1": True}).init(params)
  dn = gj.GaLoreDimensionNumbers(reduction_axis=0, output_axis=5)
  with pytest.raises(ValueError, match=r"dense1/kernel of shape \(16, 24\).*output_axis=5"):
    dns = {"dense1": {"kernel": dn, "bias": None}, "dense2": {"kernel": None, "bias": None}}
    gj.galore_adamw(1e-2, mask=_matrices, dimension_numbers=dns).init(params)
  ints = {"w": jnp.zeros((8, 8), jnp.int32), "v": jnp.zeros((8, 8))}
  with pytest.raises(ValueError, match=r"`mask` selects w of dtype int32"):
    gj.galore_adamw(1e-2, mask={"w": True, "v": True}).init(ints)
  # By default an integer leaf is simply not a target.
  assert not gj.galore_targets(ints)[1].projected
  stacked = {"layers": jnp.zeros((3, 16, 24)), "w": jnp.zeros((16, 24))}
  with pytest.warns(UserWarning, match=r"layers \(3, 16, 24\): not projected: 3-D"):
    state = gj.galore_adamw(1e-2, rank=4).init(stacked)
  assert isinstance(state[0].projectors[0]["layers"], optax.MaskedNode)
  assert state[0].projectors[0]["w"].shape == (16, 4)
  # Selected by a mask, the leading axis is a stack of layers: one basis per layer.
  state = gj.galore_adamw(1e-2, rank=4, mask={"layers": True, "w": True}).init(stacked)
  assert state[0].projectors[0]["layers"].shape == (3, 16, 4)
  with pytest.warns(UserWarning, match=r"w \(16, 24\): GaLore holds more state than Adam"):
    gj.galore_adamw(1e-2, rank=16, mask={"layers": False, "w": True}).init(stacked)
