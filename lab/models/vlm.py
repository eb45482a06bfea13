"""Vision-language model: a ViT, a connector and a decoder LLM, the shape shared by LLaVA (Liu et
al. 2023, arXiv 2304.08485; LLaVA-1.5, arXiv 2310.03744), Qwen-VL (Bai et al. 2023, arXiv
2308.12966), InternVL 1.5 (Chen et al. 2024, arXiv 2404.16821), MiniCPM-V (Yao et al. 2024, arXiv
2408.01800) and MiMo-VL (Xiaomi 2025, arXiv 2506.03569):

  x_BPC = LN(z_L) of the ViT over the image's patches, class token dropped (lab.models.vit.encode;
          LLaVA's select_feature='patch', InternVL's vit_embeds[:, 1:])
  y_BMD = connector(x_BPC)    (lab.models.vlm_connectors: mlp | resampler | pixel_shuffle)
  e_BTD = E[tokens_BT] with e[t] = y[k] at the k-th <image> placeholder (row-major over batch,
          then time: lab.models.vlm_layout.merge_image_embeddings)
  logits_BTV = W_head LLM(e_BTD)   (lab.models.transformer.forward_hidden with embeds_BTD)

Layout: one image per sequence, its M = tokens_per_image placeholders right after <bos>:
<bos> <image> x M text ... (insert_image_tokens); the number of placeholders must equal the
connector's M per image (check_layout checks a concrete batch host-side; forward assumes it).
Attention is causal over the whole interleaved sequence, image tokens included, as LLaVA,
InternVL and Qwen-VL; the bidirectional image block of lab.models.vlm_layout.
image_block_attention is not wired in (the decoder's blocks take no mask but causal). Learned
LLM positions run over image and text tokens alike (positions 0..T-1).

Config fields (`cfg` is config.model): name ('vlm'), vocab_size, image_size, channels (0: the
data fills them), image_token_id (the tokenizer's <image>), attention_backend (for all three
parts); vision: lab.models.vit's fields except image_size, channels, attention_backend, pooling
and num_classes (the VLM reads patch features, so neither pooling nor head is built); connector:
connector ('mlp' | 'resampler' | 'pixel_shuffle') and, for the resampler, n_queries and n_heads
(image_size, patch_size, vision_width and llm_width come from the towers); llm:
lab.models.transformer's fields except vocab_size and attention_backend (dense MLPs only).
Letters: B batch, X,Y pixel rows and columns, C ViT width, P patches, M image tokens (per image
or, flattened, of the batch), T sequence length, D LLM width, V vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lab.config import ConfigError, require
from lab.models import transformer, vit, vlm_connectors, vlm_layout

# Fields of the parts that the VLM sets itself, from its own fields or the other parts.
_DERIVED = {'vision': ('image_size', 'channels', 'attention_backend', 'pooling', 'num_classes'),
            'connector': ('image_size', 'patch_size', 'vision_width', 'llm_width',
                          'attention_backend'),
            'llm': ('vocab_size', 'attention_backend')}


def vision_config(cfg) -> ml_collections.FrozenConfigDict:
  """The ViT's config: model.vision plus image_size, channels and attention_backend; pooling
  'cls' or 'gap' (neither has parameters) and num_classes 0."""
  return ml_collections.FrozenConfigDict(dict(cfg.vision) | dict(
      image_size=cfg.image_size, channels=cfg.channels, attention_backend=cfg.attention_backend,
      pooling='cls' if cfg.vision.get('class_token') else 'gap', num_classes=0))


def connector_config(cfg) -> ml_collections.FrozenConfigDict:
  """The connector's config: model.connector plus the towers' sizes."""
  return ml_collections.FrozenConfigDict(dict(cfg.connector) | dict(
      image_size=cfg.image_size, patch_size=cfg.vision.patch_size,
      vision_width=cfg.vision.d_model, llm_width=cfg.llm.d_model,
      attention_backend=cfg.attention_backend))


def llm_config(cfg) -> ml_collections.FrozenConfigDict:
  """The decoder's config: model.llm plus vocab_size and attention_backend."""
  return ml_collections.FrozenConfigDict(dict(cfg.llm) | dict(
      vocab_size=cfg.vocab_size, attention_backend=cfg.attention_backend))


def tokens_per_image(cfg) -> int:
  """M: the connector's LLM tokens per image."""
  return vlm_connectors.tokens_per_image(connector_config(cfg))


def validate(cfg) -> None:
  """One-line ConfigErrors for values that cannot form the model, before any device work."""
  for part, derived in _DERIVED.items():
    require(part in cfg, f'model.{part} missing; a VLM needs model.vision, model.connector and '
                         'model.llm')
    for key in derived:
      require(key not in cfg[part], f'model.{part}.{key} is set by the VLM; remove it')
  for key in ('vocab_size', 'image_size', 'channels'):
    require(cfg[key] > 0, f'model.{key}={cfg[key]}; expected a positive integer')
  for part, check, config_of in (('vision', vit.validate, vision_config),
                                 ('connector', vlm_connectors.validate, connector_config),
                                 ('llm', transformer.validate, llm_config)):
    try:
      check(config_of(cfg))
    except ConfigError as e:
      raise ConfigError(f'model.{part}: {e}') from None
  require(transformer.n_experts(cfg.llm) == 0,
          f'model.llm.moe_experts={transformer.n_experts(cfg.llm)}; the VLM expects dense MLPs')
  require(0 <= cfg.image_token_id < cfg.vocab_size, f'model.image_token_id={cfg.image_token_id};'
          f' expected an id in 0..model.vocab_size-1={cfg.vocab_size - 1}')
  M = tokens_per_image(cfg)
  require(M + 2 <= cfg.llm.max_len, f'model.llm.max_len={cfg.llm.max_len} leaves no room for text '
                                    f'after <bos> and the {M} image tokens')


