"""Subspace refreshes: the randomized warm-started range finder against the exact SVD."""

import functools

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

# Orthonormality of float32 Householder QR + one small SVD: a few ulps times the dimension.
ORTHO_ATOL = 2e-5


def _with_spectrum(seed, batch, d, e, s):
  """`[*batch, d, e]` matrices `U diag(s) Vᵀ` with random orthonormal U, V; returns (g, U).

  Built in numpy so that test data costs no XLA compilations."""
  rng = np.random.default_rng(seed)
  n = len(s)
  u = np.linalg.qr(rng.standard_normal((*batch, d, n)))[0]
  v = np.linalg.qr(rng.standard_normal((*batch, e, n)))[0]
  g = (u * np.asarray(s)) @ np.swapaxes(v, -1, -2)
  return jnp.asarray(g, jnp.float32), u.astype(np.float32)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _cosines(p, q):
  """Cosines of the principal angles between span(p) and span(q), smallest first."""
  return np.sort(np.linalg.svd(np.swapaxes(p, -1, -2) @ q, compute_uv=False), axis=-1)


def _energy(g, p):
  """Captured energy `‖Pᵀ g‖²` per matrix."""
  return np.sum((np.swapaxes(p, -1, -2) @ g) ** 2, axis=(-2, -1))


@functools.cache
def _refresh(method, rank, oversample=8, power_iters=1, cold_power_iters=None, sign="canonical"):
  fn = subspace.make_refresh_fn(
    method, rank, oversample, power_iters, cold_power_iters=cold_power_iters, sign=sign
  )
  return jax.jit(fn, static_argnums=2)


def _canonical(b):
  idx = np.argmax(np.abs(b), axis=-2)[..., None, :]
  return b * np.where(np.take_along_axis(b, idx, axis=-2) < 0, -1.0, 1.0)


def _exact(g, r):
  """Exact ("in", "out") bases by numpy's SVD, canonical sign (no XLA compilation)."""
  u, _, vh = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  return _canonical(u[..., :r]), _canonical(np.swapaxes(vh[..., :r, :], -1, -2))


def _zeros(g, side, rank):
  return tuple(jnp.zeros(s) for s in projection.projector_shapes(g.shape, side, rank))


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
@hypothesis.given(
  batch=st.sampled_from([(), (3,), (2, 2)]),
  dims=st.tuples(st.integers(2, 20), st.integers(2, 20)),
  rank=st.integers(1, 22),
  oversample=st.integers(0, 6),
  power_iters=st.integers(1, 2),
  side=st.sampled_from(projection.SIDES),
  warm=st.booleans(),
)
def test_randomized_bases_are_orthonormal_with_batch_shapes(
  batch, dims, rank, oversample, power_iters, side, warm
):
  """For all shapes, ranks (clipped to min(I, O)) and batch axes: orthonormal float32 bases."""
  g = _normal(sum(dims) + rank, (*batch, *dims))
  prev = _zeros(g, side, rank)
  if warm:  # any orthonormal columns will do as a start
    prev = tuple(
      jnp.asarray(np.linalg.qr(np.random.default_rng(1).standard_normal(p.shape))[0], jnp.float32)
      for p in prev
    )
  out = _refresh("randomized", rank, oversample, power_iters)(g, prev, side, jax.random.key(2))
  expected = projection.projector_shapes(g.shape, side, rank)
  assert [b.shape for b in out] == list(expected)
  for b in out:
    assert b.dtype == jnp.float32
    eye = np.broadcast_to(np.eye(b.shape[-1]), b.shape[:-2] + (b.shape[-1],) * 2)
    np.testing.assert_allclose(np.swapaxes(b, -1, -2) @ b, eye, atol=ORTHO_ATOL)


def test_deterministic_given_the_key_and_key_dependent():
  g = _normal(0, (2, 30, 40))
  prev = _zeros(g, "in", 6)
  f = _refresh("randomized", 6, 2, 1)
  a = f(g, prev, "in", jax.random.key(7))[0]
  b = f(g, prev, "in", jax.random.key(7))[0]
  c = f(g, prev, "in", jax.random.key(8))[0]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)  # a flat random spectrum: the sketch matters


