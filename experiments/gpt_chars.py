"""A character-level GPT.

Variants (after ':'):
  (none)  the default job: a small GPT on the Python documentation that ships with CPython
          (no download), about 2-3 minutes on 2 CPU cores.
  baby    nanoGPT's shakespeare_char "baby" config on TFDS tiny_shakespeare: 4 layers, 4 heads,
          width 128, block 64, batch 12, no dropout, lr 1e-3 cosine to 1e-4, 100 warmup, 2000 steps.
  tiny    a few-second config for tests.
  llama   switch the decoder to Llama's pieces (RoPE, RMSNorm, SwiGLU, GQA, untied head);
          combine as 'baby,llama'.
  moe[=E] every MLP becomes a top-2 mixture of E experts (default 4), e.g. 'tiny,moe=4'.
"""
import ml_collections

from lab.config import parse_variant


def get_config(arg=None):
  variant = parse_variant(arg)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'lm'
  c.objective_args = dict(moe_balance_weight=0.01)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, seq=1)
  c.sharding_rules = {}

  c.data = dict(name='text_chars', source='python_docs', tfds_name='tiny_shakespeare',
                data_dir='', tokenizer='char', block_size=96, val_fraction=0.1, eval_batches=20)

  c.model = dict(name='transformer', vocab_size=0, vocab_multiple=1, d_model=128, n_layers=4, n_heads=4,
                 n_kv_heads=4, head_dim=0, d_ff=512, max_len=96, norm='layernorm', norm_eps=1e-5,
                 mlp='gelu', positions='learned', rope_theta=10000.0, bias=True,
                 tie_embeddings=True, dropout=0.0, init_std=0.02, remat=False,
                 attention_backend='auto', moe_experts=0, moe_top_k=2, moe_capacity_factor=1.25,
                 moe_renormalize=True)

  c.train = dict(steps=900, batch_size=16, grad_accum=1, lr=3e-3, min_lr=3e-4, warmup_steps=50,
                 schedule='cosine', decay_steps=0, wsd_decay_fraction=0.2, b1=0.9, b2=0.99,
                 eps=1e-8, weight_decay=0.1, clip_norm=1.0, ema_decay=0.0,
                 compute_dtype='float32', loss_scale_init=2.0**15, loss_scale_period=2000,
                 nonfinite='stop', log_every=50, eval_every=300, sample_every=300,
                 checkpoint_every=300, keep_checkpoints=2)

  c.sample = dict(num=3, length=90, prompt='\n', temperature=0.8, top_k=0, top_p=0.95)

  if 'baby' in variant:
    c.data.update(source='tfds', block_size=64, eval_batches=200)
    c.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=512, max_len=64)
    c.train.update(steps=2000, batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                   b2=0.99, weight_decay=0.1, log_every=50, eval_every=250, sample_every=1000,
                   checkpoint_every=500)
    c.sample.update(length=60)
  if 'tiny' in variant:
    c.data.update(block_size=32, eval_batches=2)
    c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_len=64)
    c.train.update(steps=20, batch_size=8, warmup_steps=2, log_every=1, eval_every=10,
                   sample_every=0, checkpoint_every=10)
    c.sample.update(num=1, length=16)
  if 'llama' in variant:
    c.model.update(norm='rmsnorm', mlp='swiglu', positions='rope', bias=False,
                   tie_embeddings=False, n_kv_heads=max(1, c.model.n_heads // 2),
                   d_ff=(c.model.d_ff * 2) // 3)
  if 'moe' in variant:
    c.model.update(moe_experts=int(variant['moe']) if variant['moe'] is not True else 4)
  unknown = set(variant) - {'baby', 'tiny', 'llama', 'moe'}
  if unknown:
    raise ValueError(f'gpt_chars variant {sorted(unknown)}; expected baby, tiny, llama, moe[=E]')
  return c
