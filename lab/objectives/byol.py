"""BYOL: Bootstrap Your Own Latent (Grill, Strub, Altche, Tallec, Richemond, Buchatskaya, Doersch,
Avila Pires, Guo, Gheshlaghi Azar, Piot, Kavukcuoglu, Munos & Valko 2020, arXiv:2006.07733).

An online network (encoder f_theta, projector g_theta, predictor q_theta) predicts the
projection of the other view made by a target network (f_xi, g_xi) that is a slow exponential
moving average of the online one (sec. 3.1):
  xi <- tau xi + (1 - tau) theta,  tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2,   (eq. 1)
tau_base = 0.996, k the step, K the number of steps (lab.objectives.momentum, in after_step on
the updated online parameters). With q = q_theta(g_theta(f_theta(v))) and z' = g_xi(f_xi(v')),
  L(v, v') = ||q / ||q|| - z' / ||z'|| ||^2 = 2 - 2 <q, z'> / (||q|| ||z'||),         (eq. 2)
symmetrised over the two views, L_BYOL = L(v, v') + L(v', v), averaged over the batch; the
target receives no gradient (it lives in the state, not in the parameters).
Heads (sec. 3.3): projector and predictor Linear-BN-ReLU-Linear (the paper's 4096 and 256, here
proj_hidden and proj_dim). Views: byol_views' asymmetric recipe (appendix B, table 6: blur
p = 1.0 / 0.1, solarisation p = 0 / 0.2), crop scale (0.08, 1).
Batch norm: each view goes through each network as its own batch, and the target network runs
in training mode with batch statistics and its own running statistics, as the authors' code.
Target initialisation: the paper starts xi = theta. Task.init_state sees no parameters, so the
state's target starts empty (zeros, target_ready False) and the first loss_fn call fills it with
the online parameters it is given (before the first update), which makes it exactly theta_0.
Optimizer: the paper uses LARS (lr 0.2 B / 256, weight decay 1.5e-6); at this toy scale we use
the shared AdamW recipe (experiment_defaults changes no training field).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.config import require
from lab.data import augment
from lab.eval import collapse, ssl_monitor
from lab.models import backbone
from lab.nn import mlp_head
from lab.nn import param_spec as ps
from lab.objectives import momentum
from lab.objectives.contrastive_losses import l2_normalize
from lab.train.task import Task

TARGET_PARTS = ('encoder', 'projector')


def experiment_defaults(method: str) -> dict:
  """The paper's tau_base and crop scale; head widths scaled to a width-16 ResNet."""
  del method
  return {'objective_args': dict(proj_hidden=512, proj_dim=128, tau_base=0.996,
                                 crop_scale=(0.08, 1.0))}


def validate(config) -> None:
  a = config.objective_args
  require(a.method == 'byol', f'objective_args.method={a.method!r}; expected "byol"')
  for key in ('proj_hidden', 'proj_dim'):
    require(a[key] >= 1, f'objective_args.{key}={a[key]}; expected a positive integer')
  require(0.0 <= a.tau_base <= 1.0, f'objective_args.tau_base={a.tau_base}; expected a value '
          'in [0, 1]')
  lo_hi = tuple(a.crop_scale)
  require(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1,
          f'objective_args.crop_scale={lo_hi}; expected (lo, hi) with 0 < lo <= hi <= 1')
  backbone.validate(config.model)


def normalized_mse(q_BD: jax.Array, z_BD: jax.Array) -> jax.Array:
  """mean_b ||q_b / ||q_b|| - z_b / ||z_b|| ||^2 = mean_b 2 - 2 cos(q_b, z_b) (eq. 2)."""
  return jnp.mean(jnp.sum(jnp.square(l2_normalize(q_BD) - l2_normalize(z_BD)), axis=-1))


def byol_loss(q1_BD, q2_BD, z1_BD, z2_BD) -> jax.Array:
  """L_BYOL = L(q1, z2') + L(q2, z1') with the target projections z' under stop-gradient:
  q_i is the online prediction of view i, z_i' the target projection of view i."""
  sg = jax.lax.stop_gradient
  return normalized_mse(q1_BD, sg(z2_BD)) + normalized_mse(q2_BD, sg(z1_BD))


