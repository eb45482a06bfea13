"""Linear probe on frozen features: L2-regularised multinomial logistic regression.

The protocol of SimCLR's transfer evaluation (Chen et al. 2020, arXiv:2002.05709, appendix B,
after Kornblith et al. 2019, arXiv:1805.08974) and of CLIP's linear probes (Radford et al. 2021,
arXiv:2103.00020, appendix A.3): features are standardised with training statistics, the
classifier is fitted full-batch with L-BFGS (optax), and the L2 strength is the value of a small
grid that does best on a held-out part of the training features; the probe is then refitted on
all of them.

Letters: M training examples, Q test examples, D feature width, V classes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def standardize_stats(f_MD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean_D, scale_D) in float64: z = (f - mean) / scale with scale the standard deviation; a
  numerically constant feature (std < 1e-6 (1 + |mean|)) keeps scale 1."""
  f_MD = np.asarray(f_MD, np.float64)
  mean_D, std_D = f_MD.mean(0), f_MD.std(0)
  return mean_D, np.where(std_D < 1e-6 * (1 + np.abs(mean_D)), 1.0, std_D)


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_steps', 'tol'))
def _fit(z_MD, y_M, mask_M, weight_decay, *, num_classes: int, max_steps: int, tol: float):
  """argmin_{W, b} mean_{m: mask_m} CE(softmax(z_m W + b), y_m) + weight_decay / 2 ||W||_F^2 by
  L-BFGS from zero, until the gradient norm is below tol or after max_steps steps. The mask
  selects the rows to fit, so every subset of one data set shares one compilation."""
  onehot_MV = jax.nn.one_hot(y_M, num_classes, dtype=z_MD.dtype)
  mask_M = mask_M.astype(z_MD.dtype)

  def loss(params):
    logits_MV = jnp.einsum('MD,DV->MV', z_MD, params['w']) + params['b']
    ce_M = -jnp.sum(onehot_MV * jax.nn.log_softmax(logits_MV), -1)
    return jnp.sum(mask_M * ce_M) / jnp.sum(mask_M) + 0.5 * weight_decay * jnp.sum(params['w'] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = otu.tree_get(state, 'count')
    return (count == 0) | ((count < max_steps) & (otu.tree_norm(otu.tree_get(state, 'grad'))
                                                  >= tol))

  params = {'w': jnp.zeros((z_MD.shape[1], num_classes), z_MD.dtype),
            'b': jnp.zeros((num_classes,), z_MD.dtype)}
  params, _ = jax.lax.while_loop(keep_going, step, (params, opt.init(params)))
  return params['w'], params['b']


def _check(features_MD, labels_M, num_classes: int) -> None:
  labels_M = np.asarray(labels_M)
  if np.ndim(features_MD) != 2 or labels_M.shape != (len(features_MD),):
    raise ValueError(f'features {np.shape(features_MD)} and labels {labels_M.shape}; expected '
                     '[M, D] and [M]')
  if labels_M.min() < 0 or labels_M.max() >= num_classes:
    raise ValueError(f'labels in [{labels_M.min()}, {labels_M.max()}]; expected labels in '
                     f'[0, num_classes={num_classes})')


def _fit_rows(features_MD, labels_M, rows_M, *, num_classes, weight_decay, max_steps, tol):
  """fit_logistic on the rows where rows_M is True (statistics from those rows only)."""
  features_MD = np.asarray(features_MD, np.float64)
  mean_D, scale_D = standardize_stats(features_MD[rows_M])
  w_DV, b_V = _fit(jnp.asarray((features_MD - mean_D) / scale_D, jnp.float32),
                   jnp.asarray(labels_M, jnp.int32), jnp.asarray(rows_M),
                   jnp.float32(weight_decay), num_classes=num_classes, max_steps=max_steps,
                   tol=tol)
  w_DV, b_V = np.asarray(w_DV, np.float64), np.asarray(b_V, np.float64)
  return w_DV / scale_D[:, None], b_V - (mean_D / scale_D) @ w_DV


def fit_logistic(features_MD, labels_M, *, num_classes: int, weight_decay: float,
                 max_steps: int = 1000, tol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
  """(w_DV, b_V) float64 with logits = f w + b in the original feature units: standardise with
  standardize_stats(features), fit (W, b) to min mean CE + weight_decay / 2 ||W||^2 on z, and fold
  the standardisation back in: w = W / scale, b = b - (mean / scale) W."""
  _check(features_MD, labels_M, num_classes)
  return _fit_rows(features_MD, labels_M, np.ones(len(features_MD), bool),
                   num_classes=num_classes, weight_decay=weight_decay, max_steps=max_steps,
                   tol=tol)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
  """Test accuracy of the probe refitted on all training features with the chosen weight decay,
  the held-out accuracy of every grid value, and the probe (logits = f w_DV + b_V)."""
  accuracy: float
  weight_decay: float
  heldout_accuracy: tuple[float, ...]
  w_DV: np.ndarray
  b_V: np.ndarray


def _accuracy(features_QD, labels_Q, w_DV, b_V) -> float:
  logits_QV = np.asarray(features_QD, np.float64) @ w_DV + b_V
  return float(np.mean(np.argmax(logits_QV, -1) == np.asarray(labels_Q)))


def linear_probe(train_features_MD, train_labels_M, test_features_QD, test_labels_Q, *,
                 weight_decays=WEIGHT_DECAYS, heldout_fraction: float = 0.2, seed: int = 0,
                 num_classes: int | None = None, max_steps: int = 1000) -> ProbeResult:
  """Choose the weight decay on a held-out split (a fraction of the training features, drawn by
  `seed`; the largest of the best grid values wins ties), refit on all training features, and
  report the test accuracy. Deterministic given the seed. num_classes defaults to 1 + the
  largest training label."""
  train_labels_M = np.asarray(train_labels_M)
  num_classes = int(train_labels_M.max()) + 1 if num_classes is None else num_classes
  _check(train_features_MD, train_labels_M, num_classes)
  _check(test_features_QD, test_labels_Q, num_classes)
  if np.shape(train_features_MD)[1] != np.shape(test_features_QD)[1]:
    raise ValueError(f'train features {np.shape(train_features_MD)} and test features '
                     f'{np.shape(test_features_QD)}; expected the same width D')
  n_heldout = int(round(heldout_fraction * len(train_labels_M)))
  if not 0 < n_heldout < len(train_labels_M):
    raise ValueError(f'heldout_fraction={heldout_fraction} of {len(train_labels_M)} examples; '
                     'expected a fraction leaving both parts non-empty')
  if len(weight_decays) < 1 or min(weight_decays) < 0:
    raise ValueError(f'weight_decays={tuple(weight_decays)}; expected a non-empty grid of '
                     'values >= 0')
  order = np.random.default_rng(seed).permutation(len(train_labels_M))
  fit_rows = np.ones(len(train_labels_M), bool)
  fit_rows[order[:n_heldout]] = False
  fit = functools.partial(_fit_rows, train_features_MD, train_labels_M, num_classes=num_classes,
                          max_steps=max_steps, tol=1e-5)
  heldout = []
  for weight_decay in weight_decays:
    w_DV, b_V = fit(fit_rows, weight_decay=weight_decay)
    heldout.append(_accuracy(np.asarray(train_features_MD)[~fit_rows], train_labels_M[~fit_rows],
                             w_DV, b_V))
  best = max(range(len(heldout)), key=lambda i: (heldout[i], weight_decays[i]))
  w_DV, b_V = fit(np.ones(len(train_labels_M), bool), weight_decay=weight_decays[best])
  return ProbeResult(_accuracy(test_features_QD, test_labels_Q, w_DV, b_V),
                     float(weight_decays[best]), tuple(heldout), w_DV, b_V)
