"""Decode-cache memory of MLA against MHA, GQA and MQA of the same heads (DeepSeek-V2 Table 1).

  .venv/bin/python benchmarks/bench_mla_cache.py

MLA caches one latent c^KV_t (d_c numbers) and one shared RoPE key k^R_t (d_h^R) per token and
layer; MHA caches a key and a value per head, 2 n_h d_h, and GQA / MQA the same for n_g groups, 2
n_g d_h (GQA here: 8 groups, or n_h / 2 where n_h <= 8). Every number here is measured, not
computed: the cache lab builds for a prompt (jax.eval_shape of lab.models.deepseek.prefill for MLA,
of lab.models.transformer.init_cache for MHA / GQA / MQA with n_h heads of d_h = qk_nope_dim and
the same n_layers), so no memory is allocated even for V3's 61 layers; the script asserts that each
matches its formula (lab.nn.mla.cache_elements_per_token, mha_cache_elements_per_token).

Configs: experiments/deepseek_tiny.py (trained in docs/results.md) and experiments/deepseek_v3.py
(V3's shapes: d_c = 512, d_h^R = 64, 128 heads of 128). Bytes assume bfloat16 (2 per number);
context 4K is V3's pre-training length, 128K its extended one. Writes
benchmarks/results/bench_mla_cache.json and prints a Markdown table.
"""
from __future__ import annotations

import datetime
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections

from lab import config as config_lib
from lab.models import deepseek, transformer
from lab.nn import mla
from lab.nn import param_spec as ps

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_RESULTS = _ROOT / 'benchmarks' / 'results'
_BYTES = 2  # bfloat16
_CONTEXTS = (4096, 131072)


def _numbers(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if x.ndim)


def mla_per_token_layer(cfg, max_len: int) -> int:
  """Numbers in deepseek.prefill's cache per token and layer, from its abstract output."""
  specs = deepseek.param_specs(cfg)
  specs.pop('mtp', None)
  state = jax.eval_shape(lambda: deepseek.init_state(cfg))
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  _, cache = jax.eval_shape(lambda p, s, t: deepseek.prefill(cfg, p, s, t, max_len),
                            ps.shapes(specs), state, tokens)
  return _numbers(cache['layers']) // (cfg.n_layers * max_len)


def grouped_per_token_layer(cfg, n_kv_heads: int, max_len: int) -> int:
  """Numbers in transformer.init_cache per token and layer for n_kv_heads heads of d_h."""
  tcfg = ml_collections.ConfigDict(dict(n_layers=cfg.n_layers, n_kv_heads=n_kv_heads,
                                        head_dim=cfg.qk_nope_dim))
  cache = jax.eval_shape(lambda: transformer.init_cache(tcfg, 1, max_len))
  return _numbers(cache) // (cfg.n_layers * max_len)


def rows(name: str, cfg) -> list[dict]:
  max_len = min(cfg.max_len, 64)
  schemes = [('MLA', mla_per_token_layer(cfg, max_len),
              mla.cache_elements_per_token(cfg.kv_lora_rank, cfg.qk_rope_dim))]
  gqa_groups = 8 if cfg.n_heads > 8 else cfg.n_heads // 2
  for label, groups in (('MHA', cfg.n_heads), ('GQA', gqa_groups), ('MQA', 1)):
    schemes.append((f'{label} ({groups} x {cfg.qk_nope_dim})',
                    grouped_per_token_layer(cfg, groups, max_len),
                    mla.mha_cache_elements_per_token(groups, cfg.qk_nope_dim)))
  mla_numbers = schemes[0][1]
  out = []
  for scheme, measured, formula in schemes:
    if measured != formula:
      raise AssertionError(f'{name} {scheme}: cache holds {measured} numbers a token and layer, '
                           f'formula {formula}')
    per_token = measured * cfg.n_layers * _BYTES
    out.append(dict(config=name, scheme=scheme, numbers_per_token_layer=measured,
                    bytes_per_token=per_token, relative_to_mla=measured / mla_numbers,
                    **{f'gib_at_{t}': per_token * t / 2**30 for t in _CONTEXTS}))
  return out


def markdown(table: list[dict]) -> str:
  head = ('| config | cache | numbers / token / layer | KiB / token (bf16, all layers) | '
          + ' | '.join(f'GiB / sequence at {t // 1024}K' for t in _CONTEXTS) + ' | x MLA |')
  lines = [head, '|' + '---|' * 2 + '---:|' * (3 + len(_CONTEXTS))]
  for r in table:
    gib = ' | '.join(f'{r[f"gib_at_{t}"]:.3g}' for t in _CONTEXTS)
    lines.append(f'| {r["config"]} | {r["scheme"]} | {r["numbers_per_token_layer"]:,} | '
                 f'{r["bytes_per_token"] / 1024:.3g} | {gib} | {r["relative_to_mla"]:.1f} |')
  return '\n'.join(lines)


def main():
  table = []
  for name in ('deepseek_tiny', 'deepseek_v3'):
    cfg = config_lib.load(str(_ROOT / 'experiments' / f'{name}.py')).model
    if not cfg.vocab_size:  # set from the data at run time; the cache does not depend on it
      cfg.vocab_size = 256
    table += rows(name, cfg)
  _RESULTS.mkdir(parents=True, exist_ok=True)
  out = _RESULTS / 'bench_mla_cache.json'
  out.write_text(json.dumps(dict(date=datetime.date.today().isoformat(), bytes_per_number=_BYTES,
                                 rows=table), indent=1))
  print(markdown(table))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
