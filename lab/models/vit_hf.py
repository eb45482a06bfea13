"""Hugging Face interop for `lab.models.vit`: transformers' ViTModel / ViTForImageClassification
configs and weights (Dosovitskiy et al. 2021, arXiv:2010.11929; HF's port of google/vit-*).

Our blocks are stacked on a leading layer axis L; HF keeps one tensor per layer (nn.Linear stores
[out, in], so matrices are transposed; heads are flattened head-major, index n * H + h). Keys, with
the prefix 'vit.' in ViTForImageClassification:
  embeddings.cls_token [1, 1, D] = cls     embeddings.position_embeddings [1, 1 + P, D] = pos_embed
  embeddings.patch_embeddings.projection.weight [D, C, p, p] = patch.w_XYCO.transpose(3, 2, 0, 1)
  embeddings.patch_embeddings.projection.bias = patch.b
  layers.i.layernorm_before / layernorm_after {weight, bias} = attn_norm / mlp_norm {scale, bias}
  layers.i.attention.{q,k,v}_proj {weight [NH, D], bias [NH]} = wq / wk / wv, bq / bk / bv
  layers.i.attention.o_proj {weight [D, NH], bias} = wo, bo
  layers.i.mlp.fc1 {weight [F, D], bias} = w_in, b_in;  layers.i.mlp.fc2 {weight [D, F], bias}
  = w_out, b_out
  layernorm {weight, bias} = final_norm;  classifier {weight [V, D], bias} = head (cls pooling)
HF's pooler (dense + tanh on the class token) is not part of our model and is ignored. HF ViT's
dropout sits after attention, after the MLP and on the embeddings; ours adds one after the MLP's
activation (ViT appendix B.1), so only evaluation matches exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lab.models import vit

_ACTIVATIONS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
                'quick_gelu': 'quick_gelu'}
_DEFAULTS = {'hidden_act': 'gelu', 'layer_norm_eps': 1e-12, 'hidden_dropout_prob': 0.0,
             'attention_probs_dropout_prob': 0.0, 'qkv_bias': True, 'num_channels': 3}
_PREFIX = 'vit.'
_IGNORED = ('pooler.',)


def config_from_hf(hf_config: dict, *, num_classes: int = 0) -> ml_collections.ConfigDict:
  """The vit model config of an HF ViT config dict (as in config.json); unsupported settings are
  errors. num_classes: 0 for ViTModel, the number of labels for ViTForImageClassification."""
  if hf_config.get('model_type') != 'vit':
    raise ValueError(f'model_type={hf_config.get("model_type")!r}; expected \'vit\'')
  hf = _DEFAULTS | hf_config
  if hf['hidden_act'] not in _ACTIVATIONS:
    raise ValueError(f'HF config hidden_act={hf["hidden_act"]!r}; expected one of '
                     f'{tuple(_ACTIVATIONS)}')
  if not hf['qkv_bias']:
    raise ValueError('HF config qkv_bias=False is not supported; expected True')
  if hf['attention_probs_dropout_prob']:
    raise ValueError(f'HF config attention_probs_dropout_prob='
                     f'{hf["attention_probs_dropout_prob"]}; expected 0.0 (flash attention has '
                     'no dropout on the attention weights)')
  size, patch = hf['image_size'], hf['patch_size']
  for name, value in (('image_size', size), ('patch_size', patch)):
    if not isinstance(value, int):
      raise ValueError(f'HF config {name}={value!r}; expected one int (square images)')
  cfg = ml_collections.ConfigDict(dict(
      image_size=size, patch_size=patch, channels=hf['num_channels'], d_model=hf['hidden_size'],
      n_layers=hf['num_hidden_layers'], n_heads=hf['num_attention_heads'],
      mlp_dim=hf['intermediate_size'], pooling='cls', class_token=True, pos_embed='learned',
      num_classes=num_classes, attention_backend='auto',
      mlp_activation=_ACTIVATIONS[hf['hidden_act']], norm_eps=float(hf['layer_norm_eps']),
      dropout=float(hf['hidden_dropout_prob']), drop_path=0.0))
  vit.validate(cfg)
  return cfg


def _linear_in_out(w_LOI: np.ndarray) -> np.ndarray:
  return w_LOI.swapaxes(1, 2)


def params_from_hf(cfg, state_dict) -> dict:
  """Our params (float32 jnp) from an HF ViT state dict ({name: numpy array}); every
  parameter key must be present with its expected shape and none may be left over."""
  sd = {k.removeprefix(_PREFIX): np.asarray(v, np.float32) for k, v in state_dict.items()
        if not k.removeprefix(_PREFIX).startswith(_IGNORED)}
  L, D, N, C, p = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.channels, cfg.patch_size
  H, T = D // N, 1 + vit.grid(cfg) ** 2
  used = set()

  def take(name, shape):
    if name not in sd:
      raise ValueError(f'HF ViT state dict lacks {name!r}')
    if sd[name].shape != shape:
      raise ValueError(f'HF ViT state dict {name} has shape {sd[name].shape}; expected {shape}')
    used.add(name)
    return sd[name]

  def layers(name, shape):
    return np.stack([take(f'layers.{i}.{name}', shape) for i in range(L)])

  def norm(prefix):
    return {'scale': layers(f'{prefix}.weight', (D,)), 'bias': layers(f'{prefix}.bias', (D,))}

  proj = lambda n: _linear_in_out(layers(f'attention.{n}_proj.weight', (D, D))).reshape(L, D, N, H)
  bias = lambda n: layers(f'attention.{n}_proj.bias', (D,)).reshape(L, N, H)
  params = {
      'patch': {'w': take('embeddings.patch_embeddings.projection.weight',
                          (D, C, p, p)).transpose(2, 3, 1, 0),
                'b': take('embeddings.patch_embeddings.projection.bias', (D,))},
      'cls': take('embeddings.cls_token', (1, 1, D)).reshape(D),
      'pos_embed': take('embeddings.position_embeddings', (1, T, D)).reshape(T, D),
      'encoder': {
          'attn_norm': norm('layernorm_before'),
          'attn': {'wq': proj('q'), 'wk': proj('k'), 'wv': proj('v'),
                   'wo': _linear_in_out(layers('attention.o_proj.weight', (D, D))).reshape(
                       L, N, H, D),
                   'bq': bias('q'), 'bk': bias('k'), 'bv': bias('v'),
                   'bo': layers('attention.o_proj.bias', (D,))},
          'mlp_norm': norm('layernorm_after'),
          'mlp': {'w_in': _linear_in_out(layers('mlp.fc1.weight', (cfg.mlp_dim, D))),
                  'b_in': layers('mlp.fc1.bias', (cfg.mlp_dim,)),
                  'w_out': _linear_in_out(layers('mlp.fc2.weight', (D, cfg.mlp_dim))),
                  'b_out': layers('mlp.fc2.bias', (D,))},
      },
      'final_norm': {'scale': take('layernorm.weight', (D,)), 'bias': take('layernorm.bias', (D,))},
  }
  if cfg.num_classes:
    params['head'] = {'w': take('classifier.weight', (cfg.num_classes, D)).T,
                      'b': take('classifier.bias', (cfg.num_classes,))}
  left = sorted(set(sd) - used)
  if left:
    raise ValueError(f'HF ViT state dict has unused tensors {left[:4]}; expected a ViTModel or '
                     f'ViTForImageClassification with model.num_classes={cfg.num_classes}')
  return jax.tree.map(jnp.asarray, params)


def from_hf_model(model) -> tuple[ml_collections.ConfigDict, dict]:
  """(cfg, params) of an instantiated transformers ViTModel or ViTForImageClassification."""
  state_dict = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  classes = state_dict['classifier.weight'].shape[0] if 'classifier.weight' in state_dict else 0
  cfg = config_from_hf(model.config.to_dict(), num_classes=classes)
  return cfg, params_from_hf(cfg, state_dict)
