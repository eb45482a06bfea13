"""Training a vision-language model (lab.models.vlm) on image-text batches, in stages.

Visual instruction tuning (LLaVA, Liu et al. 2023, arXiv 2304.08485, sec. 4.2, eq. 3): next-token
loss on the answer tokens only,
  L = - sum_{b,t} m_{b,t+1} log p(x_{b,t+1} | image_b, x_{b,<=t}) / sum_{b,t} m_{b,t+1},
over the layout <bos> <image> x M question <sep> answer <eos> (lab.models.vlm.
insert_image_tokens), m the batch's loss_mask (the answer and its <eos>; 0 on the image tokens).
On 'caption' batches m is every non-pad token after <bos>: captioning, which pre-trains a vision
tower as CapPa does (Tschannen et al. 2023, arXiv 2306.07915).

Stages (objective_args.stage), after LLaVA's two-stage recipe (sec. 4.2):
  connector  "pre-training for feature alignment": the vision tower and the LLM are frozen and
             held in the task STATE, so neither gradients nor AdamW's weight decay touch them;
             the connector is the only parameter.
  full       every part is a parameter and trains (LLaVA's stage 2 trains connector and LLM with
             the ViT frozen; InternVL 1.5's and MiMo-VL's later stages train all three).
Towers come from earlier runs or are drawn fresh from config.seed when the workdir is '':
objective_args.vision_workdir, a lab.run workdir whose ViT is extracted (a 'vlm' run's vision
part, e.g. the captioning run of experiments/vlm_scenes.py:caption, or a 'vit' model's params
without its head), and objective_args.llm_workdir, a lab.objectives.lm run of
lab.models.transformer on the same word tokenizer (experiments/scene_lm.py) or a 'vlm' run's LLM.

Metrics: loss, token_accuracy, and exact_match, the fraction of rows whose every target token is
the argmax under teacher forcing. That is greedy decoding's exact-match VQA accuracy: greedy
picks the argmax after its own prefix, which is the teacher-forced prefix as long as every token
is right, so the greedy answer up to <eos> equals the reference iff all its teacher-forced
argmaxes do (ties aside); lab.eval.vqa_eval decodes for real.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lab.config import ConfigError, require
from lab.models import vit, vlm
from lab.nn import param_spec as ps
from lab.train import precision
from lab.train.task import Task

STAGES = ('connector', 'full')
TASKS = ('vqa', 'caption')
TOWERS = ('vision', 'llm')
_TOWER_KEY = 11
# Fields that may differ from the tower's own run: they change no parameter.
_FREE_FIELDS = ('attention_backend', 'remat', 'dropout', 'drop_path', 'pooling', 'num_classes',
                'name', 'vocab_multiple')


def validate(config) -> None:
  args = config.objective_args
  require(config.model.name == 'vlm', f'model.name={config.model.name!r}; the vlm objective '
                                      'expects "vlm"')
  require(args.stage in STAGES, f'objective_args.stage={args.stage!r}; expected one of {STAGES}')
  require(config.data.name == 'image_text' and config.data.task in TASKS,
          f'data.name={config.data.name!r}, data.task={config.data.get("task")!r}; expected '
          f'"image_text" with a task in {TASKS}')


def laid_out(cfg, batch: dict):
  """(tokens_BT, mask_BT), T = text length + M: the batch's tokens with M image placeholders
  after <bos>, and its loss_mask ('vqa') or mask ('caption') with 0 there. Inputs are
  tokens[:, :-1], targets tokens[:, 1:] weighted by mask[:, 1:] (<bos> is never a target)."""
  M = vlm.tokens_per_image(cfg)
  mask_BT = batch['loss_mask'] if 'loss_mask' in batch else batch['mask']
  return (vlm.insert_image_tokens(batch['tokens'], cfg.image_token_id, M),
          vlm.insert_image_tokens(mask_BT, 0, M))


def masked_metrics(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> dict:
  """loss = sum_t m_t (logsumexp z_t - z_t[x_t]) / sum_t m_t (float32), token_accuracy (argmax =
  target over masked tokens) and exact_match (rows, among those with a target, whose every
  masked token is right)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  m_BT = mask_BT.astype(jnp.float32)
  target_BT = jnp.einsum('BTV,BTV->BT', logits_BTV,
                         jax.nn.one_hot(targets_BT, logits_BTV.shape[-1], dtype=jnp.float32))
  nll_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - target_BT
  n = jnp.maximum(m_BT.sum(), 1.0)
  right_BT = (logits_BTV.argmax(-1) == targets_BT).astype(jnp.float32)
  has_B = (m_BT.sum(1) > 0).astype(jnp.float32)
  exact_B = jnp.all((right_BT > 0) | (m_BT == 0), axis=1).astype(jnp.float32) * has_B
  return {'loss': (nll_BT * m_BT).sum() / n, 'token_accuracy': (right_BT * m_BT).sum() / n,
          'exact_match': exact_B.sum() / jnp.maximum(has_B.sum(), 1.0)}


