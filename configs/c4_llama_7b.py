"""LLaMA-7B on C4 with 8-bit GaLore and fused layer-wise updates (paper Table 3, Sec. 5.4).

Rank 1024, update_proj_gap 500, lr 0.005, clipping 1.0, 150k steps of 512 x 256 tokens.
"""

from configs.paper import paper_recipe


def get_config():
  """Returns the config."""
  c = paper_recipe(
    "7b",
    rank=1024,
    num_steps=150_000,
    grad_accum_steps=64,
    learning_rate=0.005,
    update_proj_gap=500,
    grad_clip_norm=1.0,
  )
  c.optimizer.name = "galore_adamw_8bit"
  c.optimizer.eps = 1e-8  # bitsandbytes' Adam default, as GaLoreAdamW8bit
  c.train.fused_update = True  # layer-wise updates: the full gradient is never held
  c.train.clip_in_subspace = True  # with accumulation the full-rank norm never exists
  return c
