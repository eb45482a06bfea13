"""Exact-match VQA accuracy of a trained VLM run by greedy decoding, on 'test' and 'test_holdout'.

  python -m lab.eval.vqa_eval --run runs/vqa_rs [--n_eval 1024] [--out runs/vqa_rs/vqa.json]

For each split, the run's scene data (lab.data.image_text, task 'vqa') is rebuilt with that
eval_split; every question's prompt <bos> <image> x M question <sep> is decoded greedily
(lab.sampling.vlm_generate) for --max_new tokens, and an answer counts when the decoded tokens
start with the reference answer and its <eos> (the VQA exact match, as the training metric).
'test_holdout' scenes each hold one held-out colour-shape pair (CLEVR-CoGenT style); its
'mentions_holdout' row keeps the questions whose text or answer names such a pair. Reported per
question family (the templates of lab.data.captions.QUESTIONS), with tokens per image and the
teacher-forced exact match of the objective on the same batches as a cross-check. Prompts of one
length are decoded together (the KV cache holds one length per batch). Writes JSON.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re

import jax
import numpy as np

from lab.data import captions, image_text, scenes
from lab.models import vlm
from lab.sampling import vlm_generate
from lab.train import restore

SPLITS = ('test', 'test_holdout')
_FIELDS = {'kind': scenes.KINDS, 'plural': tuple(captions.PLURALS.values()),
           'colour': scenes.COLOURS, 'relation': captions.RELATIONS}
_FAMILY_PATTERNS = {
    key: re.compile(re.sub(r'\\\{(\w+)\\\}',
                           lambda m: '(' + '|'.join(map(re.escape, _FIELDS[m[1]])) + ')',
                           re.escape(template)))
    for key, template in captions.QUESTIONS.items()}


def question_family(question: str) -> str:
  """The lab.data.captions.QUESTIONS key whose template the question fills."""
  for key, pattern in _FAMILY_PATTERNS.items():
    if pattern.fullmatch(question):
      return key
  raise ValueError(f'question {question!r} fills none of the templates {list(captions.QUESTIONS)}')


def mentions_pair(question: str, answer: str, pairs) -> bool:
  """Whether the question names a (colour, kind) of `pairs` ('is there a red circle?') or asks
  the colour of a kind whose answer makes such a pair ('what colour is the circle?' -> red)."""
  words = question.rstrip('?').split()
  named = set(zip(words, words[1:]))
  asked = {(answer, words[-1])} if question_family(question) == 'colour' else set()
  return bool((named | asked) & set(pairs))


def split_batches(config, split: str, n_eval: int) -> list[dict]:
  """The run's VQA eval batches rebuilt for `split`, n_eval scenes (whole batches)."""
  c = config.as_configdict()
  batch = c.train.batch_size
  c.data.update(eval_split=split, n_eval=n_eval, eval_batches=max(1, n_eval // batch))
  return image_text.build(c).eval_batches


def greedy_answers(cfg, params, images_BXYC, tokens_BT, loss_mask_BT, max_new: int,
                   chunk: int = 64) -> np.ndarray:
  """int32[B, max_new] greedy continuations of each row's prompt (its tokens before the answer,
  i.e. before loss_mask's first 1, with the image placeholders inserted). Rows of one prompt
  length go together in chunks of `chunk` (the last padded by repeating its final row)."""
  starts_B = np.argmax(np.asarray(loss_mask_BT) > 0, axis=1)
  out_BN = np.zeros((len(starts_B), max_new), np.int32)
  M = vlm.tokens_per_image(cfg)
  generate = jax.jit(functools.partial(vlm_generate.generate, cfg, num_new=max_new,
                                       temperature=0.0))
  for length in np.unique(starts_B):
    rows = np.flatnonzero(starts_B == length)
    for i in range(0, len(rows), chunk):
      part = rows[i:i + chunk]
      padded = np.concatenate([part, np.full(chunk - len(part), part[-1])])
      prompt_BT = np.asarray(vlm.insert_image_tokens(np.asarray(tokens_BT)[padded, :length],
                                                     cfg.image_token_id, M))
      vlm.check_layout(cfg, prompt_BT)
      new_BN = generate(params, np.asarray(images_BXYC)[padded], prompt_BT,
                        rng=jax.random.PRNGKey(0))
      out_BN[part] = np.asarray(new_BN)[:len(part)]
  return out_BN


def _accuracy(right) -> dict:
  return {'n': int(len(right)), 'accuracy': float(np.mean(right)) if len(right) else None}


def evaluate_split(run: restore.Run, batches: list[dict], max_new: int) -> dict:
  """Greedy exact match overall, per family and (test_holdout) on held-out mentions, with the
  objective's teacher-forced exact match on the same batches."""
  cfg, decode = run.config.model, run.data.decode
  params = {**run.state.model_state, **run.params}
  exact_match = jax.jit(lambda p, s, batch: run.task.loss_fn(p, s, batch, None, False)[1][0][
      'exact_match'])
  teacher = float(np.mean([exact_match(run.params, run.state.model_state, b) for b in batches]))
  pairs = image_text.holdout_pairs(run.config.data.holdout)
  split = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  new_BN = greedy_answers(cfg, params, split['image'], split['tokens'], split['loss_mask'],
                          max_new)
  records = []
  for b in range(len(new_BN)):
    mask = split['loss_mask'][b] > 0
    reference = split['tokens'][b][mask]
    question = decode(split['tokens'][b][~mask])
    answer = captions.ANSWERS[split['answer'][b]]
    ok = len(reference) <= max_new and (new_BN[b, :len(reference)] == reference).all()
    records.append(dict(family=question_family(question), question=question, answer=answer,
                        predicted=decode(new_BN[b]), right=bool(ok),
                        holdout=mentions_pair(question, answer, pairs)))
  right = np.array([r['right'] for r in records])
  families = sorted({r['family'] for r in records})
  return {**_accuracy(right), 'teacher_forced_exact_match': teacher,
          'per_family': {f: _accuracy(right[[r['family'] == f for r in records]])
                         for f in families},
          'mentions_holdout': _accuracy(right[[r['holdout'] for r in records]]),
          'examples': records[:8]}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog='python -m lab.eval.vqa_eval',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--run', required=True, help='workdir of a lab.objectives.vlm run')
  parser.add_argument('--n_eval', type=int, default=1024, help='scenes per split')
  parser.add_argument('--max_new', type=int, default=4, help='tokens decoded per answer')
  parser.add_argument('--out', default='', help='JSON path (default: <run>/vqa_eval.json)')
  args = parser.parse_args(argv)
  run = restore.load(args.run)
  if run.config.objective != 'vlm' or run.config.data.task != 'vqa':
    raise SystemExit(f'--run={args.run!r} is a {run.config.objective!r} run on task '
                     f'{run.config.data.get("task")!r}; expected a vlm run on "vqa"')
  result = {'run': args.run, 'step': run.step, 'stage': run.config.objective_args.stage,
            'connector': run.config.model.connector.connector,
            'tokens_per_image': vlm.tokens_per_image(run.config.model),
            **{split: evaluate_split(run, split_batches(run.config, split, args.n_eval),
                                     args.max_new) for split in SPLITS}}
  out = args.out or os.path.join(args.run, 'vqa_eval.json')
  with open(out, 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: v if not isinstance(v, dict) else
                    {m: v[m] for m in ('n', 'accuracy', 'teacher_forced_exact_match')}
                    for k, v in result.items()}, indent=2))
  return result


if __name__ == '__main__':
  main()
