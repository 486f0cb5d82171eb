"""Tests for train/model.py: HF parity, causality, layouts, remat, bf16, loss masking, sizes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import galore_jax as gj
from train.checkpoint_io import llama_from_hf
from train.model import (
  LLAMA_SIZES,
  Llama,
  LlamaConfig,
  chunked_attention,
  count_params,
  is_galore_target,
  llama_config,
  next_token_loss,
)

# A tiny model for numerics. init_std 0.2 (not 0.02) so attention is far from uniform and the
# logits are O(1): a wrong rotary, mask or layer order then shows up well above the tolerances.
TINY = LlamaConfig(
  vocab_size=64, hidden_dim=32, mlp_dim=48, num_heads=4, num_layers=2, init_std=0.2
)


def _padded_tokens(seed, lengths, seq_len, vocab):
  """Random non-pad ids (>= 1) with right padding (pad id 0) after each row's length."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, size=(len(lengths), seq_len))
  tokens[np.arange(seq_len)[None, :] >= np.asarray(lengths)[:, None]] = 0
  return tokens.astype(np.int32)


def _forward(model, tokens):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)


def _logits_loss_grads(model, tokens):
  """(logits, mean loss, grads as a pure dict) under one jit."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, tokens):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(tokens)
      loss_sum, num = next_token_loss(logits, tokens)
      return loss_sum / num, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return logits, loss, grads

  logits, loss, grads = run(params, tokens)
  return logits, loss, nnx.to_pure_dict(grads)


def _stack_layers(pure, num_layers):
  """Unrolled layers {i: tree} -> one tree of [N, ...] arrays (scan layout)."""
  out = dict(pure)
  out["layers"] = jax.tree.map(
    lambda *xs: jnp.stack(xs), *[pure["layers"][i] for i in range(num_layers)]
  )
  return out


def _relayout(model, **overrides):
  """The same weights in a model built with another config (scan / remat / dtype)."""
  config = dataclasses.replace(model.config, **overrides)
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if config.scan_layers and not model.config.scan_layers:
    pure = _stack_layers(pure, config.num_layers)
  elif model.config.scan_layers and not config.scan_layers:
    layers = pure["layers"]
    pure["layers"] = {
      i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(config.num_layers)
    }
  pure = jax.tree.map(lambda x: x.astype(config.param_dtype), pure)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# Parity with HF transformers.


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_hidden_layers=2,
    rms_norm_eps=1e-6,
    initializer_range=0.1,  # larger than 0.02 so logits are O(1) (see TINY)
    tie_word_embeddings=False,
    attn_implementation="eager",
  )
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():  # HF inits norms to ones; randomise them so a swapped norm shows up
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_hf(hf_model, scan_layers, record_property):
  lengths = [16, 11, 5, 1]
  tokens = _padded_tokens(0, lengths, 16, hf_model.config.vocab_size)
  config, model = llama_from_hf(hf_model, scan_layers=scan_layers)
  assert config.scan_layers == scan_layers and config.num_layers == 2
  ours = np.asarray(_forward(model, jnp.asarray(tokens)))
  with torch.no_grad():
    ids = torch.from_numpy(tokens).long()
    hf_masked = hf_model(input_ids=ids, attention_mask=(ids != 0).long()).logits.numpy()
    hf_unmasked = hf_model(input_ids=ids).logits.numpy()
  # HF with an attention mask also hides pad keys from pad queries; we (like the reference) use
  # only the causal mask. Real positions (t < length) see only real keys either way, so compare
  # those against masked HF, and every position against HF without a mask.
  real = np.arange(16)[None, :] < np.asarray(lengths)[:, None]
  diff_masked = np.abs(ours - hf_masked)[real].max()
  diff_unmasked = np.abs(ours - hf_unmasked).max()
  print(
    f"\nHF parity (scan_layers={scan_layers}): max |diff| {diff_masked:.3g} (real positions, "
    f"HF masked), {diff_unmasked:.3g} (all positions, HF unmasked); logit std {ours.std():.3g}"
  )
  record_property("max_abs_diff", float(max(diff_masked, diff_unmasked)))
  assert ours.std() > 0.3  # the comparison is not vacuous: logits are O(1)
  # Both sides are float32 on CPU; the differences are summation-order noise, ~1e-6 here.
  assert diff_masked <= 1e-4 and diff_unmasked <= 1e-4


def test_hf_import_from_state_dict_and_bf16(hf_model):
  _, model = llama_from_hf(hf_model)
  config, model16 = llama_from_hf(
    hf_model.state_dict(), hf_model.config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
  )
  assert config.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(model16, nnx.Param)))
  q32 = model.layers[1].attn.q_proj.kernel[...]
  q16 = model16.layers[1].attn.q_proj.kernel[...]
  np.testing.assert_array_equal(q16, q32.astype(jnp.bfloat16))
  # Flax kernels are (in, out): the transpose of torch's (out, in) weight.
  w_down = hf_model.model.layers[1].mlp.down_proj.weight.detach().numpy()
  np.testing.assert_array_equal(model.layers[1].mlp.down_proj.kernel[...], w_down.T)


def _tiny_hf_config(**overrides):
  fields = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_hidden_layers=2,
    tie_word_embeddings=False,
  )
  return transformers.LlamaConfig(**{**fields, **overrides})


@pytest.mark.parametrize(
  "overrides, match",
  [
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (
      dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
      "rope_scaling",
    ),
  ],
)
def test_hf_import_rejects_unsupported_configs(overrides, match):
  with pytest.raises(ValueError, match=match):
    llama_from_hf({}, _tiny_hf_config(**overrides))


def test_hf_import_key_and_shape_errors(hf_model):
  sd = dict(hf_model.state_dict())
  with pytest.raises(ValueError, match="needs hf_config"):
    llama_from_hf(sd)
  missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
  with pytest.raises(ValueError, match=r"missing key 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    llama_from_hf(missing, hf_model.config)
  with pytest.raises(ValueError, match=r"unexpected keys.*model\.layers\.2\.mlp\.up_proj\.weight"):
    llama_from_hf(
      {**sd, "model.layers.2.mlp.up_proj.weight": sd["lm_head.weight"]}, hf_model.config
    )
  bad = {**sd, "model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 32)}
  with pytest.raises(ValueError, match=r"o_proj\.weight.*expected \(64, 64\).*got \(64, 32\)"):
    llama_from_hf(bad, hf_model.config, scan_layers=True)
  # Old transformers versions stored rotary inv_freq buffers; they are ignored, not errors.
  llama_from_hf(
    {**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, hf_model.config
  )


# ----------------------------------------------------------------------------------------------
# Causality, layouts, remat.


def test_causal_through_gradients():
  model = Llama(TINY, rngs=nnx.Rngs(1))
  tokens = jnp.asarray(_padded_tokens(1, [12], 12, TINY.vocab_size))
  x_1xLxD = model.embed(tokens)
  graphdef, state = nnx.split(model)

  def per_position_loss(x_1xLxD):
    logits_1xLxV = nnx.merge(graphdef, state).forward_embeddings(x_1xLxD).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits_1xLxV[0, :-1])
    return -jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0]  # [L - 1]

  jac = jax.jit(jax.jacrev(per_position_loss))(x_1xLxD)  # [L-1, 1, L, D]
  norms = np.linalg.norm(np.asarray(jac[:, 0]), axis=-1)  # [t, s]: d loss_t / d x_s
  future = np.triu(np.ones_like(norms, dtype=bool), k=1)  # s > t
  # Exactly zero: masked scores get zero softmax weight, so no path carries any gradient.
  assert np.all(norms[future] == 0.0)
  assert np.all(norms[~future] > 1e-6)  # and every past/current position does matter


@pytest.fixture(scope="module")
def unrolled_reference():
  """An unrolled, non-remat model with its (logits, loss, grads) on a padded batch."""
  model = Llama(TINY, rngs=nnx.Rngs(2))
  tokens = jnp.asarray(_padded_tokens(2, [10, 7], 10, TINY.vocab_size))
  return model, tokens, _logits_loss_grads(model, tokens)


@pytest.mark.parametrize(
  "scan_layers, remat_policy, attention_chunk_size",
  [
    (True, "none", 0),
    (True, "full", 0),
    (True, "dots_with_no_batch_dims_saveable", 0),
    (False, "full", 0),
    (True, "none", 4),  # 10 positions: chunks of 4, 4 and 2 (+ 2 padded queries)
    (False, "full", 3),
  ],
)
def test_scan_and_remat_match_unrolled(
  unrolled_reference, scan_layers, remat_policy, attention_chunk_size
):
  ref_model, tokens, (ref_logits, ref_loss, ref_grads) = unrolled_reference
  model = _relayout(
    ref_model,
    scan_layers=scan_layers,
    remat_policy=remat_policy,
    attention_chunk_size=attention_chunk_size,
  )
  logits, loss, grads = _logits_loss_grads(model, tokens)
  if scan_layers:
    ref_grads = _stack_layers(ref_grads, TINY.num_layers)
  # Same float32 math, but XLA fuses and orders reductions differently in a scan body, an
  # unrolled loop and a rematerialised backward pass. Measured: logits (|x| up to ~5) differ by
  # <= 2e-6, grads (|g| up to 0.6) by <= 4e-7; the bounds leave ~5x margin over float32 roundoff.
  np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6), grads, ref_grads)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("chunk", [8, 16, 36])
def test_chunked_attention_matches_dense(window, chunk):
  b, seq, heads, kv_heads, dim = 2, 37, 4, 2, 8  # GQA; 37 is prime: every chunk size pads
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, seq, heads, dim))
  k, v = (jax.random.normal(key, (b, seq, kv_heads, dim)) for key in keys[1:])
  local = (window - 1, 0) if window else None
  dense = lambda q, k, v: jax.nn.dot_product_attention(
    q, k, v, is_causal=True, local_window_size=local
  )
  chunked = lambda q, k, v: chunked_attention(q, k, v, chunk, window)
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  grads = lambda fn: jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
  # The same formulas (each query's softmax over the same masked keys); only XLA's reduction
  # order differs. A float32 sum of n terms is off by at most n * eps * (sum of |terms|); the
  # softmax chains two reductions over <= L keys, so n = 2 L, relative to the output's scale.
  for a, r in zip([chunked(q, k, v), *grads(chunked)], [dense(q, k, v), *grads(dense)]):
    bound = 2 * seq * np.finfo(np.float32).eps * float(jnp.max(jnp.abs(r)))
    np.testing.assert_allclose(a, r, rtol=0, atol=bound)


def test_chunked_attention_never_holds_the_whole_score_matrix():
  b, seq, heads, dim, chunk = 1, 1024, 4, 16, 64
  q = jax.ShapeDtypeStruct((b, seq, heads, dim), jnp.float32)
  full_scores = b * heads * seq * seq * 4  # one float32 [B, H, L, L]: 16.8 MB
  # A chunk's scores are 1/16 of that; the chunked backward holds a few such blocks (scores,
  # softmax and their gradients), so it stays below one whole matrix, which the dense
  # backward holds several of (the softmax for the backward, and the score gradients).

  def temp(fn):
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2))
    return jax.jit(grad).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

  dense = temp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
  chunked = temp(lambda q, k, v: chunked_attention(q, k, v, chunk))
  assert dense >= 2 * full_scores, dense
  assert chunked < full_scores, (chunked, dense)


def test_param_paths_target_attn_and_mlp_kernels():
  for scan_layers, n_kernels in [(False, 14), (True, 7)]:
    model = nnx.eval_shape(
      lambda s=scan_layers: Llama(dataclasses.replace(TINY, scan_layers=s), rngs=nnx.Rngs(0))
    )
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    print(f"\nscan_layers={scan_layers}:")
    for path, var in flat.items():
      print(f"  {'/'.join(map(str, path))} {var.shape}")
    targets = [p for p in flat if is_galore_target(p)]
    assert len(targets) == n_kernels
    for path in flat:
      named = "/".join(map(str, path))
      if path in targets:
        assert path[-1] == "kernel" and ("/attn/" in named or "/mlp/" in named)
      else:
        assert "attn" not in named and "mlp" not in named
    q = flat[
      ("layers", "attn", "q_proj", "kernel")
      if scan_layers
      else ("layers", 0, "attn", "q_proj", "kernel")
    ]
    down = flat[
      ("layers", "mlp", "down_proj", "kernel")
      if scan_layers
      else ("layers", 1, "mlp", "down_proj", "kernel")
    ]
    assert q.shape == ((2, 32, 32) if scan_layers else (32, 32))
    assert down.shape == ((2, 48, 32) if scan_layers else (48, 32))  # (in, out) = (F, D)
    # One target rule: the library's mask (what the optimizer and sharding use) selects
    # exactly the paths `is_galore_target` names, on the state and on its pure-dict arrays.
    for params in (nnx.state(model, nnx.Param), nnx.state(model, nnx.Param).to_pure_dict()):
      mask, _ = jax.tree_util.tree_flatten_with_path(gj.llama_galore_mask(params))
      assert [m for _, m in mask] == [is_galore_target(p) for p, _ in mask]
      assert sum(m for _, m in mask) == n_kernels


# ----------------------------------------------------------------------------------------------
# bf16 and the loss.


def test_bf16_forward_backward_finite_and_close_to_float32():
  bf16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)  # pure bf16 as in the paper's runs
  model16 = Llama(dataclasses.replace(TINY, **bf16), rngs=nnx.Rngs(3))
  model32 = _relayout(model16, dtype=jnp.float32, param_dtype=jnp.float32)  # same weights
  tokens = jnp.asarray(_padded_tokens(3, [16, 9], 16, TINY.vocab_size))
  logits16, loss16, grads16 = _logits_loss_grads(model16, tokens)
  _, loss32, _ = _logits_loss_grads(model32, tokens)
  assert logits16.dtype == jnp.bfloat16 and loss16.dtype == jnp.float32
  assert np.isfinite(loss16)
  assert all(
    g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
    for g in jax.tree.leaves(grads16)
  )
  # bf16 keeps 8 significand bits (~0.4% per rounding); measured |loss16/loss32 - 1| ~ 4e-4 for
  # this 2-layer model, so 1% catches a real dtype bug (e.g. a bf16 loss) with a wide margin.
  np.testing.assert_allclose(loss16, loss32, rtol=1e-2)


def test_bf16_scan_remat_traces_with_stable_dtypes():
  # Shapes only (bf16 compiles slowly on CPU): nnx.scan rejects a carry whose dtype drifts, so
  # tracing proves the residual stream stays bf16 through scan + remat, and grads stay bf16.
  config = dataclasses.replace(
    TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=True, remat_policy="full"
  )
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)

  def loss_fn(params, tokens):
    loss_sum, num = next_token_loss(nnx.merge(graphdef, params)(tokens), tokens)
    return loss_sum / num

  loss, grads = jax.eval_shape(jax.value_and_grad(loss_fn), params, tokens)
  assert loss.dtype == jnp.float32
  assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))


def test_next_token_loss_matches_numpy_and_masks_pads():
  rng = np.random.default_rng(4)
  tokens = _padded_tokens(4, [10, 6, 1], 10, 11)
  logits = rng.normal(size=(3, 10, 11)).astype(np.float32)
  loss_fn = jax.jit(next_token_loss)
  loss_sum, num = loss_fn(jnp.asarray(logits), jnp.asarray(tokens))
  # Position t predicts tokens[t + 1]; only non-pad targets count.
  logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
  expected, count = 0.0, 0
  for b in range(3):
    for t in range(9):
      if tokens[b, t + 1] != 0:
        expected -= logp[b, t, tokens[b, t + 1]]
        count += 1
  assert count == 9 + 5 + 0 and int(num) == count and num.dtype == jnp.int32
  np.testing.assert_allclose(loss_sum, expected, rtol=1e-5)  # float32 sum of 14 terms
  # Logits at masked positions (pad target, and the last position) do not matter at all.
  masked = np.ones((3, 10), bool)
  masked[:, :-1] = tokens[:, 1:] == 0
  noisy = logits + 100.0 * rng.normal(size=logits.shape).astype(np.float32) * masked[..., None]
  assert loss_fn(jnp.asarray(noisy), jnp.asarray(tokens))[0] == loss_sum
  # bf16 logits are upcast: the loss is float32 and equals the float32 loss of the same values.
  logits16 = jnp.asarray(logits, jnp.bfloat16)
  loss16, _ = loss_fn(logits16, jnp.asarray(tokens))
  assert loss16.dtype == jnp.float32
  assert loss16 == loss_fn(logits16.astype(jnp.float32), jnp.asarray(tokens))[0]


def test_model_loss_ignores_tokens_in_pad_region():
  model = Llama(TINY, rngs=nnx.Rngs(5))
  tokens = _padded_tokens(5, [12, 7, 3], 12, TINY.vocab_size)
  garbage = np.where(tokens == 0, np.random.default_rng(5).integers(1, 64, tokens.shape), tokens)
  graphdef, state = nnx.split(model)
  loss = jax.jit(
    lambda s, inputs, targets: next_token_loss(nnx.merge(graphdef, s)(inputs), targets)
  )
  clean = loss(state, jnp.asarray(tokens), jnp.asarray(tokens))
  dirty = loss(state, jnp.asarray(garbage.astype(np.int32)), jnp.asarray(tokens))
  # Counted positions precede each row's last real token and (causally) see only real tokens,
  # so inputs in the pad region cannot reach the loss; only float32 roundoff may differ.
  assert int(clean[1]) == int(dirty[1]) == 11 + 6 + 2
  np.testing.assert_allclose(dirty[0], clean[0], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Sizes and parameter counts.

# (total M, GaLore-target M), rounded to 0.01M as the reference's torchrun_main.py prints them
# ("Total params", "Total params with GaLore enabled"; github.com/jiaweizzhao/GaLore).
REFERENCE_COUNTS = {
  "9m": (9.00, 0.80),
  "20m": (19.55, 3.16),
  "35m": (35.20, 10.62),
  "40m": (42.39, 15.76),
  "60m": (58.07, 25.30),
  "71m": (70.58, 37.80),
  "100m": (100.12, 59.01),
  "130m": (134.11, 84.93),
  "250m": (247.37, 198.18),
  "350m": (367.97, 302.38),
  "1b": (1339.08, 1207.91),
  "3b": (2685.83, 2521.83),
  "7b": (6738.42, 6476.01),
}


@pytest.mark.parametrize("size", list(REFERENCE_COUNTS))
def test_param_counts_match_reference(size):
  config = llama_config(size)
  counts = count_params(config)  # from shapes alone: nothing allocated, even for 7b
  total, target = REFERENCE_COUNTS[size]
  assert round(counts["total"] / 1e6, 2) == total
  assert round(counts["galore_target"] / 1e6, 2) == target
  d, f = config.hidden_dim, config.mlp_dim
  assert counts["galore_target"] == config.num_layers * (4 * d * d + 3 * d * f)


def test_released_shapes_match_their_published_counts():
  # meta-llama/Meta-Llama-3-8B: 8,030,261,248 parameters (its safetensors index's total / 2).
  config = llama_config("llama3-8b")
  assert count_params(config)["total"] == 8_030_261_248
  assert config.num_kv_heads == 8 and config.vocab_size == 128256 and not config.tie_word_embeddings


def test_sizes_and_config_errors():
  assert set(LLAMA_SIZES) == set(REFERENCE_COUNTS)
  assert llama_config("100m").vocab_size == 32100 and llama_config("1b").num_heads == 32
  assert count_params(llama_config("60m", scan_layers=True)) == count_params(llama_config("60m"))
  config = llama_config("60m", dtype="bfloat16", param_dtype="bfloat16", remat_policy="full")
  assert config.dtype == jnp.bfloat16 and config.head_dim == 64
  with pytest.raises(
    ValueError, match=r"unknown LLaMA size '13b'; known sizes: 9m, 20m, .*7b, llama3-8b"
  ):
    llama_config("13b")
  with pytest.raises(ValueError, match="unknown remat_policy 'some'"):
    llama_config("9m", remat_policy="some")
  with pytest.raises(ValueError, match="num_heads=5"):
    llama_config("9m", num_heads=5)
