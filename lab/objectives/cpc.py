"""Contrastive Predictive Coding for images: van den Oord, Li & Vinyals 2018, "Representation
Learning with Contrastive Predictive Coding", arXiv:1807.03748, sec. 3.3; the image recipe of
Hénaff et al. 2019, "Data-Efficient Image Recognition with Contrastive Predictive Coding" (CPC
v2), arXiv:1905.09272, sec. 3.

The image is cut into an I x J grid of overlapping square patches (patch_grid): with stride
s = size // (grid + 1) and side 2 s (50% overlap, as the 64-pixel crops at stride 32 of the
papers), taken from the central (grid + 1) s square. MNIST's 28 x 28 with the default grid = 4
gives a 4 x 4 grid of 10 x 10 patches at stride 5 over the central 25 x 25 pixels (grid = 6 gives
6 x 6 patches of 8 x 8 at stride 4 over all 28 x 28, at 2.5 times the cost). Each patch is
encoded by the backbone on its own into z_{i,j} (lab.models.backbone, the patches of the whole
batch as one batch: batch norm then normalises over all B I J patches, as CPC v1; CPC v2's
layer norm, which removes that small cross-patch coupling, is not an option of lab's ResNet).
A row-causal context network c_{i,j} = g({z_{u,v} : u <= i}) (CPC v2, sec. 3) gives the
context, and for k = 1..K
  z^_{i+k,j} = W_k c_{i,j}                                                      (eq. 3: the
  log-bilinear f_k(z, c) = exp(z^T W_k c))
  L_k = -E_{b,i,j} log [f_k(z_{b,i+k,j}, c_{b,i,j}) / sum_{z' in batch} f_k(z', c_{b,i,j})]  (eq. 4)
  L   = 1/K sum_k L_k,
the candidates z' being every patch of every image of the batch (the positive, other positions of
its own image and all patches of the other images, CPC v2's negatives).

The context network, stated: a stack of `context_layers` residual blocks
  h <- h + conv1x1(relu(rowconv3x3(relu(h)))),  h_0 = z,  c = h_L,
where rowconv3x3 is a 3 x 3 convolution whose taps reach rows i - 2 .. i only (the input padded by
two rows on top, none below; columns padded one each side): a PixelCNN-style masked stack whose
output at row i depends on rows <= i of z, every column of them.
Patch augmentation (CPC v1, sec. 3.3: 60 x 60 sub-crops of the 64 x 64 patches, padded back):
every patch of side p keeps a random (p - 2 r) square, r = p // 8, placed back at its centre with
the background value -1 around it (10-pixel MNIST patches: a random 8 x 8 window; r = 0 for
patches under 8 pixels). It makes matching the overlapping pixels of neighbouring rows harder.
The whole-image crops and flips of v1 are not used (a flip changes a digit). The k-NN monitor
reads the grid mean of the un-augmented patches' z (CPC v2's evaluation of the encoder).

Letters beyond lab's: I, J the grid rows and columns; U, W a patch's pixel rows and columns;
K the prediction steps k = 1..K (not kv heads); Q the queries (b, i, j) of one step; P the
B I J candidate patches.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lab.config import ConfigError, require
from lab.eval import ssl_monitor
from lab.models import backbone
from lab.nn import conv
from lab.nn import param_spec as ps
from lab.train.task import Task

CONV_ENCODERS = ('resnet', 'efficientnet')  # encoders that take a patch of any size
BACKGROUND = -1.0  # the black of lab.data.images, the padding of the patch sub-crops


def experiment_defaults(method: str) -> dict:
  """A 4 x 4 grid (10 x 10 patches at stride 5 on MNIST), K = 2 prediction rows (v1 predicts up to
  5 rows of its 7-row grid: all but the last two), 2 context blocks; the shared AdamW (CPC v1 and
  v2 train with Adam). The grid is smaller than the papers' 7 x 7 so that a step costs about what
  the two-view methods' steps cost on the shared CPU budget."""
  del method
  return {'objective_args': dict(grid=4, prediction_steps=2, context_layers=2)}


