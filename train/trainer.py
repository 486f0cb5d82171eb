"""The training program: model, data and optimizer wired into a jitted, checkpointed loop.

Only the public APIs of `galore_jax`, `train.model` and `train.data` are used here. Config
values are resolved into plain Python before `jit`; I/O, logging, eval and checkpoints stay
outside the compiled step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from train import (
  c4_builder,
  checkpoint,
  checkpoint_io,
  data,
  dirlock,
  instruct,
  losses,
  lowrank,
  metrics,
  optim,
  preemption,
  sharding,
)
from train import tokenizer as tokenizer_lib
from train.model import (
  LLAMA_SIZES,
  REMAT_POLICIES,
  Llama,
  LlamaConfig,
  count_params,
  llama_config,
  next_token_loss,
)

DTYPES = ("float32", "bfloat16", "float16")


class TrainState(NamedTuple):
  """Everything an exact resume needs besides the data iterator's position."""

  step: jax.Array  # int32: updates applied so far
  params: Any
  opt_state: optax.OptState
  rng: jax.Array  # uint32[2] raw key, split per step (reserved for stochastic layers)


class TrainingDiverged(RuntimeError):
  """Loss or gradients became NaN/Inf; the last good checkpoint is left as it was."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """Resolved, static pieces of a run (no config lookups inside jit)."""

  model_config: LlamaConfig
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  data_dir: Path
  vocab_path: Path
  loss_chunk_size: int = 0  # positions per loss chunk (train.losses); 0 = full [B, L, V] logits
  adapter: lowrank.Adapter | None = None  # lora / relora / low_rank: params are its tree

  def model_params(self, params: Any) -> Any:
    """The model's parameters (for `nnx.merge`) from the trained ones."""
    return params if self.adapter is None else self.adapter.model_params(params)


def _runtime_fields(m: ml_collections.ConfigDict) -> dict:
  """The model's fields that this run chooses (not a checkpoint's config.json)."""
  return dict(
    dtype=jnp.dtype(m.dtype),
    param_dtype=jnp.dtype(m.param_dtype),
    scan_layers=m.scan_layers,
    remat_policy=m.remat_policy,
    attention_chunk_size=m.attention_chunk_size,
  )


def model_config_from(config: ml_collections.ConfigDict) -> LlamaConfig:
  m = config.model
  if config.get("init_from"):  # shapes and numerics from the checkpoint's config.json
    try:
      return checkpoint_io.read_hf_config(config.init_from, **_runtime_fields(m))
    except (OSError, ValueError) as e:
      raise _field_error("init_from", config.init_from, f"cannot be loaded: {e}") from e
  overrides = {k: m[k] for k in ("hidden_dim", "mlp_dim", "num_heads", "num_layers") if m[k]}
  return llama_config(m.size, **overrides, **_runtime_fields(m))


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _field_error(field: str, value: Any, why: str) -> ValueError:
  """An error that starts with `config.<section>.<field>=<value>`."""
  return ValueError(f"config.{field}={value!r} {why}")


def _check_ints(config: ml_collections.ConfigDict, low: int, fields: str) -> None:
  for field in fields.split():
    section, key = field.split(".")
    value = config[section][key]
    if not _is_int(value) or value < low:
      raise _field_error(field, value, f"must be an int >= {low}.")


