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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_nll(h_BxSxD, kernel_DxV, targets_BxS, mask_BxS):
  """Per-chunk float32 logits and (masked loss sum, shifted logits, log-normaliser)."""
  # As nnx.Linear: one dot in the compute dtype, then upcast for the loss.
  logits_BxSxV = jnp.dot(h_BxSxD, kernel_DxV).astype(jnp.float32)
  # As optax.softmax_cross_entropy_with_integer_labels: shift by the max, log-sum-exp.
  shifted_BxSxV = logits_BxSxV - jnp.max(logits_BxSxV, axis=-1, keepdims=True)
  lse_BxS = jnp.log(jnp.sum(jnp.exp(shifted_BxSxV), axis=-1))
  label_BxS = jnp.take_along_axis(shifted_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]
  loss = jnp.sum(jnp.where(mask_BxS, lse_BxS - label_BxS, 0.0))
  return loss, shifted_BxSxV, lse_BxS


def _scan_loss(h_CxBxSxD, kernel_DxV, targets_CxBxS, mask_CxBxS, with_grads: bool):
  """Loss sum (and, with grads, d/dh `[C, B, S, D]` and float32 d/dkernel `[D, V]`)."""
  vocab = kernel_DxV.shape[1]

  def body(carry, xs):
    loss_acc, dk_acc = carry
    h_BxSxD, targets_BxS, mask_BxS = xs
    loss, shifted_BxSxV, lse_BxS = _chunk_nll(h_BxSxD, kernel_DxV, targets_BxS, mask_BxS)
    if not with_grads:
      return (loss_acc + loss, dk_acc), None
    # d(sum nll)/d logits = softmax - one_hot(target) on unmasked positions, 0 on masked ones.
    p_BxSxV = jnp.exp(shifted_BxSxV - lse_BxS[..., None])
    g32_BxSxV = p_BxSxV - jax.nn.one_hot(targets_BxS, vocab, dtype=jnp.float32)
    # The cotangent reaches the dot in its output dtype, as under autodiff of the unchunked loss.
    g_BxSxV = jnp.where(mask_BxS[..., None], g32_BxSxV, 0.0).astype(h_BxSxD.dtype)
    dh_BxSxD = jnp.einsum("bsv,dv->bsd", g_BxSxV, kernel_DxV)
    dk_DxV = jnp.einsum("bsd,bsv->dv", h_BxSxD, g_BxSxV, preferred_element_type=jnp.float32)
    return (loss_acc + loss, dk_acc + dk_DxV), dh_BxSxD

  dk0 = jnp.zeros(kernel_DxV.shape if with_grads else (), jnp.float32)
  init = (jnp.zeros([], jnp.float32), dk0)
  xs = (h_CxBxSxD, targets_CxBxS, mask_CxBxS)
  (loss, dk_DxV), dh_CxBxSxD = jax.lax.scan(body, init, xs)
  return loss, dh_CxBxSxD, dk_DxV


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
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
  b, seq, d = h_BxLxD.shape
  # L1 = L - 1 predicting positions, padded to C chunks of S.
  l1 = seq - 1
  s = min(chunk_size, l1)
  c = -(-l1 // s)
  extra = c * s - l1
  h_BxL1xD = jnp.pad(h_BxLxD[:, :-1], ((0, 0), (0, extra), (0, 0)))
  mask_BxL1 = tokens_BxL[:, 1:] != pad_id if loss_mask_BxL is None else loss_mask_BxL[:, 1:]
  targets_BxL1 = jnp.pad(tokens_BxL[:, 1:], ((0, 0), (0, extra)))
  mask_BxL1 = jnp.pad(mask_BxL1.astype(bool), ((0, 0), (0, extra)))  # padding: not targets
  h_CxBxSxD = h_BxL1xD.reshape(b, c, s, d).transpose(1, 0, 2, 3)
  targets_CxBxS = targets_BxL1.reshape(b, c, s).transpose(1, 0, 2)
  mask_CxBxS = mask_BxL1.reshape(b, c, s).transpose(1, 0, 2)
  with jax.named_scope("chunked_loss"):  # names its ops in profiles
    loss_sum = _ce_sum(h_CxBxSxD, kernel_DxV, targets_CxBxS, mask_CxBxS)
  return loss_sum, jnp.sum(mask_BxL1, dtype=jnp.int32)
