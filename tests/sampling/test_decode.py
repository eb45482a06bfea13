"""KV-cache generation against decoding by recomputing the full forward at every step."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lab.models import transformer
from lab.nn import param_spec as ps
from lab.sampling import decode

GPT2 = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=0, d_ff=64,
            max_len=24, norm='layernorm', norm_eps=1e-5, mlp='gelu', positions='learned',
            rope_theta=10000.0, bias=True, tie_embeddings=True, dropout=0.0, init_std=0.3,
            remat=False, attention_backend='reference')
LLAMA = GPT2 | dict(norm='rmsnorm', mlp='swiglu', positions='rope', bias=False,
                    tie_embeddings=False, n_kv_heads=2)


@pytest.mark.parametrize('arch', [GPT2, LLAMA], ids=['gpt2', 'llama'])
def test_greedy_generate_equals_full_forward_argmax(arch):
  cfg = ml_collections.FrozenConfigDict(arch)
  params = ps.init(transformer.param_specs(cfg), jax.random.key(0))
  prompt_BT = jax.random.randint(jax.random.key(1), (3, 5), 0, cfg.vocab_size)
  got = jax.jit(functools.partial(decode.generate, transformer, cfg, num_new=12,
                                  temperature=0.0))(params, prompt_BT, rng=jax.random.key(2))
  # Oracle: re-run the whole sequence (zero-padded to a fixed length; causality keeps the pad
  # from touching earlier positions) and take the argmax at the last real position.
  forward = jax.jit(lambda tokens_BT: transformer.forward(cfg, params, tokens_BT))
  tokens = np.zeros((3, 17), np.int32)
  tokens[:, :5] = prompt_BT
  for t in range(5, 17):
    tokens[:, t] = np.asarray(forward(tokens)[:, t - 1].argmax(-1))
  np.testing.assert_array_equal(got, tokens)
  assert len(set(map(tuple, tokens[:, 5:]))) > 1  # rows differ: the test is not trivial


def test_sampling_is_reproducible_and_key_dependent():
  cfg = ml_collections.FrozenConfigDict(GPT2)
  params = ps.init(transformer.param_specs(cfg), jax.random.key(0))
  prompt_BT = jnp.zeros((2, 3), jnp.int32)
  generate = jax.jit(functools.partial(decode.generate, transformer, cfg, num_new=15, top_p=0.9))
  a, b, c = (generate(params, prompt_BT, rng=jax.random.key(k)) for k in (5, 5, 6))
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).any()


def test_too_long_generation_is_an_error():
  cfg = ml_collections.FrozenConfigDict(GPT2)
  params = ps.init(transformer.param_specs(cfg), jax.random.key(0))
  with pytest.raises(ValueError, match='max_len=30'):
    decode.generate(transformer, cfg, params, jnp.zeros((1, 10), jnp.int32), 20, jax.random.key(0))
