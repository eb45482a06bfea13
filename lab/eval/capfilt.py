"""CapFilt, captioning and filtering (Li, Li, Xiong & Hoi 2022, "BLIP", arXiv:2201.12086,
sec. 3.3, fig. 3), on the training pairs of a trained BLIP run (lab.objectives.blip):

  captioner  the image-grounded decoder writes one synthetic caption per training image by
             nucleus sampling, top_p = 0.9 (blip.caption);
  filter     the ITM head scores p_match of (image, original caption) and of (image, synthetic
             caption); a caption is kept when p_match >= threshold. The default 0.5 removes what
             the ITM head predicts unmatched, as BLIP's filter does.
The kept pairs, up to two per image, go to a file that lab.data.image_text_cleaned reads, so the
model can be trained again on them (experiments/blip_scenes.py:cleaned). Unlike BLIP, the
captioner and the filter are the trained run itself: BLIP first fine-tunes each on COCO's
human-annotated pairs, of which these generated scenes have no separate clean set.

  python -m lab.eval.capfilt --run runs/blip_noisy --out runs/blip_noisy/capfilt.npz

It prints, and writes beside --out as .json, the counts kept and the filter's precision and
recall at finding the swapped captions (the data's `noisy` flags) among the original ones:
precision = |removed & noisy| / |removed|, recall = |removed & noisy| / |noisy|.
Letters: N training images, T tokens, B a batch.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from lab.data import image_text_cleaned
from lab.models import blip
from lab.objectives.blip import special_ids


def keep(p_match_N: np.ndarray, threshold: float) -> np.ndarray:
  """bool_N: the captions the filter keeps, p_match >= threshold."""
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f'threshold={threshold}; expected a probability in [0, 1]')
  return np.asarray(p_match_N) >= threshold


def detection(removed_N: np.ndarray, noisy_N: np.ndarray) -> dict:
  """The filter as a detector of noisy captions: precision |removed & noisy| / |removed| and
  recall |removed & noisy| / |noisy| (nan where the denominator is 0), with the counts."""
  removed_N, noisy_N = np.asarray(removed_N, bool), np.asarray(noisy_N, bool)
  if removed_N.shape != noisy_N.shape:
    raise ValueError(f'detection: flags of shapes {removed_N.shape} and {noisy_N.shape}; '
                     'expected one [N] for both')
  hits = int(np.sum(removed_N & noisy_N))
  n_removed, n_noisy = int(removed_N.sum()), int(noisy_N.sum())
  return {'precision': hits / n_removed if n_removed else float('nan'),
          'recall': hits / n_noisy if n_noisy else float('nan'),
          'removed': n_removed, 'noisy': n_noisy, 'removed_noisy': hits}


def match_probability(cfg, params, tokens_BT, mask_BT, img_BSW) -> jax.Array:
  """p_B = softmax(itm_logits)[:, 1], the ITM head's probability that each pair matches."""
  return jax.nn.softmax(blip.itm_logits(cfg, params, tokens_BT, mask_BT, img_BSW), axis=-1)[:, 1]


def caption_and_score(cfg, params, images_BXYC, tokens_BT, mask_BT, rng, *, ids, top_p):
  """One batch through CapFilt: (synthetic tokens_BT, mask_BT, p_match of the original
  captions, p_match of the synthetic ones). ids = (bos, eos, pad)."""
  img_BSW = blip.encode_image(cfg, params, images_BXYC)
  bos, eos, pad = ids
  synth_BT, synth_mask_BT = blip.caption(cfg, params, img_BSW, rng, length=tokens_BT.shape[1],
                                         bos_id=bos, eos_id=eos, pad_id=pad, top_p=top_p)
  return (synth_BT, synth_mask_BT, match_probability(cfg, params, tokens_BT, mask_BT, img_BSW),
          match_probability(cfg, params, synth_BT, synth_mask_BT, img_BSW))


