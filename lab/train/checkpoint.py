"""Orbax checkpoints of the train state, the data iterator's state and the resolved config.

Layout: <workdir>/checkpoints/<step>/{state, data, config}. Saving is asynchronous (arrays are
copied to host before `save` returns); `close()` waits for the last write.
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, keep: int):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)), force=True)

  def restore(self, step: int, abstract_state):
    """Restores (state, data_state) at step into the shapes, dtypes and shardings of abstract_state."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out.state, out.data

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
