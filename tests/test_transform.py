"""The optax contract of galore_jax: shapes, dtypes, jit, wrappers, refresh timing, errors."""

import functools
import inspect

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj
from galore_jax import projection, subspace

jax.config.update("jax_default_matmul_precision", "highest")


def _matrices(params):
  """A mask selecting every leaf with ndim >= 2 (leading axes: stacked layers)."""
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def _params(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 4)
  return {
    "attn": {"kernel": jax.random.normal(k[0], (16, 24), dtype)},
    "mlp": {"kernel": jax.random.normal(k[1], (24, 10), dtype)},
    "norm": jax.random.normal(k[2], (16,), dtype),
    "embed": jax.random.normal(k[3], (30, 16), dtype),
  }


def _grads(step: int, params):
  keys = jax.random.split(jax.random.key(100 + step), len(jax.tree.leaves(params)))
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])


def _run(tx, params, steps, grads_fn=_grads):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    u, state = update(grads_fn(t, params), state, params)
    params = optax.apply_updates(params, u)
  return params, state


def test_state_shapes_match_paper_memory_formulas():
  """Paper Table 1 (m <= n): projector m*r, moments 2*n*r: the smaller side is projected away."""
  rank = 4
  params = {"a": jnp.zeros((16, 24)), "b": jnp.zeros((24, 10)), "c": jnp.zeros((12, 12))}
  state = gj.galore_adamw(1e-3, rank=rank).init(params)
  galore_state = state[0]
  adam = galore_state.inner_state
  for name, p in params.items():
    m, n = sorted(p.shape)
    proj = galore_state.projectors[0][name]
    assert proj.size == m * rank
    assert adam.mu[name].size + adam.nu[name].size == 2 * n * rank


def test_std_side_rule_matches_reference_layout():
  # Flax (in, out): torch weight is (out, in). std reduces the input axis when out >= in.
  assert projection.side_for("std", in_dim=16, out_dim=24) == "in"
  assert projection.side_for("std", in_dim=24, out_dim=10) == "out"
  assert projection.side_for("std", in_dim=12, out_dim=12) == "in"  # square: reduce input
  assert projection.side_for("reverse_std", in_dim=12, out_dim=12) == "out"
  assert projection.side_for("right", in_dim=3, out_dim=99) == "in"
  assert projection.side_for("left", in_dim=99, out_dim=3) == "out"


def test_rank_at_or_above_min_dim_with_identity_inner_reproduces_gradient():
  """Paper Sec. 3.3: with r = min(m, n) and rho = identity, back(proj(G)) == G."""
  params = {"w": jnp.zeros((8, 5))}
  g = {"w": jax.random.normal(jax.random.key(1), (8, 5))}
  for proj_type in projection.PROJ_TYPES:
    tx = gj.galore(optax.identity(), rank=99, scale=1.0, proj_type=proj_type)
    u, _ = tx.update(g, tx.init(params))
    np.testing.assert_allclose(u["w"], g["w"], atol=1e-5)


