"""Hugging Face LLaMA checkpoints in and out: config and weight conversion, and directories.

`config_from_hf` / `config_to_hf` translate between a transformers `LlamaConfig` (or its
`config.json`) and ours; `hf_param_keys` maps every HF tensor name to our parameter path.
`llama_from_hf` builds our model from an in-memory transformers model or state dict.

`load_hf_pretrained` reads a local directory as `transformers` writes it (`config.json` plus
`model.safetensors`, or shards listed in `model.safetensors.index.json`) with the `safetensors`
package alone, one tensor at a time: each tensor is read, transposed to Flax's `(in, out)`,
cast to the parameter dtype and moved to the device before the next is read (stacked layers
are filled into one `[N, ...]` buffer), so the checkpoint is never held twice in host memory.
bf16, fp16 and fp32 tensors on disk are accepted.

`save_hf_pretrained` writes the inverse: a directory that `transformers.LlamaForCausalLM` (and
`MistralForCausalLM` for a sliding-window model) loads with `from_pretrained`, sharded like
transformers' `max_shard_size`.

Example::

  config, model = load_hf_pretrained("llama-dir", dtype="bfloat16", param_dtype="bfloat16",
                                     scan_layers=True)
  ... fine-tune ...
  save_hf_pretrained(config, model, "llama-dir-tuned", tokenizer_path="llama-dir/tokenizer.model")

References: GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection
(https://arxiv.org/abs/2403.03507).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.typing import DTypeLike
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from train.model import Llama, Llama3RopeScaling, LlamaConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"  # SentencePiece (LLaMA-1/2, Mistral); LLaMA-3 has none
_DISK_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


# ----------------------------------------------------------------------------------------------
# Conversion: configs, tensor names, an in-memory transformers model.

# Our per-layer path -> (HF key suffix, transpose torch (out, in) to Flax (in, out)).
_HF_LAYER_KEYS: dict[tuple[str, ...], tuple[str, bool]] = {
  **{("attn", p, "kernel"): (f"self_attn.{p}.weight", True) for p in ("q_proj", "k_proj")},
  **{("attn", p, "kernel"): (f"self_attn.{p}.weight", True) for p in ("v_proj", "o_proj")},
  **{
    ("mlp", p, "kernel"): (f"mlp.{p}.weight", True) for p in ("gate_proj", "up_proj", "down_proj")
  },
  ("input_norm", "scale"): ("input_layernorm.weight", False),
  ("post_attention_norm", "scale"): ("post_attention_layernorm.weight", False),
}
_HF_GLOBAL_KEYS: dict[tuple[str, ...], tuple[str, bool]] = {
  ("embed", "embedding"): ("model.embed_tokens.weight", False),
  ("final_norm", "scale"): ("model.norm.weight", False),
  ("lm_head", "kernel"): ("lm_head.weight", True),
}
# Non-parameter buffers some transformers versions put in the state dict.
_HF_IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# HF config fields that change the computation and the values we model (anything else there,
# e.g. max_position_embeddings or bos_token_id, does not change the math of a forward pass).
_HF_MODEL_TYPES = ("llama", "mistral")


def config_from_hf(hf_config: Any, **fields: Any) -> LlamaConfig:
  """Our config from a transformers LLaMA/Mistral config or its ``config.json`` dict.

  Args:
    hf_config: a transformers ``LlamaConfig`` / ``MistralConfig`` or a plain mapping (the
      parsed ``config.json``).
    **fields: ``LlamaConfig`` fields not in an HF config (dtype, param_dtype, scan_layers, ...).

  Returns:
    The ``LlamaConfig``.

  Raises:
    ValueError: naming the field, on anything that changes the computation and that we do not
      model: biases, non-silu activations, dropout, rope types other than default / llama3.
  """
  if isinstance(hf_config, Mapping):
    get = lambda name, default=None: hf_config.get(name, default)
  else:
    get = lambda name, default=None: getattr(hf_config, name, default)
  model_type = get("model_type", "llama")
  if model_type not in _HF_MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r} is unsupported (only {_HF_MODEL_TYPES})")
  for name in ("attention_bias", "mlp_bias"):
    if get(name, False):
      raise ValueError(f"{name}={get(name)!r} is unsupported: the model has no biases")
  if get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={get('hidden_act')!r} is unsupported (only 'silu')")
  if get("attention_dropout", 0.0):
    raise ValueError(f"attention_dropout={get('attention_dropout')} is unsupported (no dropout)")
  for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads"):
    if not isinstance(get(name), int):
      raise ValueError(f"{name}={get(name)!r}: the config needs it as an int")
  heads, hidden = get("num_attention_heads"), get("hidden_size")
  head_dim = get("head_dim") or 0
  # transformers >= 5 keeps rope in `rope_parameters` (`rope_scaling` is an alias); older
  # versions and most config.json files use `rope_theta` plus `rope_scaling` (or None).
  rope = dict(get("rope_parameters") or get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  scaling = None
  if rope_type == "llama3":
    try:
      scaling = Llama3RopeScaling(
        *(rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor")),
        int(rope["original_max_position_embeddings"]),
      )
    except KeyError as e:
      raise ValueError(f"rope_scaling={rope} (rope_type 'llama3') lacks {e}") from e
  elif rope_type != "default":
    raise ValueError(
      f"rope_scaling={rope} is unsupported (rope_type {rope_type!r}; only 'default' and 'llama3')"
    )
  window = get("sliding_window") if model_type == "mistral" else None
  return LlamaConfig(
    vocab_size=get("vocab_size"),
    hidden_dim=hidden,
    mlp_dim=get("intermediate_size"),
    num_heads=heads,
    num_layers=get("num_hidden_layers"),
    num_kv_heads=get("num_key_value_heads") or heads,
    explicit_head_dim=0 if head_dim in (0, hidden // heads) else head_dim,
    tie_word_embeddings=bool(get("tie_word_embeddings", False)),
    rms_norm_eps=get("rms_norm_eps", 1e-6),
    rope_base=float(rope.get("rope_theta", get("rope_theta") or 10000.0)),
    rope_scaling=scaling,
    sliding_window=window or 0,
    init_std=get("initializer_range", 0.02),
    **fields,
  )


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
  """The ``config.json`` dict of a ``LlamaForCausalLM`` with our config's shapes and numerics."""
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_base}
  if config.rope_scaling is not None:
    rope = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
  out = {
    "architectures": ["MistralForCausalLM" if config.sliding_window else "LlamaForCausalLM"],
    "model_type": "mistral" if config.sliding_window else "llama",
    "vocab_size": config.vocab_size,
    "hidden_size": config.hidden_dim,
    "intermediate_size": config.mlp_dim,
    "num_attention_heads": config.num_heads,
    "num_key_value_heads": config.kv_heads,
    "num_hidden_layers": config.num_layers,
    "head_dim": config.head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": config.rms_norm_eps,
    "rope_theta": config.rope_base,
    "rope_scaling": rope if config.rope_scaling is not None else None,
    "tie_word_embeddings": config.tie_word_embeddings,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": config.init_std,
    "torch_dtype": jnp.dtype(config.param_dtype).name,
  }
  if config.rope_scaling is not None:
    # transformers checks original_max_position_embeddings < max_position_embeddings.
    out["max_position_embeddings"] = 2 * config.rope_scaling.original_max_position_embeddings
  if config.sliding_window:
    out["sliding_window"] = config.sliding_window
  else:
    out["mlp_bias"] = False
  return out