def _check_choice(config: ml_collections.ConfigDict, field: str, choices: tuple) -> None:
  section, key = field.split(".")
  if config[section][key] not in choices:
    raise _field_error(field, config[section][key], f"is not one of {choices}.")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Errors that name the config field, before anything is built (no I/O, no devices).

  The optimizer's fields are checked by `optim.validate_optimizer_config` (it needs the
  parameter shapes), the data locations by `validate_data_config`, the mesh by
  `sharding.validate_batch`; `build` and `train_and_evaluate` call them before compiling.
  """
  t, m = config.train, config.model
  _check_ints(
    config,
    1,
    "train.num_steps train.batch_size train.grad_accum_steps train.eval_every "
    "train.checkpoint_every train.log_every train.eval_batch_size train.keep_checkpoints",
  )
  _check_ints(config, 0, "train.seed train.stop_after_steps")
  if t.batch_size % t.grad_accum_steps:
    raise _field_error(
      "train.batch_size",
      t.batch_size,
      f"is not divisible by config.train.grad_accum_steps={t.grad_accum_steps}.",
    )
  if t.fused_update and not m.scan_layers:
    raise _field_error("train.fused_update", t.fused_update, "needs config.model.scan_layers=True.")
  _check_ints(config, 0, "train.fused_vocab_chunk_size")
  if t.fused_vocab_chunk_size and not (
    t.fused_update and m.loss_chunk_size and t.grad_accum_steps == 1
  ):
    raise _field_error(
      "train.fused_vocab_chunk_size",
      t.fused_vocab_chunk_size,
      "needs train.fused_update=True, model.loss_chunk_size > 0 and train.grad_accum_steps=1.",
    )
  _check_choice(config, "model.size", tuple(LLAMA_SIZES))
  _check_ints(
    config,
    0,
    "model.hidden_dim model.mlp_dim model.num_heads model.num_layers model.loss_chunk_size "
    "model.attention_chunk_size",
  )
  for field in ("dtype", "param_dtype"):
    _check_choice(config, f"model.{field}", DTYPES)
  _check_choice(config, "model.remat_policy", ("none", *REMAT_POLICIES))
  size = LLAMA_SIZES[m.size]
  hidden, heads = m.hidden_dim or size.hidden_dim, m.num_heads or size.num_heads
  if hidden % heads or (hidden // heads) % 2:
    raise _field_error(
      "model.num_heads",
      heads,
      f"must split config.model.hidden_dim={hidden} into heads of even size (rotary "
      "embeddings rotate pairs).",
    )
  _check_choice(config, "data.mode", data.MODES)
  _validate_instruct_fields(config)
  _check_ints(config, 2, "data.seq_len")  # one input and one target token at least
  _check_ints(config, 0, "data.eval_max_documents data.worker_count data.seed")
  for field in ("train_split", "eval_split"):
    if not isinstance(config.data[field], str) or not config.data[field]:
      raise _field_error(f"data.{field}", config.data[field], "must be a tfds split name.")
  for field in ("data", "fsdp"):
    value = config.mesh[field]
    if not _is_int(value) or (value < 1 and value != -1):
      raise _field_error(f"mesh.{field}", value, "must be an int >= 1, or -1 (all the rest).")
  _check_choice(config, "mesh.distributed", ("auto", "on", "off"))
  _validate_finetune_fields(config)


def _is_instruct(config: ml_collections.ConfigDict) -> bool:
  return config.data.get("format", "c4") == "instruct"


def _files(value: str) -> list[str]:
  return [f.strip() for f in value.split(",") if f.strip()]


def _validate_instruct_fields(config: ml_collections.ConfigDict) -> None:
  """`data.format` and, for instruction data, its files and tokenizer source."""
  _check_choice(config, "data.format", ("c4", "instruct"))
  if not _is_instruct(config):
    return
  for field in ("train_files", "eval_files"):
    value = config.data.get(field, "")
    if not isinstance(value, str) or not _files(value):
      raise _field_error(
        f"data.{field}",
        value,
        "must name JSON-lines files (comma-separated) with data.format='instruct' (see "
        "train/instruct.py for the record layouts).",
      )
  if not config.get("init_from") and not config.data.vocab_path:
    raise _field_error(
      "data.vocab_path",
      config.data.vocab_path,
      "must be a tokenizer.json (or a checkpoint directory) for data.format='instruct' without "
      "config.init_from.",
    )


def _validate_finetune_fields(config: ml_collections.ConfigDict) -> None:
  """`init_from` / `export_to`: paths (or ""), and no model shape overrides with `init_from`."""
  for field in ("init_from", "export_to"):
    if not isinstance(config.get(field, ""), str):
      raise _field_error(field, config.get(field), "must be a directory path, or '' for none.")
  if not config.get("init_from"):
    return
  for key in ("hidden_dim", "mlp_dim", "num_heads", "num_layers"):
    if config.model[key]:
      raise _field_error(
        f"model.{key}",
        config.model[key],
        f"conflicts with config.init_from={config.init_from!r} (the checkpoint's config.json "
        "sets the shapes); leave it 0.",
      )


def validate_data_config(config: ml_collections.ConfigDict, setup: Setup) -> None:
  """Errors for data that cannot be read (checked when a run starts, not at build): the data
  dir, its prepared C4, both splits (not empty) and the vocabulary (a SentencePiece model
  that fits the model's embedding). Instruction data: its files and the tokenizer.json."""
  d = config.data
  if _is_instruct(config):
    _validate_instruct_data(config, setup)
    return
  if d.data_dir and not Path(d.data_dir).is_dir():
    raise _field_error(
      "data.data_dir",
      d.data_dir,
      "does not exist; prepare C4 there with `python -m train.prepare_data --output_dir=...` "
      "or leave it empty for the bundled sample.",
    )
  data_dir = setup.data_dir
  if not c4_builder.is_prepared(data_dir):
    raise _field_error(
      "data.data_dir",
      d.data_dir,
      f"has no prepared C4 (no {c4_builder.dataset_dir(data_dir) / 'dataset_info.json'}); "
      f"prepare it with `python -m train.prepare_data --output_dir={data_dir} ...`.",
    )
  if d.vocab_path and not Path(d.vocab_path).is_file():
    raise _field_error("data.vocab_path", d.vocab_path, "is not a file.")
  try:
    vocab_size = data.Tokenizer(setup.vocab_path).vocab_size
  except Exception as e:  # noqa: BLE001 (sentencepiece raises RuntimeError/OSError)
    raise _tokenizer_error(config, setup.vocab_path, e) from e
  if vocab_size > setup.model_config.vocab_size:
    model = (
      f"config.init_from={config.init_from!r}"
      if config.get("init_from")
      else f"config.model.size={config.model.size!r}"
    )
    raise _field_error(
      "data.vocab_path",
      d.vocab_path,
      f"has {vocab_size} pieces but {model} embeds only {setup.model_config.vocab_size} token ids.",
    )
  for field in ("train_split", "eval_split"):
    try:
      n = data.num_documents(data_dir, d[field])
    except Exception as e:  # noqa: BLE001 (tfds raises many types for bad splits)
      raise _field_error(f"data.{field}", d[field], f"cannot be read from {data_dir}: {e}") from e
    if n == 0:
      raise _field_error(
        f"data.{field}", d[field], f"has no documents in {data_dir}: nothing to train or evaluate."
      )


def _validate_instruct_data(config: ml_collections.ConfigDict, setup: Setup) -> None:
  """The instruction files exist and the tokenizer loads and fits the embedding."""
  for field in ("train_files", "eval_files"):
    for file in _files(config.data[field]):
      if not Path(file).is_file():
        raise _field_error(f"data.{field}", config.data[field], f"names {file!r}, not a file.")
  field, value = (
    ("data.vocab_path", config.data.vocab_path)
    if config.data.vocab_path
    else ("init_from", config.init_from)
  )
  try:
    tok = tokenizer_lib.load_tokenizer(setup.vocab_path)
    instruct.chat_template_of(tok)
  except (OSError, ValueError) as e:
    raise _field_error(field, value, f"has no usable tokenizer for instruction data: {e}") from e
  if tok.vocab_size > setup.model_config.vocab_size:
    raise _field_error(
      field,
      value,
      f"has a tokenizer of {tok.vocab_size} ids ({setup.vocab_path}) but the model embeds only "
      f"{setup.model_config.vocab_size}.",
    )


def load_instruct_data(config: ml_collections.ConfigDict, setup: Setup, field: str):
  """`instruct.InstructData` of `config.data.<field>` ("train_files" or "eval_files")."""
  d = config.data
  return instruct.load_instruct_files(
    _files(d[field]),
    tokenizer_lib.load_tokenizer(setup.vocab_path),
    seq_len=d.seq_len,
    strict=d.get("strict", False),
  )


def _tokenizer_error(config: ml_collections.ConfigDict, path: Path, e: Exception) -> ValueError:
  """The error for a tokenizer file that does not load, naming the field it came from."""
  why = (
    f"{e}."  # a SentencePiece model that the pipeline cannot use (`data.Tokenizer` says why)
    if isinstance(e, ValueError)
    else f"{path} cannot be read as a SentencePiece model ({e}): it is truncated, corrupted or "
    "another format."
  )
  if config.data.vocab_path:
    return _field_error(
      "data.vocab_path",
      config.data.vocab_path,
      f"is not a usable SentencePiece model: {why} Point it at a valid .model file.",
    )
  if config.get("init_from"):
    return _field_error(
      "init_from",
      config.init_from,
      f"has a tokenizer that does not load: {why} "
      "Copy it from the model's source again, or set config.data.vocab_path.",
    )
  return ValueError(
    f"The bundled vocabulary does not load: {why} Restore it with "
    f"`git checkout -- {path.relative_to(c4_builder.BUNDLED_RAW_DIR.parent)}`."
  )


def build(config: ml_collections.ConfigDict) -> Setup:
  """Model graph, optimizer and data locations from a config (nothing allocated)."""
  validate_config(config)
  model_config = model_config_from(config)
  if config.train.fused_update and model_config.tie_word_embeddings:
    raise _field_error(
      "train.fused_update",
      True,
      f"needs an untied LM head; config.init_from={config.get('init_from')!r} ties it to the "
      "embedding (tie_word_embeddings).",
    )
  abstract = nnx.eval_shape(lambda: Llama(model_config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  t = config.train
  optim.validate_optimizer_config(config.optimizer, abstract_params, fused_update=t.fused_update)
  data_dir = Path(config.data.data_dir) if config.data.data_dir else data.BUNDLED_DATA_DIR
  vocab = Path(config.data.vocab_path) if config.data.vocab_path else data.BUNDLED_VOCAB
  o, adapter = config.optimizer, None
  if o.name in lowrank.METHODS:
    reset_every = o.relora_reset_every if o.name == "relora" else 0
    adapter = lowrank.Adapter(o.name, o.rank, o.lora_alpha, model_config.init_std, reset_every)
  if _is_instruct(config):  # a tokenizer.json: the checkpoint's, or data.vocab_path
    source = config.data.vocab_path or config.init_from
    try:
      vocab = tokenizer_lib.find_tokenizer_file(source)
    except FileNotFoundError as e:
      field = "data.vocab_path" if config.data.vocab_path else "init_from"
      raise _field_error(field, source, f"has no tokenizer to train with: {e}") from e
  elif config.get("init_from") and not config.data.vocab_path:  # the checkpoint's own tokenizer
    try:
      vocab = checkpoint_io.find_tokenizer(config.init_from)
    except FileNotFoundError as e:
      hint = (
        " Its tokenizer.json is read for instruction data (config.data.format='instruct', whose "
        "files may also hold plain {'text': ...} documents)."
        if (Path(config.init_from) / tokenizer_lib.TOKENIZER_JSON).is_file()
        else ""
      )
      raise _field_error(
        "init_from",
        config.init_from,
        f"has no tokenizer to train with: {e}. Set config.data.vocab_path to the SentencePiece "
        f"model the checkpoint was trained with.{hint}",
      ) from e
  return Setup(
    model_config,
    graphdef,
    optim.make_optimizer(o, t.num_steps, fused_update=t.fused_update),
    optim.make_schedule(o, t.num_steps),
    data_dir,
    vocab,
    config.model.loss_chunk_size,
    adapter,
  )


def init_state(
  setup: Setup, seed: int, layout: sharding.Layout | None = None, params: Any = None
) -> TrainState:
  """A fresh state; with a `layout`, created by one jitted call directly in its shardings (no
  device ever holds the whole state). `params` (e.g. loaded weights, an `nnx.State` of
  `nnx.Param`s) replace the random init; the optimizer state is always fresh."""

  def init(params):
    if params is None:
      model = Llama(setup.model_config, rngs=nnx.Rngs(seed))
      _, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(jnp.asarray, params)
    if setup.adapter is not None:  # the factors' own stream, apart from the model's
      key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
      params = setup.adapter.init(nnx.to_pure_dict(params), key)
    return TrainState(
      jnp.zeros([], jnp.int32), params, setup.tx.init(params), jax.random.PRNGKey(seed)
    )

  if layout is None:
    return init(params)
  donate = () if params is None else (0,)  # loaded weights: moved into place, not copied
  return jax.jit(init, out_shardings=layout.state, donate_argnums=donate)(params)


def load_init_params(config: ml_collections.ConfigDict, setup: Setup) -> Any:
  """The `nnx.Param` state of `config.init_from`'s weights (None without `init_from`)."""
  if not config.get("init_from"):
    return None
  m = config.model
  try:
    loaded_config, model = checkpoint_io.load_hf_pretrained(config.init_from, **_runtime_fields(m))
  except (OSError, ValueError) as e:  # missing, truncated or corrupted weights, named
    raise _field_error("init_from", config.init_from, f"cannot be loaded: {e}") from e
  if loaded_config != setup.model_config:  # both come from one config.json
    raise RuntimeError(f"{config.init_from} changed while the run started")
  return nnx.state(model, nnx.Param)


def export_params(config: ml_collections.ConfigDict, setup: Setup, params: Any) -> Path:
  """Writes `params` to `config.export_to` as a Hugging Face checkpoint (and the tokenizer)."""
  if jax.process_count() > 1:
    raise _field_error("export_to", config.export_to, "is supported in single-process runs only.")
  model = nnx.merge(setup.graphdef, jax.device_get(params))
  is_json = setup.vocab_path.suffix == ".json"
  sentencepiece = None if is_json else setup.vocab_path
  out = checkpoint_io.save_hf_pretrained(
    setup.model_config, model, config.export_to, tokenizer_path=sentencepiece
  )
  if is_json:  # tokenizer.json with its config, chat template and generation config
    tokenizer_lib.copy_tokenizer_files(tokenizer_lib.load_tokenizer(setup.vocab_path), out)
  return out


def _validate_batch(t: ml_collections.ConfigDict, mesh) -> None:
  sharding.validate_batch(
    mesh,
    batch_size=t.batch_size,
    grad_accum_steps=t.grad_accum_steps,
    eval_batch_size=t.eval_batch_size,
  )


def make_layout(
  config: ml_collections.ConfigDict, setup: Setup, mesh: jax.sharding.Mesh
) -> sharding.Layout:
  """Shardings of the training state and batches on `mesh` (see train/sharding.py)."""
  _validate_batch(config.train, mesh)
  abstract = jax.eval_shape(lambda: init_state(setup, 0))
  return sharding.training_layout(
    mesh,
    abstract,
    galore="galore" in config.optimizer.name,
    proj_type=config.optimizer.proj_type,
    shard_projectors=config.mesh.get("shard_projectors", True),
  )


def _loss(graphdef, params, tokens_BxL, chunk_size: int = 0, loss_mask_BxL=None):
  model = nnx.merge(graphdef, params)
  if not chunk_size:
    return next_token_loss(model(tokens_BxL), tokens_BxL, loss_mask_BxL=loss_mask_BxL)
  h_BxLxD = model.hidden_states(tokens_BxL)
  kernel_DxV = model.head_kernel().astype(h_BxLxD.dtype)
  return losses.chunked_next_token_loss(
    h_BxLxD, kernel_DxV, tokens_BxL, chunk_size=chunk_size, loss_mask_BxL=loss_mask_BxL
  )


def make_train_step(setup: Setup, grad_accum_steps: int, layout: sharding.Layout | None = None):
  """`train_step(state, batch) -> (state, metrics)`, pure; jit it with the state donated.

  With a `layout`, micro-batches keep their rows split over the batch devices, gradients are
  constrained to the parameters' shardings (a reduce-scatter under FSDP) and split GaLore
  projectors are gathered, so the optimizer update runs on shards.

  The loss is token-weighted over the whole batch: gradients of the summed per-token loss of
  each micro-batch are accumulated (float32) and divided by the batch's non-pad token count
  (with a `"loss_mask"` in the batch, instruction data: the count of its True targets),
  so accumulation gives the same update as one large batch (the reference averages micro-batch
  means instead, which weights short documents more).

  ReLoRA (`setup.adapter.reset_every`) merges and resets after every `reset_every`-th update.
  """
  graphdef, tx, adapter = setup.graphdef, setup.tx, setup.adapter
  chunk = setup.loss_chunk_size
  loss = lambda p, t, m: _loss(graphdef, setup.model_params(p), t, chunk, m)
  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    split = lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, -1)
    micro, mask = split(batch["tokens"]), batch.get("loss_mask")
    mask = None if mask is None else split(mask)
    if layout is not None:
      micro = jax.lax.with_sharding_constraint(micro, layout.micro_batches)
      if mask is not None:
        mask = jax.lax.with_sharding_constraint(mask, layout.micro_batches)

    def accumulate(carry, xs):
      g_acc, loss_acc, n_acc = carry
      tokens_BxL, mask_BxL = xs
      (loss_sum, n), g = grad_fn(state.params, tokens_BxL, mask_BxL)
      g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
      return (g_acc, loss_acc + loss_sum, n_acc + n), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    init = (zeros, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32))
    if grad_accum_steps == 1:
      (g_sum, loss_sum, n), _ = accumulate(init, (micro[0], None if mask is None else mask[0]))
    else:
      (g_sum, loss_sum, n), _ = jax.lax.scan(accumulate, init, (micro, mask))
    denom = jnp.maximum(n, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, state.params)
    opt_state = state.opt_state
    if layout is not None:
      grads = jax.lax.with_sharding_constraint(grads, layout.params)
      opt_state = jax.lax.with_sharding_constraint(opt_state, layout.update_state.opt_state)
    with jax.named_scope("optimizer"):  # names its ops in profiles
      updates, opt_state = tx.update(grads, opt_state, state.params)
      if layout is not None:  # computed replicated; split (a local slice) only when stored
        opt_state = jax.lax.with_sharding_constraint(opt_state, layout.update_state.opt_state)
      params = optax.apply_updates(state.params, updates)
    rng, key = jax.random.split(state.rng)
    if adapter is not None and adapter.reset_every:
      params, opt_state = jax.lax.cond(
        (state.step + 1) % adapter.reset_every == 0,
        lambda: adapter.restart(params, opt_state, key),
        lambda: (params, opt_state),
      )
    out = {"loss": loss_sum / denom, "grad_norm": optax.global_norm(grads), "tokens": n}
    out.update(optim.refresh_metrics(opt_state))  # GaLore with energy_tol: the latest refresh
    return TrainState(state.step + 1, params, opt_state, rng), out

  return train_step


def make_eval_step(setup: Setup):
  def eval_step(params, batch):
    model_params = setup.model_params(params)
    chunk, mask = setup.loss_chunk_size, batch.get("loss_mask")
    return _loss(setup.graphdef, model_params, batch["tokens"], chunk, mask)

  return jax.jit(eval_step)


def evaluate(eval_step, params, batches, put_batch=None) -> dict[str, float]:
  """Token-weighted loss over every non-pad target of the eval split, and its perplexity.

  Instruction data (batches with a `"loss_mask"`): over the response tokens only.

  `put_batch` turns this process's rows into global arrays (`Layout.put_batch`).
  """
  total, count = 0.0, 0
  put_batch = put_batch or (lambda b: {k: jnp.asarray(v) for k, v in b.items()})
  for batch in batches:
    loss_sum, n = eval_step(params, put_batch(batch))
    total += float(loss_sum)
    count += int(n)
  if count == 0:  # a loss of 0 and perplexity 1 would look like a perfect model
    raise ValueError("the eval split has no target tokens to evaluate.")
  loss = total / count
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)), "eval_tokens": count}


