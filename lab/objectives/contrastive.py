"""Image-text contrastive training of lab.models.clip: CLIP, SigLIP and LiT.

- 'clip' loss: the symmetric softmax cross-entropy of CLIP (Radford et al. 2021,
  arXiv:2103.00020, fig. 3) with the learnable log-scale t, exp(t) clipped at 100 (sec. 2.5),
  lab.objectives.contrastive_losses.clip_loss.
- 'siglip' loss: the pairwise sigmoid loss of SigLIP (Zhai et al. 2023, arXiv:2303.15343, eq. 1)
  with learnable t' and bias b (init log 10 and -10). When the active mesh splits the batch over
  n > 1 devices (lab.parallel.rules.activate, which lab.train.loop enters around every step), it
  is computed chunk by chunk on a ring (siglip_chunked, sec. 3.3): each device forms only its
  (B/n) x (B/n) logits per step. The mesh and rules are read at trace time from the contexts
  activate sets (jax.sharding.get_abstract_mesh, flax's logical_axis_rules), as
  lab.parallel.expert_dispatch does; with no mesh, or one device along 'batch', the plain loss.
- LiT, Locked-image Tuning (Zhai et al. 2022, arXiv:2111.07991): objective_args.
  image_tower_workdir names a finished run whose ViT becomes the image tower. With
  lock_image_tower (LiT's 'Lu') it is held in the task STATE (as lab.objectives.medusa holds a
  frozen backbone), so neither gradients nor the optimizer's weight decay touch it, and it runs
  in evaluation mode; the text tower and the heads train from scratch. Without the lock it only
  initialises the image parameters, which then train (LiT's 'Uu'). The run is a
  lab.objectives.classify run of a 'vit' backbone (its params['backbone']; the classifier head
  is dropped) or a contrastive run of lab.models.clip (its image tower; the heads are dropped,
  as big_vision's LiT does not load them). Its ViT must
  have exactly model.image's architecture (a one-line ConfigError names the fields that differ).
  With model.image_head=False the locked features are the image embeddings (big_vision's LiT,
  out_dim = (None, J)); with True a linear image head on top of them trains too.

Batches (lab.data.image_text, tasks 'caption' | 'digits_captions' | 'mnist_captions'): image
f32[B, X, Y, C], tokens i32[B, T], mask i32[B, T]. Params: {'model': lab.models.clip's (without
'image' under LiT), 'loss': {'log_scale'} | {'log_t', 'bias'}}; state: {} or {'image': tower}.
Metrics: loss, i2t_accuracy and t2i_accuracy (top-1 in the batch), logit_scale (the scale the
logits see) and, for SigLIP, logit_bias; the loop reports them on eval_batches as eval_*.
With train.grad_accum > 1 every micro-batch is its own contrastive batch (fewer negatives).

config.objective_args: loss ('clip' | 'siglip'), image_tower_workdir ('' = both towers from
scratch), lock_image_tower (bool; needs image_tower_workdir).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lab.config import ConfigError, require
from lab.models import clip, vit
from lab.nn import param_spec as ps
from lab.objectives import contrastive_losses as cl
from lab.parallel import rules as rules_lib
from lab.train.task import Task

LOSSES = ('clip', 'siglip')
TASKS = ('caption', 'digits_captions', 'mnist_captions')
# ViT fields that change no parameter: they may differ between the locked tower's run and this.
_FREE_IMAGE_FIELDS = ('attention_backend', 'dropout', 'drop_path', 'num_classes')


def validate(config) -> None:
  args = config.objective_args
  require(config.model.name == 'clip',
          f'model.name={config.model.name!r}; contrastive training expects "clip"')
  require(args.loss in LOSSES, f'objective_args.loss={args.loss!r}; expected one of {LOSSES}')
  require(config.data.name == 'image_text' and config.data.task in TASKS,
          f'data {config.data.name!r} task {config.data.get("task")!r}; expected image_text '
          f'with a task in {TASKS}')
  require(0 < config.data.text_len <= config.model.text.max_len,
          f'data.text_len={config.data.text_len}; expected 1..model.text.max_len='
          f'{config.model.text.max_len} (the text tower learns that many positions)')
  require(not args.lock_image_tower or args.image_tower_workdir,
          "objective_args.lock_image_tower=True with image_tower_workdir=''; expected the "
          'workdir of the run whose ViT is locked')


def tower_architecture(vit_cfg, pre_norm: bool) -> dict:
  """The fields that fix a ViT tower's parameters and function: lab.models.vit's fields but
  _FREE_IMAGE_FIELDS, plus CLIP's pre_norm."""
  fields = {k: vit_cfg[k] for k in vit.FIELDS if k not in _FREE_IMAGE_FIELDS}
  return dict(fields, pre_norm=pre_norm)