def test_equals_exact_subspace_when_rank_is_within_rank():
  """Exact rank <= r: the sketch spans the range, so the subspace is exact (cold start).
  Side "both" computes the "in" and the "out" basis."""
  s = [5.0, 3.0, 2.0, 1.0]  # rank 4 < r = 6
  g, _ = _with_spectrum(3, (3,), 24, 40, s)
  rnd = _refresh("randomized", 6, 0, 1)(g, _zeros(g, "both", 6), "both", jax.random.key(0))
  for p, q in zip(rnd, _exact(g, 6)):
    # The top-4 vectors (nonzero singular values) are determined: both span them.
    np.testing.assert_allclose(_cosines(p, q[..., :4])[..., 0], 1.0, atol=1e-5)
    # Distinct singular values + canonical sign: the same vectors, entry by entry.
    np.testing.assert_allclose(p[..., :4], q[..., :4], atol=1e-4)


def test_equals_exact_subspace_with_a_clear_spectral_gap():
  """A 100x gap after r: two iterations from a cold start recover the subspace to ~1e-4 rad."""
  r = 8
  s = np.concatenate([np.linspace(2.0, 1.0, r), 0.01 * np.linspace(1.0, 0.5, 32)])
  g, u = _with_spectrum(4, (2,), 40, 64, s)
  (p,) = _refresh("randomized", r, 4, 1, cold_power_iters=2)(
    g, _zeros(g, "in", r), "in", jax.random.key(1)
  )
  # Subspace iteration error ~ (σ_{r+1}/σ_r)^(2q) = 1e-8 (sketch) + float32 rounding.
  np.testing.assert_allclose(_cosines(p, u[..., :r])[..., 0], 1.0, atol=1e-6)


def test_warm_start_from_the_exact_basis_is_a_fixed_point():
  """If span(prev) is the exact top-r subspace, one iteration returns it (and the same vectors)."""
  r = 5
  s = 0.8 ** np.arange(20)  # distinct singular values: vectors are determined up to sign
  g, _ = _with_spectrum(5, (3,), 20, 32, s)
  exact = _exact(g, r)
  # Scramble prev inside the subspace (rotation + signs): only its span should matter.
  rot = np.linalg.qr(np.random.default_rng(6).standard_normal((r, r)))[0].astype(np.float32)
  (p,) = _refresh("randomized", r, 3, 1)(g, (exact[0] @ rot,), "in", jax.random.key(2))
  np.testing.assert_allclose(p, exact[0], atol=1e-4)


@pytest.mark.parametrize(
  "spectrum",
  [
    pytest.param(lambda i, r: 0.97**i, id="exponential"),
    pytest.param(lambda i, r: 1.0 / (1.0 + i), id="power-law"),
    pytest.param(lambda i, r: np.where(i < r, 1.0, 0.2), id="step-gap"),
  ],
)
def test_captured_energy_close_to_exact_on_decaying_spectra(spectrum):
  """Cold start with the defaults' cold setting keeps >= 99% of the exact top-r energy."""
  r, d, e = 16, 64, 96
  s = spectrum(np.arange(d), r)
  g, _ = _with_spectrum(7, (2,), d, e, s)
  (p,) = _refresh("randomized", r, 8, 1, cold_power_iters=3)(
    g, _zeros(g, "in", r), "in", jax.random.key(3)
  )
  exact = np.sum(np.sort(s)[::-1][:r] ** 2)
  assert np.all(_energy(g, p) >= 0.99 * exact), _energy(g, p) / exact


