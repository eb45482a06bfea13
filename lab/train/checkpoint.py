"""Orbax checkpoints of the train state, the data iterator's state and the resolved config.

Layout: <workdir>/checkpoints/<step>/{state, data, config}. Every process writes its shards of
the state and its own grain iterator state (data/process_<i>-of-<n>.json); restoring into a
different mesh reshards. Saving is asynchronous (arrays are copied to host before `save`
returns); `close()` waits for the last write.
"""
from __future__ import annotations

import os

import grain.checkpoint
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, keep: int):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, config: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(config)), force=True)

  def restore(self, step: int, abstract_state, data_iter):
    """The state at step, in the shapes, dtypes and shardings of abstract_state; data_iter is
    moved to where it was when that step was saved."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    return out.state

  def restore_state(self, step: int, abstract_state):
    """The state at step without touching any data iterator (evaluation, sampling)."""
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state))).state

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
