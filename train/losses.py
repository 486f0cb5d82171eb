"""Next-token cross-entropy from the last hidden state, in sequence chunks (no [B, L, V] logits).

The LM head of a small LLaMA dominates its step: at LLaMA-9m, 16 x 256 tokens, the float32
logits `[16, 255, 32000]` and their gradient are 0.5 GB each, and the head's three GEMMs
(logits, d hidden, d kernel) are ~100 of the step's ~120 GFLOP. `chunked_next_token_loss`
computes the same summed loss as `train.model.next_token_loss(lm_head(h), tokens)` one chunk of
`S` positions (all `B` rows) at a time under `lax.scan`, and fuses the backward into that pass: a
`jax.custom_vjp` whose forward also returns `dloss/dh` and `dloss/dkernel` (the softmax minus the
one-hot target, times the GEMMs), so no chunk is recomputed and nothing `[B, L, V]`-sized is
ever live. The backward only scales the saved gradients by the incoming cotangent.

Evaluation (no differentiation) runs the primal: the loss pass alone, chunk by chunk.

For the fused layer-wise step (`train.fused`, `vocab_chunk_size`) the loss is also available by
*vocabulary* chunks (`vocab_chunked_loss`: an online softmax over column chunks of the kernel,
then `vocab_chunk_grads` per chunk), so that no dot ever takes the whole `[D, V]` kernel: on
XLA:CPU, which has no BF16 dots, such a dot makes a float32 copy of the kernel (and another of
its transpose for `dloss/dh`), 2.1 GB each at LLaMA-3-8B's 128,256 x 4,096.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def _chunk_nll(h_BxSxD, kernel_DxV, targets_BxS, mask_BxS):
  """(masked loss sum, float32 shifted logits, their log-normaliser, the shift) of one chunk."""
  # As nnx.Linear: one dot in the compute dtype, then upcast for the loss.
  logits_BxSxV = jnp.dot(h_BxSxD, kernel_DxV).astype(jnp.float32)
  # As optax.softmax_cross_entropy_with_integer_labels: shift by the max, log-sum-exp.
  max_BxS = jnp.max(logits_BxSxV, axis=-1)
  shifted_BxSxV = logits_BxSxV - max_BxS[..., None]
  lse_BxS = jnp.log(jnp.sum(jnp.exp(shifted_BxSxV), axis=-1))
  label_BxS = jnp.take_along_axis(shifted_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]
  loss = jnp.sum(jnp.where(mask_BxS, lse_BxS - label_BxS, 0.0))
  return loss, shifted_BxSxV, lse_BxS, max_BxS


def _scan_loss(h_CxBxSxD, kernel_DxV, targets_CxBxS, mask_CxBxS, with_grads: bool, dk=True):
  """Loss sum, and with grads d/dh `[C, B, S, D]` and float32 d/dkernel `[D, V]` (with `dk`;
  else the per-position max and log-normaliser `[C, B, S]` of the shifted logits instead)."""
  vocab = kernel_DxV.shape[1]

  def body(carry, xs):
    loss_acc, dk_acc = carry
    h_BxSxD, targets_BxS, mask_BxS = xs
    loss, shifted_BxSxV, lse_BxS, max_BxS = _chunk_nll(h_BxSxD, kernel_DxV, targets_BxS, mask_BxS)
    if not with_grads:
      return (loss_acc + loss, dk_acc), None
    # d(sum nll)/d logits = softmax - one_hot(target) on unmasked positions, 0 on masked ones.
    p_BxSxV = jnp.exp(shifted_BxSxV - lse_BxS[..., None])
    g32_BxSxV = p_BxSxV - jax.nn.one_hot(targets_BxS, vocab, dtype=jnp.float32)
    # The cotangent reaches the dot in its output dtype, as under autodiff of the unchunked loss.
    g_BxSxV = jnp.where(mask_BxS[..., None], g32_BxSxV, 0.0).astype(h_BxSxD.dtype)
    dh_BxSxD = jnp.einsum("bsv,dv->bsd", g_BxSxV, kernel_DxV)
    if not dk:
      return (loss_acc + loss, dk_acc), (dh_BxSxD, max_BxS, lse_BxS)
    dk_DxV = jnp.einsum("bsd,bsv->dv", h_BxSxD, g_BxSxV, preferred_element_type=jnp.float32)
    return (loss_acc + loss, dk_acc + dk_DxV), dh_BxSxD

  dk0 = jnp.zeros(kernel_DxV.shape if with_grads and dk else (), jnp.float32)
  init = (jnp.zeros([], jnp.float32), dk0)
  xs = (h_CxBxSxD, targets_CxBxS, mask_CxBxS)
  (loss, dk_DxV), out = jax.lax.scan(body, init, xs)
  return loss, out, dk_DxV


@jax.custom_vjp
def _ce_sum(h_CxBxSxD, kernel_DxV, targets_CxBxS, mask_CxBxS):
  return _scan_loss(h_CxBxSxD, kernel_DxV, targets_CxBxS, mask_CxBxS, with_grads=False)[0]


def _ce_sum_fwd(h_CxBxSxD, kernel_DxV, targets_CxBxS, mask_CxBxS):
  loss, dh, dk = _scan_loss(h_CxBxSxD, kernel_DxV, targets_CxBxS, mask_CxBxS, with_grads=True)
  return loss, (dh, dk.astype(kernel_DxV.dtype))


def _ce_sum_bwd(residuals, cotangent):
  dh, dk = residuals
  # Integer targets and the boolean mask take no cotangent.
  return (dh * cotangent.astype(dh.dtype), dk * cotangent.astype(dk.dtype), None, None)


_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd)


def chunked_next_token_loss(
  h_BxLxD: jax.Array,
  kernel_DxV: jax.Array,
  tokens_BxL: jax.Array,
  *,
  chunk_size: int,
  pad_id: int = 0,
  loss_mask_BxL: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """`next_token_loss(h @ kernel, tokens)`, `chunk_size` positions at a time, fused backward.

  Position t predicts ``tokens[:, t + 1]``; targets equal to ``pad_id`` are masked out, or,
  with ``loss_mask_BxL``, exactly the targets where it is False (``pad_id`` is then unused). The
  L - 1 predicting positions are split into ``ceil((L - 1) / S)`` chunks of ``S = chunk_size``
  (the last padded with masked targets); each chunk's ``[B, S, V]`` logits live only inside
  one scan iteration. Differentiable in ``h`` and ``kernel`` (reverse mode only).

  Args:
    h_BxLxD: the final-norm hidden states, in the compute dtype.
    kernel_DxV: the LM head kernel, cast to the compute dtype (as ``nnx.Linear`` does).
    tokens_BxL: int tokens, the batch's ``"tokens"``.
    chunk_size: positions per chunk, S >= 1.
    pad_id: target id to ignore (without ``loss_mask_BxL``).
    loss_mask_BxL: bool, True where ``tokens[:, t]`` is a target that counts (e.g. the
      assistant's tokens of ``train.instruct`` rows); column 0 is never a target.

  Returns:
    ``(loss_sum, num_tokens)`` as ``train.model.next_token_loss``: the float32 sum of
    -log p(target) over unmasked targets and their int32 count.

  Example::

    h_BxLxD = model.hidden_states(tokens_BxL)
    kernel_DxV = model.lm_head.kernel[...].astype(h_BxLxD.dtype)
    loss_sum, n = chunked_next_token_loss(h_BxLxD, kernel_DxV, tokens_BxL, chunk_size=32)
  """
  h_CxBxSxD, targets_CxBxS, mask_CxBxS, count = _chunks(
    h_BxLxD, tokens_BxL, chunk_size, pad_id, loss_mask_BxL
  )
  with jax.named_scope("chunked_loss"):  # names its ops in profiles
    loss_sum = _ce_sum(h_CxBxSxD, kernel_DxV, targets_CxBxS, mask_CxBxS)
  return loss_sum, count


def _targets(tokens_BxL, pad_id, loss_mask_BxL):
  """(targets, bool mask) of the L - 1 predicting positions."""
  mask_BxL1 = tokens_BxL[:, 1:] != pad_id if loss_mask_BxL is None else loss_mask_BxL[:, 1:]
  return tokens_BxL[:, 1:], mask_BxL1.astype(bool)


def _chunks(h_BxLxD, tokens_BxL, chunk_size, pad_id, loss_mask_BxL):
  """The L - 1 predicting positions as C chunks of S: (h, targets, mask, target count)."""
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
  b, seq, d = h_BxLxD.shape
  # L1 = L - 1 predicting positions, padded to C chunks of S.
  l1 = seq - 1
  s = min(chunk_size, l1)
  c = -(-l1 // s)
  extra = c * s - l1
  h_BxL1xD = jnp.pad(h_BxLxD[:, :-1], ((0, 0), (0, extra), (0, 0)))
  targets_BxL1, mask_BxL1 = _targets(tokens_BxL, pad_id, loss_mask_BxL)
  targets_BxL1 = jnp.pad(targets_BxL1, ((0, 0), (0, extra)))
  mask_BxL1 = jnp.pad(mask_BxL1, ((0, 0), (0, extra)))  # padding: not targets
  h_CxBxSxD = h_BxL1xD.reshape(b, c, s, d).transpose(1, 0, 2, 3)
  targets_CxBxS = targets_BxL1.reshape(b, c, s).transpose(1, 0, 2)
  mask_CxBxS = mask_BxL1.reshape(b, c, s).transpose(1, 0, 2)
  return h_CxBxSxD, targets_CxBxS, mask_CxBxS, jnp.sum(mask_BxL1, dtype=jnp.int32)


class SoftmaxStats(NamedTuple):
  """Per predicting position, float32 `[B, L - 1]`: the max of its logits and the log-sum-exp
  of the logits shifted by it (the softmax is `exp(logits - max - lse)`)."""

  max_BxL1: jax.Array
  lse_BxL1: jax.Array


def vocab_chunked_loss(
  h_BxLxD: jax.Array,
  columns,
  num_chunks: int,
  tokens_BxL: jax.Array,
  *,
  pad_id: int = 0,
  loss_mask_BxL: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, SoftmaxStats]:
  """`chunked_next_token_loss` one vocabulary chunk at a time (an online softmax), no gradient.

  For a step that never holds the LM head whole in another dtype (XLA:CPU computes BF16 dots in
  float32, so a dot with the whole `[D, V]` kernel makes a float32 copy of it: 2.1 GB at
  LLaMA-3-8B): chunk c's logits `h @ columns(c)` (all positions, `C` vocabulary entries) update a
  running max `m` and sum `s = sum exp(logits - m)` (rescaled by `exp(m_old - m_new)` when the
  max grows), and the target's logit is picked in the chunk that holds it. Then
  `nll = log s - (logit_target - m)`, the same value as the one-pass loss up to float32
  rounding of the rescaling. Gradients: `vocab_chunk_grads`, one chunk at a time, from `stats`.

  Args:
    h_BxLxD: the final-norm hidden states, in the compute dtype.
    columns: `c -> kernel_DxC`, columns `c C .. (c + 1) C - 1` of the LM head in the compute
      dtype (a function, so that the caller decides how a chunk is read: e.g. behind a fence).
    num_chunks: n, with `n C = V`.
    tokens_BxL, pad_id, loss_mask_BxL: as `chunked_next_token_loss`.

  Returns:
    `(loss_sum, num_tokens, stats)`: as `chunked_next_token_loss`, and the softmax statistics.
  """
  targets_BxL1, mask_BxL1 = _targets(tokens_BxL, pad_id, loss_mask_BxL)
  h_BxL1xD = h_BxLxD[:, :-1]

  def body(carry, c):
    max_BxL1, sum_BxL1, label_BxL1 = carry
    kernel_DxC = columns(c)
    size = kernel_DxC.shape[1]
    # As nnx.Linear: one dot in the compute dtype, then upcast for the loss.
    logits_BxL1xC = jnp.dot(h_BxL1xD, kernel_DxC).astype(jnp.float32)
    new_max_BxL1 = jnp.maximum(max_BxL1, jnp.max(logits_BxL1xC, axis=-1))
    shifted_BxL1xC = logits_BxL1xC - new_max_BxL1[..., None]
    sum_BxL1 = sum_BxL1 * jnp.exp(max_BxL1 - new_max_BxL1) + jnp.sum(jnp.exp(shifted_BxL1xC), -1)
    local_BxL1 = targets_BxL1 - c * size
    inside_BxL1 = (local_BxL1 >= 0) & (local_BxL1 < size)
    index = jnp.clip(local_BxL1, 0, size - 1)[..., None]
    picked_BxL1 = jnp.take_along_axis(logits_BxL1xC, index, axis=-1)[..., 0]
    return (new_max_BxL1, sum_BxL1, jnp.where(inside_BxL1, picked_BxL1, label_BxL1)), None

  shape = targets_BxL1.shape
  init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape))
  (max_BxL1, sum_BxL1, label_BxL1), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
  lse_BxL1 = jnp.log(sum_BxL1)
  loss = jnp.sum(jnp.where(mask_BxL1, lse_BxL1 - (label_BxL1 - max_BxL1), 0.0))
  count = jnp.sum(mask_BxL1, dtype=jnp.int32)
  return loss, count, SoftmaxStats(max_BxL1, lse_BxL1)


def vocab_chunk_grads(
  h_BxLxD: jax.Array,
  kernel_DxC: jax.Array,
  stats: SoftmaxStats,
  tokens_BxL: jax.Array,
  start,
  *,
  pad_id: int = 0,
  loss_mask_BxL: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """float32 d loss_sum / d kernel[:, start:start + C] and this chunk's term of d loss_sum / d h,
  from `vocab_chunked_loss`'s statistics: the columns' logits are recomputed (`[B, L - 1, C]`).

  `d loss_sum / d h` is the sum of the terms over the chunks (float32; cast it to h's dtype
  once, as the one-pass loss's dot rounds once).

  Args:
    h_BxLxD: the final-norm hidden states, as given to `vocab_chunked_loss`.
    kernel_DxC: the kernel's columns `start .. start + C - 1`, in the compute dtype.
    stats: `vocab_chunked_loss`'s `SoftmaxStats`.
    tokens_BxL, pad_id, loss_mask_BxL: as there.
    start: the first column (vocabulary id) of the slice; may be traced.

  Returns:
    `(dk_DxC, dh_BxLxD)`, float32 (`dh` zero at the last position).
  """
  targets_BxL1, mask_BxL1 = _targets(tokens_BxL, pad_id, loss_mask_BxL)
  h_BxL1xD = h_BxLxD[:, :-1]
  logits_BxL1xC = jnp.dot(h_BxL1xD, kernel_DxC).astype(jnp.float32)
  # The operations of `_scan_loss` on these columns: shift, normalise, minus the one-hot.
  shifted_BxL1xC = logits_BxL1xC - stats.max_BxL1[..., None]
  p_BxL1xC = jnp.exp(shifted_BxL1xC - stats.lse_BxL1[..., None])
  onehot = jax.nn.one_hot(targets_BxL1 - start, kernel_DxC.shape[1], dtype=jnp.float32)
  # The cotangent reaches the dots in their output dtype, as under autodiff of the full loss.
  g_BxL1xC = jnp.where(mask_BxL1[..., None], p_BxL1xC - onehot, 0.0).astype(h_BxLxD.dtype)
  f32 = jnp.float32
  dk_DxC = jnp.einsum("bld,blc->dc", h_BxL1xD, g_BxL1xC, preferred_element_type=f32)
  dh_BxL1xD = jnp.einsum("blc,dc->bld", g_BxL1xC, kernel_DxC, preferred_element_type=f32)
  return dk_DxC, jnp.pad(dh_BxL1xD, ((0, 0), (0, 1), (0, 0)))
