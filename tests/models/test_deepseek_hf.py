"""A tiny random-weight transformers DeepseekV3ForCausalLM (torch, CPU, float64) loaded through
lab.models.deepseek_hf gives the same logits in float32: MLA with query compression and
interleaved RoPE, a dense first layer, group-limited sigmoid routing with a random correction
bias (our routing state), shared experts and the untied head."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lab.models import deepseek, deepseek_hf
from lab.nn import param_spec as ps

V = 37


def hf_model():
  import torch
  import transformers
  config = transformers.DeepseekV3Config(
      vocab_size=V, hidden_size=24, intermediate_size=40, moe_intermediate_size=12,
      num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=3,
      num_key_value_heads=3, q_lora_rank=14, kv_lora_rank=10, qk_nope_head_dim=5,
      qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8, n_shared_experts=1,
      num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5,
      rope_theta=100.0, max_position_embeddings=64, attn_implementation='eager')
  config._experts_implementation = 'eager'
  torch.manual_seed(0)
  model = transformers.DeepseekV3ForCausalLM(config).double().eval()
  with torch.no_grad():  # HF inits norms to 1 and the routing bias to 0: draw every tensor
    for name, w in model.state_dict().items():
      if 'norm' in name:
        w.copy_(1.0 + 0.3 * torch.randn_like(w))
      elif 'bias' in name:
        w.copy_(0.1 * torch.randn_like(w))
      else:
        w.copy_(torch.randn_like(w) * w.shape[-1] ** -0.5)
  return config, model


def test_matches_transformers_deepseek_v3_logits():
  import torch
  config, model = hf_model()
  hf = config.to_dict()
  cfg = ml_collections.FrozenConfigDict(deepseek_hf.config_from_hf(hf))
  deepseek.validate(cfg)
  assert (cfg.first_dense_layers, cfg.n_groups, cfg.top_k_groups, cfg.mtp_depth) == (1, 4, 2, 0)
  params, state = deepseek_hf.params_from_hf(hf, {k: v.numpy()
                                                  for k, v in model.state_dict().items()})
  want_shapes = jax.tree.map(lambda s: s.shape, deepseek.param_specs(cfg), is_leaf=ps.is_spec)
  assert jax.tree.map(np.shape, params) == want_shapes
  assert state['blocks'].shape == (2, 8) and np.abs(state['blocks']).min() > 0

  tokens_BT = np.random.default_rng(0).integers(0, V, (2, 9))
  with torch.no_grad():
    want_BTV = model(torch.tensor(tokens_BT)).logits.numpy()
  f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  got_BTV = jax.jit(deepseek.forward, static_argnums=0)(cfg, f32(params), f32(state),
                                                        jnp.asarray(tokens_BT, jnp.int32))
  np.testing.assert_allclose(got_BTV, want_BTV, rtol=1e-4, atol=1e-4 * np.abs(want_BTV).max())


@pytest.mark.parametrize('field, value, match', [
    ('tie_word_embeddings', True, 'tie_word_embeddings=True'),
    ('norm_topk_prob', False, 'norm_topk_prob=False'),
    ('hidden_act', 'gelu', "hidden_act='gelu'"),
])
def test_unsupported_hf_configs_are_refused(field, value, match):
  hf = dict(vocab_size=8, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
            kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2,
            intermediate_size=8, moe_intermediate_size=4, n_routed_experts=4,
            n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
            routed_scaling_factor=1.0, rope_theta=1e4)
  with pytest.raises(ValueError, match=match):
    deepseek_hf.config_from_hf(hf | {field: value})


def test_unknown_tensors_are_refused():
  config, model = hf_model()
  tensors = {k: v.numpy() for k, v in model.state_dict().items()}
  tensors['model.layers.3.eh_proj.weight'] = np.zeros((24, 48))  # an MTP layer of the release
  with pytest.raises(ValueError, match='eh_proj'):
    deepseek_hf.params_from_hf(config.to_dict(), tensors)