def _check_fields(kind: str, workdir: str, saved, current, fields) -> None:
  diff = sorted(k for k in fields if k not in _FREE_FIELDS and saved.get(k) != current.get(k))
  if diff:
    raise ConfigError(f'objective_args.{kind}_workdir={workdir!r} holds a different {kind} tower ('
                      + ', '.join(f'{k}: saved {saved.get(k)!r} vs {current.get(k)!r}'
                                  for k in diff) + ')')


def _saved_tower(run, part: str):
  """(the tower's config, its params) of a restored run: a 'vlm' run's part (from its params,
  or its state when that stage froze it), or the whole model of a 'vit' / 'transformer' run."""
  model = run.config.model
  if model.name == 'vlm':
    merged = {**run.state.model_state, **run.params}
    config_of = vlm.vision_config if part == 'vision' else vlm.llm_config
    return config_of(model), merged[part]
  if (part, model.name) in (('vision', 'vit'), ('llm', 'transformer')):
    return model, run.params
  raise ConfigError(f'objective_args.{part}_workdir holds a {model.name!r} run; expected a "vlm" '
                    f'or "{"vit" if part == "vision" else "transformer"}" run')


def load_tower(config, part: str):
  """Host arrays of the `part` ('vision' | 'llm') tower from objective_args.<part>_workdir, checked
  against this run's config; None when the workdir is ''."""
  workdir = config.objective_args[f'{part}_workdir']
  if not workdir:
    return None
  from lab.train import restore
  run = restore.load(workdir)
  saved_cfg, params = _saved_tower(run, part)
  cfg = config.model
  if part == 'vision':
    current = vlm.vision_config(cfg)
    _check_fields(part, workdir, saved_cfg, current, vit.FIELDS)
    params = {k: params[k] for k in vlm.param_specs(cfg)['vision']}  # a classifier's head goes
  else:
    current = vlm.llm_config(cfg)
    _check_fields(part, workdir, saved_cfg, current, set(saved_cfg) | set(current))
    saved_tiles = run.config.data.get('n_tiles')
    require(saved_tiles == config.data.n_tiles, f'objective_args.llm_workdir={workdir!r} was '
            f'trained with data.n_tiles={saved_tiles}; expected {config.data.n_tiles} (same ids)')
  return jax.device_get(params)


def _constant(value) -> ps.Initializer:
  return lambda key, shape, dtype: jnp.asarray(value, dtype)


def make_task(config, data) -> Task:
  cfg, args = config.model, config.objective_args
  require(list(data.encode('<image>')) == [cfg.image_token_id],
          f'model.image_token_id={cfg.image_token_id}; the tokenizer\'s <image> is '
          f'{list(data.encode("<image>"))}')
  tokens_BT, _ = laid_out(cfg, data.eval_batches[0])
  require(tokens_BT.shape[1] - 1 <= cfg.llm.max_len,
          f'model.llm.max_len={cfg.llm.max_len}; the {vlm.tokens_per_image(cfg)} image tokens '
          f'and {data.eval_batches[0]["tokens"].shape[1]} text tokens need '
          f'{tokens_BT.shape[1] - 1}')
  vlm.check_layout(cfg, tokens_BT)
  specs = vlm.param_specs(cfg)
  towers = {part: load_tower(config, part) for part in TOWERS}
  frozen = args.stage == 'connector'
  if frozen:
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _TOWER_KEY)
    state = {part: towers[part] if towers[part] is not None else
             jax.device_get(ps.init(specs[part], jax.random.fold_in(key, i)))
             for i, part in enumerate(TOWERS)}
    specs = {'connector': specs['connector']}
  else:
    state = {}
    for part in TOWERS:
      if towers[part] is not None:
        specs[part] = jax.tree.map(lambda s, v: dataclasses.replace(s, init=_constant(v)),
                                   specs[part], towers[part], is_leaf=ps.is_spec)

  def loss_fn(params, model_state, batch, rng, train):
    dtype = jax.tree.leaves(params)[0].dtype
    net = {**precision.cast_floats(model_state, dtype), **params} if frozen else params
    tokens_BT, mask_BT = laid_out(cfg, batch)
    images_BXYC = batch['image'].astype(dtype)
    logits_BTV = vlm.forward(cfg, net, images_BXYC, tokens_BT[:, :-1], rng=rng, train=train)
    metrics = masked_metrics(logits_BTV, tokens_BT[:, 1:], mask_BT[:, 1:])
    return metrics['loss'], (metrics, model_state)

  return Task(param_specs=specs, init_state=lambda key: state, loss_fn=loss_fn)
