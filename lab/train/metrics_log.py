"""Metrics to <workdir>/metrics.jsonl (one object a line: step and metric names), TensorBoard
event files (tensorboardX, no TensorFlow) and a PNG of the loss curves."""
from __future__ import annotations

import json
import os

import numpy as np


class MetricsLog:

  def __init__(self, workdir: str, resume_step: int = 0, primary: bool = True):
    """Opens the log; lines of steps after resume_step (written after the last checkpoint by a
    run that then died) are dropped so the file reads as one uninterrupted run. Only the primary
    process (process 0 of a multi-host run) writes; the others keep nothing."""
    self.primary = primary
    if not primary:
      return
    from tensorboardX import SummaryWriter
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.records = [r for r in read(self.path) if r['step'] <= resume_step] if resume_step else []
    with open(self.path, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in self.records)
    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self.workdir = workdir

  def write(self, step: int, metrics: dict) -> None:
    if not self.primary:
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    self.records.append(record)
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for name, value in metrics.items():
      self.tb.add_scalar(name, float(value), int(step))

  def plot(self, filename: str = 'loss.png') -> str:
    """Plots every metric whose name ends in 'loss' against step; returns the PNG path."""
    if not self.primary:
      return ''
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4))  # no pyplot: the caller's (e.g. a notebook's) backend is untouched
    ax = fig.subplots()
    names = sorted({k for r in self.records for k in r if k.endswith('loss')})
    for name in names:
      pts = np.array([(r['step'], r[name]) for r in self.records if name in r])
      ax.plot(pts[:, 0], pts[:, 1], label=name, marker='o' if len(pts) < 30 else None)
    ax.set_xlabel('step')
    ax.set_ylabel('loss (nats)')
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(self.workdir, filename)
    FigureCanvasAgg(fig).print_figure(path, dpi=100, bbox_inches='tight')
    return path

  def close(self) -> None:
    if self.primary:
      self.tb.close()


def read(path: str) -> list[dict]:
  """The records of a metrics.jsonl file ([] if there is none)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
