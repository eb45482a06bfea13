"""Contrastive losses on embeddings: InfoNCE, NT-Xent, CLIP and SigLIP (also chunked on a ring).

- InfoNCE: van den Oord, Li & Vinyals 2018, "Representation Learning with Contrastive Predictive
  Coding", arXiv 1807.03748, eq. 4; with a queue of negatives as in MoCo (He, Fan, Wu, Xie &
  Girshick 2019, arXiv 1911.05722, eq. 1).
- NT-Xent: SimCLR (Chen, Kornblith, Norouzi & Hinton 2020, arXiv 2002.05709, eq. 1).
- CLIP: Radford et al. 2021, arXiv 2103.00020, fig. 3 pseudo-code and sec. 2.5.
- SigLIP: Zhai, Mustafa, Kolesnikov & Beyer 2023, arXiv 2303.15343, eq. 1 / Algorithm 1, and
  its chunked multi-device form (sec. 3.3, fig. 1).

Every loss returns (loss, metrics): a scalar and a dict of scalar accuracies, computed in at
least float32 (float64 stays float64). Shape letters beyond lab's: S, the same batch indexed as
the candidates (texts, keys), so logits_BS is square; N, the negatives of MoCo's queue. Inside
`siglip_ring` shapes are per device: B there is the local batch, B_global / n.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lab.nn.param_spec import ParamSpec
from lab.parallel import rules as rules_lib

CLIP_LOG_SCALE_INIT = math.log(1 / 0.07)  # CLIP sec. 2.5: temperature initialised to 0.07
CLIP_MAX_LOG_SCALE = math.log(100.0)  # ... and clipped so that logits are scaled by <= 100
SIGLIP_LOG_T_INIT = math.log(10.0)  # SigLIP's init of the temperature, t' = log 10 (sec. 3)
SIGLIP_BIAS_INIT = -10.0  # ... and of the bias, b = -10, against the many negatives


def _constant(value: float):
  return lambda key, shape, dtype: jnp.full(shape, value, dtype)


def clip_param_specs() -> dict:
  """{'log_scale': ParamSpec of the scalar t with exp(t) = 1 / 0.07 at init}."""
  return {'log_scale': ParamSpec((), _constant(CLIP_LOG_SCALE_INIT), ())}


def siglip_param_specs() -> dict:
  """{'log_t': t' = log 10, 'bias': b = -10}: SigLIP's scalar temperature and bias at init."""
  return {'log_t': ParamSpec((), _constant(SIGLIP_LOG_T_INIT), ()),
          'bias': ParamSpec((), _constant(SIGLIP_BIAS_INIT), ())}


def l2_normalize(x_BD: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||_2, eps) over the last axis, in at least float32 (differentiable at 0)."""
  x_BD = x_BD.astype(jnp.promote_types(x_BD.dtype, jnp.float32))
  return x_BD * jax.lax.rsqrt(jnp.maximum(jnp.sum(x_BD * x_BD, -1, keepdims=True), eps * eps))


def _check_pair(name: str, a, b):
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f'{name}: embeddings of shapes {a.shape} and {b.shape}; expected two [B, D]')


def _check_temperature(temperature):
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f'temperature={temperature}; expected > 0')


