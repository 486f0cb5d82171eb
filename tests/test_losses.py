"""train.losses.chunked_next_token_loss: the same loss and gradients as the full-logits loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from train import losses, trainer
from train.losses import chunked_next_token_loss
from train.model import next_token_loss

EPS32 = float(np.finfo(np.float32).eps)


def _problem(b=3, seq=13, d=8, v=50, seed=0):
  """Hidden states, an LM head kernel and tokens with right padding (pad id 0) in some rows."""
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(b, seq, d)).astype(np.float32)
  w = (0.5 * rng.normal(size=(d, v))).astype(np.float32)
  tokens = rng.integers(1, v, size=(b, seq)).astype(np.int32)
  tokens[0, 9:] = 0  # a padded row
  tokens[1, 4:] = 0  # a short one
  return h, w, tokens


def _reference64(h, w, tokens):
  """float64 loss sum, its gradients and the magnitudes that bound float32 rounding."""
  h, w = h.astype(np.float64), w.astype(np.float64)
  h1, t = h[:, :-1], tokens[:, 1:]
  mask = (t != 0)[..., None]
  z = h1 @ w
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(w.shape[1])[t]
  nll = -np.log(np.take_along_axis(p, t[..., None], -1))
  g = (p - onehot) * mask
  # |z| computed from |h| |w|: rounding of each logit is at most gamma_D times this.
  zmag = (np.abs(h1) @ np.abs(w)).max(-1, keepdims=True)
  # First-order bounds (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1): every
  # output is a sum of at most n = D + V + R rounded terms (D in a logit, V in the softmax
  # normaliser, R = B (L - 1) rows in the loss and kernel-gradient sums), so its error is at most
  # gamma_n ~ n eps times the sum of its terms' magnitudes, and a logit error delta moves the
  # softmax and the nll by at most 2 delta each: hence the 2 p zmag terms.
  n = w.shape[0] + w.shape[1] + h1.shape[0] * h1.shape[1]
  gmag = ((p + onehot) + 2 * p * zmag) * mask
  bounds = {
    "loss": n * EPS32 * float(np.sum((nll + 2 * zmag) * mask)),
    # The last position predicts nothing: its gradient is exactly 0 in every path.
    "dh": n * EPS32 * np.pad(gmag @ np.abs(w).T, ((0, 0), (0, 1), (0, 0))),
    "dw": n * EPS32 * np.einsum("bld,blv->dv", np.abs(h1), gmag),
  }
  dh = np.zeros_like(h)
  dh[:, :-1] = g @ w.T
  dw = np.einsum("bld,blv->dv", h1, g)
  return float(np.sum(nll * mask)), dh, dw, bounds


def _value_and_grads(fn, h, w, tokens):
  f = jax.jit(jax.value_and_grad(lambda h, w: fn(h, w, tokens)[0], argnums=(0, 1)))
  loss, (dh, dw) = f(jnp.asarray(h), jnp.asarray(w))
  return float(loss), np.asarray(dh), np.asarray(dw)


@pytest.mark.parametrize("chunk", [1, 5, 12, 100])  # 12 = L - 1; 5 pads the last chunk
def test_chunked_loss_and_gradients_match_the_full_logits_loss(chunk):
  h, w, tokens = _problem()
  ref_loss, ref_dh, ref_dw, bound = _reference64(h, w, tokens)
  full = lambda h, w, t: next_token_loss(h @ w, t)  # noqa: E731
  chunked = lambda h, w, t: chunked_next_token_loss(h, w, t, chunk_size=chunk)  # noqa: E731
  for fn in (full, chunked):  # the bound holds for the full path too: it is not too tight
    loss, dh, dw = _value_and_grads(fn, h, w, tokens)
    assert abs(loss - ref_loss) <= bound["loss"]
    assert np.all(np.abs(dh - ref_dh) <= bound["dh"])
    assert np.all(np.abs(dw - ref_dw) <= bound["dw"])
  # Primal only (the eval path) and the token count: as the full loss.
  loss, n = jax.jit(chunked)(h, w, tokens)
  assert abs(float(loss) - ref_loss) <= bound["loss"]
  assert int(n) == int(next_token_loss(h @ w, tokens)[1]) == int(np.sum(tokens[:, 1:] != 0))


def test_chunked_loss_scales_by_the_cotangent_and_keeps_dtypes():
  h, w, tokens = _problem()
  fn = lambda h, w: 3.0 * chunked_next_token_loss(h, w, tokens, chunk_size=4)[0]  # noqa: E731
  _, (dh3, dw3) = jax.value_and_grad(fn, argnums=(0, 1))(h, w)
  _, dh1, dw1 = _value_and_grads(
    lambda h, w, t: chunked_next_token_loss(h, w, t, chunk_size=4), h, w, tokens
  )
  # Multiplying by 3 is exact up to one rounding of each entry: |3x - fl(3x)| <= eps |3x| / 2.
  np.testing.assert_allclose(np.asarray(dh3), 3 * dh1, rtol=EPS32, atol=0)
  np.testing.assert_allclose(np.asarray(dw3), 3 * dw1, rtol=EPS32, atol=0)
  hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  loss, (dhb, dwb) = jax.value_and_grad(
    lambda h, w: chunked_next_token_loss(h, w, tokens, chunk_size=4)[0], argnums=(0, 1)
  )(hb, wb)
  assert (loss.dtype, dhb.dtype, dwb.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)


@pytest.mark.parametrize("num_chunks", [1, 2, 5, 10])  # V = 50: 50, 25, 10, 5 columns each
def test_vocab_chunked_loss_and_gradients_match_the_full_logits_loss(num_chunks):
  """The online softmax over vocabulary chunks and the per-chunk gradients (summed): within the
  float64 reference's rounding bounds, widened for the rescaling. Each chunk after the first
  rescales the running sum once (`s exp(m_old - m_new)`: an exp and a multiply, ~2 roundings),
  so the normaliser is a sum of at most V + 2 C rounded terms instead of V."""
  h, w, tokens = _problem()
  ref_loss, ref_dh, ref_dw, bound = _reference64(h, w, tokens)
  widen = 1 + 2 * num_chunks / (w.shape[0] + w.shape[1] + h.shape[0] * (h.shape[1] - 1))
  size = w.shape[1] // num_chunks
  tokens = jnp.asarray(tokens)
  columns = lambda c: jax.lax.dynamic_slice_in_dim(w, c * size, size, axis=1)  # noqa: E731

  @jax.jit
  def run(h, w):
    loss, count, stats = losses.vocab_chunked_loss(h, columns, num_chunks, tokens)
    grads = [
      losses.vocab_chunk_grads(h, columns(c), stats, tokens, c * size) for c in range(num_chunks)
    ]
    dh = sum(g[1] for g in grads)
    return loss, count, dh, jnp.concatenate([g[0] for g in grads], axis=1)

  loss, count, dh, dw = map(np.asarray, run(jnp.asarray(h), jnp.asarray(w)))
  assert abs(float(loss) - ref_loss) <= widen * bound["loss"]
  assert np.all(np.abs(dh - ref_dh) <= widen * bound["dh"])
  assert np.all(np.abs(dw - ref_dw) <= widen * bound["dw"])
  assert int(count) == int(np.sum(np.asarray(tokens)[:, 1:] != 0))
  # With a loss mask: the mask, not the pad rule, picks the targets (here: every other one).
  mask = jnp.asarray(np.arange(tokens.shape[1]) % 2 == 0)[None].repeat(tokens.shape[0], 0)
  loss_m, count_m, _ = losses.vocab_chunked_loss(
    jnp.asarray(h), columns, num_chunks, tokens, loss_mask_BxL=mask
  )
  full_m, n_m = next_token_loss(jnp.asarray(h) @ w, tokens, loss_mask_BxL=mask)
  assert int(count_m) == int(n_m)
  assert abs(float(loss_m) - float(full_m)) <= widen * bound["loss"]


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_bad_chunk_size_is_a_clear_error(bad):
  h, w, tokens = _problem()
  with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
    chunked_next_token_loss(h, w, tokens, chunk_size=bad)


def test_config_loss_chunk_size_is_validated():
  c = default.get_config()
  c.model.loss_chunk_size = -1
  with pytest.raises(ValueError, match=r"^config\.model\.loss_chunk_size=-1"):
    trainer.build(c)


def _tiny(chunk: int):
  c = default.get_config()
  c.model.update(hidden_dim=32, mlp_dim=64, num_heads=2, num_layers=2, loss_chunk_size=chunk)
  c.optimizer.update(rank=8, update_proj_gap=2)
  return c


def test_model_gradients_and_train_steps_with_chunked_loss_match_full_logits():
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, 32000, size=(2, 4, 17)).astype(np.int32)
  tokens[:, 0, 10:] = 0
  setups = {chunk: trainer.build(_tiny(chunk)) for chunk in (0, 6)}
  params = trainer.init_state(setups[0], 0).params
  grads = {}
  for chunk, setup in setups.items():
    loss_fn = lambda p, c=chunk, s=setup: trainer._loss(s.graphdef, p, tokens[0], c)[0]  # noqa: E731
    grads[chunk] = jax.jit(jax.grad(loss_fn))(params)
  # The head's outputs agree to n eps relative (n = D + V + R, see _reference64); the rest of
  # the backward is the same code applied to d hidden, a linear map whose amplification at
  # init (N(0, 0.02) weights, residual blocks) is O(1): 10 n eps of each leaf's largest entry.
  n = 32 + 32000 + 4 * 16
  for g0, g6 in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[6])):
    g0, g6 = np.asarray(g0), np.asarray(g6)
    assert np.max(np.abs(g6 - g0)) <= 10 * n * EPS32 * np.max(np.abs(g0))
  # Two GaLore train steps (a refresh, then a projected step): the same losses and counts.
  outs = {}
  for chunk, setup in setups.items():
    state = trainer.init_state(setup, 0)
    step = jax.jit(trainer.make_train_step(setup, 1))
    outs[chunk] = []
    for batch in tokens:
      state, out = step(state, {"tokens": jnp.asarray(batch)})
      outs[chunk].append(out)
  for a, b in zip(outs[0], outs[6]):
    assert int(a["tokens"]) == int(b["tokens"])
    # A mean of per-token losses ~ log V, each within n eps relative (as above).
    assert abs(float(a["loss"]) - float(b["loss"])) <= 2 * n * EPS32 * float(a["loss"])
