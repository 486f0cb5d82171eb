"""LLaMA-350m: the paper's C4 recipe (rank 256, 60_000 steps, 512 x 256 tokens per step)."""

from configs.paper import paper_recipe


def get_config():
  """Returns the config."""
  return paper_recipe("350m", rank=256, num_steps=60_000, grad_accum_steps=4)
