"""The contrastive objective: its loss_fn against float64 NumPy CLIP and SigLIP losses of the
encoders' outputs (with the clipped scale and the metrics), SigLIP chunked on a ring when the
active mesh splits the batch (8 simulated devices: same loss and gradients, ppermutes in the
program), LiT's locked tower in the state (loaded from planted runs: a ViT classifier and a CLIP
run; architecture mismatches; the 'Uu' initialisation), and a real two-stage tiny run: a ViT
classifier, then LiT on its tower, whose loss falls while the tower stays bit-identical."""
import functools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO_ROOT
from multidevice import on_8_devices

from lab import config as config_lib
from lab import run as run_lib
from lab.config import ConfigError
from lab.models import clip, vit
from lab.nn import param_spec as ps
from lab.train import checkpoint, loop, metrics_log, restore

jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def experiment(variant: str, *overrides: str):
  """clip_scenes.py:<variant>,tiny prepared (data built, config locked), reference attention."""
  config = config_lib.override(
      config_lib.load(str(REPO_ROOT / f'experiments/clip_scenes.py:{variant}')),
      ['model.attention_backend=reference', *overrides])
  return run_lib.prepare(config)


def draw(specs, seed, std=0.3):
  """float32 params: norm scales 1 + N(0, 0.2^2), the rest N(0, std^2) (non-zero biases)."""
  rng = np.random.default_rng(seed)
  def one(path, s):
    scale = jax.tree_util.keystr(path).endswith("['scale']")
    return jnp.asarray((1.0 if scale else 0.0) + (0.2 if scale else std) *
                       rng.standard_normal(s.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(one, specs, is_leaf=ps.is_spec)


def np_clip_loss(x, y, t):
  """CLIP fig. 3 in float64: symmetric CE of min(e^t, 100) cos(x_i, y_j), targets the diagonal."""
  x, y = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (np.float64(x), np.float64(y)))
  logits = min(np.exp(t), 100.0) * x @ y.T
  ce = lambda z: np.mean(np.log(np.exp(z).sum(1)) - np.diag(z))
  return (ce(logits) + ce(logits.T)) / 2, logits


def np_siglip_loss(x, y, t, b):
  """SigLIP eq. 1 in float64: -1/B sum_ij log sigmoid(z_ij (e^t' cos(x_i, y_j) + b))."""
  x, y = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (np.float64(x), np.float64(y)))
  logits = np.exp(t) * x @ y.T + b
  z = 2 * np.eye(len(x)) - 1
  return np.sum(np.log1p(np.exp(-z * logits))) / len(x), logits


# ---------------------------------------------------------------- the loss of the encoders

@pytest.mark.parametrize('loss', ['clip', 'siglip'])
def test_loss_fn_is_the_loss_of_the_encoders_outputs(loss):
  config, task, data = experiment(f'loss={loss},tiny')
  params = draw(task.param_specs, 0)
  # CLIP: t above log 100, so the scale the logits see is clipped; SigLIP: t' = log 5, b = -2.
  params['loss'] = ({'log_scale': jnp.float32(np.log(150.0))} if loss == 'clip' else
                    {'log_t': jnp.float32(np.log(5.0)), 'bias': jnp.float32(-2.0)})
  batch = data.eval_batches[0]
  value, (metrics, state) = jit(functools.partial(task.loss_fn, train=False))(
      params, {}, batch, None)
  img, txt = jit(functools.partial(clip.forward, config.model))(
      params['model'], batch['image'], batch['tokens'], batch['mask'])
  p = jax.tree.map(float, params['loss'])
  want, logits = (np_clip_loss(img, txt, p['log_scale']) if loss == 'clip' else
                  np_siglip_loss(img, txt, p['log_t'], p['bias']))
  assert state == {}
  np.testing.assert_allclose(value, want, rtol=1e-5)
  assert metrics['loss'] == value
  labels = np.arange(len(img))
  assert metrics['i2t_accuracy'] == pytest.approx(np.mean(logits.argmax(1) == labels))
  assert metrics['t2i_accuracy'] == pytest.approx(np.mean(logits.argmax(0) == labels))
  assert metrics['logit_scale'] == pytest.approx(100.0 if loss == 'clip' else 5.0, rel=1e-6)
  assert set(metrics) == {'loss', 'i2t_accuracy', 't2i_accuracy', 'logit_scale'} | (
      {'logit_bias'} if loss == 'siglip' else set())


@on_8_devices
def test_siglip_is_chunked_over_the_mesh_batch_devices():
  """Under the loop's mesh context (8 devices on 'data'), loss_fn runs siglip_chunked: the same
  loss and gradients as without a mesh, and collective permutes in the compiled program."""
  from lab.parallel import mesh as mesh_lib
  from lab.parallel import rules as rules_lib
  config, task, data = experiment('loss=siglip,tiny')
  params = draw(task.param_specs, 1)
  batch = data.eval_batches[0]
  grad = jax.value_and_grad(lambda p: task.loss_fn(p, {}, batch, None, False)[0])
  plain = jit(grad).lower(params).compile()
  with rules_lib.activate(mesh_lib.make_mesh({'data': 8}), rules_lib.make_rules()):
    ring = jit(grad).lower(params).compile()
  assert 'collective-permute' in ring.as_text() and 'collective-permute' not in plain.as_text()
  (want, want_grads), (got, got_grads) = plain(params), ring(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want_grads))  # bk's grads are 0
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * scale)


