"""BLIP pre-training (Li, Li, Xiong & Hoi 2022, arXiv:2201.12086, sec. 3.2) of lab.models.blip:
L = L_itc + L_itm + L_lm, each of the three text modes run once per batch.

ITC  image-text contrastive loss in the batch: s_bs = f_b . g_s / tau, f and g the normalised
     image and text embeddings, tau the learnable temperature (blip.temperature), and
     L_itc = 1/2 [CE over rows (image -> its text) + CE over columns (text -> its image)].
     Built without ALBEF's momentum encoder, queue and soft labels, which BLIP's ITC also uses
     (Li et al. 2021, arXiv:2107.07651, sec. 3.2-3.3): the targets are the one-hot pairs.
ITM  image-text matching: the grounded encoder's [Encode] output is classified matched (1) or
     unmatched (0) over B positive pairs and 2B hard negatives (ALBEF's mining, which BLIP
     adopts): for each text s a negative image b ~ softmax_b(s_bs), for each image b a negative
     text s ~ softmax_s(s_bs), each over the candidates that are not a positive of it. The
     positives of image b are its own text and every text with the same tokens (templated
     captions repeat; BLIP's fine-tuning masks pairs of one image id the same way), so no
     positive is ever drawn as a negative. The similarities are not differentiated through.
     L_itm = mean cross-entropy over the pairs (a row without any candidate adds no negative).
LM   the decoder's next-token cross-entropy with label smoothing eps = 0.1 (sec. 3.2),
     l_t = (1 - eps)(-log p(y_t)) + eps / V sum_v (-log p(v)), averaged over every caption token
     after [Decode] up to and including <eos> (as torch's CrossEntropyLoss(label_smoothing)).

Batches (lab.data.image_text, task 'caption', or lab.data.image_text_cleaned): image
f32[B, X, Y, C], tokens i32[B, T] (<bos> caption <eos> <pad>...), mask i32[B, T].
config.objective_args: label_smoothing. config.sample: num (captions shown of the first eval
images, 0: none), top_p, temperature.
Letters beyond DESIGN.md's: J the ITC width, W the image tokens' width, R = 3B the ITM pairs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.config import require
from lab.models import blip
from lab.train.task import Task


def itc_loss(img_BJ: jax.Array, txt_BJ: jax.Array, temp: jax.Array):
  """(L_itc, s_BS, metrics): s_bs = f_b . g_s / tau for normalised f, g (module docstring), the
  symmetric in-batch cross-entropy, and the in-batch top-1 accuracies i2t and t2i."""
  if img_BJ.ndim != 2 or img_BJ.shape != txt_BJ.shape:
    raise ValueError(f'itc_loss: embeddings of shapes {img_BJ.shape} and {txt_BJ.shape}; '
                     'expected two [B, J]')
  sim_BS = jnp.einsum('BJ,SJ->BS', img_BJ, txt_BJ) / temp
  diag_B = jnp.diagonal(sim_BS)
  loss_i2t = jnp.mean(jax.nn.logsumexp(sim_BS, axis=1) - diag_B)
  loss_t2i = jnp.mean(jax.nn.logsumexp(sim_BS, axis=0) - diag_B)
  labels_B = jnp.arange(sim_BS.shape[0])
  return (loss_i2t + loss_t2i) / 2, sim_BS, {
      'i2t_accuracy': jnp.mean(jnp.argmax(sim_BS, 1) == labels_B),
      't2i_accuracy': jnp.mean(jnp.argmax(sim_BS, 0) == labels_B)}


def same_text(tokens_BT: jax.Array) -> jax.Array:
  """positive_BS: text b and text s have the same tokens (so image b matches text s too)."""
  return jnp.all(tokens_BT[:, None, :] == tokens_BT[None, :, :], axis=-1)


def hard_negatives(sim_BS: jax.Array, positive_BS: jax.Array, rng: jax.Array) -> dict:
  """One negative per row and column of the ITC similarities (ALBEF / BLIP hard negatives):
    text_B[b]  ~ p(s) = exp(s_bs) / sum_{s': not positive_bs'} exp(s_bs'), s not positive_bs;
    image_S[s] ~ p(b) = exp(s_bs) / sum_{b': not positive_b's} exp(s_b's), b not positive_bs.
  positive_BS must hold the diagonal. has_text_B / has_image_S: whether the row / column had
  any candidate (where not, the index drawn is meaningless and must be weighted out)."""
  B, S = sim_BS.shape
  if B != S or positive_BS.shape != (B, S):
    raise ValueError(f'hard_negatives: sims of shape {sim_BS.shape} and positives of shape '
                     f'{positive_BS.shape}; expected one square [B, B] for both')
  sim_BS = jax.lax.stop_gradient(sim_BS).astype(jnp.float32)
  has_text_B = ~jnp.all(positive_BS, axis=1)
  has_image_S = ~jnp.all(positive_BS, axis=0)
  masked_BS = jnp.where(positive_BS, -jnp.inf, sim_BS)
  key_text, key_image = jax.random.split(rng)
  text_B = jax.random.categorical(key_text, jnp.where(has_text_B[:, None], masked_BS, 0.0),
                                  axis=1)
  image_S = jax.random.categorical(key_image, jnp.where(has_image_S[None], masked_BS, 0.0),
                                   axis=0)
  return {'text_B': text_B, 'image_S': image_S, 'has_text_B': has_text_B,
          'has_image_S': has_image_S}


def itm_loss(logits_R2: jax.Array, labels_R: jax.Array, weight_R: jax.Array):
  """(L_itm, accuracy): sum_r w_r CE(logits_r, label_r) / sum_r w_r, and the weighted fraction
  of pairs whose argmax is the label (1 = matched)."""
  logp_R2 = jax.nn.log_softmax(logits_R2.astype(jnp.float32), axis=-1)
  nll_R = -jnp.take_along_axis(logp_R2, labels_R[:, None], axis=1)[:, 0]
  w_R = weight_R.astype(jnp.float32)
  total = jnp.sum(w_R)
  correct_R = (jnp.argmax(logits_R2, -1) == labels_R).astype(jnp.float32)
  return jnp.sum(w_R * nll_R) / total, jnp.sum(w_R * correct_R) / total


def lm_loss(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array,
            smoothing: float) -> jax.Array:
  """sum_bt w_bt l_bt / sum_bt w_bt with l_bt = (1 - eps)(-log p_bt(y_bt)) + eps / V sum_v
  (-log p_bt(v)), p = softmax(logits) (the LM loss of BLIP sec. 3.2 with label smoothing eps)."""
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f'label smoothing={smoothing}; expected a value in [0, 1)')
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  l_BT = (1.0 - smoothing) * nll_BT - smoothing * jnp.mean(logp_BTV, axis=-1)
  w_BT = weights_BT.astype(jnp.float32)
  return jnp.sum(w_BT * l_BT) / jnp.sum(w_BT)


def losses(cfg, params, batch: dict, rng: jax.Array, smoothing: float):
  """(L = L_itc + L_itm + L_lm, metrics) of one batch (module docstring)."""
  tokens_BT, mask_BT = jnp.asarray(batch['tokens']), jnp.asarray(batch['mask'])
  B = tokens_BT.shape[0]
  img_BSW = blip.encode_image(cfg, params, batch['image'])
  temp = blip.temperature(params)
  itc, sim_BS, metrics = itc_loss(blip.image_features(cfg, params, img_BSW),
                                  blip.text_features(cfg, params, tokens_BT, mask_BT), temp)
  neg = hard_negatives(sim_BS, same_text(tokens_BT), rng)
  # pairs: B positives; (negative image of text s, text s); (image b, negative text of image b)
  tokens_RT = jnp.concatenate([tokens_BT, tokens_BT, tokens_BT[neg['text_B']]])
  mask_RT = jnp.concatenate([mask_BT, mask_BT, mask_BT[neg['text_B']]])
  img_RSW = jnp.concatenate([img_BSW, img_BSW[neg['image_S']], img_BSW])
  labels_R = jnp.concatenate([jnp.ones(B, jnp.int32), jnp.zeros(2 * B, jnp.int32)])
  weight_R = jnp.concatenate([jnp.ones(B, bool), neg['has_image_S'], neg['has_text_B']])
  itm, itm_accuracy = itm_loss(blip.itm_logits(cfg, params, tokens_RT, mask_RT, img_RSW),
                               labels_R, weight_R)
  logits_BTV = blip.lm_logits(cfg, params, tokens_BT, mask_BT, img_BSW)
  lm = lm_loss(logits_BTV[:, :-1], tokens_BT[:, 1:], mask_BT[:, 1:], smoothing)
  loss = itc + itm + lm
  return loss, dict(metrics, loss=loss, itc_loss=itc, itm_loss=itm, lm_loss=lm,
                    itm_accuracy=itm_accuracy, temp=temp)


def special_ids(data) -> tuple[int, int, int]:
  """(bos, eos, pad) ids of the data's tokenizer, read through its encode."""
  ids = []
  for name in ('<bos>', '<eos>', '<pad>'):
    encoded = data.encode(name)
    if len(encoded) != 1:
      raise ValueError(f'the data tokenizer encodes {name!r} as {list(encoded)}; expected one id')
    ids.append(int(encoded[0]))
  return tuple(ids)


def validate(config) -> None:
  args, s = config.objective_args, config.sample
  require(config.model.name == 'blip', f'model.name={config.model.name!r}; BLIP training '
                                       'expects "blip"')
  require(config.data.task == 'caption',
          f'data.task={config.data.task!r}; BLIP training expects "caption"')
  require(0.0 <= args.label_smoothing < 1.0,
          f'objective_args.label_smoothing={args.label_smoothing}; expected a value in [0, 1)')
  require(0 < config.data.text_len <= config.model.max_len, f'data.text_len='
          f'{config.data.text_len}; expected 1..{config.model.max_len} (model.max_len)')
  require(config.train.batch_size >= 2, f'train.batch_size={config.train.batch_size}; ITM '
                                        'needs at least 2 pairs to draw negatives from')
  require(0 <= s.num <= config.train.batch_size, f'sample.num={s.num}; expected 0..'
          f'{config.train.batch_size} (captions of the first eval batch)')
  require(0.0 < s.top_p <= 1.0, f'sample.top_p={s.top_p}; expected 0 < top_p <= 1')
  require(s.temperature >= 0.0, f'sample.temperature={s.temperature}; expected >= 0')


def make_task(config, data) -> Task:
  cfg, s = config.model, config.sample
  smoothing = config.objective_args.label_smoothing

  def loss_fn(params, state, batch, rng, train):
    del train  # BLIP here has no dropout; the negatives are drawn in evaluation too
    loss, metrics = losses(cfg, params, batch, rng, smoothing)
    return loss, (metrics, state)

  bos, eos, pad = special_ids(data)
  first = data.eval_batches[0]
  write = jax.jit(lambda params, images, rng: blip.caption(
      cfg, params, blip.encode_image(cfg, params, images), rng, length=config.data.text_len,
      bos_id=bos, eos_id=eos, pad_id=pad, top_p=s.top_p, temperature=s.temperature)[0])

  def sample(params, state, rng):
    del state
    tokens_BT = jax.device_get(write(params, first['image'][:s.num], rng))
    return {f'caption_{i}': f'{data.decode(row)}  (data: {data.decode(first["tokens"][i])})'
            for i, row in enumerate(tokens_BT)}

  return Task(param_specs=blip.param_specs(cfg), init_state=lambda key: {}, loss_fn=loss_fn,
              sample=sample if s.num else None)