def validate(config) -> None:
  a = config.objective_args
  require(a.method == 'cpc', f'objective_args.method={a.method!r}; expected "cpc"')
  require(a.grid >= 2, f'objective_args.grid={a.grid}; expected at least 2 patches per side')
  require(1 <= a.prediction_steps < a.grid, f'objective_args.prediction_steps='
          f'{a.prediction_steps}; expected 1 .. grid - 1 = {a.grid - 1}')
  require(a.context_layers >= 1,
          f'objective_args.context_layers={a.context_layers}; expected a positive integer')
  require(config.model.name in CONV_ENCODERS, f'model.name={config.model.name!r}; CPC encodes '
          f'patches of any size, expected a convolutional encoder, one of {CONV_ENCODERS}')
  backbone.validate(config.model)


def grid_geometry(size: int, grid: int) -> tuple[int, int, int]:
  """(stride s, patch side p = 2 s, offset) of a grid x grid patch grid on a size x size image:
  s = size // (grid + 1), the grid covering the central (grid + 1) s pixels from `offset`."""
  stride = size // (grid + 1)
  if stride < 1:
    raise ConfigError(f'objective_args.grid={grid} on {size} x {size} images; expected '
                      f'grid + 1 <= {size} so that patches have at least 2 pixels')
  return stride, 2 * stride, (size - (grid + 1) * stride) // 2


def patch_grid(x_BXYC: jax.Array, grid: int) -> jax.Array:
  """patches_BIJUWC: patch (i, j) is x[o + s i : o + s i + p, o + s j : o + s j + p] with
  (s, p, o) = grid_geometry(size, grid); I = J = grid, U = W = p."""
  B, X, Y, C = x_BXYC.shape
  if X != Y:
    raise ValueError(f'patch_grid: image of {X} x {Y}; expected a square image')
  s, p, o = grid_geometry(X, grid)
  rows_IU = o + s * jnp.arange(grid)[:, None] + jnp.arange(p)[None, :]
  return x_BXYC[:, rows_IU[:, None, :, None], rows_IU[None, :, None, :]]


def jitter_patches(key: jax.Array, patches_BIJUWC: jax.Array) -> jax.Array:
  """Each patch keeps the window [du, du + p - 2 r) x [dw, dw + p - 2 r) of itself at a random
  (du, dw) in {0 .. 2 r}^2, moved to [r, p - r)^2, and BACKGROUND elsewhere (r = p // 8):
  y[u, w] = x[u - r + du, w - r + dw] for r <= u, w < p - r."""
  B, I, J, U, W, C = patches_BIJUWC.shape
  r = U // 8
  if r == 0:
    return patches_BIJUWC
  d_BIJ2 = jax.random.randint(key, (B, I, J, 2), 0, 2 * r + 1)
  src_BIJU = jnp.clip(jnp.arange(U) - r + d_BIJ2[..., :1], 0, U - 1)
  src_BIJW = jnp.clip(jnp.arange(W) - r + d_BIJ2[..., 1:], 0, W - 1)
  rows = jnp.take_along_axis(patches_BIJUWC, src_BIJU[..., :, None, None], axis=3)
  moved = jnp.take_along_axis(rows, src_BIJW[..., None, :, None], axis=4)
  inside_U = (jnp.arange(U) >= r) & (jnp.arange(U) < U - r)
  inside_W = (jnp.arange(W) >= r) & (jnp.arange(W) < W - r)
  keep_UW = inside_U[:, None] & inside_W[None, :]
  return jnp.where(keep_UW[:, :, None], moved, BACKGROUND).astype(patches_BIJUWC.dtype)


def context_specs(d: int, layers: int) -> list[dict]:
  """ParamSpecs of the context blocks: 'row' a 3 x 3 conv D -> D, 'out' a 1 x 1 conv D -> D."""
  return [{'row': conv.conv_specs(3, d, d), 'out': conv.conv_specs(1, d, d)}
          for _ in range(layers)]