def bootstrap(cfg, params, data, n: int, rng: jax.Array, *, top_p: float = 0.9) -> dict:
  """Captions and ITM scores of every training example 0..n-1, by scene index: {tokens_NT,
  mask_NT, noisy_N, synth_tokens_NT, synth_mask_NT, p_original_N, p_synthetic_N}. The examples
  come from the data's own training iterator, read until each index has been seen."""
  step = jax.jit(lambda params, images, tokens, mask, key: caption_and_score(
      cfg, params, images, tokens, mask, key, ids=special_ids(data), top_p=top_p))
  out, seen = {}, np.zeros(n, bool)
  for i, batch in enumerate(data.make_train_iter()):
    results = jax.device_get(step(params, batch['image'], batch['tokens'], batch['mask'],
                                  jax.random.fold_in(rng, i)))
    rows = {'tokens_NT': batch['tokens'], 'mask_NT': batch['mask'], 'noisy_N': batch['noisy'],
            **dict(zip(('synth_tokens_NT', 'synth_mask_NT', 'p_original_N', 'p_synthetic_N'),
                       results))}
    for k, v in rows.items():
      out.setdefault(k, np.zeros((n, *v.shape[1:]), v.dtype))[batch['label']] = v
    seen[batch['label']] = True
    if seen.all():
      return out
  raise ValueError(f'the training iterator ended before all {n} examples were seen')


def cleaned_pairs(scored: dict, threshold: float) -> tuple[dict, dict]:
  """(pairs, summary): the kept originals, then the kept synthetic captions, as
  image_text_cleaned.save_pairs takes them, and counts with the detection scores."""
  keep_orig_N = keep(scored['p_original_N'], threshold)
  keep_synth_N = keep(scored['p_synthetic_N'], threshold)
  image_N = np.arange(len(keep_orig_N))
  pairs = {'image_K': np.concatenate([image_N[keep_orig_N], image_N[keep_synth_N]]),
           'tokens_KT': np.concatenate([scored['tokens_NT'][keep_orig_N],
                                        scored['synth_tokens_NT'][keep_synth_N]]),
           'mask_KT': np.concatenate([scored['mask_NT'][keep_orig_N],
                                      scored['synth_mask_NT'][keep_synth_N]]),
           'synthetic_K': np.concatenate([np.zeros(keep_orig_N.sum(), np.int32),
                                          np.ones(keep_synth_N.sum(), np.int32)])}
  noisy_N = scored['noisy_N'].astype(bool)
  summary = {'images': len(image_N), 'threshold': threshold,
             'kept_original': int(keep_orig_N.sum()), 'kept_synthetic': int(keep_synth_N.sum()),
             'mean_p_clean': float(scored['p_original_N'][~noisy_N].mean()),
             'mean_p_noisy': float(scored['p_original_N'][noisy_N].mean()) if noisy_N.any()
             else float('nan'),
             **detection(~keep_orig_N, noisy_N)}
  return pairs, summary


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog='python -m lab.eval.capfilt',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--run', required=True, help='workdir of a trained BLIP run')
  parser.add_argument('--out', required=True, help='the pairs file (.npz) to write')
  parser.add_argument('--threshold', type=float, default=0.5)
  parser.add_argument('--top_p', type=float, default=0.9)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--samples', type=int, default=8, help='synthetic captions to print')
  args = parser.parse_args(argv)
  from lab.train import restore
  run = restore.load(args.run)
  if run.config.model.name != 'blip' or run.config.data.name != 'image_text':
    raise ValueError(f'--run={args.run!r} trained model {run.config.model.name!r} on data '
                     f'{run.config.data.name!r}; expected "blip" on "image_text" captions')
  scored = bootstrap(run.config.model, run.params, run.data, run.config.data.n_train,
                     jax.random.PRNGKey(args.seed), top_p=args.top_p)
  pairs, summary = cleaned_pairs(scored, args.threshold)
  image_text_cleaned.save_pairs(args.out, pairs, image_text_cleaned.scene_fields(
      run.config.data))
  summary |= {'run': args.run, 'step': run.step, 'top_p': args.top_p, 'out': args.out}
  with open(os.path.splitext(args.out)[0] + '.json', 'w') as f:
    json.dump(summary, f, indent=2)
  decode = run.data.decode
  for i in range(min(args.samples, len(scored['noisy_N']))):
    print(f'[{i}] noisy={int(scored["noisy_N"][i])} p={scored["p_original_N"][i]:.2f} '
          f'{decode(scored["tokens_NT"][i])!r}\n     synthetic p={scored["p_synthetic_N"][i]:.2f} '
          f'{decode(scored["synth_tokens_NT"][i])!r}')
  print(json.dumps(summary, indent=2))
  return summary


if __name__ == '__main__':
  main()
