"""A tiny DeepSeek-V3 config and random parameters shared by the DeepSeek tests."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lab.models import deepseek
from lab.nn import param_spec as ps

# All widths differ, so a swapped axis cannot go unnoticed.
TINY = dict(name='deepseek', vocab_size=23, vocab_multiple=1, d_model=16, n_layers=3,
            first_dense_layers=1, n_heads=2, q_lora_rank=8, kv_lora_rank=6, qk_nope_dim=4,
            qk_rope_dim=4, v_head_dim=5, d_ff=24, d_ff_expert=6, n_routed_experts=8,
            n_shared_experts=1, top_k=2, n_groups=4, top_k_groups=2, routed_scaling_factor=2.5,
            bias_update_speed=0.01, balance_alpha=0.1, mtp_depth=2, mtp_lambda=0.3,
            rope_theta=100.0, norm_eps=1e-6, max_len=16, fp8=False, attention_backend='auto',
            moe_dispatch='dense', moe_capacity_factor=1.25, init_std=0.3)


def make_cfg(**updates):
  return ml_collections.FrozenConfigDict(TINY | updates)


def make_params(cfg, seed=0):
  """Random float32 params of the specs' shapes (drawn in NumPy: quicker than compiling
  ps.init): weights with std init_std, norm scales around 1 so that a swapped norm shows."""
  rng = np.random.default_rng(seed)
  def draw(path, spec):
    if 'norm' in jax.tree_util.keystr(path):
      return jnp.asarray(1.0 + 0.2 * rng.standard_normal(spec.shape), jnp.float32)
    return jnp.asarray(cfg.init_std * rng.standard_normal(spec.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, deepseek.param_specs(cfg), is_leaf=ps.is_spec)


def draw_tokens(seed, shape, V=TINY['vocab_size']):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)