def test_warm_start_tracks_a_drifting_subspace():
  """Warm from the previous exact basis, one iteration beats the stale basis and nears exact."""
  r, d, e = 16, 64, 128
  s = 1.0 / (1.0 + np.arange(d)) ** 0.7
  g0, u0 = _with_spectrum(8, (), d, e, s)
  g1 = g0 + 0.05 * float(s[r]) * _normal(9, (d, e))
  stale = u0[:, :r]
  (p,) = _refresh("randomized", r, 8, 1)(g1, (stale,), "in", jax.random.key(4))
  exact = _energy(g1, _exact(g1, r)[0])
  assert _energy(g1, p) > _energy(g1, stale)
  assert _energy(g1, p) >= 0.99 * exact


def test_cold_matrices_of_a_batch_get_cold_iterations():
  """One loop for the batch: a cold member runs `cold_power_iters`, the warm one is unharmed."""
  r = 4
  s = np.concatenate([[1.0, 0.9, 0.8, 0.7], 0.3 * 0.9 ** np.arange(26)])
  g, u = _with_spectrum(10, (2,), 30, 40, s)
  prev = jnp.stack([jnp.zeros((30, r)), u[1, :, :r]])
  f = _refresh("randomized", r, 2, 1, cold_power_iters=6)
  (p,) = f(g, (prev,), "in", jax.random.key(5))
  np.testing.assert_allclose(_cosines(p[1], u[1, :, :r])[0], 1.0, atol=1e-5)
  # Cold: (0.3 / 0.7)^(2 * 6) ~ 4e-5 after 6 iterations; one iteration would leave ~0.2.
  np.testing.assert_allclose(_cosines(p[0], u[0, :, :r])[0], 1.0, atol=1e-4)


def test_align_signs_flips_against_previous_and_keeps_cold_start():
  new = jnp.array([[1.0, 0.0], [0.0, -1.0], [0.0, 0.0]])
  prev = jnp.array([[-0.9, 0.0], [0.1, -1.0], [0.0, 0.0]])
  np.testing.assert_array_equal(subspace.align_signs(new, prev), [[-1, 0], [0, -1], [0, 0]])
  np.testing.assert_array_equal(subspace.align_signs(new, jnp.zeros_like(prev)), new)


def test_refresh_validates_its_arguments():
  with pytest.raises(ValueError, match="subspace_method"):
    subspace.make_refresh_fn("lanczos", 4, 8, 1)
  with pytest.raises(ValueError, match="power_iters"):
    subspace.make_refresh_fn("randomized", 4, 8, 0)
  with pytest.raises(ValueError, match="oversample"):
    subspace.make_refresh_fn("randomized", 4, -1, 1)
  with pytest.raises(ValueError, match="sign"):
    subspace.make_refresh_fn("svd", 4, 8, 1, sign="positive")


# ---------------------------------------------------------------------------------------------
# Inside scale_by_galore, under jit.


