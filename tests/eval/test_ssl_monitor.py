"""The SSL k-NN monitor: raw digits pixels as 'features' classify well above chance; a collapsed
encoder (constant features) reports collapse std 0 and chance-level accuracy."""
import jax.numpy as jnp
import ml_collections

from lab.eval import ssl_monitor

CONFIG = ml_collections.ConfigDict({'data': dict(source='digits', data_dir='', image_size=0)})


def test_monitor_reports_knn_accuracy_and_collapse():
  pixels = lambda params, state, x_BXYC: x_BXYC.reshape(x_BXYC.shape[0], -1) * params['scale']
  out = ssl_monitor.make_monitor(CONFIG, pixels, n_bank=1000, n_query=200, batch=128)(
      {'scale': jnp.float32(2.0)}, {}, None)
  assert float(out['knn_accuracy'].split()[0]) > 0.9, out
  assert 0.02 < float(out['collapse_std'].split()[0]) < 0.2, out
  collapsed = lambda params, state, x_BXYC: jnp.ones((x_BXYC.shape[0], 8)) + 0 * x_BXYC.sum()
  out = ssl_monitor.make_monitor(CONFIG, collapsed, n_bank=500, n_query=200)({}, {}, None)
  assert float(out['collapse_std'].split()[0]) < 1e-6
  assert float(out['knn_accuracy'].split()[0]) < 0.3, out
