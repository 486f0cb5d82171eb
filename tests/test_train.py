"""The training program end to end on the bundled C4 sample, with a tiny model."""

import glob
import importlib.util
import math
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from configs import default
from train import data, optim, trainer
from train.model import Llama

REPO = Path(__file__).resolve().parent.parent


def tiny_config(data_dir: str, **train):
  c = default.get_config()
  c.model.update(size="9m", hidden_dim=32, mlp_dim=64, num_heads=2, num_layers=2)
  c.data.update(data_dir=data_dir, seq_len=64, eval_max_documents=16)
  c.optimizer.update(rank=8, update_proj_gap=3, learning_rate=3e-2)
  c.train.update(
    num_steps=8,
    batch_size=4,
    eval_every=4,
    checkpoint_every=4,
    log_every=1,
    eval_batch_size=8,
    progress_bar=False,
  )
  c.train.update(**train)
  return c


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


CONFIG_FILES = sorted(
  p for p in glob.glob(str(REPO / "configs" / "*.py")) if "def get_config" in Path(p).read_text()
)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: Path(p).stem)
def test_each_config_builds_abstractly(path):
  """Model + optimizer state from shapes only: the 7B recipe builds on this machine."""
  config = _load_config(path)
  setup = trainer.build(config)
  abstract = nnx.eval_shape(lambda: Llama(setup.model_config, rngs=nnx.Rngs(0)))
  _, params = nnx.split(abstract, nnx.Param)
  opt_state = jax.eval_shape(setup.tx.init, params)
  assert jax.tree.leaves(opt_state)


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("optimizer.name", "sgdw", r"config\.optimizer\.name='sgdw'"),
    ("optimizer.rank", 0, r"config\.optimizer\.rank=0 is refused by galore_jax"),
    ("train.grad_accum_steps", 3, r"config\.train\.batch_size=16 is not divisible"),
    ("train.num_steps", 0, r"config\.train\.num_steps=0"),
    ("data.mode", "stream", r"config\.data\.mode='stream'"),
  ],
)
def test_config_errors_name_the_field(field, value, match):
  config = default.get_config()
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(ValueError, match=match):
    trainer.build(config)


def test_attention_chunk_size_reaches_the_model():
  config = default.get_config()
  config.model.attention_chunk_size = 64
  trainer.validate_config(config)
  assert trainer.model_config_from(config).attention_chunk_size == 64


def test_a_rank_above_a_matrix_is_clipped_with_a_warning_as_in_the_library(caplog):
  """The trainer follows `galore_jax.galore_targets`: rank 10000 is clipped to each matrix's
  smaller side (the reference's thin SVD), with a warning where GaLore then holds more than
  Adam; the library warns alike at init."""
  config = default.get_config()
  config.optimizer.rank = 10_000
  with caplog.at_level("WARNING"):
    trainer.build(config)
  assert "config.optimizer.rank=10000" in caplog.text
  assert "GaLore holds more state than Adam" in caplog.text


def test_missing_data_dir_is_a_clear_error(tmp_path):
  config = default.get_config()
  config.data.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match=r"config\.data\.data_dir=.*does not exist"):
    trainer.train_and_evaluate(config, tmp_path / "run")


def test_end_to_end_loss_decreases_and_outputs_are_written(data_dir, tmp_path, capsys):
  final = trainer.train_and_evaluate(tiny_config(data_dir, num_steps=12), tmp_path)
  records = trainer.load_metrics(tmp_path)
  losses = [r["loss"] for r in records if "loss" in r]
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert len(losses) == 12 and len(evals) == 3
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
  assert evals[-1] < evals[0]
  assert math.isclose(final["eval_perplexity"], math.exp(final["eval_loss"]))
  assert final["eval_perplexity"] < final["unigram_perplexity"] * 20
  assert (tmp_path / "loss.png").stat().st_size > 1000
  assert glob.glob(str(tmp_path / "tb" / "events.*"))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "8"]  # keep_checkpoints=2
  out = capsys.readouterr().out
  assert "optimizer        galore_adamw" in out and "AdamW would take" in out
  assert "unigram floor" in out and "done: 12 steps" in out


