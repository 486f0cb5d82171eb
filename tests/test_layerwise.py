"""galore_jax.layerwise on a model-free tree: leaf-by-leaf updates equal the whole-tree update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj
from galore_jax import layerwise as lw

N = 3  # layers in the stacked group
EPS32 = float(np.finfo(np.float32).eps)


def _group_of(names):
  return {"stack": "stack", "head": "head", "emb": "emb"}[names[0]]


def _tree(key, scale=1.0):
  k = jax.random.split(key, 4)
  return {
    "stack": {"attn": {"kernel": scale * jax.random.normal(k[0], (N, 8, 12))}},
    "head": {"bias": scale * jax.random.normal(k[1], (12,))},
    # Larger than a stacked matrix (96 entries): updated in row chunks.
    "emb": {"table": scale * jax.random.normal(k[2], (64, 8))},
  }


def _optimizers():
  mask = lambda p: gj.galore_mask_by_path(p, ("attn",))
  return {
    "galore_adamw": gj.galore_adamw(1e-2, rank=4, update_proj_gap=2, mask=mask, weight_decay=0.1),
    "galore_adamw_8bit": gj.galore_adamw_8bit(
      1e-2, rank=4, update_proj_gap=2, mask=mask, block_size=16, min_8bit_size=16
    ),
    "adamw": optax.adamw(1e-2, weight_decay=0.1),
  }


@pytest.mark.parametrize("name", list(_optimizers()))
def test_leafwise_update_equals_the_whole_tree_update(name):
  tx = _optimizers()[name]
  params = _tree(jax.random.key(0))
  layout = lw.TreeLayout(params, _group_of, "stack")
  assert layout.num_layers == N and len(layout.index) == 3
  state = tx.init(params)
  whole = jax.jit(
    lambda g, p, s: (optax.apply_updates(p, tx.update(g, s, p)[0]), tx.update(g, s, p)[1])
  )
  leafwise = jax.jit(lambda g, p, s: lw.leafwise_update(tx, layout, g, p, s))
  for step in range(3):  # steps 0 and 2 refresh GaLore's subspace (update_proj_gap=2)
    grads = _tree(jax.random.key(10 + step), scale=3.0)
    expected, got = whole(grads, params, state), leafwise(grads, params, state)
    for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(got)
    ):
      a, b = np.asarray(a), np.asarray(b)
      if not np.issubdtype(a.dtype, np.floating):
        # Counts exact; 8-bit codes: the same float32 moments quantised (equal or adjacent code
        # where an element-wise op was fused differently and the value sits on a midpoint).
        assert np.abs(a.astype(np.int64) - b.astype(np.int64)).max() <= 1, path
        continue
      # The same element-wise float32 arithmetic per leaf; XLA may contract it differently in
      # the two programs (FMA), so allow 8 ulps of the operands' magnitude.
      tol = 8 * EPS32 * (np.abs(a) + 1.0)
      assert np.all(np.abs(a - b) <= tol), jax.tree_util.keystr(path)
    params, state = expected


def test_update_layer_writes_only_its_layer():
  tx = optax.adam(1e-1)
  params = _tree(jax.random.key(1))
  layout = lw.TreeLayout(params, _group_of, "stack")
  state = tx.init(params)
  view = lw.StateView(state, layout)
  nodes = view.split(state, layout.treedef)[0]
  opt = lw.LeafwiseOptimizer(tx, layout, view, lw.plan_chunks(layout, nodes, view.projectors))
  _, _, shared, grp = lw.unpack(opt, params, state)
  stacked = grp["stack"]
  g = [jnp.ones((1, 8, 12))]
  p_1 = lw._chunk(stacked.params, 1, N)
  new = lw.update_layer(opt, 1, [0], g, p_1, stacked, shared)
  before, after = np.asarray(stacked.params[0]), np.asarray(new.params[0])
  np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
  assert np.all(after[1] != before[1])
  # Layer 1 as the whole-tree update computes it (the other layers' zero gradients move nothing).
  grads = jax.tree.map(jnp.zeros_like, params)
  grads["stack"]["attn"]["kernel"] = grads["stack"]["attn"]["kernel"].at[1].set(1.0)
  expected = optax.apply_updates(params, tx.update(grads, state, params)[0])
  want = np.asarray(expected["stack"]["attn"]["kernel"][1])
  assert np.all(np.abs(after[1] - want) <= 8 * EPS32 * (np.abs(want) + 1.0))


def test_large_leaves_are_chunked_along_rows():
  params = _tree(jax.random.key(2))
  layout = lw.TreeLayout(params, _group_of, "stack")
  tx = optax.adam(1e-2)
  state = tx.init(params)
  view = lw.StateView(state, layout)
  chunks = lw.plan_chunks(layout, view.split(state, layout.treedef)[0], view.projectors)
  emb = layout.index["emb"][0]
  # 512 entries, largest stacked matrix 96: ceil(512 / 96) = 6 rows-chunks needed; 8 divides 64.
  assert chunks == {emb: 8}


def test_check_separable_rejects_a_global_norm_clip():
  layout = lw.TreeLayout(_tree(jax.random.key(3)), _group_of, "stack")
  lw.check_separable(optax.adamw(1e-2), layout)
  with pytest.raises(ValueError, match="not separable"):
    lw.check_separable(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)), layout)


def test_stacked_group_must_agree_on_the_layer_count():
  params = _tree(jax.random.key(4))
  params["stack"]["mlp"] = {"kernel": jnp.zeros((N + 1, 8, 12))}
  with pytest.raises(ValueError, match="disagree on N"):
    lw.TreeLayout(params, _group_of, "stack")