def hf_param_keys(config: LlamaConfig) -> list[tuple[tuple[Any, ...], str, bool]]:
  """``(our param path, HF tensor name, transpose)`` for every tensor of a checkpoint.

  With ``scan_layers`` the N layer tensors of one name share one path (stacked ``[N, ...]``),
  in layer order. A tied model has no ``lm_head.weight``.
  """
  globals_ = {p: v for p, v in _HF_GLOBAL_KEYS.items() if p[0] != "lm_head"}
  if not config.tie_word_embeddings:
    globals_[("lm_head", "kernel")] = _HF_GLOBAL_KEYS[("lm_head", "kernel")]
  pairs = [(path, key, t) for path, (key, t) in globals_.items()]
  for i in range(config.num_layers):
    prefix = ("layers",) if config.scan_layers else ("layers", i)
    pairs += [((*prefix, *p), f"model.layers.{i}.{k}", t) for p, (k, t) in _HF_LAYER_KEYS.items()]
  return pairs


def is_ignored_hf_key(key: str, config: LlamaConfig) -> bool:
  """Tensors a checkpoint may hold that are not parameters of ours (rotary buffers of old
  transformers versions; the LM head of a tied model, a copy of the embedding)."""
  return bool(_HF_IGNORED_KEY.search(key)) or (
    config.tie_word_embeddings and key == "lm_head.weight"
  )


