"""Command-line plumbing shared by the entry points.

`--config=configs/X.py[:variant]` plus `--config.field=value` overrides, as in
ml_collections. Every user error ends in one line on stderr and exit status 2,
never a traceback.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Callable, NoReturn

from absl import app
from absl import flags
from ml_collections import config_flags

from configs import base

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/fashion_mnist.py[:smoke].",
    lock_config=True)


def define_plan_flags() -> None:
  flags.DEFINE_integer("num_devices", 1,
                       "Devices the global batch is split over (checks divisibility).")
  flags.DEFINE_string("json", None, "Also write the plan as JSON to this path.")


def fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def config():
  """The parsed config, or exit with one line naming the problem."""
  if FLAGS["config"].present == 0 and _CONFIG.value is None:
    fail("--config is required, e.g. --config=configs/fashion_mnist.py")
  value = _CONFIG.value
  try:
    value.keys()  # ml_collections defers config-file errors to first use.
  except Exception as e:  # pylint: disable=broad-except
    fail(f"--config={_config_path(sys.argv)}: {_first_line(e)}")
  unknown = base.unknown_fields(value)
  if unknown:
    field, known = unknown[0]
    close = difflib.get_close_matches(field.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    fail(f"--config={_config_path(sys.argv)} sets {field!r}, which is not a "
         f"field of configs/base.py{hint}")
  return value


def run_or_exit(fn: Callable, *args, **kwargs):
  """Calls fn; a ValueError (bad input) becomes a one-line exit."""
  try:
    return fn(*args, **kwargs)
  except ValueError as e:
    fail(str(e))


def _first_line(error: BaseException) -> str:
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  # ml_collections wraps config-file errors in a traceback; keep its last
  # line, without the name of a ValueError (the config's own message).
  return (lines[-1].removeprefix("ValueError: ") if lines
          else type(error).__name__)


def _unknown_field_message(argv, error) -> str:
  text = str(error)
  if "get_config" in text:
    return f"--config={_config_path(argv)} does not define get_config()"
  key = re.search(r"(\w+)\\*'", text)
  key = key.group(1) if key else "?"
  suggestion = re.search(r'Did you mean \\*"(\w+)\\*"', text)
  hint = f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""
  for arg in argv[1:]:
    name = arg.split("=", 1)[0].lstrip("-")
    if name.startswith("config.") and key in name.split("."):
      return f"--{name}: {key!r} is not a config field{hint}"
  return f"{key!r} is not a config field{hint}"


def _config_path(argv) -> str:
  for arg in argv[1:]:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return "?"


def run(main: Callable) -> None:
  """app.run with flag errors shortened to one line."""
  def parse(argv):
    try:
      return FLAGS(argv)
    except flags.Error as e:
      fail(_first_line(e))
    except (AttributeError, KeyError) as e:  # A typo'd --config.field.
      fail(_unknown_field_message(argv, e))
  try:
    app.run(main, flags_parser=parse)
  except BrokenPipeError:
    # The reader went away (`... | head`): stop quietly, as other tools do.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)
