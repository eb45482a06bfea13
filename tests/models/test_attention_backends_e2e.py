"""End to end: the char GPT trained with the Pallas kernels (interpret backend) learns exactly
what it learns with the reference attention.

experiments/gpt_chars.py:tiny through lab.run.prepare, then three steps of lab.train's jitted
train step, once per backend: the per-step losses and the eval loss agree to 1e-5, and text
sampled from the trained params (prefill, then cached decode steps that mask the empty cache
slots with kv segment ids) is the same.
"""
import jax
import pytest

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run
from lab.train import loop, optimizers, step


def train_three_steps(variant: str, backend: str):
  """(losses of steps 1-3, eval loss after them, samples)."""
  config = config_lib.override(
      config_lib.load(str(REPO_ROOT / 'experiments/gpt_chars.py') + f':{variant}'),
      [f'model.attention_backend={backend}'])
  config, task, data = run.prepare(config)
  optimizer = optimizers.make(config.train)
  state = loop.init_state(config, task, optimizer)
  train_step = jax.jit(step.make_train_step(config.train, task, optimizer))
  batches = data.make_train_iter()
  losses = []
  for _ in range(3):
    state, metrics = train_step(state, next(batches))
    losses.append(float(metrics['loss']))
  eval_metrics = loop.evaluate(jax.jit(step.make_eval_step(config.train, task)), state,
                               data.eval_batches)
  samples = task.sample(state.params, state.model_state, jax.random.PRNGKey(0))
  return losses, eval_metrics['eval_loss'], samples


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['tiny', 'tiny,llama'])
def test_interpret_kernels_train_like_reference(variant):
  """'tiny,llama' adds grouped kv heads (4 query heads on 2 kv heads) and RoPE."""
  losses, eval_loss, samples = train_three_steps(variant, 'interpret')
  want_losses, want_eval_loss, want_samples = train_three_steps(variant, 'reference')
  assert losses == pytest.approx(want_losses, abs=1e-5)
  assert losses[-1] < losses[0]
  assert eval_loss == pytest.approx(want_eval_loss, abs=1e-5)
  assert samples == want_samples