def test_refresh_timing_count_before_increment():
  """Subspaces are recomputed at counts 0, T, 2T, ... and kept in between."""
  params = {"w": jnp.zeros((6, 9))}
  tx = gj.galore(optax.identity(), rank=2, update_proj_gap=3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  seen = []
  for t in range(7):
    _, state = update(_grads(t, params), state)
    seen.append(np.asarray(state.projectors[0]["w"]))
  changed = [t for t in range(1, 7) if not np.allclose(seen[t], seen[t - 1])]
  assert changed == [3, 6]


def test_refresh_is_a_real_conditional_for_stacked_weights():
  """The SVD must sit inside a `cond` branch: never executed on non-refresh steps."""
  params = {"layers": {"attn": jnp.zeros((4, 8, 8))}, "mlp": jnp.zeros((8, 12))}
  tx = gj.galore_adamw(1e-3, rank=2, update_proj_gap=5)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr

  def prims(jaxpr):
    out = []
    for eqn in jaxpr.eqns:
      out.append(eqn.primitive.name)
      for sub in jax.core.jaxprs_in_params(eqn.params):
        out.extend(prims(sub))
    return out

  top = [e.primitive.name for e in jaxpr.eqns]
  assert "svd" not in top
  conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  assert any("svd" in prims(b.jaxpr) for c in conds for b in c.params["branches"])
  hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
  assert "conditional" in hlo


def test_stacked_weights_equal_separate_weights():
  """A [L, in, out] weight gets L independent subspaces, identical to L 2-D weights."""
  num_layers = 3
  stacked = {"w": jax.random.normal(jax.random.key(0), (num_layers, 10, 7))}
  separate = {f"w{i}": stacked["w"][i] for i in range(num_layers)}

  def stacked_grads(t, _):
    return {"w": jax.random.normal(jax.random.key(50 + t), (num_layers, 10, 7))}

  def separate_grads(t, _):
    g = stacked_grads(t, None)["w"]
    return {f"w{i}": g[i] for i in range(num_layers)}

  for proj_type in ("std", "full"):
    tx = gj.galore_adamw(
      1e-2, rank=3, update_proj_gap=2, proj_type=proj_type, weight_decay=0.1, mask=_matrices
    )
    p_stacked, _ = _run(tx, stacked, 5, stacked_grads)
    p_separate, _ = _run(tx, separate, 5, separate_grads)
    for i in range(num_layers):
      np.testing.assert_allclose(p_stacked["w"][i], p_separate[f"w{i}"], rtol=1e-6, atol=1e-7)


def _refresh_temp_bytes(shapes, dtype=jnp.bfloat16):
  """XLA's temp bytes of a jitted exact-SVD refresh of leaves of `shapes` (abstract, compiled)."""
  refresh = subspace.make_refresh_fn("svd", 8, 8, 1)
  gs = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
  prevs = [
    tuple(jax.ShapeDtypeStruct(p, dtype) for p in projection.projector_shapes(s, "in", 8))
    for s in shapes
  ]

  def run(gs, prevs):
    return subspace.refresh_leaves(
      refresh, [(g, p, "in", jax.random.key(0)) for g, p in zip(gs, prevs)]
    )

  return jax.jit(run).lower(gs, prevs).compile().memory_analysis().temp_size_in_bytes


def test_refresh_runs_one_matrix_at_a_time():
  """Stacked [L, I, O] and L unrolled leaves refresh to the same bases, bit for bit, as each
  matrix alone, and the refresh's scratch is one matrix's, not L's: a batched SVD of 8 layers
  needs ~8x (float32 copies and factors of every layer at once)."""
  refresh = subspace.make_refresh_fn("svd", 3, 8, 1)
  key = jax.random.key(0)

  @jax.jit
  def run(gs, prevs):
    return subspace.refresh_leaves(refresh, [(g, p, "in", key) for g, p in zip(gs, prevs)])

  g = jax.random.normal(jax.random.key(0), (2, 3, 10, 7), jnp.bfloat16)
  prev = jnp.zeros((2, 3, 10, 3), jnp.bfloat16)
  (stacked,), *unrolled = run([g, *g[0]], [(prev,), *((p,) for p in prev[0])])
  for n in range(6):
    ((alone,),) = run([g.reshape(6, 10, 7)[n]], [(prev.reshape(6, 10, 3)[n],)])
    np.testing.assert_array_equal(stacked.reshape(6, 10, 3)[n], alone)
    if n < 3:
      np.testing.assert_array_equal(unrolled[n][0], alone)
  one = _refresh_temp_bytes([(64, 96)])
  # Slack: the map's loop state and the stacked outputs (8 x 64 x 8) are not one matrix's.
  assert _refresh_temp_bytes([(8, 64, 96)]) < 1.5 * one
  assert _refresh_temp_bytes([(64, 96)] * 8) < 1.5 * one


def test_dimension_numbers_for_multi_axis_kernels():
  """An attention kernel stored [D, H, K] is the matrix [D, H*K] when told so."""
  w = jax.random.normal(jax.random.key(0), (12, 2, 4))
  dn = gj.GaLoreDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
  tx3 = gj.galore(optax.sgd(1.0), rank=3, update_proj_gap=10, dimension_numbers=dn)
  tx2 = gj.galore(optax.sgd(1.0), rank=3, update_proj_gap=10)
  g = jax.random.normal(jax.random.key(1), w.shape)
  u3, _ = tx3.update(g, tx3.init(w))
  u2, _ = tx2.update(g.reshape(12, 8), tx2.init(w.reshape(12, 8)))
  np.testing.assert_allclose(u3.reshape(12, 8), u2, rtol=1e-5, atol=1e-6)


def test_mask_selects_projected_leaves_and_others_run_full_rank():
  params = _params()
  tx = gj.galore_adamw(1e-3, rank=4, mask=gj.llama_galore_mask)
  state = tx.init(params)
  (projs,) = state[0].projectors
  assert isinstance(projs["norm"], optax.MaskedNode)
  assert isinstance(projs["embed"], optax.MaskedNode)
  assert state[0].inner_state.mu["embed"].shape == (30, 16)
  assert state[0].inner_state.mu["attn"]["kernel"].shape == (4, 24)
  # Non-projected leaves follow plain (transformers-style) AdamW, unscaled.
  ref = optax.chain(gj.scale_by_transformers_adam(), optax.scale_by_learning_rate(1e-3))
  g = _grads(0, params)
  u, _ = tx.update(g, state, params)
  u_ref, _ = ref.update(g, ref.init(params))
  np.testing.assert_allclose(u["embed"], u_ref["embed"], rtol=1e-6)
  np.testing.assert_allclose(u["norm"], u_ref["norm"], rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_of_updates_and_state_are_preserved(dtype):
  params = _params(dtype)
  tx = gj.galore_adamw(1e-3, rank=4, update_proj_gap=2, mask=gj.llama_galore_mask)
  state = tx.init(params)
  update = jax.jit(tx.update)
  dtypes0 = jax.tree.map(lambda x: x.dtype, state)
  for t in range(3):
    u, state = update(_grads(t, params), state, params)
    assert all(x.dtype == dtype for x in jax.tree.leaves(u))
    assert jax.tree.map(lambda x: x.dtype, state) == dtypes0
  assert state[0].projectors[0]["attn"]["kernel"].dtype == dtype


def test_projector_dtype_option():
  params = _params(jnp.bfloat16)
  tx = gj.galore_adamw(1e-3, rank=4, projector_dtype=jnp.float32, mask=gj.llama_galore_mask)
  state = tx.init(params)
  assert state[0].projectors[0]["attn"]["kernel"].dtype == jnp.float32
  u, _ = jax.jit(tx.update)(_grads(0, params), state, params)
  assert u["attn"]["kernel"].dtype == jnp.bfloat16


def test_jit_does_not_recompile_across_steps():
  params = _params()
  tx = gj.galore_adamw(optax.linear_schedule(0.0, 1e-3, 10), rank=4, update_proj_gap=2)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(5):
    _, state = update(_grads(t, params), state, params)
  assert update._cache_size() == 1


def test_inject_hyperparams_and_schedules():
  params = _params()
  factory = optax.inject_hyperparams(
    gj.galore_adamw, static_args=("rank", "update_proj_gap", "proj_type", "mask")
  )
  sched = optax.linear_schedule(1e-3, 0.0, 4)
  tx = factory(sched, rank=4, update_proj_gap=2, scale=0.5, weight_decay=0.01, b1=0.8)
  plain = gj.galore_adamw(sched, rank=4, update_proj_gap=2, scale=0.5, weight_decay=0.01, b1=0.8)
  p1, s1 = _run(tx, params, 3)
  p2, _ = _run(plain, params, 3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), p1, p2)
  # the stored value is the one the last (third, count 2) update used
  np.testing.assert_allclose(s1.hyperparams["learning_rate"], sched(2), rtol=1e-6)
  s1.hyperparams["scale"] = jnp.asarray(0.0)  # a changed hyperparameter takes effect:
  u, _ = tx.update(_grads(9, params), s1, p1)  # only the (post-update) decay is left
  np.testing.assert_allclose(
    u["attn"]["kernel"], -sched(3) * 0.01 * p1["attn"]["kernel"], rtol=1e-5
  )


def test_every_alias_lists_galores_options_once_defined():
  fields = set(gj.GaLoreOptions._fields)
  for alias in (gj.scale_by_galore, gj.galore, gj.galore_adamw, gj.galore_adamw_8bit):
    params = inspect.signature(alias).parameters
    assert fields <= set(params), alias.__name__
    for name in fields:  # the defaults are GaLoreOptions' own
      assert params[name].default == gj.GaLoreOptions._field_defaults[name], (alias, name)
  with pytest.raises(TypeError, match=r"unknown option\(s\) \['rnak'\]"):
    gj.galore_adamw(1e-3, rnak=4)


@pytest.mark.parametrize("alias", ["galore_adamw", "galore_adamw_8bit"])
def test_inject_hyperparams_passes_keyword_options(alias):
  """Options given by keyword reach the transform under inject_hyperparams (8-bit included)."""
  params = _params()
  fn = getattr(gj, alias)
  static = ("rank", "update_proj_gap", "proj_type", "mask", "oversample", "power_iters", "seed")
  kw = dict(rank=4, update_proj_gap=2, subspace_method="randomized", power_iters=2, seed=3)
  injected = optax.inject_hyperparams(fn, static_args=static)(1e-3, **kw)
  p1, s1 = _run(injected, params, 3)
  p2, _ = _run(fn(1e-3, **kw), params, 3)
  # The same arithmetic with the same float32 learning rate, but a constant in one program and a
  # state value in the other, so XLA may fold or fuse the few products it enters differently:
  # each of the ~4 roundings of lr-dependent terms per step moves a weight by <= 1 ulp.
  eps = np.finfo(np.float32).eps
  close = lambda a, b: np.all(np.abs(a - b) <= 3 * 4 * eps * np.abs(a))
  assert all(jax.tree.leaves(jax.tree.map(close, p1, p2)))
  assert "subspace_method" not in s1.hyperparams  # a string: passed through, never injected


def test_static_args_must_be_static():
  factory = optax.inject_hyperparams(gj.galore_adamw)  # rank not declared static
  with pytest.raises(ValueError, match="rank.*static_args"):
    factory(1e-3, rank=4).init(_params())


def test_multisteps_and_apply_if_finite_and_chain():
  params = _params()
  inner = gj.galore_adamw(1e-3, rank=4, update_proj_gap=2)
  multi = optax.MultiSteps(inner, every_k_schedule=2)
  p_multi, _ = _run(multi, params, 4, lambda t, p: _grads(t // 2, p))
  p_plain, _ = _run(inner, params, 2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p_multi, p_plain)

  safe = optax.apply_if_finite(inner, max_consecutive_errors=3)
  state = safe.init(params)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(0, params))
  u, state = jax.jit(safe.update)(bad, state, params)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  assert int(state.notfinite_count) == 1
  assert int(state.inner_state[0].count) == 0  # the bad step did not advance GaLore

  tx = optax.chain(optax.clip_by_global_norm(1.0), gj.galore(optax.adam(1e-3), rank=4))
  p, _ = _run(tx, params, 2)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(p))


def test_inner_optimizer_needing_params_without_params_gets_a_clear_error():
  tx = gj.galore(optax.adamw(1e-3, weight_decay=0.1), rank=4)
  params = _params()
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update(_grads(0, params), tx.init(params))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"rank": 0}, "rank.*0"),
    ({"rank": 2.5}, "rank.*2.5"),
    ({"update_proj_gap": 0}, "update_proj_gap"),
    ({"proj_type": "diagonal"}, "proj_type.*diagonal"),
    ({"subspace_method": "qr"}, "subspace_method"),
    ({"on_refresh": "drop"}, "on_refresh"),
  ],
)
def test_static_argument_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gj.scale_by_galore(**kwargs)


