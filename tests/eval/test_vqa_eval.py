"""lab.eval.vqa_eval: question families of every template, held-out mentions, and greedy answers
of ragged prompts (grouped by length, chunked) against the teacher-forced argmax of the full
forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run as run_lib
from lab.data import captions
from lab.eval import vqa_eval
from lab.models import vlm
from lab.train import loop


@pytest.mark.parametrize('key', list(captions.QUESTIONS))
def test_question_family_of_every_template(key):
  fields = dict(kind='circle', plural='circles', colour='red', relation='to the left of')
  question = captions.QUESTIONS[key].format(**fields)
  assert vqa_eval.question_family(question) == key
  with pytest.raises(ValueError, match='fills none'):
    vqa_eval.question_family('why is the sky blue')


def test_mentions_pair():
  pairs = (('red', 'circle'),)
  assert vqa_eval.mentions_pair('is there a red circle?', 'no', pairs)
  assert vqa_eval.mentions_pair('what colour is the circle?', 'red', pairs)
  assert not vqa_eval.mentions_pair('what colour is the circle?', 'blue', pairs)
  assert vqa_eval.mentions_pair('what shape is above the red circle?', 'square', pairs)
  assert not vqa_eval.mentions_pair('how many red objects are there?', 'two', pairs)


def test_greedy_answers_of_ragged_prompts_follow_the_forward_argmax():
  config = config_lib.override(
      config_lib.load(str(REPO_ROOT / 'experiments/vlm_scenes.py') + ':tiny,stage=full'),
      ['model.attention_backend=reference', 'data.n_eval=24', 'data.eval_batches=3'])
  config, task, data = run_lib.prepare(config)
  params = jax.jit(loop.setup(config, task).init)().params
  batch = {k: np.concatenate([b[k] for b in data.eval_batches]) for k in data.eval_batches[0]}
  cfg, M = config.model, vlm.tokens_per_image(config.model)
  new = vqa_eval.greedy_answers(cfg, params, batch['image'], batch['tokens'], batch['loss_mask'],
                                max_new=2, chunk=4)
  starts = batch['loss_mask'].argmax(1)
  assert len(set(starts)) > 1 and new.shape == (24, 2)
  laid = vlm.insert_image_tokens(batch['tokens'], cfg.image_token_id, M)
  logits = jax.jit(lambda p: vlm.forward(cfg, p, jnp.asarray(batch['image']), laid))(params)
  # The answer's first token sits at laid-out position start + M, predicted at start + M - 1.
  want = np.asarray(logits)[np.arange(24), starts + M - 1].argmax(-1)
  np.testing.assert_array_equal(new[:, 0], want)
