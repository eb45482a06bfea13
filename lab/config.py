"""Configs as code: load `experiments/<name>.py:<variant>`, apply overrides, validate, lock.

`get_config(arg)` returns an `ml_collections.ConfigDict`; `arg` is the text after ':' and reads
as big_vision's variant strings, e.g. 'size=tiny,runlocal' -> {'size': 'tiny', 'runlocal': True}.
Overrides are `a.b=value` strings; a value is parsed to the type of the field it replaces.
"""
from __future__ import annotations

import ast
import importlib.util
import os

import ml_collections


class ConfigError(ValueError):
  """A config value that cannot run; the message names the key, the value and what was expected."""


def parse_variant(arg: str | None) -> dict:
  """'size=tiny,runlocal' -> {'size': 'tiny', 'runlocal': True}."""
  out = {}
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    out[key.strip()] = value.strip() if sep else True
  return out


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/experiment.py[:variant]' by calling its get_config(variant)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'--config={spec!r}: no experiment file at {path!r}')
  module_spec = importlib.util.spec_from_file_location(
      'lab_experiment_' + os.path.basename(path).removesuffix('.py'), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'--config={spec!r}: {path} defines no get_config(arg)')
  return module.get_config(arg or None)


def _parse_value(key: str, text: str, current):
  """Parses `text` as the type of `current`; bools accept true/false/1/0."""
  if isinstance(current, bool):
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise ConfigError(f'{key}={text!r}; expected a bool (true/false)')
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f'{key}={text!r}; expected a literal of type {type(current).__name__}'
                      ) from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if current is not None and not isinstance(value, type(current)):
    raise ConfigError(f'{key}={text!r} has type {type(value).__name__}; '
                      f'expected type {type(current).__name__}')
  return value


def override(config: ml_collections.ConfigDict, assignments) -> ml_collections.ConfigDict:
  """Applies 'a.b=value' strings; an unknown key or a value of the wrong type is a ConfigError."""
  for assignment in assignments:
    key, sep, text = assignment.partition('=')
    if not sep:
      raise ConfigError(f'override {assignment!r}; expected key=value')
    *parents, leaf = key.split('.')
    node = config
    for i, name in enumerate(parents):
      if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
        raise ConfigError(f'unknown config key {".".join(parents[:i + 1])!r} in override {key!r}')
      node = node[name]
    if leaf not in node:
      raise ConfigError(f'unknown config key {key!r}; known keys here: {sorted(node.keys())}')
    with node.ignore_type():
      node[leaf] = _parse_value(key, text, node[leaf])
  return config


def require(condition: bool, message: str) -> None:
  """Raises ConfigError(message) unless condition holds."""
  if not condition:
    raise ConfigError(message)