def _to_numpy(tensor: Any) -> np.ndarray:
  if hasattr(tensor, "detach"):  # torch: numpy has no bfloat16, so go through float32
    tensor = tensor.detach().cpu()
    tensor = tensor.float() if str(tensor.dtype) == "torch.bfloat16" else tensor
    return tensor.numpy()
  return np.asarray(tensor)


def _hf_params(state_dict: Mapping[str, Any], config: LlamaConfig, abstract: Any) -> dict:
  """Nested pure-dict params (our layout, ``param_dtype``) from an HF state dict."""
  expected = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  stacked = lambda path: config.scan_layers and path[0] == "layers"  # [N, ...] under scan
  pairs = hf_param_keys(config)
  unexpected = set(state_dict) - {key for _, key, _ in pairs}
  unexpected = sorted(k for k in unexpected if not is_ignored_hf_key(k, config))
  if unexpected:
    raise ValueError(f"unexpected keys in the HF state dict: {unexpected}")
  arrays: dict[tuple, list] = {}
  for path, key, transpose in pairs:
    if key not in state_dict:
      raise ValueError(f"missing key {key!r} in the HF state dict")
    array = _to_numpy(state_dict[key])
    shape = expected[path][1:] if stacked(path) else expected[path]
    hf_shape = shape[::-1] if transpose else shape
    if array.shape != hf_shape:
      raise ValueError(
        f"shape mismatch for {key!r}: expected {hf_shape} (torch layout, for "
        f"{'/'.join(map(str, path))} of shape {shape}), got {array.shape}"
      )
    arrays.setdefault(path, []).append(jnp.asarray(array.T if transpose else array))
  nested: dict = {}
  for path, parts in arrays.items():
    value = jnp.stack(parts) if stacked(path) else parts[0]
    node = nested
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value.astype(config.param_dtype)
  return nested


def llama_from_hf(
  model_or_state_dict: Any,
  hf_config: Any = None,
  *,
  dtype: DTypeLike = jnp.float32,
  param_dtype: DTypeLike = jnp.float32,
  scan_layers: bool = False,
  remat_policy: str = "none",
  attention_chunk_size: int = 0,
) -> tuple[LlamaConfig, Llama]:
  """Our config and model with the weights of a transformers ``LlamaForCausalLM``.

  Torch ``(out, in)`` weights are transposed to Flax ``(in, out)`` kernels and, with
  ``scan_layers``, stacked to ``[N, in, out]``. Nothing is randomly initialised.

  Args:
    model_or_state_dict: a ``LlamaForCausalLM`` or its ``state_dict()`` (torch tensors or
      arrays).
    hf_config: the transformers ``LlamaConfig``; required with a state dict, defaults to
      ``model.config`` with a model.
    dtype, param_dtype, scan_layers, remat_policy: as in ``LlamaConfig``.

  Returns:
    ``(config, model)``.

  Raises:
    ValueError: on an HF config we do not model (see ``config_from_hf``), or a missing /
      unexpected key or a shape mismatch.

  Example::

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(...))
    config, model = llama_from_hf(hf, scan_layers=True)

  ``load_hf_pretrained`` reads a checkpoint directory without torch.
  """
  if hasattr(model_or_state_dict, "state_dict"):
    hf_config = hf_config if hf_config is not None else model_or_state_dict.config
    state_dict = model_or_state_dict.state_dict()
  else:
    state_dict = model_or_state_dict
  if hf_config is None:
    raise ValueError("llama_from_hf needs hf_config when given a state dict")
  config = config_from_hf(
    hf_config,
    dtype=dtype,
    param_dtype=param_dtype,
    scan_layers=scan_layers,
    remat_policy=remat_policy,
  )
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  params = _hf_params(state_dict, config, abstract)
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, params)
  return config, nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# Checkpoint directories (safetensors), without torch.


def read_hf_config(path: str | os.PathLike, **fields: Any) -> LlamaConfig:
  """Our `LlamaConfig` from `path/config.json` (fields: dtype, param_dtype, scan_layers, ...).

  Raises:
    FileNotFoundError: `path` is not a directory or has no `config.json`.
    ValueError: the config is not valid JSON, or has a field we do not model (named).
  """
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is not a directory (expected a Hugging Face checkpoint)")
  file = path / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: not a Hugging Face checkpoint")
  try:
    hf_config = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from e
  try:
    return config_from_hf(hf_config, **fields)
  except ValueError as e:
    raise ValueError(f"{file}: {e}") from e


