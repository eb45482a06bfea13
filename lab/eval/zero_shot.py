"""Zero-shot classification and image-text retrieval from embeddings.

Zero-shot classification as in CLIP (Radford et al. 2021, arXiv 2103.00020, sec. 3.1.4): each
class name is written into M prompt templates ('a photo of a {}.'), the text encoder embeds the
L x M prompts, and a class's embedding is the normalised mean of its normalised prompt
embeddings (the ensemble is built in embedding space, not probability space). An image is
assigned the class of highest cosine similarity. Retrieval recall@K (image -> text and text ->
image) is the metric of the COCO and Flickr30k retrieval evaluations (CLIP's appendix; BLIP and
its CapFilt, Li, Li, Xiong & Hoi 2022, arXiv 2201.12086), where an image has several captions.
Shape letters beyond lab's: L classes (labels), M prompt templates, T texts of a retrieval set.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lab.objectives.contrastive_losses import l2_normalize


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
  """The L x M prompts template.format(name), row l for class l, in class_embeddings' order."""
  if not class_names or not templates or any('{}' not in t for t in templates):
    raise ValueError(f'prompts: {len(class_names)} class names and templates {list(templates)}; '
                     "expected both non-empty, every template with one '{}'")
  return [[t.format(name) for t in templates] for name in class_names]


def class_embeddings(txt_LMD: jax.Array) -> jax.Array:
  """cls_LD: w_l = normalise(1/M sum_m normalise(e_lm)) for text embeddings e_LMD of class l's
  M prompts (CLIP sec. 3.1.4's ensemble over templates, averaged in embedding space)."""
  if txt_LMD.ndim != 3:
    raise ValueError(f'class_embeddings: txt_LMD of shape {txt_LMD.shape}; expected [L, M, D]')
  return l2_normalize(l2_normalize(txt_LMD).mean(axis=1))


def cosine_similarity(a_BD: jax.Array, b_LD: jax.Array) -> jax.Array:
  """s_BL = <a_b, b_l> / (||a_b|| ||b_l||)."""
  if a_BD.ndim != 2 or b_LD.ndim != 2 or a_BD.shape[1] != b_LD.shape[1]:
    raise ValueError(f'embeddings of shapes {a_BD.shape} and {b_LD.shape}; expected [B, D] and '
                     '[L, D] with the same D')
  return jnp.einsum('BD,LD->BL', l2_normalize(a_BD), l2_normalize(b_LD))


def predict(img_BD: jax.Array, cls_LD: jax.Array) -> jax.Array:
  """pred_B = argmax_l cos(x_b, w_l): the zero-shot class of each image."""
  return jnp.argmax(cosine_similarity(img_BD, cls_LD), axis=1)


def accuracy(img_BD: jax.Array, cls_LD: jax.Array, labels_B: jax.Array, k: int = 1) -> jax.Array:
  """Top-k zero-shot accuracy: the fraction of images whose label is among the k classes of
  highest cosine similarity (k = 1: mean(predict == labels))."""
  if not 1 <= k <= cls_LD.shape[0]:
    raise ValueError(f'accuracy: k={k}; expected 1 <= k <= {cls_LD.shape[0]} classes')
  if labels_B.shape != img_BD.shape[:1]:
    raise ValueError(f'accuracy: labels of shape {labels_B.shape} for {img_BD.shape[0]} images')
  _, top_BK = jax.lax.top_k(cosine_similarity(img_BD, cls_LD), k)
  return jnp.mean(jnp.any(top_BK == labels_B[:, None], axis=1))


def retrieval_recall(img_BD: jax.Array, txt_TD: jax.Array, ks: Sequence[int] = (1, 5, 10),
                     image_of_text_T=None) -> dict[str, jax.Array]:
  """Recall@K of cosine-similarity retrieval between B images and T texts, for each K in ks.

  image_of_text_T[t] is the image text t describes (default: T = B pairs, text b of image b).
  image -> text: the fraction of images with at least one of their texts among their K most
  similar texts; text -> image: the fraction of texts whose image is among their K most
  similar images. Returns {'i2t_recall@K': ..., 't2i_recall@K': ...}.
  """
  B, T = img_BD.shape[0], txt_TD.shape[0]
  image_of_text_T = np.arange(T) if image_of_text_T is None else np.asarray(image_of_text_T)
  if image_of_text_T.shape != (T,) or np.any((image_of_text_T < 0) | (image_of_text_T >= B)):
    raise ValueError(f'retrieval_recall: image_of_text_T {image_of_text_T.tolist()}; expected '
                     f'{T} image indices in [0, {B})')
  if np.bincount(image_of_text_T, minlength=B).min() == 0:
    raise ValueError('retrieval_recall: some image has no text; expected every image described')
  if not ks or min(ks) < 1 or max(ks) > min(B, T):
    raise ValueError(f'retrieval_recall: ks={tuple(ks)}; expected 1 <= K <= {min(B, T)}')
  s_BT = cosine_similarity(img_BD, txt_TD)
  _, top_texts_BK = jax.lax.top_k(s_BT, max(ks))
  _, top_images_TK = jax.lax.top_k(s_BT.T, max(ks))
  owner_T = jnp.asarray(image_of_text_T)
  i2t_BK = owner_T[top_texts_BK] == jnp.arange(B)[:, None]
  t2i_TK = top_images_TK == owner_T[:, None]
  out = {}
  for k in ks:
    out[f'i2t_recall@{k}'] = jnp.mean(jnp.any(i2t_BK[:, :k], axis=1))
    out[f't2i_recall@{k}'] = jnp.mean(jnp.any(t2i_TK[:, :k], axis=1))
  return out
