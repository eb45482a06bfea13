"""SwAV: Sinkhorn-Knopp codes against a float64 NumPy transcription of the paper's Algorithm 1
and their marginals, the swapped-prediction loss and its gradient against NumPy, the prototype
normalisation and freeze, and a tiny run of experiments/ssl.py:method=swav,tiny."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run
from lab.objectives import sinkhorn, swav
from lab.parallel import rules as rules_lib
from lab.train import loop


def sinkhorn_oracle(scores_BK, eps, n_iters):
  """Algorithm 1 of the paper as written, in its K x B orientation: (codes_BK, plan_BK)."""
  Q = np.exp(scores_BK / eps).T
  Q /= Q.sum()
  K, B = Q.shape
  r, c = np.ones(K) / K, np.ones(B) / B
  for _ in range(n_iters):
    u = Q.sum(axis=1)
    Q *= (r / u)[:, None]
    Q *= (c / Q.sum(axis=0))[None, :]
  return (Q / Q.sum(axis=0, keepdims=True)).T, Q.T


def swapped_loss_oracle(scores_VBK, codes_GBK, tau):
  """1/G sum_i 1/(V - 1) sum_{v != i} -1/B sum_b sum_k q_ibk log softmax(s_vb / tau)_k."""
  V, B, _ = scores_VBK.shape
  G = codes_GBK.shape[0]
  total = 0.0
  for i in range(G):
    for v in range(V):
      if v != i:
        logits = scores_VBK[v] / tau
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total += -np.sum(codes_GBK[i] * logp) / B / (V - 1)
  return total / G


def cosines(rng, B, K, D=6):
  """Scores of L2-normalised features against L2-normalised prototypes, as SwAV has them."""
  z = rng.standard_normal((B, D))
  c = rng.standard_normal((K, D))
  return (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (
      c / np.linalg.norm(c, axis=1, keepdims=True)).T


def test_sinkhorn_matches_algorithm_1(x64):
  rng = np.random.default_rng(0)
  scores = cosines(rng, 24, 7)
  want_codes, want_plan = sinkhorn_oracle(scores, 0.05, 3)
  np.testing.assert_allclose(sinkhorn.codes(jnp.asarray(scores)), want_codes, rtol=1e-10)
  np.testing.assert_allclose(sinkhorn.sinkhorn(jnp.asarray(scores)), want_plan, rtol=1e-10)
  got32 = sinkhorn.codes(jnp.asarray(scores, jnp.float32))
  np.testing.assert_allclose(got32, want_codes, rtol=2e-4, atol=1e-6)
  with pytest.raises(ValueError, match='epsilon=0'):
    sinkhorn.sinkhorn(jnp.asarray(scores), epsilon=0)


def test_sinkhorn_marginals_are_the_equal_partition(x64):
  rng = np.random.default_rng(1)
  B, K = 32, 8
  scores = cosines(rng, B, K)
  plan3 = np.asarray(sinkhorn.sinkhorn(jnp.asarray(scores), 0.05, 3))
  np.testing.assert_allclose(plan3.sum(axis=1), np.full(B, 1 / B), rtol=1e-12)  # exact
  np.testing.assert_allclose(plan3.sum(axis=0), sinkhorn_oracle(scores, 0.05, 3)[1].sum(axis=0),
                             rtol=1e-10)  # approximate after 3 iterations, as in the paper
  plan = np.asarray(sinkhorn.sinkhorn(jnp.asarray(scores), 0.05, 200))
  np.testing.assert_allclose(plan.sum(axis=1), np.full(B, 1 / B), rtol=1e-12)
  np.testing.assert_allclose(plan.sum(axis=0), np.full(K, 1 / K), rtol=1e-8)
  np.testing.assert_allclose(plan, sinkhorn_oracle(scores, 0.05, 200)[1], rtol=1e-9)
  assert np.abs(plan3.sum(axis=0) - 1 / K).max() > 1e-6  # 3 iterations leave a gap
  # the codes are targets: no gradient reaches the scores
  g = jax.grad(lambda s: jnp.sum(sinkhorn.codes(s) * jnp.arange(K)))(jnp.asarray(scores))
  assert not np.any(np.asarray(g))


def test_swapped_prediction_loss_and_gradient(x64):
  rng = np.random.default_rng(2)
  V, G, B, K, tau = 4, 2, 5, 6, 0.1
  scores = np.stack([cosines(rng, B, K) for _ in range(V)])
  codes = rng.dirichlet(np.ones(K), size=(G, B))
  loss = swav.swapped_prediction_loss(jnp.asarray(scores), jnp.asarray(codes), tau)
  np.testing.assert_allclose(loss, swapped_loss_oracle(scores, codes, tau), rtol=1e-12)
  # d/ds_v of -q_i . log softmax(s_v / tau) is (softmax(s_v / tau) - q_i) / tau (rows of q sum
  # to 1), summed over the global crops i != v with the loss's weights; codes get no gradient
  p = np.exp(scores / tau)
  p /= p.sum(axis=-1, keepdims=True)
  want = np.zeros_like(scores)
  for v in range(V):
    for i in range(G):
      if i != v:
        want[v] += (p[v] - codes[i]) / tau / (B * G * (V - 1))
  g_s, g_q = jax.grad(swav.swapped_prediction_loss, argnums=(0, 1))(
      jnp.asarray(scores), jnp.asarray(codes), tau)
  np.testing.assert_allclose(g_s, want, rtol=1e-10, atol=1e-14)
  assert not np.any(np.asarray(g_q))


def test_prototypes_are_unit_rows_and_freeze(x64):
  rng = np.random.default_rng(3)
  w = rng.standard_normal((5, 4)) * rng.uniform(0.5, 2.0, (5, 1))
  cot = rng.standard_normal((5, 4))
  norm = np.linalg.norm(w, axis=1, keepdims=True)
  c = w / norm
  np.testing.assert_allclose(swav.prototypes(jnp.asarray(w), False), c, rtol=1e-12)
  grad = lambda frozen: jax.grad(lambda w: jnp.sum(swav.prototypes(w, frozen) * cot))(
      jnp.asarray(w))
  # the gradient of w / ||w||: (I - c c^T) g / ||w|| per row
  want = (cot - c * np.sum(c * cot, axis=1, keepdims=True)) / norm
  np.testing.assert_allclose(grad(jnp.asarray(False)), want, rtol=1e-10)
  assert not np.any(np.asarray(grad(jnp.asarray(True))))


def test_local_crop_size():
  resnet = config_lib.load(str(REPO_ROOT / 'experiments/ssl.py') + ':method=swav').model
  vit = config_lib.load(str(REPO_ROOT / 'experiments/ssl.py') + ':method=swav,encoder=vit').model
  assert swav.local_size(resnet, 224) == 96
  assert swav.local_size(resnet, 28) == 12 and swav.local_size(resnet, 8) == 3
  assert swav.local_size(vit, 28) == 12 and vit.patch_size == 4


def test_tiny_swav_run_learns():
  """8 steps of the tiny config: finite, the loss falls, the step counter and the codes' use of
  the prototypes are tracked; the prototypes stay fixed while frozen (2 steps), then move."""
  steps = 8
  config = config_lib.override(
      config_lib.load(str(REPO_ROOT / 'experiments/ssl.py') + ':method=swav,tiny'),
      [f'train.steps={steps}', 'train.lr=0.01', 'objective_args.freeze_prototypes_steps=2'])
  config, task, data = run.prepare(config)
  setup = loop.setup(config, task)
  batches = data.make_train_iter()
  with rules_lib.activate(setup.mesh, setup.rules):
    state = setup.init()
    protos, losses = [np.asarray(state.params['prototypes'])], []
    for _ in range(steps):
      state, m = setup.train_step(state, setup.global_batch(next(batches)))
      losses.append(float(m['loss']))
      protos.append(np.asarray(state.params['prototypes']))
  assert np.all(np.isfinite(losses)), losses
  assert 0 < float(m['prototypes_used']) <= 1
  assert int(state.model_state['step']) == steps
  # frozen for steps 1 and 2 (only AdamW's decoupled decay moves them), free from step 3 on
  np.testing.assert_allclose(protos[2], protos[0], rtol=1e-4)
  assert np.abs(protos[3] - protos[2]).max() > 1e-3
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