def _weight_map(path: Path) -> dict[str, Path]:
  """Tensor name -> safetensors file that holds it."""
  if (path / INDEX_FILE).is_file():
    try:
      index = json.loads((path / INDEX_FILE).read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{path / INDEX_FILE} is not valid JSON ({e}): {_DAMAGED}") from e
    if "weight_map" not in index:
      raise ValueError(f"{path / INDEX_FILE} has no 'weight_map'")
    files = {name: path / file for name, file in index["weight_map"].items()}
    for file in sorted(set(files.values())):
      if not file.is_file():
        raise FileNotFoundError(f"{path / INDEX_FILE} lists {file.name}, which is missing")
    return files
  if (path / WEIGHTS_FILE).is_file():
    with _open_weights(path / WEIGHTS_FILE) as f:
      return {name: path / WEIGHTS_FILE for name in f.keys()}  # noqa: SIM118 (not a dict)
  other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
  hint = f" (found {other}: torch pickles are not read; re-save with safetensors)" if other else ""
  raise FileNotFoundError(f"{path} has neither {WEIGHTS_FILE} nor {INDEX_FILE}{hint}")


_DAMAGED = "the file is truncated or corrupted (an interrupted download or copy?); get it again."


def _open_weights(file: Path):
  """`safe_open(file)`; a file whose header does not parse or whose size does not match it
  (truncated, corrupted) is a `ValueError` naming it. (Tensor bytes carry no checksum.)"""
  try:
    return safe_open(file, "np")
  except SafetensorError as e:
    raise ValueError(f"{file} cannot be read ({e}): {_DAMAGED}") from e


def _np_dtype(dtype: DTypeLike) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def load_hf_pretrained(
  path: str | os.PathLike,
  *,
  dtype: DTypeLike = jnp.float32,
  param_dtype: DTypeLike = jnp.float32,
  scan_layers: bool = False,
  remat_policy: str = "none",
  attention_chunk_size: int = 0,
) -> tuple[LlamaConfig, Llama]:
  """Our config and model from a local Hugging Face LLaMA / Mistral checkpoint directory.

  Args:
    path: directory with `config.json` and `model.safetensors` or a sharded
      `model.safetensors.index.json` (as `save_pretrained(..., safe_serialization=True)`).
    dtype, param_dtype, scan_layers, remat_policy, attention_chunk_size: as in `LlamaConfig`;
      tensors on disk (bf16, fp16 or fp32) are cast to `param_dtype`.

  Returns:
    `(config, model)`; nothing is randomly initialised.

  Raises:
    FileNotFoundError: a missing directory, config, weights file or shard.
    ValueError: a config field we do not model, a missing / unexpected tensor, a shape
      mismatch or an unsupported dtype on disk, each naming the tensor and its file.
  """
  path = Path(path)
  config = read_hf_config(
    path,
    dtype=dtype,
    param_dtype=param_dtype,
    scan_layers=scan_layers,
    remat_policy=remat_policy,
    attention_chunk_size=attention_chunk_size,
  )
  files = _weight_map(path)
  pairs = hf_param_keys(config)
  unexpected = sorted(set(files) - {k for _, k, _ in pairs})
  unexpected = [k for k in unexpected if not is_ignored_hf_key(k, config)]
  if unexpected:
    raise ValueError(f"{path}: unexpected tensors (not in {CONFIG_FILE}'s model): {unexpected}")
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  expected = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  target = _np_dtype(param_dtype)
  buffers: dict[tuple, np.ndarray] = {}  # stacked [N, ...] layers being filled
  filled: dict[tuple, int] = {}
  params: dict = {}
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(_open_weights(f)) for f in sorted(set(files.values()))}
    for param_path, key, transpose in pairs:
      if key not in files:
        raise ValueError(f"{path}: missing tensor {key!r} (for {'/'.join(map(str, param_path))})")
      handle = handles[files[key]]
      stacked = config.scan_layers and param_path[0] == "layers"
      shape = expected[param_path][1:] if stacked else expected[param_path]
      hf_shape = tuple(shape[::-1] if transpose else shape)
      view = handle.get_slice(key)
      if tuple(view.get_shape()) != hf_shape or view.get_dtype() not in _DISK_DTYPES:
        what = (
          f"shape {tuple(view.get_shape())}, expected {hf_shape} (torch (out, in) layout)"
          if tuple(view.get_shape()) != hf_shape
          else f"dtype {view.get_dtype()}, expected one of {sorted(_DISK_DTYPES)}"
        )
        raise ValueError(f"{files[key]}: tensor {key!r} has {what}")
      array = handle.get_tensor(key)
      array = (array.T if transpose else array).astype(target)
      if stacked:
        buf = buffers.setdefault(param_path, np.empty(expected[param_path], target))
        buf[filled.get(param_path, 0)] = array
        filled[param_path] = filled.get(param_path, 0) + 1
        if filled[param_path] < config.num_layers:
          continue
        array = buffers.pop(param_path)
      node = params
      for name in param_path[:-1]:
        node = node.setdefault(name, {})
      node[param_path[-1]] = jnp.asarray(array)
      del array
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, params)
  return config, nnx.merge(graphdef, state)


