"""lab.models.resnet_hf against transformers' ResNetModel / ResNetForImageClassification (torch
on CPU, float32): last hidden state, pooled output and logits in eval mode, and in train mode the
outputs (batch statistics) and the updated running statistics too.

The reference models are tiny, with every weight and BN statistic redrawn (He-scaled convs, BN
scales around 1, non-trivial running means and variances), so that a wrong transpose, stride,
padding, epsilon or momentum moves the outputs far beyond the tolerance.
"""
import functools

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from lab.models import resnet, resnet_hf

_HF_CONFIGS = {
    'basic': transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32],
                                       depths=[1, 2, 1], layer_type='basic'),
    'bottleneck': transformers.ResNetConfig(embedding_size=8, hidden_sizes=[32, 64],
                                            depths=[2, 1], layer_type='bottleneck'),
}


def _randomise(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if name.endswith('num_batches_tracked'):
        continue
      if t.ndim == 4:
        t.normal_(0.0, float(np.sqrt(2.0 / t[0].numel())))
      elif name.endswith('normalization.weight'):
        t.normal_(1.0, 0.3)
      elif name.endswith('running_var'):
        t.uniform_(0.5, 2.0)
      else:
        t.normal_(0.0, 0.3)
  return model.eval()


@functools.cache
def _hf_model(name: str, num_labels: int = 0):
  if num_labels:
    config = transformers.ResNetConfig(**{**_HF_CONFIGS[name].to_dict(), 'num_labels': num_labels})
    return _randomise(transformers.ResNetForImageClassification(config), 1)
  return _randomise(transformers.ResNetModel(_HF_CONFIGS[name]), 0)


def _pixels_BCXY(seed=0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((2, 3, 32, 32)).astype(np.float32)


def _converted(model, num_classes=0):
  cfg = ml_collections.FrozenConfigDict(resnet_hf.config_from_hf(model.config.to_dict(),
                                                                 num_classes))
  sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  return cfg, *resnet_hf.params_from_hf(cfg, sd)


_feature_map = jax.jit(resnet.feature_map, static_argnums=0, static_argnames='train')


@functools.partial(jax.jit, static_argnums=0)
def _eval_outputs(cfg, params, state, x_BXYC):
  """(last hidden state, forward's output, forward's new state) in eval mode, compiled together."""
  h_BXYD, _ = resnet.feature_map(cfg, params, state, x_BXYC, train=False)
  return h_BXYD, *resnet.forward(cfg, params, state, x_BXYC, train=False)


def _close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize('name', ['basic', 'bottleneck'])
def test_eval_hidden_state_and_pooled_output_match(name):
  model = _hf_model(name)
  cfg, params, state = _converted(model)
  x = _pixels_BCXY()
  with torch.no_grad():
    out = model(torch.from_numpy(x))
  x_BXYC = x.transpose(0, 2, 3, 1)
  h, features, new_state = _eval_outputs(cfg, params, state, x_BXYC)
  want_h = out.last_hidden_state.numpy().transpose(0, 2, 3, 1)
  assert h.shape == want_h.shape and h.shape[-1] == resnet.feature_dim(cfg)
  _close(h, want_h)
  _close(features, out.pooler_output.numpy()[:, :, 0, 0])
  for got, before in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(got, before)


@pytest.mark.parametrize('name', ['basic', 'bottleneck'])
def test_train_mode_outputs_and_running_stats_match(name):
  """torch's momentum 0.1 is bn_momentum 0.9 here; both keep the unbiased running variance."""
  model = _hf_model(name)
  cfg, params, state = _converted(model)
  x = _pixels_BCXY(1)
  train_model = _randomise(transformers.ResNetModel(_HF_CONFIGS[name]), 0).train()
  with torch.no_grad():
    out = train_model(torch.from_numpy(x))
  h, new_state = _feature_map(cfg, params, state, x.transpose(0, 2, 3, 1), train=True)
  _close(h, out.last_hidden_state.numpy().transpose(0, 2, 3, 1))
  _, torch_state = resnet_hf.params_from_hf(
      cfg, {k: v.numpy() for k, v in train_model.state_dict().items()})
  for got, want, before in zip(jax.tree.leaves(new_state), jax.tree.leaves(torch_state),
                               jax.tree.leaves(state)):
    _close(got, want)
    assert np.abs(want - before).max() > 1e-3


def test_classifier_logits_match():
  model = _hf_model('bottleneck', num_labels=5)
  cfg, params, state = _converted(model, num_classes=5)
  x = _pixels_BCXY(2)
  with torch.no_grad():
    want = model(torch.from_numpy(x)).logits.numpy()
  _, logits, _ = _eval_outputs(cfg, params, state, x.transpose(0, 2, 3, 1))
  assert logits.shape == (2, 5)
  _close(logits, want)


@pytest.mark.parametrize('change,match', [
    (dict(downsample_in_bottleneck=True), 'downsample_in_bottleneck'),
    (dict(hidden_sizes=[32, 48]), 'hidden_sizes'),
    (dict(layer_type='wide'), 'layer_type'),
    (dict(hidden_act='gelu'), 'hidden_act')])
def test_unsupported_hf_configs_raise(change, match):
  hf = {**_HF_CONFIGS['bottleneck'].to_dict(), **change}
  with pytest.raises(ValueError, match=match):
    resnet_hf.config_from_hf(hf)


def test_state_dict_mismatches_raise():
  cfg, *_ = _converted(_hf_model('basic'))
  sd = {k: v.numpy() for k, v in _hf_model('basic').state_dict().items()}
  with pytest.raises(ValueError, match='does not use'):
    resnet_hf.params_from_hf(cfg, {**sd, 'pooler.weight': np.zeros(3)})
  missing = dict(sd)
  missing.pop('encoder.stages.1.layers.0.shortcut.convolution.weight')
  with pytest.raises(ValueError, match='lacks'):
    resnet_hf.params_from_hf(cfg, missing)
