"""Image-text retrieval with a trained BLIP run (Li, Li, Xiong & Hoi 2022, arXiv:2201.12086,
sec. 5.1 and 5.2) on its evaluation batches (for lab.data.image_text, the clean test split):
text b is the caption of image b.

  ITC      rank by the cosine similarity of the ITC embeddings (lab.eval.zero_shot's recall@K);
  ITM      BLIP's inference: the k candidates of highest ITC similarity are re-scored by
           s = ITM match logit + cosine similarity (as the released code adds them), the rest
           ranked below; recall@K of the re-scored ranking.

  python -m lab.eval.blip_retrieval --run runs/blip_cleaned --rerank 16

Prints {i2t_recall@K, t2i_recall@K} for K in --ks, then those of the re-ranked ranking (named
itm_...) when --rerank k > 0; writes them to --out as JSON when given.
Letters: N images (and their N captions), J the ITC width, S image tokens, W their width,
T tokens, k candidates (A in array names).
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from lab.eval.zero_shot import retrieval_recall
from lab.models import blip


def embed(cfg, params, batches) -> dict:
  """{img_NJ, txt_NJ, tokens_NT, mask_NT, img_NSW}: ITC embeddings, the texts and the image
  tokens of every batch, concatenated in order."""
  def one(params, images, tokens, mask):
    img_BSW = blip.encode_image(cfg, params, images)
    return (blip.image_features(cfg, params, img_BSW),
            blip.text_features(cfg, params, tokens, mask), img_BSW)
  step = jax.jit(one)
  parts = [jax.device_get(step(params, b['image'], b['tokens'], b['mask'])) for b in batches]
  return {'img_NJ': np.concatenate([p[0] for p in parts]),
          'txt_NJ': np.concatenate([p[1] for p in parts]),
          'img_NSW': np.concatenate([p[2] for p in parts]),
          'tokens_NT': np.concatenate([b['tokens'] for b in batches]),
          'mask_NT': np.concatenate([b['mask'] for b in batches])}


def recall_from_scores(score_NN: np.ndarray, ks) -> dict:
  """Recall@K of a score matrix whose diagonal holds the true pairs: i2t, the fraction of rows
  whose own column is among their K highest; t2i, of columns whose own row is (ties broken
  against the true pair)."""
  score_NN = np.asarray(score_NN, np.float64)
  own_N = np.diagonal(score_NN)
  rank_i2t_N = np.sum(score_NN >= own_N[:, None], axis=1) - 1  # others scoring as high or higher
  rank_t2i_N = np.sum(score_NN >= own_N[None, :], axis=0) - 1
  out = {}
  for k in ks:
    out[f'i2t_recall@{k}'] = float(np.mean(rank_i2t_N < k))
    out[f't2i_recall@{k}'] = float(np.mean(rank_t2i_N < k))
  return out


def itm_scores(cfg, params, emb: dict, k: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """(i2t_NN, t2i_NN): for each image (row) its k texts of highest cosine similarity, and for
  each text (column) its k images, scored ITM match logit + similarity; every other entry -inf."""
  N = len(emb['img_NJ'])
  if not 1 <= k <= N:
    raise ValueError(f'rerank k={k}; expected 1..{N} (the number of pairs)')
  sim_NN = emb['img_NJ'] @ emb['txt_NJ'].T
  logit = jax.jit(lambda params, t, m, img: blip.itm_logits(cfg, params, t, m, img)[:, 1])

  def score(image_R, text_R):
    out = []
    for i in range(0, len(image_R), chunk):
      im, tx = image_R[i:i + chunk], text_R[i:i + chunk]
      pad = chunk - len(im)  # a fixed chunk shape: one compilation
      im, tx = np.pad(im, (0, pad)), np.pad(tx, (0, pad))
      out.append(np.asarray(logit(params, emb['tokens_NT'][tx], emb['mask_NT'][tx],
                                  emb['img_NSW'][im]))[:chunk - pad])
    return np.concatenate(out) + sim_NN[image_R, text_R]

  top_text_NA = np.argsort(-sim_NN, axis=1, kind='stable')[:, :k]
  top_image_NA = np.argsort(-sim_NN, axis=0, kind='stable')[:k].T
  rows_NA = np.repeat(np.arange(N)[:, None], k, axis=1)
  i2t_NN, t2i_NN = np.full((N, N), -np.inf), np.full((N, N), -np.inf)
  i2t_NN[rows_NA, top_text_NA] = score(rows_NA.ravel(), top_text_NA.ravel()).reshape(N, k)
  t2i_NN[top_image_NA, rows_NA] = score(top_image_NA.ravel(), rows_NA.ravel()).reshape(N, k)
  return i2t_NN, t2i_NN


def evaluate(cfg, params, batches, ks=(1, 5), rerank: int = 0) -> dict:
  """Recall@K of ITC ranking, and with rerank = k > 0 of the ITM re-scored ranking (itm_*)."""
  emb = embed(cfg, params, batches)
  out = {k: float(v) for k, v in retrieval_recall(jnp.asarray(emb['img_NJ']),
                                                  jnp.asarray(emb['txt_NJ']), ks).items()}
  if rerank:
    i2t_NN, t2i_NN = itm_scores(cfg, params, emb, rerank)
    out |= {f'itm_{k}': v for k, v in recall_from_scores(i2t_NN, ks).items() if 'i2t' in k}
    out |= {f'itm_{k}': v for k, v in recall_from_scores(t2i_NN, ks).items() if 't2i' in k}
  return out


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog='python -m lab.eval.blip_retrieval',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--run', required=True, help='workdir of a trained BLIP run')
  parser.add_argument('--ks', default='1,5', help='comma-separated K of recall@K')
  parser.add_argument('--rerank', type=int, default=0, help='ITM re-ranking of the top k (0: off)')
  parser.add_argument('--out', default='', help='write the recalls here as JSON')
  args = parser.parse_args(argv)
  from lab.train import restore
  run = restore.load(args.run)
  if run.config.model.name != 'blip':
    raise ValueError(f'--run={args.run!r} trained {run.config.model.name!r}; expected "blip"')
  ks = tuple(int(k) for k in args.ks.split(','))
  out = evaluate(run.config.model, run.params, run.data.eval_batches, ks, args.rerank)
  out |= {'run': args.run, 'step': run.step, 'pairs': sum(len(b['tokens'])
                                                          for b in run.data.eval_batches)}
  print(json.dumps(out, indent=2))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == '__main__':
  main()
