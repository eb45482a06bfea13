"""Position-wise feed-forward layers."""
import jax
import jax.numpy as jnp

from lab.nn import fp8 as fp8_lib


def gelu_mlp(x_BTD, w_in_DF, b_in_F, w_out_FD, b_out_D):
  """GPT-2 MLP: y = GELU_tanh(x W_in + b_in) W_out + b_out (Hendrycks & Gimpel 2016, tanh form)."""
  h_BTF = jnp.einsum('BTD,DF->BTF', x_BTD, w_in_DF)
  if b_in_F is not None:
    h_BTF = h_BTF + b_in_F
  h_BTF = jax.nn.gelu(h_BTF, approximate=True)
  y_BTD = jnp.einsum('BTF,FD->BTD', h_BTF, w_out_FD)
  return y_BTD + b_out_D if b_out_D is not None else y_BTD


def swiglu_mlp(x_BTD, w_gate_DF, w_up_DF, w_down_FD, *, fp8: bool = False):
  """SwiGLU (Shazeer 2020, eq. 6 with Swish_1): y = (SiLU(x W_gate) * x W_up) W_down; the three
  matmuls in DeepSeek-V3's fine-grained FP8 (lab.nn.fp8) when `fp8`."""
  gate_BTF = jax.nn.silu(fp8_lib.linear(x_BTD, w_gate_DF, fp8=fp8))
  up_BTF = fp8_lib.linear(x_BTD, w_up_DF, fp8=fp8)
  return fp8_lib.linear(gate_BTF * up_BTF, w_down_FD, fp8=fp8)
