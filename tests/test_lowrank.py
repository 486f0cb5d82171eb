"""The paper's low-rank baselines (train/lowrank.py) and AdamW's per-group learning rate."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import _final_state, tiny_config

import galore_jax as gj
from train import lowrank, optim, trainer
from train.model import count_params, is_galore_target


def _config(name: str, data_dir: str = "", **train):
  c = tiny_config(data_dir, **train)
  c.optimizer.update(name=name, rank=4, lora_alpha=8.0, relora_reset_every=3)
  c.optimizer.relora_restart_warmup = 2
  return c


def _tokens(seed: int = 0):
  return jax.random.randint(jax.random.PRNGKey(seed), (2, 16), 1, 500)


def _logits(setup, params, tokens):
  """The trainer's forward pass, jitted with the kernels materialised inside (as in training)."""
  return jax.jit(lambda p, t: nnx.merge(setup.graphdef, setup.model_params(p))(t))(params, tokens)


def _targets(tree):
  """{path: linear dict} of the adapted linears of a tree."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = tuple(k.key for k in path)
    if names[-1] in lowrank.FACTORS:
      flat.setdefault(names[:-1], {})[names[-1]] = leaf
  return flat


@pytest.mark.parametrize("scan_layers", [True, False])
def test_lora_at_init_is_the_base_model_exactly(scan_layers):
  config = _config("lora")
  config.model.scan_layers = scan_layers
  setup = trainer.build(config)
  state = trainer.init_state(setup, seed=0)
  base_config = _config("adamw")
  base_config.model.scan_layers = scan_layers
  base = trainer.init_state(trainer.build(base_config), seed=0)
  # b = 0 makes W + s (a @ 0) = W + 0 = W bit for bit: the same kernels and the same logits.
  for a, b in zip(
    jax.tree.leaves(setup.model_params(state.params)),
    jax.tree.leaves(nnx.to_pure_dict(base.params)),
  ):
    np.testing.assert_array_equal(a, b)
  tokens = _tokens()
  plain = jax.jit(lambda p, t: nnx.merge(setup.graphdef, p)(t))(base.params, tokens)
  np.testing.assert_array_equal(_logits(setup, state.params, tokens), plain)
  assert len(_targets(state.params)) == (1 if scan_layers else 2) * 7  # q k v o gate up down


@pytest.mark.parametrize("name", ["lora", "relora", "low_rank"])
def test_trainable_params_and_state_bytes_equal_their_formulas(name):
  config = _config(name)
  setup = trainer.build(config)
  abstract = jax.eval_shape(lambda: trainer.init_state(setup, 0))
  m = setup.model_config
  n, d, f, r = m.num_layers, m.hidden_dim, m.mlp_dim, config.optimizer.rank
  counts = count_params(m)
  factors = n * r * (4 * (d + d) + 2 * (d + f) + (f + d))  # q k v o: D x D; gate, up: D x F
  got = lowrank.count(abstract.params)
  assert got["trainable"] == counts["other"] + factors
  assert got["frozen"] == (0 if name == "low_rank" else counts["galore_target"])
  assert got["weight_bytes"] == 4 * (got["trainable"] + got["frozen"])  # float32
  # AdamW's two float32 moments per trainable entry plus three int32 counters (Adam's, the lr
  # schedule's, the decay's), as the full-rank AdamW; the frozen kernels (set_to_zero) hold nothing.
  b = gj.memory.state_bytes(setup.tx, abstract.params)
  full = gj.memory.state_bytes(
    trainer.build(_config("adamw")).tx, jax.eval_shape(setup.model_params, abstract.params)
  )
  assert b.moments == 2 * 4 * got["trainable"] and b.other == full.other == 3 * 4
  assert full.moments == 2 * 4 * counts["total"] and b.projectors == 0


def test_relora_merge_changes_no_logits_and_resets_factor_moments():
  setup = trainer.build(_config("relora"))
  state = trainer.init_state(setup, seed=0)
  step = jax.jit(trainer.make_train_step(setup, 1))
  batch = {"tokens": jax.random.randint(jax.random.PRNGKey(1), (4, 64), 1, 500)}
  tokens = _tokens()
  for _ in range(2):  # steps 1, 2: no merge yet; the factors and their moments move
    state, _ = step(state, batch)
  before = state
  # What the third step's merge does, applied to the state after 2 steps: a merge alone.
  merged = jax.jit(setup.adapter.merge)(before.params, jax.random.PRNGKey(7))
  assert all(np.any(t["lora_b"] != 0) for t in _targets(before.params).values())
  # W' = W + s a b is the very expression the forward pass uses, and then b = 0 adds exactly 0.
  np.testing.assert_array_equal(
    _logits(setup, merged, tokens), _logits(setup, before.params, tokens)
  )
  state, _ = step(state, batch)  # step 3: update, then merge + reset (reset_every = 3)
  for t in _targets(state.params).values():
    np.testing.assert_array_equal(t["lora_b"], 0)
  for t, t0 in zip(_targets(state.params).values(), _targets(before.params).values()):
    assert np.all(t["lora_a"] != t0["lora_a"])  # drawn afresh
  moments = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
  names = lambda path: {getattr(k, "key", None) for k in path}  # noqa: E731
  factor = [x for p, x in moments if names(p) & set(lowrank.FACTORS)]
  other = [x for p, x in moments if x.ndim and not names(p) & set(lowrank.FACTORS)]
  assert len(factor) == 2 * 2 * 7  # mu and nu of a and b of 7 stacked linears
  assert all(np.all(np.asarray(x) == 0) for x in factor)
  assert all(np.any(np.asarray(x) != 0) for x in other)  # embedding, head, norms keep theirs
  # The frozen kernels moved only by the merges (step 3's): W + s a b of step 3's factors.
  kernels = lambda tree: [  # noqa: E731
    x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if is_galore_target(p)
  ]
  for k0, k1 in zip(kernels(before.params), kernels(state.params)):
    assert np.any(k0 != k1)


def test_relora_schedule_restarts_from_zero_with_a_warmup():
  config = _config("relora", num_steps=12)
  lora = _config("lora", num_steps=12)
  base = optim.make_schedule(lora.optimizer, lora.train.num_steps)
  jagged = optim.make_schedule(config.optimizer, config.train.num_steps)
  every, warmup = config.optimizer.relora_reset_every, config.optimizer.relora_restart_warmup
  for s in range(12):
    since = s % every
    factor = since / warmup if s >= every and since < warmup else 1.0
    # A product of float32 values by 0, 1/2 or 1: exact (halving only changes the exponent).
    assert float(jagged(s)) == np.float32(float(base(s)) * factor), s
  assert float(jagged(every)) == 0.0 < float(jagged(every - 1))


def test_adamw_target_lr_scale_scales_only_the_attention_mlp_updates():
  setups = {}
  for scale in (1.0, 0.0625):
    config = _config("adamw")
    config.optimizer.update(target_lr_scale=scale, weight_decay=0.1)
    setups[scale] = trainer.build(config)
  state = trainer.init_state(setups[1.0], seed=0)
  grads = jax.tree.map(lambda p: jnp.cos(p * 100.0), state.params)
  out = {}
  for scale, setup in setups.items():
    opt_state = setup.tx.init(state.params)
    for _ in range(3):  # past lr(0) = 0 of the warmup
      out[scale], opt_state = jax.jit(setup.tx.update)(grads, opt_state, state.params)
  mask = jax.tree.leaves(gj.llama_galore_mask(state.params))
  # 0.0625 = 2^-4: scaling a float32 by it is exact (no underflow at these magnitudes), so the
  # targets' updates (Adam step and decoupled decay alike) are exactly 1/16 of the one-lr ones.
  for m, u1, u2 in zip(mask, jax.tree.leaves(out[1.0]), jax.tree.leaves(out[0.0625])):
    np.testing.assert_array_equal(u2, u1 * 0.0625 if m else u1)
  assert any(mask) and not all(mask)
  # At 1.0 the optimizer (and so its state and checkpoints) is the one-lr AdamW's, unchanged.
  c = _config("adamw")
  plain = optim.adamw(optim.make_schedule(c.optimizer, c.train.num_steps), c.optimizer)
  assert jax.tree.structure(setups[1.0].tx.init(state.params)) == jax.tree.structure(
    plain.init(state.params)
  )


@pytest.mark.parametrize("name", ["relora"])  # lora/low_rank: the same tree and state, no merges
def test_resume_is_bit_identical(data_dir, tmp_path, name):
  """7 steps straight vs 4 + restart + 3; relora merges at 3 and 6 (one on each side)."""
  config = _config(name, data_dir, num_steps=7, eval_every=100, checkpoint_every=100)
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  trainer.train_and_evaluate(config, straight)
  config.train.stop_after_steps = 4
  trainer.train_and_evaluate(config, resumed)
  config.train.stop_after_steps = 0
  trainer.train_and_evaluate(config, resumed)
  (s1, d1), (s2, d2) = _final_state(config, straight), _final_state(config, resumed)
  assert int(s1.step) == int(s2.step) == 7 and d1 == d2
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  records = trainer.load_metrics(straight)
  losses = [r["loss"] for r in records if "loss" in r]
  assert losses[-1] < losses[0]  # it trains
  if name == "relora":
    lrs = [r["learning_rate"] for r in records if "learning_rate" in r]
    assert lrs[3] == lrs[6] == 0.0  # steps 4 and 7 (counts 3 and 6): restarted
  loss = lambda w: [r["loss"] for r in trainer.load_metrics(w) if "loss" in r][-3:]  # noqa: E731
  assert loss(straight) == loss(resumed)
  assert Path(straight / "checkpoints" / "7").is_dir()


@pytest.mark.parametrize(
  "name, field, value, match, extra",
  [
    ("lora", "lora_alpha", 0.0, r"config\.optimizer\.lora_alpha=0\.0 must be a number > 0", {}),
    ("low_rank", "rank", 33, r"config\.optimizer\.rank=33 must be an int in \[1, 32\]", {}),
    ("relora", "relora_reset_every", 0, r"relora_reset_every=0 must be an int >= 1", {}),
    ("relora", "relora_restart_warmup", 4, r"relora_restart_warmup=4 must be an int in \[0, 3\]",
     {"relora_reset_every": 3}),
    ("adamw", "target_lr_scale", 0.0, r"target_lr_scale=0\.0 must be a number in \(0, inf\)", {}),
    ("galore_adamw", "target_lr_scale", 0.5, r"target_lr_scale=0\.5 applies to .*'adamw' only",
     {}),
  ],
)  # fmt: skip
def test_config_errors_name_the_field(name, field, value, match, extra):
  config = _config(name)
  config.optimizer.update(**{field: value, **extra})
  with pytest.raises(ValueError, match=match):
    trainer.build(config)


def test_adapters_reject_the_fused_update():
  config = _config("lora", fused_update=True)
  with pytest.raises(ValueError, match=r"config\.optimizer\.name='lora' does not run with .*fused"):
    trainer.build(config)


def test_quality_benchmark_run_specs_name_the_same_runs_as_its_sweep():
  """`benchmarks.quality --run=` fills in exactly the run a sweep or grid extension would write."""
  from benchmarks import quality  # noqa: PLC0415

  assert quality.parse_run("lora:0.003") == ("lora", {"optimizer.learning_rate": 0.003}, 0)
  method, sweep, seed = quality.parse_run("adamw_group:0.03125:1")
  assert (method, sweep, seed) == ("adamw_group", {"optimizer.target_lr_scale": 0.03125}, 1)
  grid = [{"method": "lora", "seed": 0, "sweep": s, "eval_perplexity": p}
          for s, p in zip(quality.METHODS["lora"][2], (900.0, 1000.0, 1100.0))]  # fmt: skip
  extension = quality.extension(grid, "lora")  # best at the low end: one step below it
  assert extension == {"optimizer.learning_rate": pytest.approx(0.003 * 0.003 / 0.01)}
  by_hand = quality.parse_run(f"lora:{extension['optimizer.learning_rate']!r}")[1]
  assert quality.run_name("lora", by_hand, 0) == quality.run_name("lora", extension, 0)
  for bad in ("lora", "sgd:0.1", "lora:fast", "lora:0.1:one", "lora:0.1:1:2"):
    with pytest.raises(SystemExit, match="--run="):
      quality.parse_run(bad)