@jax.jit
def _all_finite(tree) -> jax.Array:
  """Whether every floating-point leaf of `tree` is free of NaN/Inf."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _step_name(step: int | None) -> str:
  return "none" if step is None else f"step {step}"


def _memory_summary(compiled) -> str:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 (not every backend reports it)
    return "n/a"
  gb = 1e9
  return (
    f"arguments {m.argument_size_in_bytes / gb:.3f} GB, outputs "
    f"{m.output_size_in_bytes / gb:.3f} GB, temp {m.temp_size_in_bytes / gb:.3f} GB"
  )


@dataclasses.dataclass
class Run:
  """A run's pieces once built and restored (`prepare`): what the loop reads and advances."""

  config: ml_collections.ConfigDict
  setup: Setup
  mesh: jax.sharding.Mesh
  layout: sharding.Layout
  logdir: Path
  state: TrainState
  train_iter: Any  # data.make_train_iterator's checkpointable iterator
  ckpt: checkpoint.Checkpointer
  eval_data: Any = None  # instruction data: instruct.InstructData of data.eval_files
  lock: dirlock.DirLock | None = None  # this process's hold on its logdir (`release` it)


def prepare(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Run:
  """Validates `config` (every config error is raised here, before anything is allocated or
  compiled), locks `workdir` (`dirlock.DirectoryInUse` if another trainer holds it), then builds
  the state in its shardings and restores `workdir`'s latest checkpoint. The returned run holds
  the lock: `run.lock.release()` when done with it (`train_and_evaluate` does)."""
  workdir = Path(workdir)
  sharding.initialize_distributed(config.mesh.get("distributed", "auto"))
  setup = build(config)
  if not config.data.data_dir and not _is_instruct(config):
    data.ensure_bundled_prepared(setup.data_dir)
  validate_data_config(config, setup)
  shape = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, jax.device_count())
  _validate_batch(config.train, dict(zip(sharding.MESH_AXES, shape)))
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  layout = make_layout(config, setup, mesh)
  # Checkpoints are shared; logs, metrics and plots of processes other than 0 go to a subdir.
  logdir = workdir if jax.process_index() == 0 else workdir / f"process_{jax.process_index()}"
  # Before anything in the workdir is written or cleaned up (unfinished checkpoints): a second
  # trainer stops here, and the lock dies with its process however it ends.
  lock = dirlock.DirLock(logdir, "workdir", _LOCK_ADVICE).acquire()
  try:
    t = config.train
    with open(logdir / "config.json", "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    state = init_state(setup, t.seed, layout, load_init_params(config, setup))
    eval_data = None
    if _is_instruct(config):
      train_data = load_instruct_data(config, setup, "train_files")
      eval_data = load_instruct_data(config, setup, "eval_files")
      print(
        f"Instruction data, train: {train_data.stats}\nInstruction data, eval: {eval_data.stats}"
      )
      if len(eval_data) == 0:
        raise _field_error("data.eval_files", config.data.eval_files, "has no usable examples.")
      train_iter = instruct.make_train_iterator(
        train_data, batch_size=t.batch_size, seed=config.data.seed
      )
    else:
      train_iter = data.make_train_iterator(
        setup.data_dir,
        split=config.data.train_split,
        seq_len=config.data.seq_len,
        batch_size=t.batch_size,
        mode=config.data.mode,
        seed=config.data.seed,
        vocab_path=setup.vocab_path,
        worker_count=config.data.worker_count,
      )
    ckpt = checkpoint.Checkpointer(
      workdir / "checkpoints", keep=t.keep_checkpoints, clean_unfinished=True
    )
    restored = ckpt.restore_latest(state, set_aside=True)
    if restored is not None:
      state, iter_state = restored
      train_iter.set_state(iter_state)
      print(f"Resumed from step {int(state.step)} in {ckpt.directory}")
    return Run(config, setup, mesh, layout, logdir, state, train_iter, ckpt, eval_data, lock)
  except BaseException:
    lock.release()
    raise


_LOCK_ADVICE = (
  "Two trainers on one workdir would interleave their checkpoints. Wait for it to finish, "
  "stop it (SIGTERM or Ctrl-C saves a checkpoint first), or give this run another --workdir."
)


def compile_train_step(run: Run) -> jax.stages.Compiled:
  """The run's train step (standard or fused), compiled once for its state and batch shapes.

  It returns `(state, metrics)`; the metrics add `input_tokens`, the non-pad input tokens read
  (global), for the tokens/s metric.
  """
  config, setup, layout, t = run.config, run.setup, run.layout, run.config.train
  if t.fused_update:
    from train import fused  # noqa: PLC0415 (optional path)

    o = config.optimizer
    step_fn = fused.make_fused_train_step(
      setup,
      t.grad_accum_steps,
      grad_clip_norm=o.grad_clip_norm,
      clip_in_subspace=t.clip_in_subspace,
      proj_type=o.proj_type,
      loss_chunk_size=setup.loss_chunk_size,
      vocab_chunk_size=t.fused_vocab_chunk_size,
    )
  else:
    step_fn = make_train_step(setup, t.grad_accum_steps, layout)

  def train_step(state, batch):
    state, out = step_fn(state, batch)
    return state, {**out, "input_tokens": _input_tokens(batch)}

  jitted = jax.jit(
    train_step,
    in_shardings=(layout.state, layout.batch),
    out_shardings=(layout.state, layout.replicated),
    donate_argnums=(0,),
  )
  shape = (t.batch_size, config.data.seq_len)
  batch_spec = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32)}
  if _is_instruct(config):
    batch_spec["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.bool_)
  # Call the result, not `jitted`: calling the jitted function would compile it a second time.
  return jitted.lower(run.state, batch_spec).compile()


def _input_tokens(batch) -> jax.Array:
  """Real (non-pad) input tokens `tokens[:, :-1]` of a batch, for the tokens/s metric."""
  inputs_BxL1 = batch["tokens"][:, :-1]
  if "loss_mask" not in batch:  # C4 rows: pad id 0
    return jnp.sum(inputs_BxL1 != 0, dtype=jnp.int32)
  # Instruction rows end with their last target (the pad id may be an ordinary token's).
  mask_BxL = batch["loss_mask"]
  last_B = mask_BxL.shape[1] - jnp.argmax(mask_BxL[:, ::-1], axis=1)
  length_B = jnp.where(jnp.any(mask_BxL, axis=1), last_B, 0)
  return jnp.sum(jnp.minimum(length_B, inputs_BxL1.shape[1]), dtype=jnp.int32)


def start_summary(run: Run, compiled: jax.stages.Compiled) -> dict[str, Any]:
  """What the run is (model, optimizer, state bytes vs AdamW's, compiled memory, mesh), and the
  unigram perplexity floor of a fresh run: printed and written before the first step."""
  config, setup, state = run.config, run.setup, run.state
  counts = count_params(setup.model_config)
  model_params = jax.eval_shape(setup.model_params, state.params)  # (adapters: the kernels)
  summary = {
    "model": config.model.size if not config.get("init_from") else f"({config.init_from})",
    "params": counts["total"],
    "galore_target_params": counts["galore_target"],
    "optimizer": config.optimizer.name,
    "optimizer_state_bytes": optim.state_bytes(setup.tx, state.params),
    "adamw_state_bytes": optim.state_bytes(optim.adamw(1.0, config.optimizer), model_params),
    "compiled_step_memory": _memory_summary(compiled),
    "mesh": dict(run.mesh.shape),
    "optimizer_state_bytes_per_device": sharding.shard_bytes(
      state.opt_state, run.layout.state.opt_state
    ),
  }
  if _is_instruct(config):
    summary["eval_response_tokens"] = run.eval_data.stats.response_tokens
  elif int(state.step) == 0:
    d = config.data
    summary["unigram_perplexity"] = data.unigram_perplexity(
      setup.data_dir,
      seq_len=d.seq_len,
      mode=d.mode,
      vocab_path=setup.vocab_path,
      train_split=d.train_split,
      eval_split=d.eval_split,
      max_eval_documents=d.eval_max_documents or None,
    )
  return summary


def _eval_batches(run: Run):
  d = run.config.data
  if run.eval_data is not None:
    return instruct.make_eval_batches(run.eval_data, batch_size=run.config.train.eval_batch_size)
  return data.make_eval_batches(
    run.setup.data_dir,
    split=d.eval_split,
    seq_len=d.seq_len,
    batch_size=run.config.train.eval_batch_size,
    mode=d.mode,
    vocab_path=run.setup.vocab_path,
    max_documents=d.eval_max_documents or None,
  )


class _StepLog:
  """Checks, logs and times each step's metrics (fetched one step late, see `train_loop`)."""

  def __init__(self, run: Run, writer: metrics.MetricWriter, start_step: int):
    self.run, self.writer, self.t = run, writer, run.config.train
    self.positions_per_step = self.t.batch_size * (run.config.data.seq_len - 1)  # pad included
    self.throughput = metrics.Throughput()
    self.progress = metrics.Progress(self.t.num_steps, start_step, enabled=self.t.progress_bar)

  def __call__(self, step_done: int, out) -> dict[str, float]:
    run, ckpt = self.run, self.run.ckpt
    values = {k: float(v) for k, v in jax.device_get(out).items()}
    if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
      ckpt.wait()  # the last good checkpoint is complete on disk before we name it
      raise TrainingDiverged(
        f"non-finite loss/gradient at step {step_done}: loss={values['loss']}, grad_norm="
        f"{values['grad_norm']}. Stopped; the last good checkpoint "
        f"({_step_name(ckpt.latest_step())}) in {ckpt.directory} is untouched."
      )
    refresh = {k: values.pop(k) for k in list(values) if k.startswith(optim.REFRESH_PREFIX)}
    if refresh and optim.is_refresh_step(run.config.optimizer, step_done - 1):
      self.writer.write(step_done, refresh)
    values["learning_rate"] = float(run.setup.schedule(step_done - 1))
    self.throughput.add(values.pop("input_tokens"), self.positions_per_step)
    rates = self.throughput.rates()
    self.progress.update(step_done, values, rates["tokens_per_second"])
    if step_done % self.t.log_every == 0 or step_done == self.t.num_steps:
      self.writer.write(step_done, {**values, **rates})
    return values


def _save(run: Run, done: int, writer: metrics.MetricWriter) -> None:
  """Checkpoints the state after step `done`, unless it is not finite (then stops, keeping the
  last good checkpoint). The loss checked so far is that of the parameters *before* the update.
  Logs how long the loop stalled for it (`checkpoint_seconds`: the finiteness check, waiting
  for the previous save, copying to host memory; the write itself runs in the background)."""
  start = time.perf_counter()
  state, ckpt = run.state, run.ckpt
  if not bool(_all_finite((state.params, state.opt_state))):
    ckpt.wait()
    raise TrainingDiverged(
      f"non-finite parameters/optimizer state at step {done} (after its update). Stopped "
      f"without saving it; the last good checkpoint ({_step_name(ckpt.latest_step())}) in "
      f"{ckpt.directory} is untouched."
    )
  ckpt.save(done, state, run.train_iter.get_state())
  writer.write(done, {"checkpoint_seconds": time.perf_counter() - start})


def _evaluate(run: Run, eval_step, done: int, writer: metrics.MetricWriter, progress) -> dict:
  """Evaluates the state after step `done`; logs the result and its time (`eval_seconds`)."""
  start = time.perf_counter()
  result = evaluate(eval_step, run.state.params, _eval_batches(run), run.layout.put_batch)
  writer.write(done, {**result, "eval_seconds": time.perf_counter() - start})
  progress.write(
    f"step {done}: eval loss {result['eval_loss']:.4f}, perplexity {result['eval_perplexity']:.2f}"
  )
  return result


def train_loop(run: Run, train_step, writer: metrics.MetricWriter) -> dict[str, Any]:
  """Steps `run.state` to `train.num_steps` (or `stop_after_steps`), evaluating and saving on
  their boundaries. Returns the throughput and the last eval. A step's metrics are fetched
  after the next step is dispatched, so the host never waits on the device between steps.

  On SIGTERM or SIGINT (`preemption.StopSignals`, all processes agreeing on the step) it
  finishes the step it is on, saves it, waits until the checkpoint is on disk, runs that
  step's scheduled eval if it has one, and raises `preemption.Preempted`.
  """
  t = run.config.train
  log = _StepLog(run, writer, int(run.state.step))
  eval_step = make_eval_step(run.setup)
  pending, last_eval = None, {}  # pending: (step, metrics future) of the previous step
  stop, preempted = min(t.num_steps, t.stop_after_steps or t.num_steps), False
  with preemption.StopSignals() as signals:
    log.throughput.start()
    for step in range(int(run.state.step), stop):
      run.state, out = train_step(run.state, run.layout.put_batch(next(run.train_iter)))
      if pending is not None:
        log(*pending)
      pending, done = (step + 1, out), step + 1
      preempted = signals.should_stop(done) and done < stop  # at the end: just finish
      evals = done % t.eval_every == 0 or done == t.num_steps
      saves = done % t.checkpoint_every == 0 or done == stop or preempted
      if evals or saves:
        log(*pending)  # checkpoints and evals only see verified-finite states
        pending = None
      log.throughput.stop()  # evals and saves are not training time
      if preempted:  # the state before the eval: the grace period before SIGKILL may be short
        _save(run, done, writer)
        run.ckpt.wait()
      if evals:
        last_eval = _evaluate(run, eval_step, done, writer, log.progress)
      if preempted:
        break
      if saves:
        _save(run, done, writer)
      log.throughput.start()
    if pending is not None:
      log(*pending)
    log.throughput.stop()
    run.ckpt.wait()
    log.progress.close()
    if preempted:
      raise preemption.Preempted(done, signals.received, run.ckpt.directory)
  return {**log.throughput.rates(), **last_eval}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Trains per `config`, resuming from `workdir` if it holds a checkpoint. Returns a summary:
  `prepare`, `compile_train_step`, `start_summary`, `train_loop`, then the end summary.

  Raises:
    dirlock.DirectoryInUse: another live process trains in `workdir`.
    preemption.Preempted: SIGTERM or SIGINT stopped the run after saving a checkpoint.
  """
  run = prepare(config, workdir)
  try:  # the workdir lock is released however the run ends
    compiled = compile_train_step(run)
    summary = start_summary(run, compiled)
    metrics.print_start_summary(summary)
    writer = metrics.MetricWriter(run.logdir)
    try:
      writer.write_summary(summary)
      t_start = time.time()
      rates_and_eval = train_loop(run, compiled, writer)
      final = {
        "steps": int(run.state.step),
        "wall_seconds": time.time() - t_start,
        **rates_and_eval,
        **{k: summary[k] for k in ("unigram_perplexity",) if k in summary},
      }
      if config.get("export_to") and int(run.state.step) == config.train.num_steps:
        final["exported_to"] = os.fspath(export_params(config, run.setup, run.state.params))
        print(f"Exported the fine-tuned model to {final['exported_to']}")
      writer.write_final(final)
      png = metrics.plot_curves(run.logdir)
      metrics.print_end_summary(final, png, run.logdir)
    finally:
      writer.close()
      sys.stdout.flush()
  finally:
    if run.lock is not None:
      run.lock.release()
  return final


def load_metrics(workdir: str | os.PathLike) -> list[dict]:
  """All records of `workdir/metrics.jsonl` (used by tests and the plots)."""
  with open(Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f if line.strip()]


__all__ = [
  "Run",
  "TrainState",
  "TrainingDiverged",
  "build",
  "compile_train_step",
  "evaluate",
  "export_params",
  "init_state",
  "load_init_params",
  "load_instruct_data",
  "load_metrics",
  "make_layout",
  "make_train_step",
  "prepare",
  "start_summary",
  "train_and_evaluate",
  "train_loop",
  "validate_config",
  "validate_data_config",
]
