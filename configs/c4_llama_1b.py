"""LLaMA-1b: the paper's C4 recipe (rank 512, 100_000 steps, 512 x 256 tokens per step)."""

from configs.paper import paper_recipe


def get_config():
  """Returns the config."""
  return paper_recipe("1b", rank=512, num_steps=100_000, grad_accum_steps=32)
