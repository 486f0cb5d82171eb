"""LLaMA in Flax NNX, as in the GaLore reference's pre-training code, with its model sizes.

The architecture follows the reference's local copy of HF LLaMA (``peft_pretraining/
modeling_llama.py``): RMSNorm (eps 1e-6, variance in float32), rotary position embeddings with
HF's ``rotate_half`` convention (so HF weights import directly; the conversion is in
``train/checkpoint_io.py``), causal self-attention with no padding mask (right padding plus a
masked loss makes the mask unnecessary), a SwiGLU MLP, no biases, an untied LM head and
N(0, 0.02) init for every kernel and the embedding.

Parameter paths are built for GaLore targeting by name, like the reference's "attn"/"mlp" rule:
attention kernels live under ``attn`` (``layers/attn/q_proj/kernel``), MLP kernels under ``mlp``
(``layers/mlp/gate_proj/kernel``); the embedding, LM head and norms never contain either word.
Kernels are Flax layout ``(in, out)``; with ``scan_layers`` they are stacked to ``[N, in, out]``
and layers are applied with ``nnx.scan``, otherwise ``layers`` is an ``nnx.List`` indexed by layer.

References: GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection
(https://arxiv.org/abs/2403.03507); LLaMA (https://arxiv.org/abs/2302.13971).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.typing import DTypeLike

from galore_jax.masks import path_names

# Remat policy names -> jax.checkpoint policies ("none" means no remat at all).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
  "full": None,  # save only each block's input; recompute the whole block
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # same as "full"
  "everything_saveable": jax.checkpoint_policies.everything_saveable,  # saves no memory
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """LLaMA-3.1 rotary rescaling (HF ``rope_scaling`` with ``rope_type: "llama3"``).

  Frequencies with wavelength above ``original_max_position_embeddings / low_freq_factor`` are
  divided by ``factor``, those below ``... / high_freq_factor`` are kept, and the band between
  is interpolated linearly in ``original_max_position_embeddings / wavelength``.
  """

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int

  def __post_init__(self):
    if not self.factor > 0 or not self.high_freq_factor > self.low_freq_factor > 0:
      raise ValueError(
        f"llama3 rope scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0, got "
        f"{self}"
      )

  def apply(self, inv_freq_K2: jax.Array) -> jax.Array:
    """Rescaled inverse frequencies, float32 (transformers' ``_compute_llama3_parameters``)."""
    old = float(self.original_max_position_embeddings)
    low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
    wavelen_K2 = 2 * jnp.pi / inv_freq_K2
    scaled_K2 = jnp.where(wavelen_K2 > low_wavelen, inv_freq_K2 / self.factor, inv_freq_K2)
    smooth_K2 = (old / wavelen_K2 - self.low_freq_factor) / (
      self.high_freq_factor - self.low_freq_factor
    )
    smoothed_K2 = (1 - smooth_K2) * scaled_K2 / self.factor + smooth_K2 * scaled_K2
    medium_K2 = (wavelen_K2 >= high_wavelen) & (wavelen_K2 <= low_wavelen)
    return jnp.where(medium_K2, smoothed_K2, scaled_K2)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a LLaMA decoder.

  Dimension letters used in tensor names (``x_BxLxD``, ``logits_BxLxV``, ``kernel_NxDxF``):
    B batch, L sequence length, D hidden (model) dim, H attention heads, G key/value heads
    (grouped-query attention; G = H is plain multi-head), K head dim (D / H unless given),
    F MLP intermediate dim, V vocabulary size, N layers.

  Attributes:
    vocab_size: V.
    hidden_dim: D.
    mlp_dim: F.
    num_heads: H; must divide D (unless ``explicit_head_dim`` is set), and K must be even
      (rotary pairs).
    num_layers: N.
    num_kv_heads: G, key/value heads of grouped-query attention; must divide H. 0 = H.
    explicit_head_dim: K where it is not D / H (HF's ``head_dim``); 0 = D / H.
    tie_word_embeddings: the LM head is the transposed embedding (no ``lm_head`` parameter).
    rms_norm_eps: epsilon added to the mean square in RMSNorm.
    rope_base: rotary base (theta); inverse frequencies are base^(-2i/K).
    rope_scaling: ``Llama3RopeScaling`` (LLaMA-3.1's frequency-dependent rescaling) or None.
    sliding_window: each query sees only its last W positions (itself included), as Mistral's
      ``sliding_window``; 0 = plain causal attention.
    init_std: standard deviation of the N(0, std) init of every kernel and the embedding.
    dtype: compute dtype (activations, logits). RMSNorm variance, rotary and the loss always run
      in float32. ``jnp.float32`` or ``jnp.bfloat16`` (the paper's pure-bf16 runs).
    param_dtype: dtype the parameters are stored in (pure bf16 = both dtypes bf16).
    scan_layers: stack the N blocks (kernels ``[N, in, out]``) and run them with ``nnx.scan``
      (compile time independent of N); False keeps an ``nnx.List`` of N blocks (2-D kernels).
    remat_policy: activation rematerialisation of each decoder block. "none": off. "full" or
      "nothing_saveable": keep only block inputs, recompute everything. "dots_saveable": keep
      every matmul output. "dots_with_no_batch_dims_saveable": keep the weight matmuls (q/k/v/o,
      gate/up/down) but recompute attention scores. "everything_saveable": remat wrapper that
      saves everything (for testing).
    attention_chunk_size: queries per attention chunk; 0 = all at once. With C > 0 and L > C,
      the attention runs C queries at a time (each against all keys, under the causal/window
      mask) and each chunk is recomputed in the backward pass, so the ``[B, H, L, L]`` scores
      and softmax exist one ``[B, H, C, L]`` slice at a time. Exact (each query's softmax is
      over the same keys); it trades one extra attention forward in the backward pass for
      memory, e.g. 2048-token fine-tuning on one device (``benchmarks/finetune_memory.py``).
  """

  vocab_size: int
  hidden_dim: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  num_kv_heads: int = 0
  explicit_head_dim: int = 0
  tie_word_embeddings: bool = False
  rms_norm_eps: float = 1e-6
  rope_base: float = 10000.0
  rope_scaling: Llama3RopeScaling | None = None
  sliding_window: int = 0
  init_std: float = 0.02
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  scan_layers: bool = False
  remat_policy: str = "none"
  attention_chunk_size: int = 0

  def __post_init__(self):
    # Normalise dtypes so "bfloat16" (e.g. from a CLI override) works and configs hash equal.
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    for name in ("vocab_size", "hidden_dim", "mlp_dim", "num_heads", "num_layers"):
      if getattr(self, name) <= 0:
        raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
    for name in ("num_kv_heads", "explicit_head_dim", "sliding_window", "attention_chunk_size"):
      if getattr(self, name) < 0:
        raise ValueError(f"LlamaConfig.{name} must be >= 0, got {getattr(self, name)}")
    if self.explicit_head_dim:
      if self.explicit_head_dim % 2:
        raise ValueError(
          f"explicit_head_dim={self.explicit_head_dim} must be even (rotary embeddings rotate "
          "pairs)"
        )
    elif self.hidden_dim % self.num_heads or (self.hidden_dim // self.num_heads) % 2:
      raise ValueError(
        f"hidden_dim={self.hidden_dim} must split into num_heads={self.num_heads} heads "
        "of even size (rotary embeddings rotate pairs)"
      )
    if self.num_heads % self.kv_heads:
      raise ValueError(
        f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} "
        "(grouped-query attention shares each key/value head among H / G query heads)"
      )
    if self.remat_policy != "none" and self.remat_policy not in REMAT_POLICIES:
      known = ", ".join(["none", *REMAT_POLICIES])
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; known: {known}")

  @property
  def head_dim(self) -> int:
    """K: ``explicit_head_dim`` if set, else D / H."""
    return self.explicit_head_dim or self.hidden_dim // self.num_heads

  @property
  def kv_heads(self) -> int:
    """G: ``num_kv_heads`` if set, else H."""
    return self.num_kv_heads or self.num_heads


def _size(hidden: int, inter: int, heads: int, layers: int, vocab: int = 32000) -> LlamaConfig:
  return LlamaConfig(
    vocab_size=vocab, hidden_dim=hidden, mlp_dim=inter, num_heads=heads, num_layers=layers
  )


# The reference's configs/llama_*.json (github.com/jiaweizzhao/GaLore): hidden, intermediate,
# heads, layers.
LLAMA_SIZES: dict[str, LlamaConfig] = {
  "9m": _size(128, 352, 4, 4),
  "20m": _size(256, 688, 4, 4),
  "35m": _size(384, 1024, 8, 6),
  "40m": _size(416, 1024, 8, 8),
  "60m": _size(512, 1376, 8, 8),
  "71m": _size(512, 1368, 8, 12),
  "100m": _size(640, 1708, 10, 12, vocab=32100),
  "130m": _size(768, 2048, 12, 12),
  "250m": _size(768, 2560, 16, 24),
  "350m": _size(1024, 2736, 16, 24),
  "1b": _size(2048, 5461, 32, 24),
  "3b": _size(2560, 6848, 32, 32),
  "7b": _size(4096, 11008, 32, 32),
}


# Shapes of released checkpoints, for memory accounting (benchmarks) without the checkpoint; a
# real fine-tune reads them from the checkpoint's config.json (`train.checkpoint_io`).
RELEASED_SHAPES: dict[str, LlamaConfig] = {
  # meta-llama/Meta-Llama-3-8B config.json: GQA 32 query / 8 key-value heads, vocab 128,256.
  "llama3-8b": LlamaConfig(
    vocab_size=128256,
    hidden_dim=4096,
    mlp_dim=14336,
    num_heads=32,
    num_layers=32,
    num_kv_heads=8,
    rms_norm_eps=1e-5,
    rope_base=500000.0,
  ),
}


def llama_config(size: str, **overrides: Any) -> LlamaConfig:
  """The reference's LLaMA config of a given size, with fields overridden.

  Args:
    size: one of ``LLAMA_SIZES`` ("9m", "60m", "130m", ..., "7b") or ``RELEASED_SHAPES``
      ("llama3-8b").
    **overrides: ``LlamaConfig`` fields to replace, e.g. ``dtype=jnp.bfloat16``.

  Returns:
    The ``LlamaConfig``.

  Example::

    config = llama_config("60m", dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)
  """
  sizes = {**LLAMA_SIZES, **RELEASED_SHAPES}
  if size not in sizes:
    raise ValueError(f"unknown LLaMA size {size!r}; known sizes: {', '.join(sizes)}")
  return dataclasses.replace(sizes[size], **overrides)


# ----------------------------------------------------------------------------------------------
# Layers.


class RMSNorm(nnx.Module):
  """RMSNorm with a learned ``scale``; mean square in float32 as in HF LLaMA."""

  def __init__(self, dim: int, *, eps: float, dtype: DTypeLike, param_dtype: DTypeLike):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  @jax.named_scope("rms_norm")  # names the ops in profiles (benchmarks/step_breakdown.py)
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x32_BxLxD = x_BxLxD.astype(jnp.float32)
    ms_BxLx1 = jnp.mean(jnp.square(x32_BxLxD), axis=-1, keepdims=True)
    y_BxLxD = (x32_BxLxD * jax.lax.rsqrt(ms_BxLx1 + self.eps)).astype(self.dtype)
    return y_BxLxD * self.scale[...].astype(self.dtype)


def rope_tables(
  seq_len: int, head_dim: int, base: float, scaling: Llama3RopeScaling | None = None
) -> tuple[jax.Array, jax.Array]:
  """float32 ``(cos_LxK, sin_LxK)`` for positions 0..L-1, HF layout (frequencies repeated)."""
  inv_freq_K2 = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is not None:
    inv_freq_K2 = scaling.apply(inv_freq_K2)
  freqs_LxK2 = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq_K2[None, :]
  emb_LxK = jnp.concatenate([freqs_LxK2, freqs_LxK2], axis=-1)
  return jnp.cos(emb_LxK), jnp.sin(emb_LxK)


@jax.named_scope("rope")
def apply_rope(x_BxLxHxK: jax.Array, cos_LxK: jax.Array, sin_LxK: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin (HF convention), in float32, returned in x's dtype."""
  x32 = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x32 * cos_LxK[None, :, None, :] + rotated * sin_LxK[None, :, None, :]
  return out.astype(x_BxLxHxK.dtype)


def _linear(c: LlamaConfig, din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
    din,
    dout,
    use_bias=False,
    dtype=c.dtype,
    param_dtype=c.param_dtype,
    kernel_init=nnx.initializers.normal(c.init_std),
    rngs=rngs,
  )


class Attention(nnx.Module):
  """Causal grouped-query self-attention with rotary q/k, via ``jax.nn.dot_product_attention``.

  q has H heads, k and v have G (each shared by H / G query heads; G = H is multi-head).
  Kernels: q ``(D, H K)``, k and v ``(D, G K)``, o ``(H K, D)``.
  """

  def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
    self.num_heads, self.kv_heads, self.head_dim = c.num_heads, c.kv_heads, c.head_dim
    self.sliding_window, self.chunk_size = c.sliding_window, c.attention_chunk_size
    d, q_dim, kv_dim = c.hidden_dim, c.num_heads * c.head_dim, c.kv_heads * c.head_dim
    self.q_proj = _linear(c, d, q_dim, rngs)
    self.k_proj = _linear(c, d, kv_dim, rngs)
    self.v_proj = _linear(c, d, kv_dim, rngs)
    self.o_proj = _linear(c, q_dim, d, rngs)

  @jax.named_scope("attention")
  def __call__(self, x_BxLxD: jax.Array, cos_LxK: jax.Array, sin_LxK: jax.Array) -> jax.Array:
    b, seq, _ = x_BxLxD.shape
    split = lambda y, heads: y.reshape(b, seq, heads, self.head_dim)
    q_BxLxHxK = apply_rope(split(self.q_proj(x_BxLxD), self.num_heads), cos_LxK, sin_LxK)
    k_BxLxGxK = apply_rope(split(self.k_proj(x_BxLxD), self.kv_heads), cos_LxK, sin_LxK)
    v_BxLxGxK = split(self.v_proj(x_BxLxD), self.kv_heads)
    # A query at t sees keys t - W + 1 .. t (Mistral's window W, itself included).
    window = (self.sliding_window - 1, 0) if self.sliding_window else None
    # No padding mask (as in the reference): with right padding, real positions only see
    # real positions under the causal mask, and pad targets are masked in the loss.
    with jax.named_scope("sdpa"):
      if self.chunk_size and seq > self.chunk_size:
        out_BxLxHxK = chunked_attention(
          q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, self.chunk_size, self.sliding_window
        )
      else:
        out_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, is_causal=True, local_window_size=window
        )
    return self.o_proj(out_BxLxHxK.reshape(b, seq, self.num_heads * self.head_dim))


def chunked_attention(
  q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array, chunk: int, window: int = 0
) -> jax.Array:
  """Causal attention `chunk` queries at a time, each chunk recomputed in the backward pass.

  Equal to ``jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=...)``:
  every query's softmax runs over the same keys (all L, masked to positions <= its own and,
  with `window` W > 0, > its own - W). Only one ``[B, H, chunk, L]`` block of scores is live
  at a time, forward or backward (`jax.checkpoint` on the per-chunk function: its residuals
  are the chunk's queries and the shared keys and values). L need not divide by `chunk`: the
  queries are padded to a multiple and the padded rows dropped.
  """
  b, seq, heads, dim = q_BxLxHxK.shape
  n = -(-seq // chunk)
  q_BxPxHxK = jnp.pad(q_BxLxHxK, ((0, 0), (0, n * chunk - seq), (0, 0), (0, 0)))
  q_NxBxCxHxK = q_BxPxHxK.reshape(b, n, chunk, heads, dim).swapaxes(0, 1)
  key_pos_L = jnp.arange(seq)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def one(q_BxCxHxK, start):
    query_pos_C = start + jnp.arange(chunk)
    mask_CxL = key_pos_L[None, :] <= query_pos_C[:, None]
    if window:
      mask_CxL &= key_pos_L[None, :] > query_pos_C[:, None] - window
    return jax.nn.dot_product_attention(q_BxCxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask_CxL[None, None])

  out_NxBxCxHxK = jax.lax.map(lambda a: one(*a), (q_NxBxCxHxK, jnp.arange(n) * chunk))
  return out_NxBxCxHxK.swapaxes(0, 1).reshape(b, n * chunk, heads, dim)[:, :seq]


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate x) * up x)."""

  def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
    self.gate_proj = _linear(c, c.hidden_dim, c.mlp_dim, rngs)
    self.up_proj = _linear(c, c.hidden_dim, c.mlp_dim, rngs)
    self.down_proj = _linear(c, c.mlp_dim, c.hidden_dim, rngs)

  @jax.named_scope("mlp")
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    h_BxLxF = jax.nn.silu(self.gate_proj(x_BxLxD)) * self.up_proj(x_BxLxD)
    return self.down_proj(h_BxLxF)


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then h + mlp(norm(h))."""

  def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(
      c.hidden_dim, eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype
    )
    self.input_norm = norm()
    self.attn = Attention(c, rngs=rngs)
    self.post_attention_norm = norm()
    self.mlp = MLP(c, rngs=rngs)

  # The sub-modules of each residual half (the fused step updates each half's weights apart).
  ATTENTION_HALF = ("input_norm", "attn")
  MLP_HALF = ("post_attention_norm", "mlp")

  def attention_half(self, x_BxLxD: jax.Array, cos_LxK: jax.Array, sin_LxK: jax.Array):
    """`h = x + attn(input_norm(x))`."""
    return x_BxLxD + self.attn(self.input_norm(x_BxLxD), cos_LxK, sin_LxK)

  def mlp_half(self, h_BxLxD: jax.Array) -> jax.Array:
    """`h + mlp(post_attention_norm(h))`."""
    return h_BxLxD + self.mlp(self.post_attention_norm(h_BxLxD))

  def __call__(self, x_BxLxD: jax.Array, cos_LxK: jax.Array, sin_LxK: jax.Array) -> jax.Array:
    return self.mlp_half(self.attention_half(x_BxLxD, cos_LxK, sin_LxK))


def _apply_block(block: Block, x_BxLxD: jax.Array, cos_LxK, sin_LxK) -> jax.Array:
  return block(x_BxLxD, cos_LxK, sin_LxK)


class Llama(nnx.Module):
  """LLaMA decoder: ``model(tokens_BxL) -> logits_BxLxV``.

  Logits come out in ``config.dtype`` (bf16 in pure-bf16 runs, to keep the largest activation
  small); ``next_token_loss`` upcasts them to float32.

  Example::

    model = Llama(llama_config("60m"), rngs=nnx.Rngs(0))
    logits_BxLxV = model(batch["tokens"])
    loss_sum, num_tokens = next_token_loss(logits_BxLxV, batch["tokens"])
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    self.embed = nnx.Embed(
      c.vocab_size,
      c.hidden_dim,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      embedding_init=nnx.initializers.normal(c.init_std),
      rngs=rngs,
    )
    if c.scan_layers:

      @nnx.split_rngs(splits=c.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def stacked_blocks(rngs: nnx.Rngs) -> Block:
        return Block(c, rngs=rngs)

      self.layers = stacked_blocks(rngs)
    else:
      self.layers = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = RMSNorm(
      c.hidden_dim, eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype
    )
    if not c.tie_word_embeddings:
      self.lm_head = _linear(c, c.hidden_dim, c.vocab_size, rngs)

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    return self.forward_embeddings(self.embed(tokens_BxL))

  def forward_embeddings(self, x_BxLxD: jax.Array) -> jax.Array:
    """Logits from already-embedded inputs (the model minus its embedding lookup)."""
    h_BxLxD = self.hidden_states_from_embeddings(x_BxLxD)
    if self.config.tie_word_embeddings:
      return self.embed.attend(h_BxLxD)  # h @ embedding^T
    return self.lm_head(h_BxLxD)

  def hidden_states(self, tokens_BxL: jax.Array) -> jax.Array:
    """The final-norm hidden states ``h_BxLxD`` (the LM head's input), in ``config.dtype``."""
    return self.hidden_states_from_embeddings(self.embed(tokens_BxL))

  def hidden_states_from_embeddings(self, x_BxLxD: jax.Array) -> jax.Array:
    """``hidden_states`` from already-embedded inputs."""
    c = self.config
    cos_LxK, sin_LxK = rope_tables(x_BxLxD.shape[1], c.head_dim, c.rope_base, c.rope_scaling)
    block_fn = _apply_block
    if c.remat_policy != "none":
      # prevent_cse is only needed outside scan (scan already blocks the CSE it guards).
      block_fn = nnx.remat(
        block_fn, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=not c.scan_layers
      )
    if c.scan_layers:

      @nnx.scan(in_axes=(0, nnx.Carry, None, None), out_axes=nnx.Carry)
      def scan_blocks(block, x_BxLxD, cos_LxK, sin_LxK):
        return block_fn(block, x_BxLxD, cos_LxK, sin_LxK)

      x_BxLxD = scan_blocks(self.layers, x_BxLxD, cos_LxK, sin_LxK)
    else:
      for block in self.layers:
        x_BxLxD = block_fn(block, x_BxLxD, cos_LxK, sin_LxK)
    return self.final_norm(x_BxLxD)

  def head_kernel(self) -> jax.Array:
    """The LM head's ``[D, V]`` kernel: the embedding's transpose when they are tied."""
    if self.config.tie_word_embeddings:
      return self.embed.embedding[...].T
    return self.lm_head.kernel[...]


# ----------------------------------------------------------------------------------------------
# Loss, GaLore targets and parameter counts.


def next_token_loss(
  logits_BxLxV: jax.Array,
  tokens_BxL: jax.Array,
  pad_id: int = 0,
  loss_mask_BxL: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over non-pad targets, in float32.

  Position t predicts ``tokens[:, t + 1]``; targets equal to ``pad_id`` (T5's 0, right padding)
  are masked out, as the reference's labels = input_ids with pad -> -100.

  Args:
    logits_BxLxV: model output, any float dtype (upcast to float32 here).
    tokens_BxL: int tokens, the batch's ``"tokens"``.
    pad_id: target id to ignore (without ``loss_mask_BxL``).
    loss_mask_BxL: bool, True where ``tokens[:, t]`` is a target that counts (instruction data:
      the response tokens, `train/instruct.py`); it then replaces the pad rule.

  Returns:
    ``(loss_sum, num_tokens)``: float32 sum of -log p(target) over unmasked targets, and the
    int32 number of those targets; the token-weighted mean loss is their ratio.
  """
  # L1 = L - 1: the last position has no next token.
  logits_BxL1xV = logits_BxLxV[:, :-1].astype(jnp.float32)
  targets_BxL1 = tokens_BxL[:, 1:]
  mask_BxL1 = targets_BxL1 != pad_id if loss_mask_BxL is None else loss_mask_BxL[:, 1:] != 0
  nll_BxL1 = optax.losses.softmax_cross_entropy_with_integer_labels(logits_BxL1xV, targets_BxL1)
  loss_sum = jnp.sum(jnp.where(mask_BxL1, nll_BxL1, 0.0))
  return loss_sum, jnp.sum(mask_BxL1, dtype=jnp.int32)


def param_names(keypath: tuple[Any, ...]) -> tuple[Any, ...]:
  """The LLaMA's one naming rule for parameter (and optimizer-state) paths.

  Plain names (str / int) of a jax key path or an nnx path, e.g.
  ``("layers", "attn", "q_proj", "kernel")``; a trailing ``"value"`` (an ``nnx.Variable``'s
  field) is dropped, so a tree of Variables and a tree of arrays name their leaves alike. Used by
  the GaLore target rule, the optimizer, the sharding rules and the fused step.
  """
  return path_names(keypath)


def is_galore_target(path: tuple[Any, ...]) -> bool:
  """Whether a parameter path is a GaLore target: an attention or MLP kernel.

  The path form of the one target rule, ``galore_jax.llama_galore_mask`` (leaves whose path
  contains "attn" or "mlp", as the reference's module names), which the optimizer and sharding
  use on parameter trees; on this model every such leaf is a kernel, so the two select the same
  leaves (``tests/test_model.py`` checks it for both layouts). For code that has a path but no
  leaf: parameter counts and the low-rank baselines' choice of linears (``train/lowrank.py``).
  Accepts an nnx path (``("layers", 0, "attn", "q_proj", "kernel")``) or a jax key path.
  """
  names = param_names(path)
  named = [n for n in names if isinstance(n, str)]
  return bool(names) and names[-1] == "kernel" and any("attn" in n or "mlp" in n for n in named)


def count_params(config: LlamaConfig) -> dict[str, int]:
  """Parameter counts from shapes alone (``nnx.eval_shape``: nothing is allocated).

  Returns:
    ``{"total": ..., "galore_target": ..., "other": ...}``; ``galore_target`` counts the
    attention and MLP kernels (4 D^2 + 3 D F per layer), ``other`` the embedding, LM head and
    norms.
  """
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  total = target = 0
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    size = int(np.prod(var.shape))
    total += size
    target += size if is_galore_target(path) else 0
  return {"total": total, "galore_target": target, "other": total - target}
