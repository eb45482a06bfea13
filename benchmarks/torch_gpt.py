"""The PyTorch baseline of bench_gpt_cpu.py: lab's GPT-2-style decoder and train step, eager.

Same math as `lab.models.transformer` with the GPT-2 switches (learned positions, pre-LayerNorm,
GELU-tanh MLP, biases, tied embeddings, no dropout) and as `lab.train.step` (mean cross-entropy,
global-norm clipping, AdamW with weight decay on >=2-D parameters only), written the way nanoGPT
writes it: one fused qkv Linear and `F.scaled_dot_product_attention(is_causal=True)`.
"""
import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
  """h = x + Attn(LN(x)); y = h + MLP(LN(h))."""

  def __init__(self, d_model: int, n_heads: int, d_ff: int, eps: float):
    super().__init__()
    self.n_heads = n_heads
    self.attn_norm = nn.LayerNorm(d_model, eps=eps)
    self.qkv = nn.Linear(d_model, 3 * d_model)
    self.out = nn.Linear(d_model, d_model)
    self.mlp_norm = nn.LayerNorm(d_model, eps=eps)
    self.mlp_in = nn.Linear(d_model, d_ff)
    self.mlp_out = nn.Linear(d_ff, d_model)

  def forward(self, x_BTD):
    B, T, D = x_BTD.shape
    N = self.n_heads
    q_BTD, k_BTD, v_BTD = self.qkv(self.attn_norm(x_BTD)).split(D, dim=2)
    heads = lambda a_BTD: a_BTD.view(B, T, N, D // N).transpose(1, 2)
    o_BNTH = F.scaled_dot_product_attention(heads(q_BTD), heads(k_BTD), heads(v_BTD),
                                            is_causal=True)
    x_BTD = x_BTD + self.out(o_BNTH.transpose(1, 2).reshape(B, T, D))
    h_BTF = F.gelu(self.mlp_in(self.mlp_norm(x_BTD)), approximate='tanh')
    return x_BTD + self.mlp_out(h_BTF)


class GPT(nn.Module):
  """logits_BTV = LN(blocks(E[tokens] + P[positions])) E^T, with E the tied token embedding."""

  def __init__(self, cfg):
    super().__init__()
    self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
    self.positions = nn.Embedding(cfg.max_len, cfg.d_model)
    self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.norm_eps)
                                for _ in range(cfg.n_layers))
    self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

  def forward(self, tokens_BT):
    x_BTD = self.tokens(tokens_BT) + self.positions.weight[:tokens_BT.shape[1]]
    for block in self.blocks:
      x_BTD = block(x_BTD)
    return self.final_norm(x_BTD) @ self.tokens.weight.T


def load_lab_params(model: GPT, params) -> None:
  """Copies lab transformer params (blocks stacked on a leading layer axis) into `model`."""
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  matrix = lambda a, rows: t(a).reshape(rows, -1).T   # lab's [in, ...] -> torch's [out, in]
  D = model.tokens.weight.shape[1]
  with torch.no_grad():
    model.tokens.weight.copy_(t(params['embed']['tokens']))
    model.positions.weight.copy_(t(params['embed']['positions']))
    model.final_norm.weight.copy_(t(params['final_norm']['scale']))
    model.final_norm.bias.copy_(t(params['final_norm']['bias']))
    for i, block in enumerate(model.blocks):
      p = jax.tree.map(lambda a: a[i], params['blocks'])
      a, m = p['attn'], p['mlp']
      block.attn_norm.weight.copy_(t(p['attn_norm']['scale']))
      block.attn_norm.bias.copy_(t(p['attn_norm']['bias']))
      block.qkv.weight.copy_(torch.cat([matrix(a[w], D) for w in ('wq', 'wk', 'wv')]))
      block.qkv.bias.copy_(torch.cat([t(a[b]).reshape(-1) for b in ('bq', 'bk', 'bv')]))
      block.out.weight.copy_(matrix(a['wo'], D))
      block.out.bias.copy_(t(a['bo']))
      block.mlp_norm.weight.copy_(t(p['mlp_norm']['scale']))
      block.mlp_norm.bias.copy_(t(p['mlp_norm']['bias']))
      block.mlp_in.weight.copy_(matrix(m['w_in'], D))
      block.mlp_in.bias.copy_(t(m['b_in']))
      block.mlp_out.weight.copy_(matrix(m['w_out'], m['w_out'].shape[0]))
      block.mlp_out.bias.copy_(t(m['b_out']))


def loss_fn(model: GPT, tokens_BT1):
  """Mean next-token cross-entropy (nats), as lab.objectives.lm."""
  logits_BTV = model(tokens_BT1[:, :-1])
  return F.cross_entropy(logits_BTV.flatten(0, 1), tokens_BT1[:, 1:].flatten())


def make_train_step(model: GPT, train_cfg):
  """step(tokens_BT1) -> loss: backward, clip_grad_norm_, AdamW (decay on >=2-D params only)."""
  params = list(model.parameters())
  groups = [{'params': [p for p in params if p.ndim >= 2], 'weight_decay': train_cfg.weight_decay},
            {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.b1, train_cfg.b2),
                                eps=train_cfg.eps, fused=True)

  def step(tokens_BT1):
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, tokens_BT1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, train_cfg.clip_norm)
    optimizer.step()
    return loss

  return step
