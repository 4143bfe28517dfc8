"""`python tests/failing_reader.py FLAGS...`: `python -m trainer.main FLAGS...`
in which process $FAIL_PROCESS cannot read any training example, as if only
its host met a corrupt record (tests/test_multihost.py)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position

from input_pipeline import batches  # pylint: disable=wrong-import-position
from input_pipeline.errors import DataError  # pylint: disable=wrong-import-position

_read = batches.Reader.read


def _failing_read(self, *args, **kwargs):
  if self.train and jax.process_index() == int(os.environ["FAIL_PROCESS"]):
    raise DataError(f"{self.source.name}: injected read error")
  return _read(self, *args, **kwargs)


batches.Reader.read = _failing_read
sys.argv[0] = "trainer.main"
runpy.run_module("trainer.main", run_name="__main__", alter_sys=True)
