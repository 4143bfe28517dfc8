"""The workdir's config record: what a resume compares against."""
import json

import pytest

from configs import base
from trainer import workdir as workdir_lib


def _json(config):
  return json.loads(config.to_json())


def test_a_field_added_since_the_run_at_its_default_is_no_difference():
  """A workdir recorded before schedule.warmup_start_learning_rate existed
  resumes under the same config; the field at another value is named."""
  config = base.get_base_config()
  saved = _json(config)
  del saved["schedule"]["warmup_start_learning_rate"]
  assert workdir_lib.config_differences(saved, _json(config)) == []
  config.schedule.warmup_start_learning_rate = 0.05
  assert workdir_lib.config_differences(saved, _json(config)) == [
      "schedule.warmup_start_learning_rate (None → 0.05)"]
  config.schedule.warmup_start_learning_rate = 0.0
  config.seed = 3  # Present in both: named as before.
  assert workdir_lib.config_differences(saved, _json(config)) == ["seed (0 → 3)"]


@pytest.mark.parametrize("resolved,differ", [
    (False, []),
    (True, ["model.stem_space_to_depth (False → True)"]),
])
def test_a_run_recorded_before_the_blocked_stem_trained_without_it(resolved,
                                                                   differ):
  """Unset, the field is resolved for the platform before the record is
  compared; a record from before the field trained the plain stem conv: the
  same on the CPU and TPUs, another config on a GPU; either way round (a
  report compares two records)."""
  config = base.get_base_config()
  old = _json(config)
  del old["model"]["stem_space_to_depth"]
  config.model.stem_space_to_depth = resolved
  assert workdir_lib.config_differences(old, _json(config)) == differ
  assert workdir_lib.config_differences(_json(config), old) == [
      d.replace("False → True", "True → False") for d in differ]
  # Another field added later at False is still named (False is not its
  # default, None).
  del old["model"]["bn_fuse_relu"]
  config.model.bn_fuse_relu = False
  assert workdir_lib.config_differences(old, _json(config)) == sorted(
      differ + ["model.bn_fuse_relu (None → False)"])


def test_a_removed_field_is_a_difference():
  config = base.get_base_config()
  saved = _json(config)
  saved["schedule"]["old_knob"] = 1
  assert workdir_lib.config_differences(saved, _json(config)) == [
      "schedule.old_knob (1 → None)"]


def test_a_corrupt_config_record_is_named(tmp_path):
  (tmp_path / "config.json").write_text('{"seed": 0,\n')
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.check_config(str(tmp_path), base.get_base_config())
  assert str(e.value).startswith(f"{tmp_path}/config.json is not valid JSON (")
  assert str(e.value).endswith("; it records the config this workdir's run "
                               "trained with: restore it, or use a new --workdir")


def test_a_workdir_that_is_a_file_is_named_as_such(tmp_path):
  a_file = tmp_path / "run"
  a_file.write_text("")
  with pytest.raises(workdir_lib.WorkdirError,
                     match=f"^workdir {a_file} is a file, not a directory$"):
    workdir_lib.prepare(str(a_file))
