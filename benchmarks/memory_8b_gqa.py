"""LLaMA-3-8B shapes (GQA 32/8 heads, vocab 128,256), bf16: parameter and optimizer-state bytes from
shapes alone (jax.eval_shape; nothing allocated). Analytic, not compiled memory (see the report).

  python -m benchmarks.memory_8b_gqa
"""

import jax
from flax import nnx

from configs import default
from train import optim
from train.model import Llama, count_params, llama_config

cfg = llama_config("llama3-8b", dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)
_, params = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))), nnx.Param)
pb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
print("params", count_params(cfg), f"{pb / 2**30:.2f} GiB bf16")
for name in ("adamw", "galore_adamw", "galore_adamw_8bit", "adamw_8bit"):
  c = default.get_config()
  c.optimizer.name = name
  c.optimizer.rank = 1024
  tx = optim.make_optimizer(c.optimizer, c.train.num_steps)
  st = jax.eval_shape(tx.init, params)
  sb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(st))
  print(
    f"{name:20s} state {sb / 2**30:.2f} GiB; params+state {(pb + sb) / 2**30:.2f} GiB; "
    f"+ full bf16 grads {(2 * pb + sb) / 2**30:.2f} GiB"
  )