def _low_rank_grads(t, shape, k, gap):
  """Stacked gradients of exact rank k with distinct singular values; the subspace is new every
  `gap` steps (at each refresh) and only rescaled in between."""
  s = 2.0 ** -np.arange(k)
  g, _ = _with_spectrum(100 + t // gap, shape[:-2], *shape[-2:], s)
  return g * (1.0 + 0.1 * t)


def test_randomized_matches_svd_inside_scale_by_galore_with_stacked_weights():
  """Gradients of exact rank r: both methods find the same subspace and, with distinct singular
  values and the canonical sign, the same vectors, so the whole Adam trajectory agrees."""
  shape = (3, 12, 20)  # [N, I, O] stacked layers; std reduces I
  params = {"layers": {"attn": jnp.zeros(shape)}, "norm": jnp.zeros((12,))}

  def grads(t):
    return {"layers": {"attn": _low_rank_grads(t, shape, 3, 2)}, "norm": jnp.ones((12,))}

  runs = {}
  for method in ("svd", "randomized"):
    tx = gj.galore_adamw(
      1e-2, rank=3, update_proj_gap=2, subspace_method=method, seed=3, mask=gj.llama_galore_mask
    )
    state, p = tx.init(params), params
    update = jax.jit(tx.update)
    for t in range(5):  # refreshes at 0 (cold), 2 and 4 (warm)
      u, state = update(grads(t), state, p)
      p = optax.apply_updates(p, u)
    runs[method] = (p, state[0].projectors[0]["layers"]["attn"])
  (p_svd, proj_svd), (p_rnd, proj_rnd) = runs["svd"], runs["randomized"]
  eye = np.broadcast_to(np.eye(3), (3, 3, 3))
  np.testing.assert_allclose(jnp.swapaxes(proj_rnd, -1, -2) @ proj_rnd, eye, atol=ORTHO_ATOL)
  np.testing.assert_allclose(proj_rnd, proj_svd, atol=1e-5)
  # Updates are ~lr * scale = 2.5e-3 per step; basis differences ~1e-6 carry over linearly.
  np.testing.assert_allclose(p_rnd["layers"]["attn"], p_svd["layers"]["attn"], atol=1e-6)


@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_align_signs_option_orients_each_new_vector_like_the_previous_one(method):
  """A refresh whose previous projector is the exact basis with every sign flipped: the canonical
  rule ignores history and returns the canonical basis; `align_signs=True` keeps the previous
  orientation. Checked through `scale_by_galore` under jit and on the refresh function."""
  shape = (12, 20)
  g, u = _with_spectrum(7, (), *shape, 2.0 ** -np.arange(3))
  u_canon = _canonical(u)
  for align, want in ((False, u_canon), (True, -u_canon)):
    tx = gj.scale_by_galore(
      gj.scale_by_transformers_adam(),
      rank=3,
      update_proj_gap=2,
      subspace_method=method,
      align_signs=align,
    )
    state = tx.init({"w": jnp.zeros(shape)})
    flipped = (jnp.asarray(-u_canon),)
    state = state._replace(count=jnp.asarray(2, jnp.int32), projectors=({"w": flipped[0]},))
    _, state = jax.jit(tx.update)({"w": g}, state)
    np.testing.assert_allclose(state.projectors[0]["w"], want, atol=1e-5)
    (direct,) = _refresh(method, 3, sign="align" if align else "canonical")(
      g, flipped, "in", jax.random.key(0)
    )
    np.testing.assert_allclose(direct, want, atol=1e-5)
  with pytest.raises(ValueError, match="align_signs"):
    gj.scale_by_galore(rank=3, align_signs="yes")


def _adam_run(params, grads, steps, **kw):
  tx = gj.scale_by_galore(gj.scale_by_transformers_adam(), rank=3, update_proj_gap=2, **kw)
  state = tx.init(params)
  update = jax.jit(tx.update)
  states = []
  for t in range(steps):
    _, state = update(grads(t), state)
    states.append(state)
  return update, states


def test_rotate_carries_moments_exactly_under_a_signed_permutation():
  """New basis = old basis with columns permuted and signs flipped: `rotate` maps m and v
  exactly, so the moments equal those of a run that had used the new basis all along."""
  d, e, r = 6, 9, 3
  params = {"w": jnp.zeros((d, e))}
  _, u = _with_spectrum(0, (), d, d, np.ones(d))
  _, v = _with_spectrum(1, (), e, d, np.ones(d))
  first = np.array([3.0, 2.0, 1.0, 0.1, 0.05, 0.01])
  later = np.array([1.0, 3.0, 2.0, 0.1, 0.05, 0.01])  # the same top-3 vectors, reordered

  def grads(t):
    s = first if t < 2 else later
    return {"w": (u * s) @ v.T * (1.0 + 0.1 * t)}

  update, states = _adam_run(params, grads, 3, on_refresh="rotate")
  before, after = states[1], states[2]
  p_old = before.projectors[0]["w"]
  p_new = after.projectors[0]["w"]
  q = np.asarray(p_new.T @ p_old)
  # Sanity: a permutation (canonical signs), with at least one column moved.
  np.testing.assert_allclose(np.abs(q), np.round(np.abs(q)), atol=1e-5)
  assert not np.allclose(np.abs(q), np.eye(r))
  # Flip two stored columns before the refresh: now the change of basis is a signed permutation.
  flips = jnp.array([1.0, -1.0, -1.0])
  before = before._replace(projectors=({"w": p_old * flips},))
  _, after = update(grads(2), before)
  q = np.asarray(after.projectors[0]["w"].T @ (p_old * flips))
  mu, nu = before.inner_state.mu["w"], before.inner_state.nu["w"]
  low = np.asarray(after.projectors[0]["w"].T @ grads(2)["w"])
  np.testing.assert_allclose(
    after.inner_state.mu["w"], 0.9 * q @ mu + 0.1 * low, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    after.inner_state.nu["w"], 0.999 * (q**2) @ nu + 0.001 * low**2, rtol=1e-5, atol=1e-7
  )
  # And the signed permutation carried |m| and v exactly (just reordered).
  perm = np.argmax(np.abs(q), axis=1)
  np.testing.assert_allclose(np.abs(q @ mu), np.abs(np.asarray(mu)[perm]), rtol=1e-5, atol=1e-7)


def test_reset_zeroes_moments_of_projected_leaves_only():
  params = {"w": jnp.zeros((6, 9)), "b": jnp.zeros((9,))}

  def grads(t):
    return {"w": _normal(t, (6, 9)), "b": _normal(50 + t, (9,))}

  _, states = _adam_run(params, grads, 3, on_refresh="reset", subspace_method="randomized")
  before, after = states[1].inner_state, states[2].inner_state  # step 2 refreshes
  low = np.asarray(states[2].projectors[0]["w"].T @ grads(2)["w"])
  np.testing.assert_allclose(after.mu["w"], 0.1 * low, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(after.nu["w"], 0.001 * low**2, rtol=1e-5, atol=1e-9)
  g_b = np.asarray(grads(2)["b"])
  np.testing.assert_allclose(after.mu["b"], 0.9 * before.mu["b"] + 0.1 * g_b, rtol=1e-6)
  np.testing.assert_allclose(after.nu["b"], 0.999 * before.nu["b"] + 0.001 * g_b**2, rtol=1e-6)
  assert int(after.count) == 3  # bias correction keeps counting


def test_gram_basis_of_column_chunks_equals_the_svd_of_the_whole_matrix():
  """`gram_left_basis(Σ_c G_c G_cᵀ)` over column chunks: the SVD's top-r subspace and vectors.

  Davis–Kahan: a perturbation `E` of `A = G Gᵀ` moves the top-r subspace by `sin θ <=
  ‖E‖₂ / (λ_r - λ_{r+1})` and vector i by about `‖E‖₂ / min_j |λ_i - λ_j|`. Float32 sums of
  `c` chunk products of `m`-long dots and eigh's backward error give `‖E‖₂ <= (m + c + D) ε ‖G‖²`
  (Higham's γ_n for each entry's sum, a backward-stable eigh); the SVD's own error,
  `~D ε ‖G‖ / gap_σ`, is smaller. Spectrum: top r in [1, 2] with gaps of at least 0.1, then 0.1.
  """
  d, e, r, chunks = 24, 96, 6, 4
  s = np.concatenate([np.linspace(2.0, 1.0, r + 1)[:r], np.full(d - r, 0.1)])
  g, _ = _with_spectrum(7, (), d, e, s)
  g = jnp.asarray(g)
  gram = sum(c @ c.T for c in jnp.split(g, chunks, axis=1))
  p = subspace.gram_left_basis(gram, r)
  (q,) = projection.svd_projectors(g, "in", r)
  eps = float(np.finfo(np.float32).eps)
  pert = (e // chunks + chunks + d) * eps * s[0] ** 2
  lam = s**2
  sin_theta = np.linalg.norm(np.asarray(p @ p.T - q @ q.T), 2)
  assert sin_theta <= pert / (lam[r - 1] - lam[r]), sin_theta
  vector_gap = np.min(lam[:r] - lam[1 : r + 1])
  np.testing.assert_allclose(p, q, atol=pert / vector_gap)
  assert p.shape == (d, r) and p.dtype == jnp.float32