def make_task(config, data) -> Task:
  del data
  cfg, a = config.model, config.objective_args
  projector = mlp_head.layers((a.proj_hidden, a.proj_dim), bn_hidden=True)
  predictor = mlp_head.layers((a.proj_hidden, a.proj_dim), bn_hidden=True)
  specs = {'encoder': backbone.param_specs(cfg),
           'projector': mlp_head.head_specs(backbone.feature_dim(cfg), projector),
           'predictor': mlp_head.head_specs(a.proj_dim, predictor)}

  def init_state(key):
    del key
    net_state = {'encoder': backbone.init_state(cfg),
                 'projector': mlp_head.init_head_state(projector)}
    empty = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         {k: specs[k] for k in TARGET_PARTS}, is_leaf=ps.is_spec)
    return {**net_state, 'predictor': mlp_head.init_head_state(predictor),
            'target': {'params': empty, 'state': net_state},
            'target_ready': jnp.zeros((), bool)}

  def project(params, state, x_BXYC, train, rng):
    """(z_BD, new_state) of encoder + projector, online or target."""
    h_BD, enc = backbone.features(cfg, params['encoder'], state['encoder'], x_BXYC, train=train,
                                  rng=rng)
    z_BD, proj = mlp_head.head(params['projector'], state['projector'], projector, h_BD,
                               train=train)
    return z_BD, {'encoder': enc, 'projector': proj}

  def loss_fn(params, state, batch, rng, train):
    x_BXYC = batch['image']
    key = jax.random.key(0) if rng is None else jax.random.fold_in(rng, 0)
    views = lambda k, x: augment.byol_views(k, x, x_BXYC.shape[1], tuple(a.crop_scale))
    x1_BXYC, x2_BXYC = jax.vmap(views)(augment.example_keys(key, x_BXYC.shape[0]), x_BXYC)
    rngs = [None if rng is None else jax.random.fold_in(rng, i) for i in range(1, 5)]
    online = {k: state[k] for k in TARGET_PARTS}
    pred = state['predictor']
    z, q, z_t = [], [], []
    for v_BXYC, r in zip((x1_BXYC, x2_BXYC), rngs[:2]):
      z_BD, online = project(params, online, v_BXYC, train, r)
      q_BD, pred = mlp_head.head(params['predictor'], pred, predictor, z_BD, train=train)
      z.append(z_BD)
      q.append(q_BD)
    ready = state['target_ready']
    fill = lambda t, o: jnp.where(ready, t, jax.lax.stop_gradient(o).astype(t.dtype))
    online_params = {k: params[k] for k in TARGET_PARTS}
    target = jax.tree.map(fill, state['target']['params'], online_params)
    target_in = jax.tree.map(lambda t, o: t.astype(o.dtype), target, online_params)  # compute dtype
    target_state = state['target']['state']
    for v_BXYC, r in zip((x1_BXYC, x2_BXYC), rngs[2:]):
      z_BD, target_state = project(target_in, target_state, v_BXYC, train, r)
      z_t.append(z_BD)
    loss = byol_loss(q[0], q[1], z_t[0], z_t[1])
    metrics = {'loss': loss, 'z_std': collapse.normalized_std(jax.lax.stop_gradient(z[0]))}
    new_state = {**online, 'predictor': pred, 'target': {'params': target, 'state': target_state},
                 'target_ready': jnp.ones((), bool)}
    return loss, (metrics, new_state)

  def after_step(params, state, step):
    """xi <- tau_k xi + (1 - tau_k) theta (eq. 1) with the cosine tau_k of the step just done."""
    tau = momentum.cosine_momentum(a.tau_base, step, config.train.steps)
    target = momentum.ema(state['target']['params'], {k: params[k] for k in TARGET_PARTS}, tau)
    return {**state, 'target': {**state['target'], 'params': target}}

  def features(params, state, images_BXYC):
    return backbone.features(cfg, params['encoder'], state['encoder'], images_BXYC,
                             train=False)[0]

  return Task(param_specs=specs, init_state=init_state, loss_fn=loss_fn, after_step=after_step,
              sample=ssl_monitor.make_monitor(config, features, config.sample.n_bank,
                                              config.sample.n_query), features=features)