def load_image_tower(config) -> dict:
  """The locked tower's params from objective_args.image_tower_workdir (see the docstring)."""
  from lab.train import restore
  workdir = config.objective_args.image_tower_workdir
  run = restore.load(workdir)
  saved = run.config.model
  if run.config.objective == 'classify' and saved.name == 'vit':
    have, tower = tower_architecture(saved, False), run.params['backbone']
  elif saved.name == 'clip':
    have = tower_architecture(clip.image_config(saved), saved.image.pre_norm)
    tower = run.params['model'].get('image', run.state.model_state.get('image'))
  else:
    raise ConfigError(f'objective_args.image_tower_workdir={workdir!r} holds a '
                      f'{run.config.objective!r} run of model {saved.name!r}; expected a '
                      "classify run of a 'vit' or a contrastive run of 'clip'")
  want = tower_architecture(clip.image_config(config.model), config.model.image.pre_norm)
  diff = sorted(k for k in want if have[k] != want[k])
  if diff:
    raise ConfigError(f'objective_args.image_tower_workdir={workdir!r} holds another ViT ('
                      + ', '.join(f'{k}: saved {have[k]!r} vs model.image {want[k]!r}'
                                  for k in diff) + ')')
  return jax.device_get(tower)


def _constant(value) -> ps.Initializer:
  return lambda key, shape, dtype: jnp.asarray(value, dtype)


def _batch_mesh():
  """(mesh, rules) of the active mesh when it splits 'batch' over more than one device."""
  mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
  if mesh.empty or not rules or mesh.manual_axes:
    return None
  axes = rules_lib.mesh_axes(rules_lib.spec(('batch',), rules)[0])
  return (mesh, rules) if rules_lib.devices_along(mesh, axes) > 1 else None


def contrastive_loss(loss: str, img_BJ: jax.Array, txt_BJ: jax.Array, p: dict):
  """(L, metrics) of clip_loss or siglip_loss (chunked over the active mesh's batch devices),
  with the scale the logits see (and SigLIP's bias) among the metrics."""
  if loss == 'clip':
    value, metrics = cl.clip_loss(img_BJ, txt_BJ, p['log_scale'])
    return value, dict(metrics, logit_scale=jnp.exp(cl.clipped_log_scale(p['log_scale'])))
  split = _batch_mesh()
  if split is None:
    value, metrics = cl.siglip_loss(img_BJ, txt_BJ, p['log_t'], p['bias'])
  else:
    value, metrics = cl.siglip_chunked(img_BJ, txt_BJ, p['log_t'], p['bias'], mesh=split[0],
                                       rules=split[1])
  return value, dict(metrics, logit_scale=jnp.exp(p['log_t']), logit_bias=p['bias'])


def make_task(config, data) -> Task:
  del data  # the batches carry everything
  cfg, args = config.model, config.objective_args
  locked = args.lock_image_tower
  model_specs = clip.param_specs(cfg)
  tower = load_image_tower(config) if args.image_tower_workdir else None
  if locked:
    del model_specs['image']
  elif tower is not None:  # 'Uu': the loaded tower is the image parameters' initial value
    model_specs['image'] = jax.tree.map(
        lambda spec, value: dataclasses.replace(spec, init=_constant(value)),
        model_specs['image'], tower, is_leaf=ps.is_spec)
  loss_specs = cl.clip_param_specs() if args.loss == 'clip' else cl.siglip_param_specs()

  def loss_fn(params, state, batch, rng, train):
    images, tokens, mask = batch['image'], batch['tokens'], batch['mask']
    if locked:
      dtype = jax.tree.leaves(params['model'])[0].dtype
      model = dict(params['model'], image=jax.tree.map(
          lambda a: jax.lax.stop_gradient(a.astype(dtype)), state['image']))
      img_BJ = clip.encode_image(cfg, model, images)
      txt_BJ = clip.encode_text(cfg, model, tokens, mask, train=train, rng=rng)
    else:
      img_BJ, txt_BJ = clip.forward(cfg, params['model'], images, tokens, mask, train=train,
                                    rng=rng)
    loss, metrics = contrastive_loss(args.loss, img_BJ, txt_BJ, params['loss'])
    return loss, (dict(metrics, loss=loss), state)

  return Task(param_specs={'model': model_specs, 'loss': loss_specs},
              init_state=(lambda key: {'image': tower}) if locked else (lambda key: {}),
              loss_fn=loss_fn)