def _final_state(config, workdir):
  setup = trainer.build(config)
  like = trainer.init_state(setup, config.train.seed)
  from train.checkpoint import Checkpointer

  state, data_state = Checkpointer(Path(workdir) / "checkpoints").restore_latest(like)
  return state, data_state


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_resume_is_bit_identical(data_dir, tmp_path, grad_accum_steps):
  """N steps straight vs N/2, restart, N/2: same params, optimizer state (projectors), loss."""
  config = tiny_config(
    data_dir, num_steps=6, eval_every=100, checkpoint_every=100, grad_accum_steps=grad_accum_steps
  )
  straight = tmp_path / "straight"
  trainer.train_and_evaluate(config, straight)
  resumed = tmp_path / "resumed"
  config.train.stop_after_steps = 3  # an interrupted run ...
  trainer.train_and_evaluate(config, resumed)
  config.train.stop_after_steps = 0  # ... restarted from its checkpoint
  trainer.train_and_evaluate(config, resumed)

  (s1, d1), (s2, d2) = _final_state(config, straight), _final_state(config, resumed)
  assert int(s1.step) == int(s2.step) == 6
  assert d1 == d2
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  loss = lambda w: [r["loss"] for r in trainer.load_metrics(w) if "loss" in r][-3:]  # noqa: E731
  assert loss(straight) == loss(resumed)


# Train loss after each of 4 steps of `tiny_config` with the default seed (float32, CPU).
# If a change is *meant* to alter training numerics (model, data order, optimizer), rerun
#   pytest tests/test_train.py -k golden -s
# and paste the printed list here, saying why in the commit message.
GOLDEN_LOSSES = [10.3731, 10.37578, 10.27048, 10.18222]


def test_golden_metrics(data_dir, tmp_path):
  trainer.train_and_evaluate(tiny_config(data_dir, num_steps=4, eval_every=100), tmp_path)
  losses = [r["loss"] for r in trainer.load_metrics(tmp_path) if "loss" in r]
  print("\nGOLDEN_LOSSES =", [round(x, 5) for x in losses])
  assert GOLDEN_LOSSES is not None, "record GOLDEN_LOSSES (see the comment above)"
  # XLA's CPU kernels may reassociate sums differently across builds: 1e-4 relative.
  np.testing.assert_allclose(losses, GOLDEN_LOSSES, rtol=1e-4)


def test_non_finite_loss_stops_with_last_good_checkpoint_intact(data_dir, tmp_path):
  config = tiny_config(data_dir, num_steps=12, checkpoint_every=2, eval_every=100)
  config.optimizer.update(name="adamw", learning_rate=1e30, warmup_fraction=0.0)
  with pytest.raises(trainer.TrainingDiverged, match="non-finite .*last good checkpoint"):
    trainer.train_and_evaluate(config, tmp_path)
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  good = [
    r["step"] for r in trainer.load_metrics(tmp_path) if "loss" in r and math.isfinite(r["loss"])
  ]
  assert all(s <= max(good, default=0) for s in steps)


