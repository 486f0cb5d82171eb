"""galore_jax.galore_adamw against the PyTorch reference galore_torch.GaLoreAdamW 1.0.

Sign convention. A singular vector is defined up to its sign and LAPACK (JAX) and torch pick
different ones. The reference keeps Adam's moments across a subspace refresh, so a flipped basis
vector meets a moment row of the opposite sign and the two runs drift apart by tens of percent
after the second refresh (measured: 16-52%), although each step is computed correctly. galore_jax
fixes the sign (`canonical_sign`: the largest-magnitude entry of every basis vector is positive).
Here the same convention is applied to the reference's `get_orthogonal_matrix` output, which
makes the two the same deterministic algorithm; the tolerance is float32 round-off.

Gradient scale. Gradients are drawn with entries ~1e-4 (typical of LLM weight gradients). At a
refresh, `proj_type="full"` gives `R = Uᵀ G V = diag(s)`: its off-diagonal entries are zero in
exact arithmetic and float32 noise (~1e-7 |G|) in both libraries. Adam maps such noise to
`0.1 δ / (0.03 δ + eps)`, i.e. to O(1) normalised updates once `δ >> eps = 1e-6`: with unit-scale
gradients the two libraries then legitimately disagree by ~1e-3 (measured), a property of Adam at
zero gradients, not of either implementation. More generally a low-rank entry near zero carries
absolute noise ~1e-7 ||G|| which Adam divides by ~eps: with entries ~1e-3 that alone reaches
~1e-5 relative (measured 1.25e-5 on a 5x4 case). At ~1e-4 this noise is ~1e-6 relative while
`sqrt(v)` (~3e-6) and eps (1e-6) stay comparable, so eps placement is still exercised.

Spectrum. A singular vector whose singular value is within δ of another is determined by any
float32 SVD only to ~1e-7 ||G|| / δ; a Gaussian matrix has arbitrarily small gaps at the bottom of
its spectrum, and with `rank >= min(m, n)` those vectors are part of the basis in which the kept
moments live. So gradients are drawn as `Q1 diag(s) Q2ᵀ` with random orthogonal `Q1`, `Q2` and
well-separated singular values (`s` spread linearly over [0.1, 1]: gaps >= 0.9 / min(m, n)), like
real gradients whose spectrum decays (paper Lemma 3.3). The comparison is then well-posed.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import galore_jax as gj

galore_torch = pytest.importorskip("galore_torch")
from galore_torch.galore_projector import GaLoreProjector  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Max over steps of ||w_jax - w_torch||_inf / ||w_torch||_inf, and the same for the displacement
# w_t - w_0 (the part the optimizer wrote, which the first ratio would hide under large weights).
# Both are float32 round-off: ~1e-7 per op, accumulated over <= 13 steps, amplified at most by
# 1/spectral-gap in the SVD; measured worst cases are listed in the issue note.
WEIGHT_RTOL = 1e-5
DISPLACEMENT_RTOL = 1e-4


def _sign_fix_rows(x: torch.Tensor) -> torch.Tensor:
  idx = x.abs().argmax(dim=1, keepdim=True)
  return x * torch.where(torch.gather(x, 1, idx) < 0, -1.0, 1.0).to(x.dtype)


def _canonical_get_orthogonal_matrix(self, weights, rank, type):
  """The reference's basis with galore_jax's sign convention applied to every basis vector."""
  out = _ORIGINAL(self, weights, rank, type)
  if type == "right":  # rows of Vh: vectors over the input dim
    return _sign_fix_rows(out)
  if type == "left":  # columns of U: vectors over the output dim
    return _sign_fix_rows(out.T).T
  a, b = out
  return [_sign_fix_rows(a.T).T, _sign_fix_rows(b)]


_ORIGINAL = GaLoreProjector.get_orthogonal_matrix
_RESULTS = {"cases": 0, "worst_weight": 0.0, "worst_disp": 0.0}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _gradient(rng, out_dim: int, in_dim: int) -> np.ndarray:
  """A ~1e-4-scale gradient with well-separated singular values (see the module docstring)."""
  k = min(out_dim, in_dim)
  q1, _ = np.linalg.qr(rng.standard_normal((out_dim, k)))
  q2, _ = np.linalg.qr(rng.standard_normal((in_dim, k)))
  s = rng.permutation(np.linspace(0.1, 1.0, k))
  return (1e-4 * np.sqrt(out_dim * in_dim / k) * (q1 * s) @ q2.T).astype(np.float32)


@functools.cache
def _jax_update(out_dim, in_dim, rank, gap, proj_type, wd, scale, lr):
  tx = gj.galore_adamw(
    lr, rank=rank, update_proj_gap=gap, scale=scale, proj_type=proj_type, weight_decay=wd
  )
  return tx, jax.jit(tx.update)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(
  shape_kind=st.sampled_from(["tall", "wide", "square"]),
  small=st.integers(2, 24),
  extra=st.integers(1, 24),
  rank_offset=st.integers(-8, 3),
  proj_type=st.sampled_from(["std", "reverse_std", "left", "right", "full"]),
  gap=st.integers(1, 3),
  weight_decay=st.sampled_from([0.0, 0.1]),
  scale=st.sampled_from([0.25, 1.0, 2.0]),
  seed=st.integers(0, 2**16),
)
def test_galore_adamw_matches_galore_torch(
  shape_kind, small, extra, rank_offset, proj_type, gap, weight_decay, scale, seed
):
  out_dim, in_dim = {
    "tall": (small + extra, small),  # torch [out, in] with out > in
    "wide": (small, small + extra),
    "square": (small, small),
  }[shape_kind]
  rank = max(1, min(out_dim, in_dim) + rank_offset)
  # The reference's reverse_std back-projects on the wrong side when out < in and rank >= out
  # (its project_back picks the side from the low-rank tensor's shape, which is then square):
  # it raises a shape error there. galore_jax does the right thing; nothing to compare against.
  hypothesis.assume(not (proj_type == "reverse_std" and out_dim < in_dim and rank >= out_dim))
  lr = 1e-2
  steps = 3 * gap + 1  # refreshes at 0, gap, 2*gap, 3*gap: at least 3 of them
  rng = np.random.default_rng(seed)
  w0 = (0.02 * rng.standard_normal((out_dim, in_dim))).astype(np.float32)
  grads = [_gradient(rng, out_dim, in_dim) for _ in range(steps)]

  p_torch = torch.nn.Parameter(torch.tensor(w0))
  group = {"params": [p_torch], "rank": rank, "update_proj_gap": gap, "scale": scale}
  group["proj_type"] = proj_type
  opt = galore_torch.GaLoreAdamW(
    [group], lr=lr, weight_decay=weight_decay, no_deprecation_warning=True
  )

  tx, update = _jax_update(out_dim, in_dim, rank, gap, proj_type, weight_decay, scale, lr)
  w_jax = jnp.asarray(w0.T)  # Flax layout (in, out)
  state = tx.init(w_jax)
  worst_w = worst_d = 0.0
  GaLoreProjector.get_orthogonal_matrix = _canonical_get_orthogonal_matrix
  try:
    for g in grads:
      p_torch.grad = torch.tensor(g)
      opt.step()
      u, state = update(jnp.asarray(g.T), state, w_jax)
      w_jax = w_jax + u
      wt = p_torch.detach().numpy().T
      wj = np.asarray(w_jax)
      worst_w = max(worst_w, _rel(wj, wt))
      worst_d = max(worst_d, _rel(wj - w0.T, wt - w0.T))
  finally:
    GaLoreProjector.get_orthogonal_matrix = _ORIGINAL
  _RESULTS["cases"] += 1
  _RESULTS["worst_weight"] = max(_RESULTS["worst_weight"], worst_w)
  _RESULTS["worst_disp"] = max(_RESULTS["worst_disp"], worst_d)
  assert worst_w <= WEIGHT_RTOL, (worst_w, worst_d)
  assert worst_d <= DISPLACEMENT_RTOL, (worst_w, worst_d)


def test_parity_report(capsys):
  """Prints the figures of the property test above (run after it in file order)."""
  with capsys.disabled():
    print(
      f"\n[torch parity] cases={_RESULTS['cases']} worst weight rel diff="
      f"{_RESULTS['worst_weight']:.2e} worst displacement rel diff={_RESULTS['worst_disp']:.2e}"
    )


def test_without_sign_convention_runs_drift_apart():
  """Documents why the convention is needed: raw torch signs vs ours diverge after a refresh."""
  rng = np.random.default_rng(0)
  out_dim, in_dim, rank, gap = 24, 16, 6, 2
  w0 = (0.02 * rng.standard_normal((out_dim, in_dim))).astype(np.float32)
  p_torch = torch.nn.Parameter(torch.tensor(w0))
  group = {"params": [p_torch], "rank": rank, "update_proj_gap": gap, "scale": 1.0}
  group["proj_type"] = "std"
  opt = galore_torch.GaLoreAdamW([group], lr=1e-2, no_deprecation_warning=True)
  tx = gj.galore_adamw(1e-2, rank=rank, update_proj_gap=gap, scale=1.0)
  w = jnp.asarray(w0.T)
  state = tx.init(w)
  update = jax.jit(tx.update)
  worst = 0.0
  for _ in range(3 * gap + 1):
    g = rng.standard_normal((out_dim, in_dim)).astype(np.float32)
    p_torch.grad = torch.tensor(g)
    opt.step()
    u, state = update(jnp.asarray(g.T), state, w)
    w = w + u
    worst = max(worst, _rel(np.asarray(w) - w0.T, p_torch.detach().numpy().T - w0.T))
  # With raw signs, some basis vector flips between the libraries with overwhelming probability.
  assert worst > 1e-2


@pytest.mark.parametrize(
  "out_dim, in_dim, proj_type", [(24, 16, "std"), (16, 24, "std"), (24, 16, "reverse_std")]
)
def test_galore_over_optax_adafactor_equals_galore_adafactor(out_dim, in_dim, proj_type):
  """`gj.galore(optax.adafactor(...))` is `galore_torch.GaLoreAdafactor` with the training
  script's settings (no relative step, no parameter scale, no first moment, factored second
  moment, RMS clip 1): optax's factored Adafactor and transformers' agree on the low-rank
  gradient (factoring is symmetric under the transpose between the torch and Flax layouts, and
  the row and column means of the second moment share one total). Without a first moment a
  basis vector's sign cancels between projection and back-projection, so the runs agree across
  refreshes with or without the sign convention; the tolerance is the same float32 round-off."""
  rank, gap, scale, lr = 4, 2, 0.5, 1e-2
  rng = np.random.default_rng(7)
  w0 = (0.02 * rng.standard_normal((out_dim, in_dim))).astype(np.float32)
  p_torch = torch.nn.Parameter(torch.tensor(w0))
  group = {"params": [p_torch], "rank": rank, "update_proj_gap": gap, "scale": scale}
  group["proj_type"] = proj_type
  opt = galore_torch.GaLoreAdafactor(
    [group], lr=lr, scale_parameter=False, relative_step=False, warmup_init=False
  )
  inner = optax.adafactor(
    lr, min_dim_size_to_factor=1, multiply_by_parameter_scale=False, clipping_threshold=1.0
  )
  tx = gj.galore(inner, rank=rank, update_proj_gap=gap, scale=scale, proj_type=proj_type)
  update = jax.jit(tx.update)
  w_jax = jnp.asarray(w0.T)
  state = tx.init(w_jax)
  worst_w = worst_d = 0.0
  for _ in range(3 * gap + 1):
    g = _gradient(rng, out_dim, in_dim)
    p_torch.grad = torch.tensor(g)
    opt.step()
    u, state = update(jnp.asarray(g.T), state, w_jax)
    w_jax = w_jax + u
    wt, wj = p_torch.detach().numpy().T, np.asarray(w_jax)
    worst_w = max(worst_w, _rel(wj, wt))
    worst_d = max(worst_d, _rel(wj - w0.T, wt - w0.T))
  assert worst_w <= WEIGHT_RTOL and worst_d <= DISPLACEMENT_RTOL, (worst_w, worst_d)
