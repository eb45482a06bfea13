"""An FID-style Frechet distance in the feature space of a small classifier that lab trains itself.

Heusel et al. 2017 use Inception-v3 pool features; we need no downloaded weights, so a small conv
net is trained on the dataset's own labels (`train_classifier`) and its penultimate layer (after
ReLU) gives the features. Values are comparable only between runs that use the same classifier:
cache it with `FeatureNet.save` / `FeatureNet.load`.
"""
from __future__ import annotations

import dataclasses
import math

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lab.nn import conv
from lab.nn import param_spec as ps

WIDTHS = (16, 32, 64)  # conv channels; the 2nd and 3rd convs have stride 2
FEATURES = 128


def _pooled_size(image_size: int) -> int:
  for _ in WIDTHS[1:]:
    image_size = -(-image_size // 2)  # a stride-2 'SAME' conv
  return image_size


def param_specs(image_size: int, channels: int, num_classes: int) -> dict:
  """Three 3x3 convs (WIDTHS), then dense layers to FEATURES and to num_classes."""
  def dense(d_in, d_out):
    return {'w': ps.ParamSpec((d_in, d_out), ps.normal(1 / math.sqrt(d_in)), ('embed', 'mlp')),
            'b': ps.ParamSpec((d_out,), ps.zeros, ('mlp',))}
  ins = (channels,) + WIDTHS[:-1]
  specs = {f'conv{i}': conv.conv_specs(3, c_in, c_out)
           for i, (c_in, c_out) in enumerate(zip(ins, WIDTHS))}
  flat = _pooled_size(image_size) ** 2 * WIDTHS[-1]
  return specs | {'hidden': dense(flat, FEATURES), 'out': dense(FEATURES, num_classes)}


def apply(params, x_BXYC):
  """(features_BF, logits_BV): 3 conv+ReLU, flatten, dense+ReLU (the features), dense."""
  h_BXYC = x_BXYC
  for i in range(len(WIDTHS)):
    h_BXYC = jax.nn.relu(conv.conv2d(params[f'conv{i}'], h_BXYC, stride=1 if i == 0 else 2))
  h_BD = h_BXYC.reshape(h_BXYC.shape[0], -1)
  f_BF = jax.nn.relu(jnp.einsum('BD,DF->BF', h_BD, params['hidden']['w']) + params['hidden']['b'])
  return f_BF, jnp.einsum('BF,FV->BV', f_BF, params['out']['w']) + params['out']['b']


_apply = jax.jit(apply)


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """A trained classifier (params of `param_specs`) used as a feature extractor."""
  params: dict

  def _outputs(self, images_BXYC, batch_size: int = 1000):
    _, x, y, c = images_BXYC.shape
    flat = _pooled_size(x) * _pooled_size(y) * WIDTHS[-1]
    if (c, flat) != (self.params['conv0']['w'].shape[2], self.params['hidden']['w'].shape[0]):
      raise ValueError(f'images of shape {images_BXYC.shape} do not fit the classifier; expected '
                       'the image size and channels it was trained on')
    out = [jax.device_get(_apply(self.params, jnp.asarray(images_BXYC[i:i + batch_size],
                                                            jnp.float32)))
           for i in range(0, len(images_BXYC), batch_size)]
    return np.concatenate([f for f, _ in out]), np.concatenate([l for _, l in out])

  def features(self, images_BXYC) -> np.ndarray:
    """float64[B, F] penultimate-layer features of images in [-1, 1]."""
    return self._outputs(images_BXYC)[0].astype(np.float64)

  def accuracy(self, images_BXYC, labels_B) -> float:
    return float((self._outputs(images_BXYC)[1].argmax(-1) == np.asarray(labels_B)).mean())

  def save(self, path: str) -> None:
    np.savez(path, **flax.traverse_util.flatten_dict(jax.device_get(self.params), sep='/'))

  @classmethod
  def load(cls, path: str) -> FeatureNet:
    with np.load(path) as f:
      flat = {k: jnp.asarray(v) for k, v in f.items()}
    return cls(flax.traverse_util.unflatten_dict(flat, sep='/'))


def train_classifier(images_BXYC, labels_B, *, num_classes: int, steps: int, seed: int,
                     batch_size: int = 128, learning_rate: float = 2e-3) -> FeatureNet:
  """Adam on softmax cross-entropy over random minibatches (reshuffled every epoch)."""
  if int(np.max(labels_B)) >= num_classes:
    raise ValueError(f'label {int(np.max(labels_B))} found; expected < num_classes={num_classes}')
  specs = param_specs(images_BXYC.shape[1], images_BXYC.shape[-1], num_classes)
  params = ps.init(specs, jax.random.key(seed))
  optimizer = optax.adam(learning_rate)

  @jax.jit
  def step(params, opt_state, x_BXYC, y_B):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(apply(p, x_BXYC)[1], y_B).mean()
    updates, opt_state = optimizer.update(jax.grad(loss_fn)(params), opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  rng = np.random.default_rng(seed)
  order = np.zeros(0, np.int64)
  for _ in range(steps):
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(len(labels_B))])
    idx, order = order[:batch_size], order[batch_size:]
    params, opt_state = step(params, opt_state, images_BXYC[idx], labels_B[idx])
  return FeatureNet(params)


def frechet_distance(mu1_F, s1_FF, mu2_F, s2_FF) -> float:
  """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017, eq. 6), in float64.
  Tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i(S1^(1/2) S2 S1^(1/2))), a symmetric PSD matrix similar
  to S1 S2, so eigvalsh gives it without complex round-off."""
  mu1_F, s1_FF, mu2_F, s2_FF = (np.asarray(a, np.float64) for a in (mu1_F, s1_FF, mu2_F, s2_FF))
  lam_F, u_FF = np.linalg.eigh(s1_FF)
  sqrt_s1_FF = (u_FF * np.sqrt(np.maximum(lam_F, 0.0))) @ u_FF.T
  cross_F = np.linalg.eigvalsh(sqrt_s1_FF @ s2_FF @ sqrt_s1_FF)
  tr_sqrt = np.sqrt(np.maximum(cross_F, 0.0)).sum()
  return float(((mu1_F - mu2_F) ** 2).sum() + np.trace(s1_FF) + np.trace(s2_FF) - 2 * tr_sqrt)


def feature_stats(net: FeatureNet, images_BXYC) -> tuple[np.ndarray, np.ndarray]:
  """Mean float64[F] and covariance float64[F, F] (np.cov, as Heusel et al.'s code) of the features;
  cache these for the real data."""
  f_BF = net.features(images_BXYC)
  return f_BF.mean(0), np.cov(f_BF, rowvar=False)


def feature_fid(net: FeatureNet, real_images, fake_images) -> float:
  return frechet_distance(*feature_stats(net, real_images), *feature_stats(net, fake_images))