def param_specs(cfg) -> dict:
  """{'vision': ViT, 'connector': connector, 'llm': decoder} ParamSpecs."""
  validate(cfg)
  return {'vision': vit.param_specs(vision_config(cfg)),
          'connector': vlm_connectors.param_specs(connector_config(cfg)),
          'llm': transformer.param_specs(llm_config(cfg))}


def insert_image_tokens(x_BT, value: int, n: int) -> jax.Array:
  """[x_B1, value x n, x_B(T-1)]: n copies of value after the first column (<bos>), so
  insert_image_tokens(tokens, image_token_id, M) is the layout <bos> <image> x M text ..., and
  insert_image_tokens(mask, 0, M) its mask (image tokens are never targets)."""
  x_BT = jnp.asarray(x_BT)
  filler_Bn = jnp.full((x_BT.shape[0], n), value, x_BT.dtype)
  return jnp.concatenate([x_BT[:, :1], filler_Bn, x_BT[:, 1:]], axis=1)


def check_layout(cfg, tokens_BT) -> None:
  """Host-side: ValueError unless every row of the concrete tokens_BT holds exactly
  tokens_per_image placeholders (lab.models.vlm_layout.image_token_index checks the total)."""
  tokens_BT = np.asarray(tokens_BT)
  M = tokens_per_image(cfg)
  per_row_B = (tokens_BT == cfg.image_token_id).sum(axis=1)
  if (per_row_B != M).any():
    raise ValueError(f'rows hold {sorted(set(per_row_B.tolist()))} image placeholders (id '
                     f'{cfg.image_token_id}); expected {M} per image (the connector\'s tokens)')
  vlm_layout.image_token_index(tokens_BT, cfg.image_token_id, tokens_BT.shape[0] * M)


def placeholder_index(tokens_BT: jax.Array, image_id: int) -> jax.Array:
  """index_BT (int32, jit-able): k at the k-th placeholder in row-major order, else -1; equal to
  lab.models.vlm_layout.image_token_index on a layout that check_layout accepts."""
  is_image_BT = tokens_BT == image_id
  k_BT = jnp.cumsum(is_image_BT.reshape(-1)).reshape(is_image_BT.shape) - 1
  return jnp.where(is_image_BT, k_BT, -1).astype(jnp.int32)


def _split(rng, train: bool):
  return (None, None) if rng is None or not train else tuple(jax.random.split(rng))


def image_features(cfg, params, images_BXYC: jax.Array, *, train: bool = False,
                   rng: jax.Array | None = None) -> jax.Array:
  """x_BPC: the final-normed ViT tokens (eqs. 1-4 of Dosovitskiy et al.) of the patches, the
  class token (if any) dropped."""
  vcfg = vision_config(cfg)
  x_BTC = vit.patch_tokens(vcfg, params['vision'], images_BXYC)
  if vcfg.class_token:
    x_BTC = vit.with_cls(vcfg, params['vision'], x_BTC)
  h_BTC = vit.encode(vcfg, params['vision'], x_BTC, train=train, rng=rng)
  return h_BTC[:, vit.num_prefix(vcfg):]


def image_embeddings(cfg, params, images_BXYC: jax.Array, *, train: bool = False,
                     rng: jax.Array | None = None) -> jax.Array:
  """y_BMD = connector(x_BPC): M LLM-input embeddings per image of image_size pixels."""
  x_BPC = image_features(cfg, params, images_BXYC, train=train, rng=rng)
  return vlm_connectors.apply(connector_config(cfg), params['connector'], x_BPC)


def input_embeddings(cfg, params, images_BXYC: jax.Array, tokens_BT: jax.Array, *,
                     train: bool = False, rng: jax.Array | None = None) -> jax.Array:
  """e_BTD: the token embeddings E[tokens_BT] with the images' y_BMD at the placeholders (image b
  fills row b's placeholders when every row holds M), the decoder's embeds_BTD."""
  y_BMD = image_embeddings(cfg, params, images_BXYC, train=train, rng=rng)
  text_BTD = transformer.embed_tokens(params['llm'], tokens_BT)
  return vlm_layout.merge_image_embeddings(text_BTD, y_BMD,
                                           placeholder_index(tokens_BT, cfg.image_token_id))


def forward(cfg, params, images_BXYC: jax.Array, tokens_BT: jax.Array, *,
            rng: jax.Array | None = None, train: bool = False) -> jax.Array:
  """logits_BTV of the causal decoder over the merged sequence e_BTD; tokens_BT holds M
  placeholders per row (insert_image_tokens). rng drives the ViT's and the LLM's dropout when
  train."""
  vision_rng, llm_rng = _split(rng, train)
  e_BTD = input_embeddings(cfg, params, images_BXYC, tokens_BT, train=train, rng=vision_rng)
  lcfg = llm_config(cfg)
  h_BTD, _ = transformer.forward_hidden(lcfg, params['llm'], None, embeds_BTD=e_BTD,
                                        rng=llm_rng, train=train)
  return transformer.unembed(lcfg, params['llm'], h_BTD)