def _xent(logits_BS: jax.Array, target_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean_b logsumexp_s logits_bs - logits_b,target_b, fraction of rows whose argmax is the
  target). The target is picked by index, so masked (-inf) entries elsewhere are harmless."""
  picked_B = jnp.take_along_axis(logits_BS, target_B[:, None], axis=1)[:, 0]
  loss = jnp.mean(jax.nn.logsumexp(logits_BS, axis=1) - picked_B)
  return loss, jnp.mean(jnp.argmax(logits_BS, axis=1) == target_B)


def info_nce(q_BD: jax.Array, k_BD: jax.Array, temperature, negatives_ND: jax.Array | None = None):
  """InfoNCE (Oord et al. 2018, eq. 4), in MoCo's notation (He et al. 2019, eq. 1):
    L = -1/B sum_b log exp(q_b . k_b / tau) / (exp(q_b . k_b / tau) + sum_- exp(q_b . k_- / tau)).
  The positive of query q_b is key k_b. The negatives k_- are, with negatives_ND=None, the other
  keys of the batch (logits q k^T / tau, targets on the diagonal: CPC's in-batch form, MoCo v3);
  with a queue, exactly its N rows (MoCo: logits [q_b . k_b, q_b . queue^T] / tau, target 0; the
  batch's other keys are not negatives, they enter the queue after the step).
  Scores are plain dot products (Oord's log-bilinear f with W = I / tau); MoCo L2-normalises q, k
  and the queue before (l2_normalize). temperature may be a traced scalar.
  Returns (L, {'accuracy': fraction of queries whose positive scores highest}).
  """
  _check_pair('info_nce', q_BD, k_BD)
  _check_temperature(temperature)
  dtype = jnp.promote_types(jnp.result_type(q_BD, k_BD), jnp.float32)
  q_BD, k_BD = q_BD.astype(dtype), k_BD.astype(dtype)
  B = q_BD.shape[0]
  if negatives_ND is None:
    logits_BS = jnp.einsum('BD,SD->BS', q_BD, k_BD) / temperature
    loss, acc = _xent(logits_BS, jnp.arange(B))
  else:
    if negatives_ND.ndim != 2 or negatives_ND.shape[1] != q_BD.shape[1]:
      raise ValueError(f'info_nce: negatives_ND of shape {negatives_ND.shape}; expected '
                       f'[N, {q_BD.shape[1]}]')
    pos_B = jnp.einsum('BD,BD->B', q_BD, k_BD)
    neg_BN = jnp.einsum('BD,ND->BN', q_BD, negatives_ND.astype(dtype))
    logits_BS = jnp.concatenate([pos_B[:, None], neg_BN], axis=1) / temperature
    loss, acc = _xent(logits_BS, jnp.zeros(B, jnp.int32))
  return loss, {'accuracy': acc}


def nt_xent(z_2BD: jax.Array, temperature):
  """NT-Xent (SimCLR, Chen et al. 2020, eq. 1 and Algorithm 1) over 2B views: rows b and B + b
  of z_2BD are the two augmented views of example b (the batch of views 1, then of views 2). With
  sim(u, v) = u . v / (||u|| ||v||),
    l(i, j) = -log exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau),
    L = 1/(2B) sum_b [l(b, B + b) + l(B + b, b)]:
  each view's positive is its other view, the other 2B - 2 views are negatives, and the
  self-similarity k = i is excluded from the denominator.
  Returns (L, {'accuracy': fraction of views whose other view is the most similar}).
  """
  if z_2BD.ndim != 2 or z_2BD.shape[0] % 2:
    raise ValueError(f'nt_xent: z_2BD of shape {z_2BD.shape}; expected [2B, D] (two views)')
  _check_temperature(temperature)
  B2 = z_2BD.shape[0]
  z_2BD = l2_normalize(z_2BD)
  logits_BS = jnp.einsum('BD,SD->BS', z_2BD, z_2BD) / temperature
  logits_BS = jnp.where(jnp.eye(B2, dtype=bool), -jnp.inf, logits_BS)
  loss, acc = _xent(logits_BS, (jnp.arange(B2) + B2 // 2) % B2)
  return loss, {'accuracy': acc}


def clipped_log_scale(log_scale: jax.Array) -> jax.Array:
  """min(t, log 100) in the forward pass, with the identity as its gradient (straight-through).

  CLIP clips the learnable temperature so that exp(t) <= 100 (sec. 2.5); OpenCLIP clamps the
  parameter after each optimizer step. lab's Task.after_step hook updates model state, not
  params, so the clip acts here, on the parameter's effect: the logits never see a scale above
  100. A plain min would give t zero gradient above the cap and freeze it there; the
  straight-through gives it the gradient at the cap, so t comes back below log 100 as soon as
  the loss asks for a lower scale (while the loss pushes up, t itself may drift above the cap).
  """
  return log_scale + jax.lax.stop_gradient(jnp.minimum(log_scale, CLIP_MAX_LOG_SCALE) - log_scale)


def clip_loss(img_BD: jax.Array, txt_BD: jax.Array, log_scale: jax.Array):
  """CLIP's symmetric cross-entropy (Radford et al. 2021, fig. 3):
    logits_bs = exp(t) <x_b / ||x_b||, y_s / ||y_s||>,  t clipped to <= log 100 (clipped_log_scale),
    L = 1/2 [CE over rows (image -> its text) + CE over columns (text -> its image)],
  with the matching pair on the diagonal.
  Returns (L, {'i2t_accuracy', 't2i_accuracy'}): top-1 retrieval accuracy in the batch.
  """
  _check_pair('clip_loss', img_BD, txt_BD)
  B = img_BD.shape[0]
  scale = jnp.exp(clipped_log_scale(log_scale))
  logits_BS = scale * jnp.einsum('BD,SD->BS', l2_normalize(img_BD), l2_normalize(txt_BD))
  labels_B = jnp.arange(B)
  loss_i, acc_i = _xent(logits_BS, labels_B)
  loss_t, acc_t = _xent(logits_BS.T, labels_B)
  return (loss_i + loss_t) / 2, {'i2t_accuracy': acc_i, 't2i_accuracy': acc_t}


def _siglip_logits(img_BD, txt_SD, log_t, bias):
  """t <x_b, y_s> + b for normalised x, y and t = exp(t')."""
  return jnp.exp(log_t) * jnp.einsum('BD,SD->BS', img_BD, txt_SD) + bias


def siglip_loss(img_BD: jax.Array, txt_BD: jax.Array, log_t: jax.Array, bias: jax.Array):
  """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, eq. 1 / Algorithm 1):
    L = -1/B sum_b sum_s log sigmoid(z_bs (t x_b . y_s + b)),  z_bs = +1 if b = s else -1,
  with x, y the L2-normalised image and text embeddings and t = exp(t') (init t' = log 10,
  b = -10: siglip_param_specs). This forms the whole B x B logits; siglip_chunked does not.
  Returns (L, {'i2t_accuracy', 't2i_accuracy'}): top-1 retrieval accuracy in the batch.
  """
  _check_pair('siglip_loss', img_BD, txt_BD)
  B = img_BD.shape[0]
  logits_BS = _siglip_logits(l2_normalize(img_BD), l2_normalize(txt_BD), log_t, bias)
  z_BS = 2 * jnp.eye(B, dtype=logits_BS.dtype) - 1
  loss = -jnp.sum(jax.nn.log_sigmoid(z_BS * logits_BS)) / B
  labels_B = jnp.arange(B)
  return loss, {'i2t_accuracy': jnp.mean(jnp.argmax(logits_BS, 1) == labels_B),
                't2i_accuracy': jnp.mean(jnp.argmax(logits_BS, 0) == labels_B)}


def _negative_block(img_BD, txt_SD, log_t, bias):
  """(sum_bs -log sigmoid(-logits_bs), row max, column max) of a block with no positives."""
  logits_BS = _siglip_logits(img_BD, txt_SD, log_t, bias)
  seen_BS = jax.lax.stop_gradient(logits_BS)
  return -jnp.sum(jax.nn.log_sigmoid(-logits_BS)), seen_BS.max(1), seen_BS.max(0)


def siglip_ring(img_BD: jax.Array, txt_BD: jax.Array, log_t: jax.Array, bias: jax.Array,
                axis_name):
  """siglip_loss of the global batch, computed chunk by chunk (Zhai et al. 2023, sec. 3.3,
  fig. 1); call inside jax.shard_map with the batch split over the n devices of `axis_name` (a
  mesh axis or a tuple of them). Device i holds B = B_global / n images and texts:
    step 0:  its images against its own texts, positives on the diagonal,
             l_0 = -sum_bs log sigmoid(z_bs (t x_b . y_s + b));
    steps 1..n-1: it passes its current text chunk to device i + 1 (ppermute) and adds the
             negative-only loss against the chunk it receives, -sum_bs log sigmoid(-(t x.y + b));
    L = psum(sum of the n terms) / B_global on every device.
  No device forms more than B x B logits (B the local batch). Gradients flow back through the
  ppermutes; each step's logits are recomputed in the backward pass (jax.checkpoint), so they
  are never stored for all steps at once. The accuracies of siglip_loss come along: each image
  keeps the highest negative logit it has seen, each text chunk carries its texts' own.
  Returns (L, {'i2t_accuracy', 't2i_accuracy'}), the same on every device.
  """
  n = jax.lax.axis_size(axis_name)
  B = img_BD.shape[0]
  img_BD, txt_SD = l2_normalize(img_BD), l2_normalize(txt_BD)
  perm = [(d, (d + 1) % n) for d in range(n)]

  logits_BS = _siglip_logits(img_BD, txt_SD, log_t, bias)
  eye_BS = jnp.eye(B, dtype=bool)
  loss = -jnp.sum(jax.nn.log_sigmoid(jnp.where(eye_BS, logits_BS, -logits_BS)))
  seen_BS = jax.lax.stop_gradient(logits_BS)
  pos_B = jnp.diagonal(seen_BS)
  neg_BS = jnp.where(eye_BS, -jnp.inf, seen_BS)
  block = jax.checkpoint(_negative_block)

  def step(_, carry):
    loss, img_max_B, txt_SD, txt_pos_S, txt_max_S = carry
    txt_SD, txt_pos_S, txt_max_S = jax.lax.ppermute((txt_SD, txt_pos_S, txt_max_S), axis_name,
                                                    perm)
    loss_blk, row_max_B, col_max_S = block(img_BD, txt_SD, log_t, bias)
    return (loss + loss_blk, jnp.maximum(img_max_B, row_max_B), txt_SD, txt_pos_S,
            jnp.maximum(txt_max_S, col_max_S))

  carry = (loss, neg_BS.max(1), txt_SD, pos_B, neg_BS.max(0))
  loss, img_max_B, _, txt_pos_S, txt_max_S = jax.lax.fori_loop(1, n, step, carry)
  total = B * n
  return jax.lax.psum(loss, axis_name) / total, {
      'i2t_accuracy': jax.lax.psum(jnp.sum(pos_B > img_max_B), axis_name) / total,
      't2i_accuracy': jax.lax.psum(jnp.sum(txt_pos_S > txt_max_S), axis_name) / total}


def siglip_chunked(img_BD: jax.Array, txt_BD: jax.Array, log_t: jax.Array, bias: jax.Array, *,
                   mesh: jax.sharding.Mesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES):
  """siglip_loss(img_BD, txt_BD, log_t, bias) by siglip_ring in jax.shard_map over `mesh`, the
  global batch split over the mesh axes of the logical name 'batch' under `rules` (default
  (data, fsdp, expert)); other mesh axes hold replicas. B must be divisible by their size n;
  each device then forms only (B / n) x (B / n) logits. Returns (L, accuracies) as siglip_loss.
  """
  _check_pair('siglip_chunked', img_BD, txt_BD)
  axes = rules_lib.mesh_axes(rules_lib.spec(('batch',), rules)[0])
  n = rules_lib.devices_along(mesh, axes)
  if img_BD.shape[0] % n:
    raise ValueError(f'siglip_chunked: batch {img_BD.shape[0]} is not divisible by the {n} '
                     f'devices of mesh axes {axes}')
  batch = jax.sharding.PartitionSpec(axes)
  scalar = jax.sharding.PartitionSpec()
  ring = jax.shard_map(lambda *a: siglip_ring(*a, axis_name=axes), mesh=mesh,
                       in_specs=(batch, batch, scalar, scalar), out_specs=scalar)
  return ring(img_BD, txt_BD, log_t, bias)
