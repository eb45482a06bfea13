"""lab.models.clip_hf against transformers' CLIPModel and SiglipModel (torch on CPU, float32, eval
mode): the unnormalised image and text features (pooler outputs after the projections), the
logits with the logit scale (and SigLIP's bias), and HF's own contrastive losses against
lab.objectives.contrastive_losses; CLIP with both eos rules, SigLIP with and without a padding
mask; and the config / state-dict checks.

The reference models are tiny, with every weight redrawn at std 0.2 (norm scales around 1) and
different LayerNorm epsilons and activations per tower, so that a wrong transpose, head split,
epsilon, activation, pooling position or norm placement moves the outputs far beyond 1e-5."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from lab.models import clip, clip_hf
from lab.objectives import contrastive_losses as cl

B, T = 4, 9
_TEXT = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=12, bos_token_id=1,
             pad_token_id=0)
_VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
               image_size=8, patch_size=4, num_channels=3)
_HF = {
    # eos_token_id 5: HF pools the first <eos>; vision eps and activation differ from the text's.
    'clip': (transformers.CLIPModel, transformers.CLIPConfig, dict(
        text_config=dict(_TEXT, eos_token_id=5, layer_norm_eps=1e-5),
        vision_config=dict(_VISION, layer_norm_eps=1e-2, hidden_act='gelu'),
        projection_dim=16)),
    # The legacy eos_token_id 2: HF pools at the highest token id (OpenAI's argmax rule).
    'clip_legacy': (transformers.CLIPModel, transformers.CLIPConfig, dict(
        text_config=dict(_TEXT, eos_token_id=2), vision_config=_VISION, projection_dim=16)),
    'siglip': (transformers.SiglipModel, transformers.SiglipConfig, dict(
        text_config=dict(_TEXT, projection_size=24, layer_norm_eps=1e-3),
        vision_config=dict(_VISION, layer_norm_eps=1e-6, image_size=12))),
}
jit = functools.partial(jax.jit, static_argnums=0,
                        compiler_options={'xla_backend_optimization_level': 0})


@functools.cache
def _hf_model(name: str):
  """A random-weight transformers model: weights ~ N(0, 0.2), norm scales ~ N(1, 0.2)."""
  torch.manual_seed(0)
  model_cls, config_cls, fields = _HF[name]
  model = model_cls(config_cls(**fields, attn_implementation='eager'))
  with torch.no_grad():
    for param_name, p in model.named_parameters():
      is_norm_scale = ('norm' in param_name or 'layrnorm' in param_name) and param_name.endswith(
          'weight')
      p.normal_(mean=1.0 if is_norm_scale else 0.0, std=0.2)
  return model.eval()


def _load(name: str):
  cfg, params, logit = clip_hf.from_hf_model(_hf_model(name))
  cfg.attention_backend = 'reference'
  return ml_collections.FrozenConfigDict(cfg), params, logit  # hashable: a static jit argument


def _inputs(seed: int, name: str):
  """pixels [B, C, X, Y] (torch layout), ids [B, T] with one <eos> per row at a random position
  followed by padding (id 0), and the attention mask (1 through the <eos>)."""
  rng = np.random.default_rng(seed)
  size = _hf_model(name).config.vision_config.image_size
  pixels = rng.standard_normal((B, 3, size, size)).astype(np.float32)
  V = _TEXT['vocab_size']
  ids = rng.integers(6, V - 1, (B, T))
  ends = rng.permutation(np.arange(2, T))[:B]
  eos = V - 1 if name == 'clip_legacy' else 5
  mask = (np.arange(T)[None] <= ends[:, None]).astype(np.int64)
  ids[np.arange(B), ends] = eos
  ids = np.where(mask == 1, ids, 0)
  return pixels, ids, mask


_forward = jit(clip.forward)


def _ours(cfg, params, pixels, ids, mask):
  img, txt = _forward(
      cfg, params, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids, jnp.int32),
      None if mask is None else jnp.asarray(mask, jnp.int32))
  return np.asarray(img), np.asarray(txt)


@pytest.mark.parametrize('name', ['clip', 'clip_legacy', 'siglip'])
def test_embeddings_logits_and_loss_match_transformers(name):
  cfg, params, logit = _load(name)
  model = _hf_model(name)
  assert (cfg.flavour, cfg.text.pooling, cfg.image_head) == {
      'clip': ('clip', 'eos', True), 'clip_legacy': ('clip', 'max_id', True),
      'siglip': ('siglip', 'last', False)}[name]
  pixels, ids, mask = _inputs(1, name)
  with torch.no_grad():
    args = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    want_txt = model.get_text_features(**args).pooler_output.numpy()
    want_img = model.get_image_features(torch.from_numpy(pixels)).pooler_output.numpy()
    out = model(pixel_values=torch.from_numpy(pixels), return_loss=True, **args)
  img, txt = _ours(cfg, params, pixels, ids, mask)
  assert img.shape == want_img.shape == txt.shape == want_txt.shape == (B, cfg.embed_dim)
  np.testing.assert_allclose(img, want_img, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(txt, want_txt, rtol=1e-5, atol=1e-5)
  # The normalised embeddings, the logits with HF's scale (and bias), and its losses.
  np.testing.assert_allclose(cl.l2_normalize(img), out.image_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(cl.l2_normalize(txt), out.text_embeds.numpy(), atol=1e-5)
  cos = np.asarray(cl.l2_normalize(img) @ cl.l2_normalize(txt).T)
  if name == 'siglip':
    logits = np.exp(logit['log_t']) * cos + logit['bias']
    loss, _ = cl.siglip_loss(img, txt, logit['log_t'], logit['bias'])
  else:
    logits = np.exp(logit['log_scale']) * cos
    loss, _ = cl.clip_loss(img, txt, logit['log_scale'])
  np.testing.assert_allclose(logits, out.logits_per_image.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, out.loss.item(), rtol=1e-5)


def test_siglip_without_a_mask_attends_to_padding_like_transformers():
  """SigLIP's default (max_length padding, no attention mask): the pooled last token reads the
  padding; with the mask it does not, and the two differ."""
  cfg, params, _ = _load('siglip')
  pixels, ids, mask = _inputs(2, 'siglip')
  with torch.no_grad():
    want = _hf_model('siglip').get_text_features(torch.from_numpy(ids)).pooler_output.numpy()
  _, txt = _ours(cfg, params, pixels, ids, None)
  np.testing.assert_allclose(txt, want, rtol=1e-5, atol=1e-5)
  _, masked = _ours(cfg, params, pixels, ids, mask)
  assert np.abs(masked - want).max() > 1e-2


def test_config_and_state_dict_errors():
  hf = _hf_model('clip').config.to_dict()
  bad = dict(hf, text_config=dict(hf['text_config'], attention_dropout=0.1))
  with pytest.raises(ValueError, match='attention_dropout=0.1; expected 0.0'):
    clip_hf.config_from_hf(bad)
  with pytest.raises(ValueError, match="model_type='vit'"):
    clip_hf.config_from_hf(dict(hf, model_type='vit'))
  bad = dict(hf, text_config=dict(hf['text_config'], eos_token_id=99))
  with pytest.raises(ValueError, match='eos_token_id=99; expected a token id below'):
    clip_hf.config_from_hf(bad)
  cfg = clip_hf.config_from_hf(hf)
  sd = {k: v.numpy() for k, v in _hf_model('clip').state_dict().items()}
  with pytest.raises(ValueError, match='unused tensors'):
    clip_hf.params_from_hf(cfg, dict(sd, extra=np.zeros(3)))
  del sd['vision_model.pre_layrnorm.bias']
  with pytest.raises(ValueError, match="lacks 'vision_model.pre_layrnorm.bias'"):
    clip_hf.params_from_hf(cfg, sd)