# ---------------------------------------------------------------- LiT from planted runs

def _planted_vit_run(d_model=None):
  """A restore.Run-like classify run of vit_digits.py:tiny (8x8 digits) with drawn weights."""
  config = config_lib.load(str(REPO_ROOT / 'experiments/vit_digits.py:tiny'))
  config.model.update(image_size=8, channels=1)
  if d_model:
    config.model.update(d_model=d_model)
  tower = draw(vit.param_specs(config.model), 2)
  return types.SimpleNamespace(config=ml_collections.FrozenConfigDict(config),
                               params={'backbone': tower, 'head': {}},
                               state=types.SimpleNamespace(model_state={}))


def test_lit_holds_the_locked_tower_in_the_state(monkeypatch):
  planted = _planted_vit_run()
  monkeypatch.setattr(restore, 'load', lambda workdir: planted)
  config, task, data = experiment('data=digits,lit,tiny', 'objective_args.image_tower_workdir=x')
  assert 'image' not in task.param_specs['model'] and 'image_head' not in task.param_specs['model']
  state = task.init_state(jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, state['image'], planted.params['backbone'])
  params = draw(task.param_specs, 3)
  batch = data.eval_batches[0]
  loss = lambda p, s: task.loss_fn(p, s, batch, None, True)[0]
  grads = jit(jax.grad(loss))(params, state)
  assert jax.tree.structure(grads) == jax.tree.structure(params)  # nothing of the tower
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads['model']['text']))
  # The tower is used: other tower weights give another loss; the image features are its pooled
  # features (no image head), with the locked tower in evaluation mode.
  other = {'image': jax.tree.map(lambda a: a * 1.1, state['image'])}
  assert abs(jit(loss)(params, other) - jit(loss)(params, state)) > 1e-4
  img = clip.encode_image(config.model, dict(params['model'], image=state['image']),
                          batch['image'])
  want = vit.forward(planted.config.model, planted.params['backbone'], batch['image'])
  np.testing.assert_allclose(img, want, rtol=1e-5, atol=1e-6)


def test_lit_tower_checks_and_unlocked_initialisation(monkeypatch):
  monkeypatch.setattr(restore, 'load', lambda workdir: _planted_vit_run(d_model=24))
  with pytest.raises(ConfigError, match=r"holds another ViT \(d_model: saved 24 vs model.image "
                                        r"16\)"):
    experiment('data=digits,lit,tiny', 'objective_args.image_tower_workdir=x')
  with pytest.raises(ConfigError, match='lock_image_tower=True with image_tower_workdir=\'\''):
    experiment('data=digits,lit,tiny')
  # A CLIP run's image tower, unlocked ('Uu'): the image parameters start at its values.
  config, task, _ = experiment('data=digits,tiny')
  tower = draw(task.param_specs['model']['image'], 4)
  clip_run = types.SimpleNamespace(config=config, params={'model': {'image': tower}},
                                   state=types.SimpleNamespace(model_state={}))
  monkeypatch.setattr(restore, 'load', lambda workdir: clip_run)
  _, task, _ = experiment('data=digits,tiny', 'objective_args.image_tower_workdir=x')
  start = ps.init(task.param_specs['model']['image'], jax.random.key(5))
  jax.tree.map(np.testing.assert_array_equal, start, tower)


# ---------------------------------------------------------------- a real two-stage run

@pytest.mark.slow
def test_vit_classifier_then_lit_trains_text_and_keeps_the_tower(tmp_path):
  tower_dir, lit_dir = str(tmp_path / 'vit'), str(tmp_path / 'lit')
  fast = ['model.attention_backend=reference', 'train.eval_every=0']
  config = config_lib.override(config_lib.load(str(REPO_ROOT / 'experiments/vit_digits.py:tiny')),
                               fast + ['train.steps=2', 'train.checkpoint_every=2'])
  loop.train(*run_lib.prepare(config), tower_dir)
  config = config_lib.override(
      config_lib.load(str(REPO_ROOT / 'experiments/clip_scenes.py:data=digits,lit,tiny')),
      fast + [f'objective_args.image_tower_workdir={tower_dir}', 'train.steps=8',
              'train.checkpoint_every=4', 'train.keep_checkpoints=2', 'train.lr=3e-3'])
  config, task, data = run_lib.prepare(config)
  loop.train(config, task, data, lit_dir)

  losses = [r['loss'] for r in metrics_log.read(f'{lit_dir}/metrics.jsonl') if 'loss' in r]
  assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses
  setup = loop.setup(config, task)
  ckpt = checkpoint.Checkpointer(lit_dir, keep=2)
  mid, end = (ckpt.restore_state(s, setup.abstract_state) for s in (4, 8))
  ckpt.close()
  tower = restore.load(tower_dir).params['backbone']
  for state in (mid, end):
    assert 'image' not in state.params['model']
    jax.tree.map(np.testing.assert_array_equal, state.model_state['image'], tower)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), mid.params['model']['text'],
                       end.params['model']['text'])
  assert min(jax.tree.leaves(moved)) > 0
