"""LLaMA-60m: the paper's C4 recipe (rank 128, 10_000 steps, 512 x 256 tokens per step)."""

from configs.paper import paper_recipe


def get_config():
  """Returns the config."""
  return paper_recipe("60m", rank=128, num_steps=10_000, grad_accum_steps=2)
