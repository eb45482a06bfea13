"""VQA on generated scenes with a ViT + connector + decoder LLM (lab.models.vlm), in stages.

  # 1. the LLM, on text only (captions, questions, answers of training scenes)
  python -m lab.run --config experiments/scene_lm.py --workdir runs/scene_lm
  # 2. the vision tower: captioning of ViT + MLP connector + that LLM, all trained (CapPa-style)
  python -m lab.run --config experiments/vlm_scenes.py:caption --workdir runs/vlm_caption \
      --config.objective_args.llm_workdir=runs/scene_lm
  # 3. VQA: the connector alone on the frozen towers (LLaVA stage 1), or everything
  python -m lab.run --config experiments/vlm_scenes.py:connector=resampler --workdir runs/vqa_rs \
      --config.objective_args.vision_workdir=runs/vlm_caption \
      --config.objective_args.llm_workdir=runs/scene_lm
  python -m lab.eval.vqa_eval --run runs/vqa_rs

The scenes (and held-out colour-shape pairs) and the LLM's shape are scene_lm.py's, so its runs
load here. 32 x 32 images, 4-pixel patches: 64 patch features; the MLP connector gives 64 LLM
tokens per image, the resampler 16 queries, pixel shuffle 16.

Variants (after ':', comma-separated):
  connector=C  mlp (default) | resampler | pixel_shuffle.
  stage=S      connector (default: towers frozen in the task state) | full (all trained).
  caption      train on captions instead of questions (stage full): the vision tower's
               pre-training, its ViT later read through objective_args.vision_workdir.
  tiny         a few-second config for tests.
"""
import os

import ml_collections

from lab import config as config_lib

CONNECTORS = ('mlp', 'resampler', 'pixel_shuffle')


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  unknown = set(variant) - {'connector', 'stage', 'caption', 'tiny'}
  if unknown:
    raise ValueError(f'vlm_scenes variant {sorted(unknown)}; expected connector=, stage=, '
                     'caption, tiny')
  connector = variant.get('connector', 'mlp')
  if connector not in CONNECTORS:
    raise ValueError(f'vlm_scenes connector={connector!r}; expected one of {CONNECTORS}')
  stage = 'full' if 'caption' in variant else variant.get('stage', 'connector')
  tiny = 'tiny' in variant
  lm = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'scene_lm.py')
                       + (':tiny' if tiny else ''))
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'vlm'
  c.objective_args = dict(stage=stage, vision_workdir='', llm_workdir='')
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, seq=1)
  c.sharding_rules = {}
  scene = {k: lm.data[k] for k in ('seed', 'image_size', 'grid', 'max_objects', 'digit_fraction',
                                   'holdout', 'n_tiles')}
  c.data = dict(name='image_text', task='caption' if 'caption' in variant else 'vqa',
                glyphs='digits', data_dir='', n_train=10000, n_eval=256, eval_split='test',
                noise_fraction=0.0, text_len=0, eval_batches=8, **scene)
  llm = {k: v for k, v in lm.model.items()
         if k not in ('name', 'vocab_size', 'vocab_multiple', 'attention_backend')}
  c.model = dict(name='vlm', vocab_size=0, image_size=0, channels=0, image_token_id=5,
                 attention_backend='auto',
                 vision=dict(patch_size=4, d_model=64, n_layers=2, n_heads=4, mlp_dim=256,
                             class_token=False, pos_embed='learned', mlp_activation='gelu',
                             norm_eps=1e-6, dropout=0.0, drop_path=0.0),
                 connector=dict(connector=connector, n_queries=16, n_heads=4), llm=llm)
  lr = 2e-3 if stage == 'connector' else 1e-3
  c.train = dict(steps=800, batch_size=32, grad_accum=1, lr=lr, min_lr=lr / 20, warmup_steps=50,
                 schedule='cosine', decay_steps=0, wsd_decay_fraction=0.2, b1=0.9, b2=0.99,
                 eps=1e-8, weight_decay=0.0, clip_norm=1.0, ema_decay=0.0, compute_dtype='float32',
                 loss_scale_init=2.0**15, loss_scale_period=2000, nonfinite='stop', log_every=50,
                 eval_every=400, sample_every=0, checkpoint_every=400, keep_checkpoints=1)
  if tiny:
    c.data.update(n_train=64, n_eval=16, eval_batches=1)
    c.model.update(attention_backend='xla')
    c.model.vision.update(patch_size=8, d_model=16, n_layers=1, n_heads=2, mlp_dim=32)
    c.model.connector.update(n_queries=4, n_heads=2)
    c.train.update(steps=4, batch_size=8, warmup_steps=1, log_every=1, eval_every=4,
                   checkpoint_every=4)
  return c