def test_fused_update_trains_like_the_standard_step(data_dir, tmp_path):
  """config.train.fused_update wires train/fused.py into the loop with the same numerics."""
  losses = {}
  for fused_update in (False, True):
    config = tiny_config(data_dir, num_steps=4, eval_every=100, fused_update=fused_update)
    config.optimizer.grad_clip_norm = 1.0
    workdir = tmp_path / str(fused_update)
    trainer.train_and_evaluate(config, workdir)
    losses[fused_update] = [r["loss"] for r in trainer.load_metrics(workdir) if "loss" in r]
  # The fused step recomputes each block (like remat): float32 reassociation only.
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_tokens_per_second_counts_non_pad_inputs_of_training_time_only(data_dir, tmp_path):
  """`tokens_per_second` = non-pad input tokens / training seconds (eval and saves excluded);
  `total_tokens_per_second` counts every input position, pad included."""
  config = tiny_config(data_dir, num_steps=4, eval_every=2, checkpoint_every=2)
  final = trainer.train_and_evaluate(config, tmp_path)
  it = data.make_train_iterator(
    data_dir,
    split=config.data.train_split,
    seq_len=config.data.seq_len,
    batch_size=config.train.batch_size,
    mode=config.data.mode,
    seed=config.data.seed,
  )
  rows = [next(it)["tokens"] for _ in range(4)]
  non_pad = sum(int(np.count_nonzero(r[:, :-1])) for r in rows)
  positions = 4 * config.train.batch_size * (config.data.seq_len - 1)
  assert non_pad < positions  # pad mode: the sample has short documents
  seconds = final["train_seconds"]
  np.testing.assert_allclose(final["tokens_per_second"] * seconds, non_pad, rtol=1e-9)
  np.testing.assert_allclose(final["total_tokens_per_second"] * seconds, positions, rtol=1e-9)
  assert seconds < final["wall_seconds"]  # two evals and two saves were left out
  logged = [r for r in trainer.load_metrics(tmp_path) if "tokens_per_second" in r]
  assert len(logged) == 4 and all(r["tokens_per_second"] > 0 for r in logged)


@pytest.mark.parametrize("inner", optim.INNER_OPTIMIZERS)
def test_galore_over_each_inner_optimizer_trains(data_dir, tmp_path, inner):
  """`optimizer.name=galore` with every inner optimizer the config accepts: the loss falls and
  the subspace was refreshed (update_proj_gap=3 over 8 steps)."""
  config = tiny_config(data_dir)
  config.optimizer.update(name="galore", inner=inner, learning_rate=1e-2 if inner != "sgd" else 0.3)
  final = trainer.train_and_evaluate(config, tmp_path / inner)
  records = trainer.load_metrics(tmp_path / inner)
  losses = [r["loss"] for r in records if "loss" in r]
  assert np.isfinite(final["eval_loss"]) and losses[-1] < losses[0], (inner, losses)


def test_galore_vocab_puts_galore_on_the_embedding_and_head():
  """`config.optimizer.galore_vocab`: the embedding and LM head get GaLore's projectors (on D)
  besides the attention and MLP kernels; for the GaLore optimizers only."""
  config = default.get_config()
  config.model.update(size="9m", hidden_dim=32, mlp_dim=64, num_heads=2, num_layers=2)
  config.optimizer.update(rank=8, galore_vocab=True)
  setup = trainer.build(config)
  _, params = nnx.split(nnx.eval_shape(lambda: Llama(setup.model_config, rngs=nnx.Rngs(0))))
  projectors = jax.eval_shape(setup.tx.init, params)[0].projectors[0]
  assert projectors["embed"]["embedding"].shape == (32, 8)
  assert projectors["lm_head"]["kernel"].shape == (32, 8)
  assert projectors["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 8)
  assert not jax.tree.leaves(projectors["final_norm"])  # a MaskedNode: not projected
  config.optimizer.name = "adamw"
  with pytest.raises(ValueError, match=r"config\.optimizer\.galore_vocab=True applies to the G"):
    trainer.build(config)


def test_galore_vocab_with_fused_vocab_chunks_trains_like_the_standard_step(data_dir, tmp_path):
  """GaLore on the embedding and head, the fused step by vocabulary chunks (its refresh from
  the chunks' Gram matrix, steps 1 and 4) against the standard step (SVD of whole gradients):
  the same losses up to float32 reassociation and eigh-vs-SVD rounding (`test_fused.py`)."""
  losses = {}
  for fused_update in (False, True):
    config = tiny_config(data_dir, num_steps=4, eval_every=100, fused_update=fused_update)
    config.optimizer.galore_vocab = True
    config.train.fused_vocab_chunk_size = 4096 if fused_update else 0
    workdir = tmp_path / str(fused_update)
    trainer.train_and_evaluate(config, workdir)
    losses[fused_update] = [r["loss"] for r in trainer.load_metrics(workdir) if "loss" in r]
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
