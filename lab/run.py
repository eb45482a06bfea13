"""The one entry point: flags -> config -> data -> task -> training loop.

  python -m lab.run --config experiments/gpt_chars.py:baby --workdir runs/baby \
      --config.train.steps=500

`experiments/<name>.py:<variant>` gives the config; every `--config.a.b=value` overrides a field.
The config is validated (a one-line error naming key, value and expectation) and locked before
any device work. The experiment names its data, model and objective modules by name.
Several processes (one per host, or one per GPU) run the same command; see docs/scaling.md.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import jax
import ml_collections

from lab import config as config_lib
from lab.config import ConfigError
from lab.train import loop
from lab.train import validate as train_validate


def _apply_data_updates(config, updates: dict) -> None:
  """Fills fields the data decides (0 = decide for me); a conflicting explicit value is an error."""
  for key, value in updates.items():
    *parents, leaf = key.split('.')
    node = config
    for name in parents:
      node = node[name]
    if node[leaf] not in (0, None, value):
      raise ConfigError(f'{key}={node[leaf]} but the data gives {value}; set it to 0 or {value}')
    node[leaf] = value


def prepare(config: ml_collections.ConfigDict):
  """Builds the data, completes and validates the config, locks it; returns (config, task, data)."""
  objective = importlib.import_module(f'lab.objectives.{config.objective}')
  model = importlib.import_module(f'lab.models.{config.model.name}')
  data = importlib.import_module(f'lab.data.{config.data.name}').build(config)
  _apply_data_updates(config, data.config_updates)
  train_validate.validate(config.train)
  model.validate(config.model)
  objective.validate(config)
  config = ml_collections.FrozenConfigDict(config)
  return config, objective.make_task(config, data), data


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(prog='python -m lab.run', description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='experiments/<name>.py[:variant]')
  parser.add_argument('--workdir', required=True, help='checkpoints, metrics and plots go here')
  parser.add_argument('--coordinator', default='',
                      help='host:port of process 0, for a multi-process run without a cluster '
                           'manager (with --num_processes and --process_id)')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--distributed', action='store_true',
                      help='call jax.distributed.initialize() with auto-detection (TPU pods, '
                           'SLURM, Open MPI)')
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith('--config.'):
      parser.error(f'unrecognised argument {item!r}; overrides look like --config.a.b=value')
    overrides.append(item.removeprefix('--config.'))
  if args.num_processes > 1:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  elif args.distributed:
    jax.distributed.initialize()
  try:
    config = config_lib.override(config_lib.load(args.config), overrides)
    config, task, data = prepare(config)
    return loop.train(config, task, data, args.workdir)
  except ConfigError as e:
    sys.exit(f'config error: {e}')


if __name__ == '__main__':
  main()