def test_dimension_numbers_validation_names_shape():
  tx = gj.galore(optax.sgd(1.0), rank=2, dimension_numbers=gj.GaLoreDimensionNumbers(0, 3))
  with pytest.raises(ValueError, match=r"output_axis=3.*\(4, 5\)"):
    tx.init({"w": jnp.zeros((4, 5))})


def test_matches_optax_contrib_galore_when_configured_as_the_same_algorithm(monkeypatch):
  """optax.contrib.galore differs from the paper in:
  * side rule: it reduces the *larger* dimension (projector r x max(m, n), states r x min) --
    our `reverse_std` for non-square kernels, our `std` for square ones;
  * Adam: textbook `optax.scale_by_adam` (eps 1e-8 on sqrt(v_hat)) vs transformers' eps=1e-6
    on sqrt(v);
  * targets: every 2-D leaf by default (embeddings, lm_head too) vs attention/MLP kernels;
  * weight decay before the learning rate on W_t vs the reference's decay after the update;
  * raw LAPACK singular-vector signs vs our canonical sign (matters when moments meet a refresh);
  * no batch axes for stacked layers, no 8-bit, exact SVD only.
  With the same side rule, the same inner Adam and the same sign convention the two agree.
  """
  original_svd = jnp.linalg.svd

  def canonical_svd(a, full_matrices=True, compute_uv=True, **kw):
    u, s, vh = original_svd(a, full_matrices=full_matrices, compute_uv=compute_uv, **kw)
    u = projection.canonical_sign(u)
    vh = jnp.swapaxes(projection.canonical_sign(jnp.swapaxes(vh, -1, -2)), -1, -2)
    return u, s, vh

  monkeypatch.setattr(jnp.linalg, "svd", canonical_svd)
  shapes = {"tall": (20, 8), "wide": (8, 20), "square": (12, 12)}
  for name, shape in shapes.items():
    params = {"w": jax.random.normal(jax.random.key(0), shape)}
    proj_type = "std" if shape[0] == shape[1] else "reverse_std"
    ours = gj.galore(
      optax.scale_by_adam(), rank=3, update_proj_gap=2, scale=0.5, proj_type=proj_type
    )
    peer = optax.contrib.scale_by_galore(
      rank=3, update_proj_gap=2, scale=0.5, base_optimizer=optax.scale_by_adam()
    )
    p1, _ = _run(ours, params, 7)
    p2, _ = _run(peer, params, 7)
    np.testing.assert_allclose(p1["w"], p2["w"], rtol=1e-5, atol=1e-6, err_msg=name)


@hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
@hypothesis.given(
  shape=st.tuples(st.integers(2, 12), st.integers(2, 12)),
  rank=st.integers(1, 14),
  proj_type=st.sampled_from(projection.PROJ_TYPES),
)
def test_projection_is_orthogonal_and_idempotent(shape, rank, proj_type):
  """P has orthonormal columns; back(proj(G)) is an orthogonal projection of G."""
  g = jax.random.normal(jax.random.key(sum(shape) + rank), shape)
  side = projection.side_for(proj_type, *shape)
  ps = projection.svd_projectors(g, side, rank)
  for p in ps:
    np.testing.assert_allclose(p.T @ p, np.eye(p.shape[1]), atol=1e-5)
  once = projection.project_back(projection.project(g, ps, side), ps, side)
  twice = projection.project_back(projection.project(once, ps, side), ps, side)
  np.testing.assert_allclose(twice, once, atol=1e-5)
  # At a refresh the captured part is the best rank-r approximation on that side.
  assert float(jnp.linalg.norm(once)) <= float(jnp.linalg.norm(g)) * (1 + 1e-6)


def _block_chunk(x, c, rows: int, n: int):
  """Chunk c of n of 8-bit codes `[blocks, block_size]` / scales `[blocks]` of a `[rows, ...]`
  moment whose rows split into n chunks of whole blocks; other entries whole."""
  if not x.ndim or x.shape[0] != rows * n:
    return x
  return x.reshape(rows, n, -1)[:, c].reshape(-1, *x.shape[1:])


