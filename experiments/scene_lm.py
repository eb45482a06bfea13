"""A word-level GPT on the generated scenes' text: the language model a VLM starts from.

  python -m lab.run --config experiments/scene_lm.py --workdir runs/scene_lm

Documents are "<bos> caption question <sep> answer <eos>" of training scenes (lab.data.
scene_text), so the LM knows the captions' language and answers from the text before the
question; vlm_scenes.py then puts image tokens where the caption was. The scene settings (and
so the held-out colour-shape pairs, which the LM never reads) are the ones vlm_scenes.py uses.

Variants (after ':'):
  (none)  GPT-2 style, width 64, 2 layers, 800 steps of 32 windows of 112 tokens (about 5
          documents each); max_len 112 holds a VLM's 64 image tokens and the longest caption.
  tiny    a few-second config for tests.
"""
import ml_collections

from lab.config import parse_variant

SCENES = dict(seed=0, image_size=32, grid=3, max_objects=4, digit_fraction=0.25,
              holdout=('red circle', 'blue square'), n_tiles=0)


def get_config(arg=None):
  variant = parse_variant(arg)
  unknown = set(variant) - {'tiny'}
  if unknown:
    raise ValueError(f'scene_lm variant {sorted(unknown)}; expected tiny')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'lm'
  c.objective_args = dict(moe_balance_weight=0.0)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, seq=1)
  c.sharding_rules = {}
  c.data = dict(name='scene_text', n_train=10000, n_eval=1000, block_size=112, eval_batches=8,
                **SCENES)
  c.model = dict(name='transformer', vocab_size=0, vocab_multiple=1, d_model=64, n_layers=2,
                 n_heads=4, n_kv_heads=4, head_dim=0, d_ff=256, max_len=112, norm='layernorm',
                 norm_eps=1e-5, mlp='gelu', positions='learned', rope_theta=10000.0, bias=True,
                 tie_embeddings=True, dropout=0.0, init_std=0.02, remat=False,
                 attention_backend='auto', moe_experts=0, moe_top_k=2, moe_capacity_factor=1.25,
                 moe_renormalize=True)
  c.train = dict(steps=800, batch_size=32, grad_accum=1, lr=3e-3, min_lr=3e-4, warmup_steps=50,
                 schedule='cosine', decay_steps=0, wsd_decay_fraction=0.2, b1=0.9, b2=0.99,
                 eps=1e-8, weight_decay=0.1, clip_norm=1.0, ema_decay=0.0,
                 compute_dtype='float32', loss_scale_init=2.0**15, loss_scale_period=2000,
                 nonfinite='stop', log_every=50, eval_every=400, sample_every=800,
                 checkpoint_every=400, keep_checkpoints=1)
  c.sample = dict(num=2, length=40, prompt='a red square', temperature=0.0, top_k=0, top_p=1.0)
  if 'tiny' in variant:
    c.data.update(n_train=200, n_eval=50, block_size=32, eval_batches=1)
    c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_len=96,
                   attention_backend='xla')
    c.train.update(steps=4, batch_size=8, warmup_steps=1, log_every=1, eval_every=4,
                   sample_every=0, checkpoint_every=4)
  return c
