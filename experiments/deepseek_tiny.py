"""A tiny DeepSeek-V3-shaped character model (lab.models.deepseek, objective lm_deepseek).

The data are experiments/gpt_chars.py's: the Python documentation that ships with CPython,
character-level, no download. The model keeps every V3 piece at toy width: MLA with query and
KV compression and a decoupled RoPE key, a first dense layer then DeepSeekMoE layers (1 shared
+ 16 routed experts, top-2 within 2 of 4 groups, sigmoid gates scaled by 2.5), aux-loss-free
balancing with a small sequence-wise balance loss (alpha 1e-4 as V3), and one MTP module
(lambda 0.3 as V3's first 10T tokens). gamma is 0.01, not V3's 0.001: V3 runs ~10^5 steps,
this 600, and with 0.001 the bias needs ~300 of them to undo the early routing collapse
(MaxVio ~4 until then).

Variants (after ':'):
  (none)   the default run: a few minutes on 2 CPU cores.
  tiny     a few-second config for tests.
  auxloss  aux-loss-only balancing, the baseline of V3 §4.5.2 / Wang et al.: gamma = 0 and
           balance_alpha = 0.01.
  nomtp    mtp_depth = 0 (the MTP ablation of V3 §4.5.1).
  fp8      the FP8 recipe (simulated fine-grained e4m3 GEMMs, lab.nn.fp8).
Variants combine, e.g. 'tiny,fp8'.
"""
import ml_collections

from lab.config import parse_variant


def get_config(arg=None):
  variant = parse_variant(arg)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'lm_deepseek'
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, seq=1)
  c.sharding_rules = {}

  c.data = dict(name='text_chars', source='python_docs', tfds_name='tiny_shakespeare',
                data_dir='', tokenizer='char', block_size=64, val_fraction=0.1, eval_batches=20)

  c.model = dict(name='deepseek', vocab_size=0, vocab_multiple=1, d_model=64, n_layers=4,
                 first_dense_layers=1, n_heads=4, q_lora_rank=32, kv_lora_rank=24,
                 qk_nope_dim=16, qk_rope_dim=8, v_head_dim=16, d_ff=192, d_ff_expert=32,
                 n_routed_experts=16, n_shared_experts=1, top_k=2, n_groups=4, top_k_groups=2,
                 routed_scaling_factor=2.5, bias_update_speed=1e-2, balance_alpha=1e-4,
                 mtp_depth=1, mtp_lambda=0.3, rope_theta=10000.0, norm_eps=1e-6, max_len=64,
                 fp8=False, attention_backend='auto', moe_dispatch='dense',
                 moe_capacity_factor=1.25, init_std=0.02)

  c.train = dict(steps=600, batch_size=16, grad_accum=1, lr=3e-3, min_lr=3e-4, warmup_steps=50,
                 schedule='cosine', decay_steps=0, wsd_decay_fraction=0.2, b1=0.9, b2=0.95,
                 eps=1e-8, weight_decay=0.1, clip_norm=1.0, ema_decay=0.0,
                 compute_dtype='float32', loss_scale_init=2.0**15, loss_scale_period=2000,
                 nonfinite='stop', log_every=25, eval_every=200, sample_every=200,
                 checkpoint_every=200, keep_checkpoints=2)

  c.sample = dict(num=2, length=56, prompt='\n', temperature=0.8, top_k=0, top_p=0.95)

  if 'tiny' in variant:
    c.data.update(block_size=32, eval_batches=2)
    c.model.update(d_model=32, n_layers=3, n_heads=2, q_lora_rank=16, kv_lora_rank=16,
                   qk_nope_dim=8, qk_rope_dim=4, v_head_dim=8, d_ff=64, d_ff_expert=16,
                   n_routed_experts=8, top_k=2, n_groups=2, top_k_groups=1, max_len=32)
    c.train.update(steps=20, batch_size=8, warmup_steps=2, log_every=1, eval_every=10,
                   sample_every=0, checkpoint_every=10)
    c.sample.update(num=1, length=16)
  if 'auxloss' in variant:
    c.model.update(bias_update_speed=0.0, balance_alpha=0.01)
  if 'nomtp' in variant:
    c.model.update(mtp_depth=0)
  if 'fp8' in variant:
    c.model.update(fp8=True)
  unknown = set(variant) - {'tiny', 'auxloss', 'nomtp', 'fp8'}
  if unknown:
    raise ValueError(f'deepseek_tiny variant {sorted(unknown)}; expected tiny, auxloss, nomtp, '
                     'fp8')
  return c
