"""SIGTERM (preemption) as a flag the loop reads at each step boundary."""
from __future__ import annotations

import signal


class PreemptionFlag:
  """While open, SIGTERM sets `requested` instead of killing the process."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)
