"""Path-based masks: which leaves GaLore projects, which keep float32 8-bit states."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def resolve_tree(tree_or_fn, params):
  """`tree_or_fn(params)` for a callable (a mask or dimension-number function), else itself."""
  return tree_or_fn(params) if callable(tree_or_fn) else tree_or_fn


def path_names(path) -> tuple:
  """The names along a `jax.tree_util` key path (or an nnx path): keys, attributes, indices.

  A trailing `"value"` (the field of an `nnx.Variable`) is dropped, so a tree of Variables and
  the tree of their arrays name each leaf alike.
  """
  names = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
  return names[:-1] if names and names[-1] == "value" else names


def galore_mask_by_path(params: optax.Params, patterns: tuple[str, ...] = ("attn", "mlp")) -> Any:
  """True for leaves with ndim >= 2 whose `/`-joined key path contains any of `patterns`.

  This is the reference's rule (`"attn" in name or "mlp" in name` over module names).
  """

  def keep(path, leaf):
    name = "/".join(map(str, path_names(path)))
    return jnp.ndim(leaf) >= 2 and any(pat in name for pat in patterns)

  return jax.tree_util.tree_map_with_path(keep, params)


def llama_galore_mask(params: optax.Params) -> Any:
  """The paper's targets: attention and MLP kernels of the LLaMA (paths containing attn/mlp)."""
  return galore_mask_by_path(params, ("attn", "mlp"))


def llama_vocab_mask(params: optax.Params) -> Any:
  """True for the vocabulary-sized leaves of the LLaMA (token embedding and output head).

  For `float32_mask`: bitsandbytes advises 32-bit optimizer states for embeddings (its
  `StableEmbedding`), whose rows of tokens absent from a batch get zero gradients.
  """
  return galore_mask_by_path(params, ("embed", "lm_head"))


def leaf_entries(tree, treedef) -> list:
  """The array (or `MaskedNode`) at each parameter position of a state tree, with any wrapper
  a framework put around it (an `nnx.Variable` when the state was built from a tree of
  Variables but is read with the tree of their arrays) removed."""
  out = []
  for x in treedef.flatten_up_to(tree):
    leaves = jax.tree.leaves(x)
    out.append(leaves[0] if len(leaves) == 1 else optax.MaskedNode() if not leaves else x)
  return out