def _column_chunks(tree, cols, width: int):
  """Columns `cols` of every leaf whose last axis is `width` (the weight, its gradient and the
  low-rank moments of a `[D, width]` leaf projected on its input side); others whole."""
  return jax.tree.map(lambda x: x[..., cols] if x.shape[-1:] == (width,) else x, tree)


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adamw_8bit"])
def test_update_by_column_chunks_with_given_bases_and_sides_equals_the_whole_update(name):
  """A `[16, 48]` matrix updated as 6 chunks of 8 columns, each with its slice of the low-rank
  state, `galore_sides` (an 8-column chunk alone would be projected on its output side) and
  `galore_bases` (the SVD of the whole gradient: a refresh of the whole matrix): the update and
  state of the whole matrix, over a refresh and a non-refresh step (gap 2). The same float32
  operations on the same values, column by column: equal up to summation order (1e-6)."""
  d, v, width, r = 16, 48, 8, 4
  q8 = dict(min_8bit_size=0, block_size=8)  # 8-bit blocks inside one row of a chunk
  tx = {
    "galore_adamw": lambda: gj.galore_adamw(1e-2, rank=r, update_proj_gap=2),
    "galore_adamw_8bit": lambda: gj.galore_adamw_8bit(1e-2, rank=r, update_proj_gap=2, **q8),
  }[name]()
  params = {"w": jax.random.normal(jax.random.key(0), (d, v))}
  state = tx.init(params)

  def chunked(grads, state, params, garbage):
    (whole,) = projection.svd_projectors(grads["w"], "in", r)
    bases = jnp.full_like(whole, 7.0) if garbage else whole  # never used off refresh steps
    outs, states = [], []
    for c in range(v // width):
      cols = slice(c * width, (c + 1) * width)
      if name == "galore_adamw_8bit":  # codes `[r * v / 8, 8]`: rows of v / 8 blocks
        part = jax.tree.map(functools.partial(_block_chunk, c=c, rows=r, n=v // width), state)
      else:
        part = _column_chunks(state, cols, v)
      u, s = tx.update(
        _column_chunks(grads, cols, v),
        part,
        _column_chunks(params, cols, v),
        galore_bases=lambda: {"w": (bases,)},
        galore_sides={"w": "in"},
      )
      outs.append(u["w"])
      states.append(s)
    return jnp.concatenate(outs, axis=1), states

  update, chunked = jax.jit(tx.update), jax.jit(chunked, static_argnums=3)
  for t in range(3):
    grads = _grads(t, params)
    u, new_state = update(grads, state, params)
    u_c, states = chunked(grads, state, params, t % 2 == 1)
    np.testing.assert_allclose(u_c, u["w"], rtol=1e-5, atol=1e-6 * float(jnp.abs(u["w"]).max()))
    np.testing.assert_allclose(states[0][0].projectors[0]["w"], new_state[0].projectors[0]["w"])
    params, state = optax.apply_updates(params, u), new_state


def test_galore_sides_and_bases_are_validated():
  params = {"w": jnp.zeros((8, 12)), "b": jnp.zeros((12, 3))}
  tx = gj.galore(optax.identity(), rank=2, mask={"w": True, "b": False})
  state = tx.init(params)
  with pytest.raises(ValueError, match="does not project"):
    tx.update(params, state, galore_sides={"w": None, "b": "in"})
  with pytest.raises(ValueError, match="sides are"):
    tx.update(params, state, galore_sides={"w": "up", "b": None})
  with pytest.raises(ValueError, match="gave bases"):
    tx.update(params, state, galore_bases=lambda: {"w": jnp.zeros((12, 2)), "b": None})
