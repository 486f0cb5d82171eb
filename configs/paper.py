"""The paper's C4 pre-training recipes (GaLore Table 2/3, scripts/benchmark_c4/*.sh).

Shared by `configs/c4_llama_*.py`. Point `--config.data.data_dir` at a tfds directory with the
full C4 prepared (`python -m train.prepare_data`); the default is the bundled sample, which is
far too small for these step counts.
"""

import ml_collections

from configs import default


def paper_recipe(
  size: str,
  rank: int,
  num_steps: int,
  grad_accum_steps: int,
  learning_rate: float = 0.01,
  update_proj_gap: int = 200,
  grad_clip_norm: float = 0.0,
) -> ml_collections.ConfigDict:
  """The default config turned into one of the paper's runs."""
  c = default.get_config()
  c.model.size = size
  c.model.dtype = "bfloat16"  # the paper's pure-bf16 training
  c.model.param_dtype = "bfloat16"
  c.optimizer.name = "galore_adamw"
  c.optimizer.learning_rate = learning_rate  # 0.01 (7b: 0.005), effective 0.0025 via scale
  c.optimizer.scale = 0.25
  c.optimizer.rank = rank
  c.optimizer.update_proj_gap = update_proj_gap
  c.optimizer.warmup_fraction = 0.1
  c.optimizer.min_lr_ratio = 0.1
  c.optimizer.grad_clip_norm = grad_clip_norm
  c.data.seq_len = 256
  c.train.batch_size = 512  # sequences per update: 131k tokens
  c.train.grad_accum_steps = grad_accum_steps  # micro-batch = the reference's per-GPU batch
  c.train.num_steps = num_steps
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.train.log_every = 10
  c.train.eval_batch_size = 64
  c.data.eval_max_documents = 0
  return c
