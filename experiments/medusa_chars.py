"""Medusa heads (Cai et al. 2024) on the character-level GPT of gpt_chars.py.

Two runs on the same no-download Python-docs text and the same model: first the decoder, then
its heads (Medusa-1: the decoder frozen):
  python -m lab.run --config experiments/gpt_chars.py --workdir runs/gpt
  python -m lab.run --config experiments/medusa_chars.py --workdir runs/medusa \
      --config.objective_args.backbone_workdir=runs/gpt
The samples are decoded with tree speculation and report tokens per verification step;
benchmarks/bench_speculative.py times it against plain decoding.

Variants (after ':'):
  (none)   4 heads on the default gpt_chars model, 600 steps.
  tiny     on gpt_chars:tiny, a few-second config for tests.
  llama    on gpt_chars' llama variant (combine as 'tiny,llama').
  medusa2  train the decoder and the heads jointly (L_LM + lambda_0 L_heads); with an empty
           backbone_workdir the decoder starts from scratch.
  heads=M  M heads (default 4).
"""
import os

from lab import config as config_lib


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  unknown = set(variant) - {'tiny', 'llama', 'medusa2', 'heads'}
  if unknown:
    raise ValueError(f'medusa_chars variant {sorted(unknown)}; expected tiny, llama, medusa2, '
                     'heads=M')
  base = ','.join(name for name in ('tiny', 'llama') if name in variant)
  c = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gpt_chars.py')
                      + (f':{base}' if base else ''))
  heads = int(variant['heads']) if 'heads' in variant else 4
  c.objective = 'medusa'
  c.objective_args = dict(mode='medusa1', num_heads=heads, decay=0.8, lambda_0=0.2,
                          backbone_workdir='', moe_balance_weight=0.01,
                          sample_tree=(3, 2, 1, 1)[:heads] + (1,) * max(0, heads - 4))
  # Medusa-1 trains the heads alone from the LM head's copy, without weight decay (as the
  # authors' recipe); Medusa-2 keeps gpt_chars' optimizer for the decoder it also trains.
  c.train.update(steps=600, lr=1e-3, min_lr=1e-4, warmup_steps=40, weight_decay=0.0)
  c.sample.update(num=1, length=80)
  if 'tiny' in variant:
    c.train.update(steps=20, warmup_steps=2)
    c.sample.update(length=16)
  if 'medusa2' in variant:
    c.objective_args.mode = 'medusa2'
    c.train.update(lr=3e-3, min_lr=3e-4, weight_decay=0.1, steps=900 if 'tiny' not in variant
                   else 20)
  return c
