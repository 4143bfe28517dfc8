"""The workdir's record of the config a run was started with."""
from __future__ import annotations

import json
import os


class WorkdirError(ValueError):
  """The workdir holds something this run must not touch."""


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def record_config(workdir: str, config) -> None:
  """Writes `<workdir>/config.json`, or checks that the run's config matches.

  Raises WorkdirError listing the differing fields: resuming a run under a
  different config would silently mix two experiments.
  """
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json())
  if not os.path.exists(path):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    return
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  a, b = _flatten(saved), _flatten(current)
  differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
  if differ:
    shown = ", ".join(f"{k} ({a.get(k)!r} → {b.get(k)!r})" for k in differ[:5])
    more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
    raise WorkdirError(
        f"workdir {workdir} holds a run of a different config: {shown}{more}; "
        "use a new --workdir")
