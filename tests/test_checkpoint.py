"""Checkpointer unit tests: save cadence in steps and minutes, round trip."""
import jax.numpy as jnp
import numpy as np

from trainer import checkpoint as checkpoint_lib


class FakeClock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_due_by_steps_and_by_minutes(tmp_path):
  clock = FakeClock()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=100,
                                     every_minutes=2.0, max_to_keep=3,
                                     clock=clock)
  # (seconds since the start, step, due?)
  table = [(0, 1, False), (60, 50, False), (60, 100, True), (119, 101, False),
           (120, 102, True)]
  for seconds, step, due in table:
    clock.now = 1000.0 + seconds
    assert ckpt.due(step) is due, (seconds, step)
  state = {"w": jnp.arange(4.0)}
  ckpt.save(102, state, {"examples_seen": 5})
  ckpt.close()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=100,
                                     every_minutes=2.0, max_to_keep=3,
                                     clock=clock)
  clock.now += 119  # A restarted run counts from its start-up.
  assert not ckpt.due(103)
  clock.now += 1
  assert ckpt.due(104)
  restored, meta = ckpt.restore({"w": jnp.zeros(4)})
  ckpt.close()
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))
  assert meta == {"examples_seen": 5}


def test_minutes_off_means_steps_only(tmp_path):
  clock = FakeClock()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=10,
                                     every_minutes=0.0, max_to_keep=1,
                                     clock=clock)
  clock.now += 1e6
  assert not ckpt.due(9)
  assert ckpt.due(10)
  ckpt.close()
