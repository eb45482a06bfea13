"""Hugging Face interop for `lab.models.clip`: transformers' CLIPModel (Radford et al. 2021,
arXiv:2103.00020) and SiglipModel (Zhai et al. 2023, arXiv:2303.15343) configs and weights.

Our blocks are stacked on a leading layer axis L; HF keeps one tensor per layer (nn.Linear stores
[out, in], so matrices are transposed; heads are flattened head-major, index n * H + h). Both
towers' blocks use the same names under {text,vision}_model.encoder.layers.i.:
  layer_norm1 / layer_norm2 = attn_norm / mlp_norm;  self_attn.{q,k,v}_proj = wq, wk, wv (+ b);
  self_attn.out_proj = wo, bo;  mlp.fc1 / mlp.fc2 = w_in, b_in / w_out, b_out.
Text tower: embeddings.token_embedding [V, D] = text.embed, embeddings.position_embedding
[max_len, D] = text.pos_embed, final_layer_norm = text.final_norm.
CLIP: vision_model.embeddings.class_embedding [D] = image.cls, patch_embedding.weight [D, C, p, p]
(no bias: ours is loaded as zero), position_embedding [1 + P, D], pre_layrnorm = image.pre_norm,
post_layernorm = image.final_norm (HF norms only the class token, the same thing per token),
visual_projection / text_projection [J, D] = image_head.w / text_head.w (no bias), and
logit_scale = t of clip_loss (a scalar; HF does not clip it). Text pooling follows HF: the legacy
eos_token_id == 2 reads the highest token id ('max_id'), any other the first <eos> ('eos').
SigLIP: patch_embedding {weight, bias}, position_embedding [P, D] (no class token),
post_layernorm = image.final_norm, head = image.map (probe [1, 1, D]; attention.in_proj_weight
[3D, D] stacks q, k, v; attention.out_proj; layernorm; mlp), no image projection,
text_model.head {weight [J, D], bias} = text_head, pooling at the last position ('last'), and
logit_scale, logit_bias [1] = t', b of siglip_loss.
HF has no dropout besides attention_dropout, which must be 0 (flash attention has none).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lab.models import clip

_ACTIVATIONS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
                'quick_gelu': 'quick_gelu'}
_LEGACY_EOS = 2  # HF CLIP's eos_token_id before PR #24773: pool at the highest token id


def _activation(tower: dict, name: str) -> str:
  if tower['hidden_act'] not in _ACTIVATIONS:
    raise ValueError(f'HF {name}_config hidden_act={tower["hidden_act"]!r}; expected one of '
                     f'{tuple(_ACTIVATIONS)}')
  if tower.get('attention_dropout', 0.0):
    raise ValueError(f'HF {name}_config attention_dropout={tower["attention_dropout"]}; '
                     'expected 0.0 (flash attention has no dropout on the attention weights)')
  return _ACTIVATIONS[tower['hidden_act']]


def config_from_hf(hf_config: dict) -> ml_collections.ConfigDict:
  """The clip model config of an HF CLIPConfig or SiglipConfig dict (as in config.json)."""
  kind = hf_config.get('model_type')
  if kind not in ('clip', 'siglip'):
    raise ValueError(f"model_type={kind!r}; expected 'clip' or 'siglip'")
  t, v = hf_config['text_config'], hf_config['vision_config']
  size, patch = v['image_size'], v['patch_size']
  for name, value in (('image_size', size), ('patch_size', patch)):
    if not isinstance(value, int):
      raise ValueError(f'HF vision_config {name}={value!r}; expected one int (square images)')
  siglip = kind == 'siglip'
  if siglip and not v.get('vision_use_head', True):
    raise ValueError('HF vision_config vision_use_head=False leaves SigLIP without image '
                     'embeddings; expected True')
  eos, vocab = t['eos_token_id'], t['vocab_size']
  pooling = 'last' if siglip else 'max_id' if eos == _LEGACY_EOS else 'eos'
  if pooling == 'eos' and not 0 <= eos < vocab:
    raise ValueError(f'HF text_config eos_token_id={eos}; expected a token id below '
                     f'vocab_size={vocab} (CLIP pools at the first <eos>)')
  cfg = ml_collections.ConfigDict(dict(
      name='clip', flavour=kind, embed_dim=t['projection_size'] if siglip
      else hf_config['projection_dim'], image_head=not siglip, image_size=size,
      channels=v.get('num_channels', 3), vocab_size=vocab, attention_backend='auto',
      image=dict(patch_size=patch, d_model=v['hidden_size'], n_layers=v['num_hidden_layers'],
                 n_heads=v['num_attention_heads'], mlp_dim=v['intermediate_size'],
                 pooling='map' if siglip else 'cls', class_token=not siglip,
                 pos_embed='learned', mlp_activation=_activation(v, 'vision'),
                 norm_eps=float(v['layer_norm_eps']), dropout=0.0, drop_path=0.0,
                 pre_norm=not siglip),
      text=dict(max_len=t['max_position_embeddings'], d_model=t['hidden_size'],
                n_layers=t['num_hidden_layers'], n_heads=t['num_attention_heads'],
                mlp_dim=t['intermediate_size'], mlp_activation=_activation(t, 'text'),
                norm_eps=float(t['layer_norm_eps']), dropout=0.0,
                pooling=pooling, eos_id=eos if 0 <= eos < vocab else 0)))  # 0: unread
  clip.validate(cfg)
  return cfg


class _StateDict:
  """Tensors of an HF state dict taken by name with their expected shapes; `left()` lists the
  ones never taken."""

  def __init__(self, state_dict):
    self.sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    self.used = set()

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self.sd:
      raise ValueError(f'HF state dict lacks {name!r}')
    if self.sd[name].shape != shape:
      raise ValueError(f'HF state dict {name} has shape {self.sd[name].shape}; expected {shape}')
    self.used.add(name)
    return self.sd[name]

  def norm(self, name: str, d: int) -> dict:
    return {'scale': self.take(f'{name}.weight', (d,)), 'bias': self.take(f'{name}.bias', (d,))}

  def left(self) -> list[str]:
    return sorted(set(self.sd) - self.used)


def _encoder(sd: _StateDict, prefix: str, n_layers: int, d: int, n_heads: int, f: int) -> dict:
  """The stacked blocks (lab.nn.transformer_encoder.stack_specs) of {prefix}.layers.i."""
  h = d // n_heads
  stack = lambda name, shape: np.stack([sd.take(f'{prefix}.layers.{i}.{name}', shape)
                                        for i in range(n_layers)])
  norm = lambda name: {'scale': stack(f'{name}.weight', (d,)), 'bias': stack(f'{name}.bias', (d,))}
  proj = lambda n: stack(f'self_attn.{n}_proj.weight', (d, d)).swapaxes(1, 2).reshape(
      n_layers, d, n_heads, h)
  bias = lambda n: stack(f'self_attn.{n}_proj.bias', (d,)).reshape(n_layers, n_heads, h)
  return {'attn_norm': norm('layer_norm1'), 'mlp_norm': norm('layer_norm2'),
          'attn': {'wq': proj('q'), 'wk': proj('k'), 'wv': proj('v'),
                   'wo': stack('self_attn.out_proj.weight', (d, d)).swapaxes(1, 2).reshape(
                       n_layers, n_heads, h, d),
                   'bq': bias('q'), 'bk': bias('k'), 'bv': bias('v'),
                   'bo': stack('self_attn.out_proj.bias', (d,))},
          'mlp': {'w_in': stack('mlp.fc1.weight', (f, d)).swapaxes(1, 2),
                  'b_in': stack('mlp.fc1.bias', (f,)),
                  'w_out': stack('mlp.fc2.weight', (d, f)).swapaxes(1, 2),
                  'b_out': stack('mlp.fc2.bias', (d,))}}


def _map_head(sd: _StateDict, prefix: str, d: int, n_heads: int, f: int) -> dict:
  """lab.models.vit's 'map' parameters from SigLIP's SiglipMultiheadAttentionPoolingHead."""
  h = d // n_heads
  w_qkv = sd.take(f'{prefix}.attention.in_proj_weight', (3 * d, d)).reshape(3, d, d)
  b_qkv = sd.take(f'{prefix}.attention.in_proj_bias', (3 * d,)).reshape(3, n_heads, h)
  w_q, w_k, w_v = (w.T.reshape(d, n_heads, h) for w in w_qkv)
  return {'probe': sd.take(f'{prefix}.probe', (1, 1, d)).reshape(d),
          'attn': {'wq': w_q, 'wk': w_k, 'wv': w_v,
                   'wo': sd.take(f'{prefix}.attention.out_proj.weight', (d, d)).T.reshape(
                       n_heads, h, d),
                   'bq': b_qkv[0], 'bk': b_qkv[1], 'bv': b_qkv[2],
                   'bo': sd.take(f'{prefix}.attention.out_proj.bias', (d,))},
          'norm': sd.norm(f'{prefix}.layernorm', d),
          'mlp': {'w_in': sd.take(f'{prefix}.mlp.fc1.weight', (f, d)).T,
                  'b_in': sd.take(f'{prefix}.mlp.fc1.bias', (f,)),
                  'w_out': sd.take(f'{prefix}.mlp.fc2.weight', (d, f)).T,
                  'b_out': sd.take(f'{prefix}.mlp.fc2.bias', (d,))}}


def _image_tower(cfg, sd: _StateDict) -> dict:
  i, siglip = cfg.image, cfg.flavour == 'siglip'
  D, C, p = i.d_model, cfg.channels, i.patch_size
  P = (cfg.image_size // p) ** 2
  e = 'vision_model.embeddings'
  tower = {'patch': {'w': sd.take(f'{e}.patch_embedding.weight', (D, C, p, p)).transpose(
               2, 3, 1, 0),
                     'b': sd.take(f'{e}.patch_embedding.bias', (D,)) if siglip
                     else np.zeros(D, np.float32)},
           'pos_embed': sd.take(f'{e}.position_embedding.weight', (P + (not siglip), D)),
           'encoder': _encoder(sd, 'vision_model.encoder', i.n_layers, D, i.n_heads, i.mlp_dim),
           'final_norm': sd.norm('vision_model.post_layernorm', D)}
  if siglip:
    tower['map'] = _map_head(sd, 'vision_model.head', D, i.n_heads, i.mlp_dim)
  else:
    tower['cls'] = sd.take(f'{e}.class_embedding', (D,))
    tower['pre_norm'] = sd.norm('vision_model.pre_layrnorm', D)
  return tower


def params_from_hf(cfg, state_dict) -> tuple[dict, dict]:
  """(params, logit_params) from an HF CLIPModel / SiglipModel state dict ({name: numpy array});
  logit_params is {'log_scale'} (clip_loss) or {'log_t', 'bias'} (siglip_loss). Every tensor
  must be present with its expected shape and none may be left over."""
  sd = _StateDict(state_dict)
  t, J, siglip = cfg.text, cfg.embed_dim, cfg.flavour == 'siglip'
  D = t.d_model
  text = {'embed': sd.take('text_model.embeddings.token_embedding.weight', (cfg.vocab_size, D)),
          'pos_embed': sd.take('text_model.embeddings.position_embedding.weight', (t.max_len, D)),
          'encoder': _encoder(sd, 'text_model.encoder', t.n_layers, D, t.n_heads, t.mlp_dim),
          'final_norm': sd.norm('text_model.final_layer_norm', D)}
  params = {'image': _image_tower(cfg, sd), 'text': text}
  if siglip:
    params['text_head'] = {'w': sd.take('text_model.head.weight', (J, D)).T,
                           'b': sd.take('text_model.head.bias', (J,))}
    logit = {'log_t': sd.take('logit_scale', (1,))[0], 'bias': sd.take('logit_bias', (1,))[0]}
  else:
    params['text_head'] = {'w': sd.take('text_projection.weight', (J, D)).T}
    params['image_head'] = {'w': sd.take('visual_projection.weight', (J, cfg.image.d_model)).T}
    logit = {'log_scale': sd.take('logit_scale', ())}
  if sd.left():
    raise ValueError(f'HF state dict has unused tensors {sd.left()[:4]}; expected a '
                     f'{"SiglipModel" if siglip else "CLIPModel"}')
  return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, logit)


def from_hf_model(model) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """(cfg, params, logit_params) of an instantiated transformers CLIPModel or SiglipModel."""
  state_dict = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  cfg = config_from_hf(model.config.to_dict())
  return (cfg, *params_from_hf(cfg, state_dict))
