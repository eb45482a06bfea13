"""lab.objectives.vlm: the answer-only loss against a float64 NumPy cross-entropy over positions
found from the raw batch; stage 'connector' keeps the towers in the state and unchanged; towers
load from earlier runs' workdirs; a tiny run lowers the loss."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from scipy.special import log_softmax

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run as run_lib
from lab.config import ConfigError
from lab.models import vlm
from lab.objectives import vlm as vlm_objective
from lab.train import loop

VLM_TINY = str(REPO_ROOT / 'experiments/vlm_scenes.py') + ':tiny'


def prepare(variant='', overrides=()):
  config = config_lib.load(VLM_TINY + (f',{variant}' if variant else ''))
  config = config_lib.override(config, ['model.attention_backend=reference', *overrides])
  return run_lib.prepare(config)


def np_masked_metrics(logits_BTV, targets_BT, mask_BT):
  logp_BTV = log_softmax(np.asarray(logits_BTV, np.float64), axis=-1)
  nll_BT = -np.take_along_axis(logp_BTV, targets_BT[..., None], -1)[..., 0]
  right_BT = logits_BTV.argmax(-1) == targets_BT
  rows = mask_BT.sum(1) > 0
  exact_B = np.array([right_BT[b][mask_BT[b] > 0].all() for b in range(len(mask_BT))])
  return {'loss': (nll_BT * mask_BT).sum() / mask_BT.sum(),
          'token_accuracy': (right_BT * mask_BT).sum() / mask_BT.sum(),
          'exact_match': exact_B[rows].mean()}


def test_masked_metrics_match_numpy_and_ignore_unmasked_targets():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((4, 6, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (4, 6))
  targets[0, 2] = logits[0, 2].argmax()  # row 0: its one masked token is right
  mask = np.zeros((4, 6), np.int32)
  mask[0, 2] = mask[1, 3:5] = mask[2, 1] = 1  # row 3 has no target
  got = vlm_objective.masked_metrics(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  want = np_masked_metrics(logits, targets, mask)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
  assert 0 < want['exact_match'] < 1
  moved = np.where(mask > 0, targets, (targets + 3) % 7)
  again = vlm_objective.masked_metrics(jnp.asarray(logits), jnp.asarray(moved), jnp.asarray(mask))
  np.testing.assert_array_equal(again['loss'], got['loss'])


def test_loss_is_on_answer_tokens_only():
  config, task, data = prepare('stage=full')
  params = jax.jit(loop.setup(config, task).init)().params
  batch = {k: jnp.asarray(v) for k, v in data.eval_batches[0].items()}
  loss_fn = jax.jit(lambda p, b: task.loss_fn(p, {}, b, None, False)[0])
  M = vlm.tokens_per_image(config.model)
  tokens = np.asarray(batch['tokens'])
  # Oracle: the answer follows <sep> and ends with the first <eos>; in the laid-out sequence the
  # token at text position t is predicted by the logits at position t + M - 1.
  laid = np.asarray(vlm.insert_image_tokens(batch['tokens'], config.model.image_token_id, M))
  logits = np.asarray(jax.jit(lambda p: vlm.forward(config.model, p, batch['image'],
                                                    jnp.asarray(laid[:, :-1])))(params))
  logp = log_softmax(logits.astype(np.float64), axis=-1)
  nll = []
  for b, row in enumerate(tokens):
    sep, eos = list(row).index(3), list(row).index(2)
    nll += [-logp[b, t + M - 1, row[t]] for t in range(sep + 1, eos + 1)]
  np.testing.assert_allclose(loss_fn(params, batch), np.mean(nll), rtol=1e-5)
  # Padding after <eos> is a target of no loss (and, being later, input to no answer).
  pads = np.asarray(batch['tokens']) == 0
  assert pads.any()
  changed = dict(batch, tokens=jnp.where(pads, 40, batch['tokens']))
  np.testing.assert_array_equal(loss_fn(params, changed), loss_fn(params, batch))
  # The answer token itself does count.
  answer_at = np.asarray(batch['loss_mask']).argmax(1)
  flipped = tokens.copy()
  flipped[np.arange(len(tokens)), answer_at] = 40
  assert abs(float(loss_fn(params, dict(batch, tokens=jnp.asarray(flipped)))
                   - float(loss_fn(params, batch)))) > 1e-3


def test_connector_stage_keeps_frozen_towers_in_state():
  config, task, data = prepare('connector=pixel_shuffle')
  assert set(task.param_specs) == {'connector'}
  setup = loop.setup(config, task)
  state = setup.init()
  assert set(state.model_state) == {'vision', 'llm'}
  towers = jax.device_get(state.model_state)
  connector = jax.device_get(state.params)
  batches = iter(data.make_train_iter())
  for _ in range(3):
    state, metrics = setup.train_step(state, setup.global_batch(next(batches)))
  assert np.isfinite(float(metrics['loss']))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.model_state), towers)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       jax.device_get(state.params), connector)
  assert min(jax.tree.leaves(moved)) > 0


def test_a_tiny_run_lowers_the_loss():
  """Overfitting one batch: the schedule spans the 25 steps taken (a shorter cosine would reach
  lr 0 early and stall the loss)."""
  config, task, data = prepare('stage=full', ['train.lr=1e-2', 'train.warmup_steps=0',
                                              'train.steps=25'])
  setup = loop.setup(config, task)
  state = setup.init()
  batch = setup.global_batch(next(iter(data.make_train_iter())))
  losses = []
  for _ in range(25):
    state, metrics = setup.train_step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.35 * losses[0], losses


@pytest.mark.slow
def test_towers_load_from_earlier_runs(tmp_path):
  lm = config_lib.override(config_lib.load(str(REPO_ROOT / 'experiments/scene_lm.py') + ':tiny'),
                           ['train.steps=2', 'train.eval_every=0', 'train.checkpoint_every=2'])
  loop.train(*run_lib.prepare(lm), str(tmp_path / 'lm'))
  cap = config_lib.override(config_lib.load(VLM_TINY + ',caption'),
                            ['train.steps=2', 'train.eval_every=0', 'train.checkpoint_every=2',
                             f'objective_args.llm_workdir={tmp_path / "lm"}'])
  loop.train(*run_lib.prepare(cap), str(tmp_path / 'cap'))
  from lab.train import restore
  lm_params, cap_params = (restore.load(str(tmp_path / d)).params for d in ('lm', 'cap'))
  _, task, _ = prepare('', [f'objective_args.llm_workdir={tmp_path / "lm"}',
                            f'objective_args.vision_workdir={tmp_path / "cap"}'])
  state = task.init_state(None)
  jax.tree.map(np.testing.assert_array_equal, state['llm'], jax.device_get(lm_params))
  jax.tree.map(np.testing.assert_array_equal, state['vision'],
               jax.device_get(cap_params['vision']))
  # The caption run trained its LLM from the LM run's, so the LM moved away from it.
  assert not np.array_equal(cap_params['llm']['final_norm']['scale'],
                            lm_params['final_norm']['scale'])
  with pytest.raises(ConfigError, match='d_ff: saved 64 vs 48'):
    prepare('', [f'objective_args.llm_workdir={tmp_path / "lm"}', 'model.llm.d_ff=48'])
