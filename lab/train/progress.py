"""Progress display: a tqdm bar with steps/s and ETA on a terminal, plain lines otherwise."""
from __future__ import annotations

import sys
import time


class Progress:

  def __init__(self, start: int, total: int, every: int, primary: bool = True):
    """Only the primary process (process 0 of a multi-host run) shows anything."""
    self.total, self.every, self.start, self.primary = total, every, start, primary
    self.t0 = time.perf_counter()
    self.bar = None
    if primary and sys.stdout.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)

  def update(self, step: int, metrics: dict) -> None:
    """Called after each step (step = steps done so far)."""
    if not self.primary:
      return
    if self.bar is not None:
      self.bar.update(1)
      if step % self.every == 0:
        self.bar.set_postfix({k: f'{v:.4g}' for k, v in metrics.items()})
      return
    if step % self.every == 0 or step == self.total:
      rate = (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
      eta = (self.total - step) / max(rate, 1e-9)
      shown = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items())
      print(f'step {step}/{self.total} {shown} ({rate:.2f} steps/s, ETA {eta:.0f}s)', flush=True)

  def write(self, text: str) -> None:
    if self.bar is not None:
      self.bar.write(text)
    elif self.primary:
      print(text, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
