"""Candidate trees for speculative decoding (Medusa, Cai et al. 2024, sec. 2.1.2 and fig. 2).

A tree is a list of paths; path (r_1, ..., r_d) is the candidate whose token at depth k is the
r_k-th most likely choice of draft head k (for Medusa, head k predicts token t+k+1). The root
(depth 0, the empty path) is the base model's own next token. Nodes are flattened in Medusa's
order, by depth and then path; node i attends to the cached prefix and, inside the tree, to its
ancestors and itself (`mask_TT`), at position prefix_len + depth.

Letters: T tree nodes, M draft depth (heads), J candidates kept per head (top-J), P root-to-leaf
paths, A = M + 1 tokens on the longest path.
"""
from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

# Medusa's default sparse tree for Vicuna-7B (`mc_sim_7b_63` in FasterDecoding/Medusa,
# medusa/model/medusa_choices.py): 63 candidates over 4 heads, top-10 each.
MEDUSA_63 = ((0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,),
             (0, 4), (2, 0), (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1),
             (7,), (0, 8), (0, 0, 2), (3, 0), (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2),
             (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1), (0, 0, 6),
             (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0),
             (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5),
             (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0))


@dataclasses.dataclass(frozen=True, eq=False)
class Tree:
  """Static arrays of one candidate tree (NumPy, so jit sees them as constants).

  paths: the sorted paths, node i + 1 is paths[i] (node 0 is the root).
  parent_T: parent node (-1 for the root). depth_T: 0 for the root. rank_T: the node's choice
  among its head's top-J (0 for the root). mask_TT: mask_TT[i, j] = node j is node i or one of
  its ancestors. retrieve_PA: for every leaf, the nodes from the root down to it, padded with 0
  where valid_PA is False.
  Equality and hash are those of `paths`, so a Tree can be a static argument of jit.
  """
  paths: tuple[tuple[int, ...], ...]
  parent_T: np.ndarray
  depth_T: np.ndarray
  rank_T: np.ndarray
  mask_TT: np.ndarray
  retrieve_PA: np.ndarray
  valid_PA: np.ndarray

  @property
  def size(self) -> int:
    return len(self.parent_T)

  @property
  def depth(self) -> int:
    return int(self.depth_T.max())

  @property
  def width(self) -> int:
    return int(self.rank_T.max()) + 1

  def __eq__(self, other):
    return isinstance(other, Tree) and self.paths == other.paths

  def __hash__(self):
    return hash(self.paths)


def ancestor_mask(parent_T: np.ndarray) -> np.ndarray:
  """mask_TT[i, j] = j is i or an ancestor of i, from parents listed before their children."""
  T = len(parent_T)
  mask_TT = np.eye(T, dtype=bool)
  for i in range(1, T):
    mask_TT[i] |= mask_TT[parent_T[i]]
  return mask_TT


def build(paths) -> Tree:
  """A Tree from candidate paths (tuples of non-negative ranks). Every prefix of a path must be
  a path too, as in Medusa's choice lists."""
  paths = [tuple(int(r) for r in p) for p in paths]
  if not paths:
    raise ValueError('paths=[]; expected at least one candidate path')
  for p in paths:
    if not p or min(p) < 0:
      raise ValueError(f'path {p}; expected a non-empty tuple of non-negative ranks')
  if len(set(paths)) != len(paths):
    raise ValueError(f'paths {paths} repeat a path; expected each path once')
  known = set(paths)
  for p in paths:
    if len(p) > 1 and p[:-1] not in known:
      raise ValueError(f'path {p} lacks its prefix {p[:-1]}; expected a prefix-closed tree')
  paths = sorted(paths, key=lambda p: (len(p), p))
  index = {(): 0} | {p: i + 1 for i, p in enumerate(paths)}
  parent_T = np.array([-1] + [index[p[:-1]] for p in paths], np.int32)
  depth_T = np.array([0] + [len(p) for p in paths], np.int32)
  rank_T = np.array([0] + [p[-1] for p in paths], np.int32)
  leaves = [p for p in [()] + paths if not any(q[:len(p)] == p and q != p for q in paths)]
  A = int(depth_T.max()) + 1
  retrieve_PA = np.zeros((len(leaves), A), np.int32)
  valid_PA = np.zeros((len(leaves), A), bool)
  for row, leaf in enumerate(leaves):
    chain = [index[leaf[:d]] for d in range(len(leaf) + 1)]
    retrieve_PA[row, :len(chain)] = chain
    valid_PA[row, :len(chain)] = True
  return Tree(tuple(paths), parent_T, depth_T, rank_T, ancestor_mask(parent_T), retrieve_PA,
              valid_PA)


def cartesian(widths) -> Tree:
  """The full tree of the top-widths[k] choices of head k at every depth (all prefixes of the
  Cartesian product): prod(widths[:d]) nodes at depth d. cartesian((1,) * M) is a chain."""
  widths = tuple(int(w) for w in widths)
  if not widths or min(widths) < 1:
    raise ValueError(f'widths={widths}; expected a non-empty tuple of positive integers')
  return build(p for d in range(1, len(widths) + 1)
               for p in itertools.product(*(range(w) for w in widths[:d])))


def tokens(tree: Tree, root_B: jax.Array, top_BMJ: jax.Array) -> jax.Array:
  """tokens_BT of the flattened tree: the root, then node i's token top_BMJ[:, depth-1, rank]."""
  head_T = np.maximum(tree.depth_T - 1, 0)
  picked_BT = top_BMJ[:, head_T, tree.rank_T]
  return jnp.where(jnp.asarray(tree.depth_T == 0)[None], root_B[:, None], picked_BT)


def positions(tree: Tree, length, batch: int) -> jax.Array:
  """positions_BT = length + depth (the prefix holds positions 0..length-1)."""
  return jnp.broadcast_to(length + jnp.asarray(tree.depth_T), (batch, tree.size))
