"""DeepSeek-V3's published shapes (arXiv 2412.19437 §4.2) on lab.models.deepseek.

61 layers (the first 3 dense, d_ff 18432), d_model 7168, 128 heads, MLA with d_c' = 1536,
d_c = 512, d_h = 128, d_h^R = 64, value dim 128; 256 routed experts of width 2048 plus 1
shared, 8 active per token within 4 of 8 groups, gates scaled by 2.5; vocabulary 129280; one
MTP module (lambda 0.3); gamma 0.001, alpha 0.0001, init std 0.006; rope_theta 10000 with the
4K pre-training context. `lab.models.deepseek.count_params` gives 671.03B total / 36.63B active
per token (the paper: 671B / 37B) and 11.61B more for the MTP module, without allocating
anything (tests/models/test_deepseek.py).

For counting and sharding plans only: lab has no data module with V3's 128K-token vocabulary
yet (the char data of deepseek_tiny sets a different vocab_size, which lab.run refuses), and
the training settings below are V3's (§4.2) without its batch-size ramp.
"""
import ml_collections

from lab.config import parse_variant


def get_config(arg=None):
  variant = parse_variant(arg)
  if variant:
    raise ValueError(f'deepseek_v3 variant {sorted(variant)}; expected none')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'lm_deepseek'
  c.mesh = dict(data=1, fsdp=-1, tensor=1, expert=1, seq=1)
  c.sharding_rules = {}
  c.data = dict(name='text_chars', source='python_docs', tfds_name='', data_dir='',
                tokenizer='byte', block_size=4096, val_fraction=0.01, eval_batches=10)
  c.model = dict(name='deepseek', vocab_size=129280, vocab_multiple=1, d_model=7168,
                 n_layers=61, first_dense_layers=3, n_heads=128, q_lora_rank=1536,
                 kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128, d_ff=18432,
                 d_ff_expert=2048, n_routed_experts=256, n_shared_experts=1, top_k=8, n_groups=8,
                 top_k_groups=4, routed_scaling_factor=2.5, bias_update_speed=1e-3,
                 balance_alpha=1e-4, mtp_depth=1, mtp_lambda=0.3, rope_theta=10000.0,
                 norm_eps=1e-6, max_len=4096, attention_backend='auto',
                 moe_dispatch='expert_parallel', moe_capacity_factor=1.25, init_std=0.006,
                 # V3 trains in FP8 with expert parallelism; lab's expert-parallel experts have
                 # no FP8 path yet (lab.models.deepseek.validate refuses the pair).
                 fp8=False)
  # 14.8T tokens in batches of 15360 x 4096 (V3 ramps the batch from 3072 and keeps the peak
  # lr until 10T tokens; here a plain warmup-cosine).
  c.train = dict(steps=235_000, batch_size=15360, grad_accum=1, lr=2.2e-4, min_lr=2.2e-5,
                 warmup_steps=2000, schedule='cosine', decay_steps=0, wsd_decay_fraction=0.2,
                 b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, ema_decay=0.0,
                 compute_dtype='bfloat16', loss_scale_init=2.0**15, loss_scale_period=2000,
                 nonfinite='stop', log_every=10, eval_every=1000, sample_every=0,
                 checkpoint_every=1000, keep_checkpoints=2)
  c.sample = dict(num=0, length=64, prompt='', temperature=1.0, top_k=0, top_p=1.0)
  return c
