"""InfoNCE, NT-Xent, CLIP and SigLIP against float64 NumPy re-derivations of the papers' formulas,
written here pair by pair: values, accuracies, and gradients w.r.t. embeddings, temperature and
bias; CLIP's temperature clip, MoCo's queue, SimCLR's excluded self-pairs, SigLIP's init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lab.nn import param_spec
from lab.objectives import contrastive_losses as cl
from oracles import assert_vjp_matches_oracle


def np_normalize(x_BD):
  return x_BD / np.sqrt((x_BD ** 2).sum(-1, keepdims=True))


def np_neg_log_softmax(pos, others):
  """-log exp(pos) / (exp(pos) + sum exp(others)), stabilised by the max."""
  m = max(pos, *others)
  return -(pos - m - np.log(np.exp(pos - m) + np.sum(np.exp(np.asarray(others) - m))))


def np_info_nce(q_BD, k_BD, tau, queue_ND=None):
  """Oord et al. 2018 eq. 4 / MoCo eq. 1: one positive k_b; negatives the other keys of the
  batch, or (MoCo) exactly the queue."""
  B = len(q_BD)
  total = 0.0
  for b in range(B):
    negs = ([k_BD[j] for j in range(B) if j != b] if queue_ND is None else list(queue_ND))
    total += np_neg_log_softmax(q_BD[b] @ k_BD[b] / tau, [q_BD[b] @ n / tau for n in negs])
  return total / B


def np_nt_xent(z_2BD, tau, include_self=False):
  """SimCLR eq. 1: l(i, j) over the 2B views, j = i's other view, the sum over k != i."""
  z = np_normalize(z_2BD)
  n = len(z)
  total = 0.0
  for i in range(n):
    j = (i + n // 2) % n
    others = [z[i] @ z[k] / tau for k in range(n) if k != j and (include_self or k != i)]
    total += np_neg_log_softmax(z[i] @ z[j] / tau, others)
  return total / n


def np_clip(img_BD, txt_BD, t):
  """CLIP fig. 3: symmetric cross-entropy of exp(t) * cosine logits (t as given, unclipped)."""
  logits = np.exp(t) * np_normalize(img_BD) @ np_normalize(txt_BD).T
  B = len(logits)
  row = sum(np_neg_log_softmax(logits[b, b], np.delete(logits[b], b)) for b in range(B)) / B
  col = sum(np_neg_log_softmax(logits[b, b], np.delete(logits[:, b], b)) for b in range(B)) / B
  return (row + col) / 2


def np_siglip(img_BD, txt_BD, t_prime, b):
  """SigLIP eq. 1: -1/B sum_i sum_j log sigmoid(z_ij (exp(t') x_i . y_j + b))."""
  x, y = np_normalize(img_BD), np_normalize(txt_BD)
  B = len(x)
  total = 0.0
  for i in range(B):
    for j in range(B):
      z = 1.0 if i == j else -1.0
      total += np.log1p(np.exp(-z * (np.exp(t_prime) * x[i] @ y[j] + b)))
  return total / B


def np_top1(logits_BS):
  return np.mean(np.argmax(logits_BS, 1) == np.arange(len(logits_BS)))


def round32(a):
  return a.astype(np.float32).astype(np.float64)


def draw(seed, *shapes):
  """Float32-representable float64 arrays (so the oracle sees exactly what jax sees)."""
  rng = np.random.default_rng(seed)
  return rng, [round32(rng.standard_normal(s)) for s in shapes]


def f32(*arrays):
  return [jnp.asarray(a, jnp.float32) for a in arrays]


def loss_only(fn):
  return lambda *args: fn(*args)[0]


@pytest.mark.parametrize('seed', range(3))
def test_info_nce_in_batch_matches_oracle(seed):
  _, (q, k) = draw(seed, (6, 5), (6, 5))
  k = round32(q + 0.7 * k)  # correlated, so the accuracy is neither 0 nor 1 by construction
  loss, metrics = cl.info_nce(*f32(q, k), 0.3)
  np.testing.assert_allclose(loss, np_info_nce(q, k, 0.3), rtol=1e-5)
  assert metrics['accuracy'] == pytest.approx(np_top1(q @ k.T))


@pytest.mark.parametrize('seed', range(3))
def test_info_nce_with_queue_matches_moco(seed):
  """MoCo: the negatives are the queue only; the loss is a mean of independent per-query terms,
  so each row alone gives the same value (the batch's other keys are not negatives)."""
  _, (q, k, queue) = draw(seed, (4, 5), (4, 5), (7, 5))
  (queue32,) = f32(queue)
  loss, metrics = cl.info_nce(*f32(q, k), 0.2, negatives_ND=queue32)
  np.testing.assert_allclose(loss, np_info_nce(q, k, 0.2, queue), rtol=1e-5)
  assert loss != pytest.approx(np_info_nce(q, k, 0.2), rel=1e-3)
  rows = [cl.info_nce(*f32(q[b:b + 1], k[b:b + 1]), 0.2, queue32)[0] for b in range(4)]
  np.testing.assert_allclose(loss, np.mean(rows), rtol=1e-6)
  want_acc = np.mean([(q[b] @ k[b] > q[b] @ queue.T).all() for b in range(4)])
  assert metrics['accuracy'] == pytest.approx(want_acc)


def np_info_nce_queue(q, k, negs, tau):
  return np_info_nce(q, k, tau, negs)


@pytest.mark.parametrize('queue', [False, True])
def test_info_nce_gradients_match_oracle(queue):
  """W.r.t. q, k, the temperature and (MoCo) the queue."""
  rng, (q, k, negs) = draw(3, (3, 4), (3, 4), (5, 4))
  tau = np.float64(0.5)
  if queue:
    fn = lambda q, k, n, tau: cl.info_nce(q, k, tau, negatives_ND=n)[0]
    assert_vjp_matches_oracle(fn, np_info_nce_queue, (q, k, negs, tau), rng)
  else:
    assert_vjp_matches_oracle(loss_only(cl.info_nce), np_info_nce, (q, k, tau), rng)


@pytest.mark.parametrize('seed', range(3))
def test_nt_xent_matches_simclr(seed):
  _, (z,) = draw(seed, (8, 5))
  z[4:] = round32(z[:4] + 0.8 * z[4:])  # rows b and 4 + b: two views of example b
  loss, metrics = cl.nt_xent(jnp.asarray(z, jnp.float32), 0.5)
  np.testing.assert_allclose(loss, np_nt_xent(z, 0.5), rtol=1e-5)
  sim = np_normalize(z) @ np_normalize(z).T
  np.fill_diagonal(sim, -np.inf)
  partner = (np.arange(8) + 4) % 8
  assert metrics['accuracy'] == pytest.approx(np.mean(np.argmax(sim, 1) == partner))


def test_nt_xent_excludes_self_pairs():
  """Views planted on orthonormal directions (the two views of one example equal): with the
  self-pair excluded, l = -log e^(1/tau) / (e^(1/tau) + (2B - 2)); counting it would add e^(1/tau)
  to the denominator."""
  B, tau = 3, 0.25
  z_2BD = np.concatenate([np.eye(B), 2 * np.eye(B)])  # views differ in norm only
  loss, metrics = cl.nt_xent(jnp.asarray(z_2BD, jnp.float32), tau)
  e = np.exp(1 / tau)
  np.testing.assert_allclose(loss, -np.log(e / (e + 2 * B - 2)), rtol=1e-5)
  assert abs(loss - (-np.log(e / (2 * e + 2 * B - 2)))) > 0.5
  assert metrics['accuracy'] == pytest.approx(1.0)
  _, (z,) = draw(7, (6, 4))
  assert abs(cl.nt_xent(jnp.asarray(z, jnp.float32), tau)[0] - np_nt_xent(z, tau, True)) > 0.1


def test_nt_xent_gradients_match_oracle():
  rng, (z,) = draw(4, (6, 3))
  tau = np.float64(0.4)
  assert_vjp_matches_oracle(loss_only(cl.nt_xent), np_nt_xent, (z, tau), rng)


@pytest.mark.parametrize('seed', range(3))
def test_clip_loss_matches_pseudo_code(seed):
  _, (img, txt) = draw(seed, (6, 5), (6, 5))
  txt = round32(img + 0.9 * txt)
  t = np.log(1 / 0.07)
  loss, metrics = cl.clip_loss(*f32(img, txt), jnp.float32(t))
  np.testing.assert_allclose(loss, np_clip(img, txt, t), rtol=1e-5)
  logits = np_normalize(img) @ np_normalize(txt).T
  assert metrics['i2t_accuracy'] == pytest.approx(np_top1(logits))
  assert metrics['t2i_accuracy'] == pytest.approx(np_top1(logits.T))


def test_clip_loss_gradients_match_oracle():
  rng, (img, txt) = draw(5, (4, 3), (4, 3))
  assert_vjp_matches_oracle(loss_only(cl.clip_loss), np_clip, (img, txt, np.float64(1.5)), rng)


def test_clip_temperature_clip_is_straight_through():
  """Above log 100 the logits see a scale of exactly 100, and t gets the gradient it would have
  at the cap (d/dt of the unclipped oracle at t = log 100), not zero; below, nothing changes."""
  _, (img, txt) = draw(6, (5, 4), (5, 4))
  cap = np.log(100.0)
  grad = jax.jit(jax.grad(loss_only(cl.clip_loss), argnums=(0, 1, 2)))
  loss_above = cl.clip_loss(*f32(img, txt), jnp.float32(np.log(300.0)))[0]
  np.testing.assert_allclose(loss_above, np_clip(img, txt, cap), rtol=1e-5)
  eps = 1e-6
  dt_at_cap = (np_clip(img, txt, cap + eps) - np_clip(img, txt, cap - eps)) / (2 * eps)
  g_above = grad(*f32(img, txt), jnp.float32(np.log(300.0)))
  g_cap = grad(*f32(img, txt), jnp.float32(cap))
  assert abs(dt_at_cap) > 1e-3
  np.testing.assert_allclose(g_above[2], dt_at_cap, rtol=1e-3)
  for a, b in zip(g_above, g_cap):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  t_below = np.log(50.0)
  np.testing.assert_allclose(cl.clip_loss(*f32(img, txt), jnp.float32(t_below))[0],
                             np_clip(img, txt, t_below), rtol=1e-5)


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('t_prime,b', [(np.log(10.0), -10.0), (np.log(3.0), 1.5)])
def test_siglip_loss_matches_eq_1(seed, t_prime, b):
  _, (img, txt) = draw(seed, (6, 5), (6, 5))
  txt = round32(img + 0.9 * txt)
  loss, metrics = cl.siglip_loss(*f32(img, txt), jnp.float32(t_prime), jnp.float32(b))
  np.testing.assert_allclose(loss, np_siglip(img, txt, t_prime, b), rtol=1e-5)
  logits = np_normalize(img) @ np_normalize(txt).T
  assert metrics['i2t_accuracy'] == pytest.approx(np_top1(logits))
  assert metrics['t2i_accuracy'] == pytest.approx(np_top1(logits.T))


def test_siglip_gradients_match_oracle():
  """W.r.t. both embeddings, t' and b."""
  rng, (img, txt) = draw(8, (4, 3), (4, 3))
  assert_vjp_matches_oracle(loss_only(cl.siglip_loss), np_siglip,
                            (img, txt, np.float64(np.log(5.0)), np.float64(-2.0)), rng)


def test_init_constants():
  """SigLIP: t = exp(t') = 10, b = -10; CLIP: exp(t) = 1 / 0.07; scalar specs with no axes."""
  siglip = param_spec.init(cl.siglip_param_specs(), jax.random.key(0))
  clip = param_spec.init(cl.clip_param_specs(), jax.random.key(0))
  np.testing.assert_allclose(np.exp(siglip['log_t']), 10.0, rtol=1e-6)
  assert siglip['bias'] == -10.0 and siglip['log_t'].shape == () and siglip['bias'].shape == ()
  np.testing.assert_allclose(np.exp(clip['log_scale']), 1 / 0.07, rtol=1e-6)
  assert np.exp(cl.CLIP_MAX_LOG_SCALE) == pytest.approx(100.0)
  assert param_spec.count(cl.siglip_param_specs()) == 2
  assert all(s.axes == () for s in jax.tree.leaves(cl.siglip_param_specs(),
                                                   is_leaf=param_spec.is_spec))


def test_low_precision_embeddings_compute_in_float32():
  _, (img, txt) = draw(9, (6, 5), (6, 5))
  img16, txt16 = (jnp.asarray(a, jnp.bfloat16) for a in (img, txt))
  loss, _ = cl.siglip_loss(img16, txt16, jnp.float32(np.log(10.0)), jnp.float32(-10.0))
  assert loss.dtype == jnp.float32
  want = np_siglip(np.asarray(img16, np.float64), np.asarray(txt16, np.float64), np.log(10.0),
                   -10.0)
  np.testing.assert_allclose(loss, want, rtol=1e-5)


@pytest.mark.parametrize('name', ['info_nce', 'nt_xent', 'clip_loss', 'siglip_loss'])
def test_float64_check_grads(x64, name):
  _, (a, b) = draw(10, (4, 3), (4, 3))
  fns = {'info_nce': (lambda a, b, s: cl.info_nce(a, b, s)[0], (a, b, 0.5)),
         'nt_xent': (lambda a, b, s: cl.nt_xent(jnp.concatenate([a, b]), s)[0], (a, b, 0.5)),
         'clip_loss': (loss_only(cl.clip_loss), (a, b, 2.0)),
         'siglip_loss': (lambda a, b, s: cl.siglip_loss(a, b, s, 0.5 * s)[0], (a, b, 1.0))}
  fn, args = fns[name]
  check_grads(jax.jit(fn), tuple(np.asarray(x, np.float64) for x in args), order=1,
              modes=['rev'])


def test_bad_inputs_raise():
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match='temperature=0'):
    cl.info_nce(x, x, 0.0)
  with pytest.raises(ValueError, match=r'expected \[N, 3\]'):
    cl.info_nce(x, x, 0.1, negatives_ND=jnp.ones((5, 2)))
  with pytest.raises(ValueError, match='two views'):
    cl.nt_xent(jnp.ones((5, 3)), 0.1)
  with pytest.raises(ValueError, match=r'\(4, 3\) and \(3, 3\)'):
    cl.clip_loss(x, jnp.ones((3, 3)), 1.0)
  with pytest.raises(ValueError, match='siglip_loss'):
    cl.siglip_loss(x, jnp.ones((4, 2)), 1.0, 0.0)