def _hf_tensors(config: LlamaConfig, model: Llama):
  """Yields `(HF name, torch-layout numpy array)` one tensor at a time."""
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  layer = {}
  for param_path, key, transpose in hf_param_keys(config):
    value = flat[param_path][...]
    if config.scan_layers and param_path[0] == "layers":
      i = layer[param_path] = layer.get(param_path, -1) + 1
      value = value[i]
    array = np.asarray(jax.device_get(value))
    yield key, np.ascontiguousarray(array.T if transpose else array)


def save_hf_pretrained(
  config: LlamaConfig,
  model: Llama,
  path: str | os.PathLike,
  *,
  max_shard_bytes: int = DEFAULT_SHARD_BYTES,
  tokenizer_path: str | os.PathLike | None = None,
) -> Path:
  """Writes `model` as a Hugging Face checkpoint directory (`config.json`, safetensors).

  Tensors keep the parameters' dtype (bf16 / fp16 / fp32). Shards hold at most
  `max_shard_bytes` each (a larger single tensor gets its own shard), named and indexed as
  transformers names them; one shard is written as `model.safetensors`. Host memory holds at
  most one shard's tensors at a time.

  Args:
    config: the model's config (`model.config`).
    model: the model (any `scan_layers` layout).
    path: output directory; created, and existing checkpoint files in it are overwritten.
    max_shard_bytes: largest shard size in bytes.
    tokenizer_path: a SentencePiece model copied in as `tokenizer.model`, or None.

  Returns:
    The directory.
  """
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  # Plan the shards from shapes alone, then write each one.
  sizes = []
  for param_path, key, _ in hf_param_keys(config):
    var = flat[param_path]
    n = (
      var.size // config.num_layers
      if config.scan_layers and param_path[0] == "layers"
      else var.size
    )
    sizes.append((key, n * jnp.dtype(var.dtype).itemsize))
  shards: list[list[str]] = [[]]
  used = 0
  for key, nbytes in sizes:
    if shards[-1] and used + nbytes > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(key)
    used += nbytes
  names = (
    [WEIGHTS_FILE]
    if len(shards) == 1
    else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  )
  shard_of = {key: i for i, keys in enumerate(shards) for key in keys}
  for stale in [path / WEIGHTS_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
    stale.unlink(missing_ok=True)
  pending: dict[str, np.ndarray] = {}
  current = 0
  for key, array in _hf_tensors(config, model):
    if shard_of[key] != current:
      save_file(pending, path / names[current], metadata={"format": "pt"})
      pending, current = {}, shard_of[key]
    pending[key] = array
  save_file(pending, path / names[current], metadata={"format": "pt"})
  if len(shards) > 1:
    index = {
      "metadata": {"total_size": sum(n for _, n in sizes)},
      "weight_map": {key: names[shard_of[key]] for key, _ in sizes},
    }
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  (path / CONFIG_FILE).write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
  if (
    tokenizer_path is not None
    and Path(tokenizer_path).resolve() != (path / TOKENIZER_FILE).resolve()
  ):
    shutil.copyfile(tokenizer_path, path / TOKENIZER_FILE)
  return path


def find_tokenizer(path: str | os.PathLike) -> Path:
  """The SentencePiece `tokenizer.model` of a checkpoint directory.

  Raises:
    FileNotFoundError: there is none (e.g. LLaMA-3's tiktoken-style `tokenizer.json` only),
      with what the directory has instead.
  """
  path = Path(path)
  if (path / TOKENIZER_FILE).is_file():
    return path / TOKENIZER_FILE
  others = sorted(p.name for p in path.glob("tokenizer*"))
  raise FileNotFoundError(
    f"{path} has no SentencePiece {TOKENIZER_FILE}"
    + (f" (it has {others}: only SentencePiece tokenizers are supported)" if others else "")
  )


__all__ = [
  "config_from_hf",
  "config_to_hf",
  "find_tokenizer",
  "hf_param_keys",
  "is_ignored_hf_key",
  "llama_from_hf",
  "load_hf_pretrained",
  "read_hf_config",
  "save_hf_pretrained",
]
