"""Greedy / temperature / top-k / top-p against NumPy oracles."""
import jax
import numpy as np
import pytest

from lab.sampling import logits_filters


def _oracle_keep(logits_V, top_k, top_p):
  keep = np.ones_like(logits_V, bool)
  if top_k:
    keep &= logits_V >= np.sort(logits_V)[::-1][top_k - 1]
  if top_p < 1.0:  # the nucleus of what top-k kept, renormalised (as Hugging Face chains them)
    order = np.argsort(-logits_V)
    p = np.where(keep, np.exp(logits_V - logits_V.max()), 0.0)
    p /= p.sum()
    mass_before = np.cumsum(p[order]) - p[order]
    nucleus = np.zeros_like(keep)
    nucleus[order[mass_before < top_p]] = True
    keep &= nucleus
  return keep


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('top_k, top_p', [(0, 1.0), (5, 1.0), (0, 0.9), (0, 0.3), (7, 0.6)])
def test_filters_match_oracle(seed, top_k, top_p):
  logits_BV = np.random.default_rng(seed).normal(size=(3, 50)).astype(np.float32) * 2
  got = np.asarray(logits_filters.filter_logits(logits_BV, top_k=top_k, top_p=top_p))
  for b in range(3):
    keep = _oracle_keep(logits_BV[b].astype(np.float64), top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(got[b]), keep)
    np.testing.assert_array_equal(got[b][keep], logits_BV[b][keep])


def test_greedy_is_argmax():
  logits_BV = np.random.default_rng(0).normal(size=(4, 30)).astype(np.float32)
  got = logits_filters.choose(logits_BV, jax.random.key(0), temperature=0.0)
  np.testing.assert_array_equal(got, logits_BV.argmax(-1))


def test_temperature_draws_follow_tempered_softmax():
  logits_V = np.array([2.0, 1.0, 0.0, -1.0, -3.0], np.float32)
  temperature, n = 0.7, 40000
  logits_BV = np.broadcast_to(logits_V, (n, 5))
  draws = np.asarray(logits_filters.choose(logits_BV, jax.random.key(1), temperature=temperature,
                                           top_k=4))
  p = np.exp(logits_V[:4] / temperature)
  p /= p.sum()
  freq = np.bincount(draws, minlength=5) / n
  assert freq[4] == 0.0
  assert np.all(np.abs(freq[:4] - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-3), (freq, p)