def row_causal_conv(p: dict, h_BIJC: jax.Array) -> jax.Array:
  """3 x 3 conv whose output at row i reads rows i - 2 .. i (zero above the grid) and columns
  j - 1 .. j + 1: the input padded by (2, 0) rows and (1, 1) columns, then a VALID conv."""
  k = p['w'].shape[0]
  padded = jnp.pad(h_BIJC, ((0, 0), (k - 1, 0), (k // 2, k // 2), (0, 0)))
  return conv.conv2d(p, padded, padding='VALID')


def context(p: list[dict], z_BIJD: jax.Array) -> jax.Array:
  """c_BIJC (C = D): h <- h + conv1x1(relu(row_causal_conv(relu(h)))) per block, h_0 = z, so
  c_{i,j} depends on z_{u,v} with u <= i only."""
  h = z_BIJD
  for block in p:
    h = h + conv.conv2d(block['out'], jax.nn.relu(row_causal_conv(block['row'],
                                                                  jax.nn.relu(h))))
  return h


def cpc_loss(z_BIJD: jax.Array, c_BIJC: jax.Array, w_KCD: jax.Array):
  """L = 1/K sum_k L_k (eqs. 3-4): query (b, i, j), i < I - k, predicts z^ = W_k c_{b,i,j} and
  scores every patch z' of the batch by z'^T z^; its positive is z_{b,i+k,j}.
  Returns (L, {'accuracy': mean over k of the fraction of queries whose positive scores
  highest})."""
  B, I, J, D = z_BIJD.shape
  K = w_KCD.shape[0]
  if c_BIJC.shape[:3] != (B, I, J) or w_KCD.shape[1:] != (c_BIJC.shape[-1], D) or K >= I:
    raise ValueError(f'cpc_loss: z {z_BIJD.shape}, c {c_BIJC.shape}, W {w_KCD.shape}; expected '
                     '[B, I, J, D], [B, I, J, C], [K, C, D] with K < I')
  dtype = jnp.promote_types(z_BIJD.dtype, jnp.float32)
  z_PD = z_BIJD.reshape(B * I * J, D).astype(dtype)
  b, i, j = jnp.meshgrid(jnp.arange(B), jnp.arange(I), jnp.arange(J), indexing='ij')
  losses, accuracies = [], []
  for k in range(1, K + 1):
    pred_QD = jnp.einsum('BIJC,CD->BIJD', c_BIJC[:, :I - k].astype(dtype),
                         w_KCD[k - 1].astype(dtype)).reshape(-1, D)
    target_Q = ((b[:, :I - k] * I + i[:, :I - k] + k) * J + j[:, :I - k]).reshape(-1)
    logits_QP = jnp.einsum('QD,PD->QP', pred_QD, z_PD)
    picked_Q = jnp.take_along_axis(logits_QP, target_Q[:, None], axis=1)[:, 0]
    losses.append(jnp.mean(jax.nn.logsumexp(logits_QP, axis=1) - picked_Q))
    accuracies.append(jnp.mean(jnp.argmax(logits_QP, axis=1) == target_Q))
  return jnp.mean(jnp.stack(losses)), {'accuracy': jnp.mean(jnp.stack(accuracies))}


def make_task(config, data) -> Task:
  a, cfg = config.objective_args, config.model
  size = data.eval_batches[0]['image'].shape[1]
  grid_geometry(size, a.grid)  # a ConfigError now if the grid does not fit the images
  d = backbone.feature_dim(cfg)

  def encode(params, state, patches_BIJUWC, train, rng):
    B, I, J, U, W, C = patches_BIJUWC.shape
    z_PD, enc_state = backbone.features(cfg, params['encoder'], state['encoder'],
                                        patches_BIJUWC.reshape(B * I * J, U, W, C), train=train,
                                        rng=rng)
    return z_PD.reshape(B, I, J, -1), enc_state

  def loss_fn(params, state, batch, rng, train):
    key = rng if rng is not None else jax.random.key(0)
    k_jitter, k_enc = jax.random.split(key)
    patches = jitter_patches(k_jitter, patch_grid(batch['image'], a.grid))
    z_BIJD, enc_state = encode(params, state, patches, train, k_enc)
    loss, metrics = cpc_loss(z_BIJD, context(params['context'], z_BIJD), params['predict'])
    return loss, (dict(metrics, loss=loss), {'encoder': enc_state} if train else state)

  def features(params, state, x_BXYC):
    z_BIJD, _ = encode(params, state, patch_grid(x_BXYC, a.grid), False, None)
    return z_BIJD.mean(axis=(1, 2))

  specs = {'encoder': backbone.param_specs(cfg),
           'context': context_specs(d, a.context_layers),
           'predict': ps.ParamSpec((a.prediction_steps, d, d), ps.normal(1.0 / math.sqrt(d)),
                                   (None, 'embed', 'mlp'))}
  return Task(param_specs=specs, init_state=lambda key: {'encoder': backbone.init_state(cfg)},
              loss_fn=loss_fn, sample=ssl_monitor.make_monitor(config, features, **config.sample),
              features=features)
