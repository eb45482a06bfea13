"""VLM generation with the KV cache (one prefill over the merged embeddings, then decode steps)
against decoding by recomputing the whole decoder over the merged sequence at every step."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lab.models import transformer, vlm
from lab.nn import param_spec as ps
from lab.sampling import vlm_generate

IMAGE_ID = 5
LLM = dict(d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=0, d_ff=32, max_len=32,
           norm='layernorm', norm_eps=1e-5, mlp='gelu', positions='learned', rope_theta=10000.0,
           bias=True, tie_embeddings=True, dropout=0.0, init_std=0.3, remat=False)
VISION = dict(patch_size=2, d_model=8, n_layers=1, n_heads=2, mlp_dim=16, class_token=True,
              pos_embed='learned', mlp_activation='gelu', norm_eps=1e-6, dropout=0.0,
              drop_path=0.0)


def make(connector, positions='learned'):
  """A random VLM: every weight ~ N(0, 0.3^2), norm scales around 1, drawn in NumPy (no compile);
  connector outputs are larger (N(0, 1) weights), so that the image visibly steers the answers."""
  cfg = ml_collections.FrozenConfigDict(dict(
      name='vlm', vocab_size=20, image_size=8, channels=3, image_token_id=IMAGE_ID,
      attention_backend='reference', vision=VISION,
      connector=dict(connector=connector, n_queries=4, n_heads=2),
      llm=LLM | dict(positions=positions)))
  rng = np.random.default_rng(0)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    std = 1.0 if name.startswith("['connector']") else 0.3
    return jnp.asarray((name.endswith("['scale']") + std * rng.standard_normal(s.shape)),
                       jnp.float32)

  return cfg, jax.tree_util.tree_map_with_path(draw, vlm.param_specs(cfg), is_leaf=ps.is_spec)


@pytest.mark.parametrize('connector, positions', [('pixel_shuffle', 'learned'),
                                                  ('resampler', 'rope')])
def test_greedy_generate_equals_full_forward_argmax(connector, positions):
  cfg, params = make(connector, positions)
  M = vlm.tokens_per_image(cfg)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((3, 8, 8, 3)), jnp.float32)
  text = rng.integers(IMAGE_ID + 1, 20, (3, 4))
  text[:, 0] = 1
  prompt = np.asarray(vlm.insert_image_tokens(text, IMAGE_ID, M))
  T, N = prompt.shape[1], 6
  got = jax.jit(functools.partial(vlm_generate.generate, cfg, num_new=N, temperature=0.0))(
      params, images, prompt, rng=jax.random.key(1))
  # Oracle: the whole sequence again at every step, without a cache: the prompt's merged
  # embeddings, then the token embeddings of what was decoded (a decoded id may be <image>'s, so
  # forward's placeholder search is not applied to it), padded to a fixed length (causality keeps
  # the padding from touching earlier positions); the argmax at the last real position.
  lcfg, llm = vlm.llm_config(cfg), params['llm']
  e_prompt = vlm.input_embeddings(cfg, params, images, jnp.asarray(prompt))

  @jax.jit
  def logits(tokens_BT):
    e_BTD = jnp.concatenate([e_prompt, transformer.embed_tokens(llm, tokens_BT[:, T:])], axis=1)
    return transformer.unembed(lcfg, llm, transformer.forward_hidden(lcfg, llm, None,
                                                                     embeds_BTD=e_BTD)[0])

  tokens = np.zeros((3, T + N), np.int32)
  tokens[:, :T] = prompt
  for t in range(T, T + N):
    tokens[:, t] = np.asarray(logits(tokens)[:, t - 1].argmax(-1))
  np.testing.assert_array_equal(got, tokens[:, T:])
  assert len(set(map(tuple, tokens[:, T:]))) > 1  # rows differ: the images matter


def test_sampling_is_reproducible_and_key_dependent():
  cfg, params = make('mlp')
  prompt = np.asarray(vlm.insert_image_tokens(np.ones((2, 2), np.int32), IMAGE_ID,
                                              vlm.tokens_per_image(cfg)))
  images = jnp.zeros((2, 8, 8, 3))
  generate = jax.jit(functools.partial(vlm_generate.generate, cfg, num_new=8))
  a, b, c = (generate(params, images, prompt, rng=jax.random.key(k)) for k in (3, 3, 4))
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).any()


def test_num_new_must_be_positive():
  cfg, params = make('mlp')
  with pytest.raises(ValueError, match='num_new=0'):
    vlm_generate.generate(cfg, params, jnp.zeros((1, 8, 8, 3)), jnp.ones((1, 18), jnp.int32), 0,
                          jax.random.key(0))
