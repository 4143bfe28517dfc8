"""Checkpointer unit tests: save cadence in steps and minutes, round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer import checkpoint as checkpoint_lib
from trainer import mesh as mesh_lib


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


@pytest.mark.parametrize("written_with,read_with", [
    (0, checkpoint_lib.MIN_SLICE_BYTES),  # A checkpoint from before the change.
    (checkpoint_lib.MIN_SLICE_BYTES, checkpoint_lib.MIN_SLICE_BYTES),
    (checkpoint_lib.MIN_SLICE_BYTES, 0),
])
def test_replicated_state_round_trips_sliced_or_whole(tmp_path, written_with,
                                                       read_with):
  # Replicated on the 8 test devices: the large array's slices (1 MiB per
  # replica) reach MIN_SLICE_BYTES, the small ones' do not.
  replicated = mesh_lib.replicated(mesh_lib.make_mesh())
  rng = np.random.default_rng(0)
  state = jax.device_put(dict(
      large=rng.normal(size=(8, 1 << 18)).astype(np.float32),
      small=rng.normal(size=(3, 5)).astype(np.float32),
      step=np.int32(7)), replicated)
  assert state["large"].nbytes // 8 == checkpoint_lib.MIN_SLICE_BYTES
  checkpoints = checkpoint_lib.Checkpointer(
      str(tmp_path), every_steps=10, every_minutes=0.0, max_to_keep=2,
      min_slice_bytes=written_with)
  checkpoints.save(3, state, dict(examples_seen=96))
  checkpoints.close()
  checkpoints = checkpoint_lib.Checkpointer(
      str(tmp_path), every_steps=10, every_minutes=0.0, max_to_keep=2,
      min_slice_bytes=read_with)
  restored, meta = checkpoints.restore(jax.tree_util.tree_map(jnp.zeros_like,
                                                              state))
  checkpoints.close()
  assert meta == dict(examples_seen=96)
  for key, value in state.items():
    np.testing.assert_array_equal(restored[key], value)
    assert restored[key].sharding.is_equivalent_to(replicated, value.ndim)


@pytest.mark.parametrize("other_process_reads", [True, False])
def test_a_step_one_process_cannot_read(tmp_path, monkeypatch,
                                        other_process_reads):
  """Step 2 unreadable here. If another process read it, the fault is this
  process's (not a corrupt file): every process stops, nothing is set
  aside. If no process read it, all fall back to step 1 together."""
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=1,
                                     every_minutes=0.0, max_to_keep=3)
  for step in (1, 2):
    ckpt.save(step, {"w": jnp.full(4, float(step))}, {"examples_seen": step})
  ckpt.close()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=1,
                                     every_minutes=0.0, max_to_keep=3)
  real_restore = ckpt._manager.restore

  def restore(step, *args, **kwargs):
    if step == 2:
      raise OSError("Input/output error")
    return real_restore(step, *args, **kwargs)

  monkeypatch.setattr(ckpt._manager, "restore", restore)
  monkeypatch.setattr(  # This process, then a second one.
      checkpoint_lib, "_read_by_each_process",
      lambda ok: [ok, ok if not other_process_reads else True])
  if other_process_reads:
    with pytest.raises(checkpoint_lib.CheckpointError) as e:
      ckpt.restore({"w": jnp.zeros(4)})
    assert str(e.value) == (
        f"checkpoint step 2 in {tmp_path}/checkpoints was read by 1 of 2 "
        "processes (this process: Input/output error); nothing was set "
        "aside: rerun to retry")
    assert ckpt.all_steps() == [1, 2]
  else:
    restored, meta = ckpt.restore({"w": jnp.zeros(4)})
    assert meta == {"examples_seen": 1}
    np.testing.assert_array_equal(restored["w"], np.ones(4))
    assert ckpt.all_steps() == [1]  # Step 2 set aside.
  ckpt.close()
