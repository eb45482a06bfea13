"""lab.models.efficientnet_hf against transformers' EfficientNetModel /
EfficientNetForImageClassification (torch on CPU, float32, eval mode) on reduced configs: last
hidden state, pooled output and logits, with even and odd sizes at the stride-2 depthwise convs.

Every weight and BN statistic of the reference is redrawn (He-scaled convs, BN scales around 1,
non-trivial running statistics), so a wrong transpose, padding, SE width or epsilon shows.
"""
import functools

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from lab.models import efficientnet, efficientnet_hf

# width 0.5: stem 16, stage widths 8, 16, 24, 40, head 640; depth 1.2: 2 blocks per stage.
_REDUCED = dict(width_coefficient=0.5, depth_coefficient=1.2, image_size=32,
                kernel_sizes=[3, 3, 5, 3], strides=[1, 2, 2, 2], expand_ratios=[1, 6, 4, 6],
                in_channels=[32, 16, 24, 40], out_channels=[16, 24, 40, 80],
                num_block_repeats=[1, 1, 1, 1], hidden_dim=640, batch_norm_eps=1e-2)
# image 36: the stem gives 18 and block 2 gives 9, so the stride-2 blocks 4 (5x5) and 6 (3x3)
# see odd sizes (9, 5) and need HF's symmetric padding (depthwise_padding) to equal TF SAME.
_ODD = {**_REDUCED, 'image_size': 36, 'depthwise_padding': [4, 6]}


def _randomise(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if name.endswith('num_batches_tracked'):
        continue
      if t.ndim == 4:
        t.normal_(0.0, float(np.sqrt(2.0 / t[0].numel())))
      elif name.endswith('running_var'):
        t.uniform_(0.5, 2.0)
      elif name.endswith('.weight') and ('bn' in name or 'norm' in name):
        t.normal_(1.0, 0.3)
      else:
        t.normal_(0.0, 0.3)
  return model.eval()


_LABELS = 4


@functools.cache
def _hf_model(kind: str):
  """'odd': EfficientNetModel on _ODD; 'classifier': EfficientNetForImageClassification on
  _REDUCED with _LABELS classes."""
  if kind == 'odd':
    return _randomise(transformers.EfficientNetModel(transformers.EfficientNetConfig(**_ODD)), 0)
  config = transformers.EfficientNetConfig(**_REDUCED, num_labels=_LABELS)
  return _randomise(transformers.EfficientNetForImageClassification(config), 1)


def _converted(model, num_classes=0):
  cfg = ml_collections.FrozenConfigDict(efficientnet_hf.config_from_hf(model.config.to_dict(),
                                                                       num_classes))
  sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  return cfg, *efficientnet_hf.params_from_hf(cfg, sd)


@functools.partial(jax.jit, static_argnums=0)
def _eval_outputs(cfg, params, state, x_BXYC):
  """(last hidden state, forward's output) in eval mode, compiled together."""
  h_BXYD, _ = efficientnet.feature_map(cfg, params, state, x_BXYC, train=False)
  return h_BXYD, efficientnet.forward(cfg, params, state, x_BXYC, train=False)[0]


def _close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_reduced_config_converts_to_the_expected_shapes():
  cfg, params, _ = _converted(_hf_model('classifier'), num_classes=_LABELS)
  widths = [b.c_out for b in efficientnet.blocks(cfg)]
  assert widths == [8, 8, 16, 16, 24, 24, 40, 40]
  assert params['stem']['conv']['w'].shape == (3, 3, 3, 16)
  assert params['blocks'][2]['se']['reduce']['w'].shape == (1, 1, 48, 2)  # 0.25 * C_in 8
  assert efficientnet.feature_dim(cfg) == 640


def _pixels_BCXY(size, seed):
  return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)


def test_odd_sizes_hidden_state_and_pooled_output_match():
  """EfficientNetModel with depthwise_padding: last_hidden_state and pooler_output."""
  model = _hf_model('odd')
  cfg, params, state = _converted(model)
  x = _pixels_BCXY(36, 0)
  with torch.no_grad():
    out = model(torch.from_numpy(x))
  h, features = _eval_outputs(cfg, params, state, x.transpose(0, 2, 3, 1))
  want_h = out.last_hidden_state.numpy().transpose(0, 2, 3, 1)
  assert h.shape == want_h.shape == (2, 3, 3, 640)
  _close(h, want_h)
  _close(features, out.pooler_output.numpy())


def test_classifier_hidden_state_pooled_output_and_logits_match():
  """EfficientNetForImageClassification on even sizes: its backbone's hidden state and pooled
  output (the mean of our feature map), and the logits of our forward."""
  model = _hf_model('classifier')
  cfg, params, state = _converted(model, num_classes=_LABELS)
  x = _pixels_BCXY(32, 1)
  with torch.no_grad():
    out = model.efficientnet(torch.from_numpy(x))
    want_logits = model(torch.from_numpy(x)).logits.numpy()
  h, logits = _eval_outputs(cfg, params, state, x.transpose(0, 2, 3, 1))
  want_h = out.last_hidden_state.numpy().transpose(0, 2, 3, 1)
  assert h.shape == want_h.shape == (2, 2, 2, 640) and logits.shape == (2, _LABELS)
  _close(h, want_h)
  _close(np.asarray(h).mean((1, 2)), out.pooler_output.numpy())
  _close(logits, want_logits)


@pytest.mark.parametrize('change,match', [
    (dict(image_size=36), 'block 4'),  # odd size at block 4 without symmetric padding
    (dict(depthwise_padding=[2]), 'block 2'),  # symmetric padding on an even size
    (dict(image_size=33), 'even image size'),
    (dict(hidden_dim=512), 'hidden_dim=512'),
    (dict(in_channels=[32, 16, 16, 40], out_channels=[16, 16, 40, 80], strides=[1, 1, 2, 2]),
     'stage 1'),
    (dict(hidden_act='relu'), 'hidden_act')])
def test_unsupported_hf_configs_raise(change, match):
  hf = {**transformers.EfficientNetConfig(**_REDUCED).to_dict(), **change}
  with pytest.raises(ValueError, match=match):
    efficientnet_hf.config_from_hf(hf)


def test_state_dict_mismatches_raise():
  model = _hf_model('classifier')
  cfg, *_ = _converted(model, num_classes=_LABELS)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  with pytest.raises(ValueError, match='does not use'):
    efficientnet_hf.params_from_hf(cfg, {**sd, 'encoder.extra.weight': np.zeros(3)})
  missing = {k: v for k, v in sd.items()
             if k != 'efficientnet.encoder.blocks.3.squeeze_excite.reduce.bias'}
  with pytest.raises(ValueError, match='lacks'):
    efficientnet_hf.params_from_hf(cfg, missing)
