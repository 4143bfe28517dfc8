"""The train stream: one global order, cut by the plan, sliced per process."""
import threading

import numpy as np
import pytest

from configs import base
from input_pipeline import keyed_random
from input_pipeline import order
from input_pipeline import sources
from input_pipeline import train_batches
from trainer import plan as plan_lib


def _config(num_train_examples=256, batch_size=16, augment_kind="pad_crop_flip"):
  config = base.get_base_config()
  base.shrink_for_smoke(config, batch_size=batch_size)
  config.dataset.num_train_examples = num_train_examples
  config.dataset.image_size = 8
  config.dataset.augment = augment_kind
  return config


def _stream(config, plan=None, **kwargs):
  plan = plan or plan_lib.plan_from_config(config)
  with train_batches(config, plan, **kwargs) as batches:
    return list(batches)


def _stitched(config, process_count, plan=None):
  """Global batches rebuilt from the slices of `process_count` processes."""
  per_process = [_stream(config, plan, process_index=p, process_count=process_count)
                 for p in range(process_count)]
  stitched = []
  for slices in zip(*per_process):
    assert len({s["examples_seen"] for s in slices}) == 1
    stitched.append(dict(
        image=np.concatenate([s["image"] for s in slices]),
        label=np.concatenate([s["label"] for s in slices]),
        examples_seen=slices[0]["examples_seen"], step=slices[0]["step"]))
  return stitched


def _assert_same(a, b):
  assert [x["examples_seen"] for x in a] == [x["examples_seen"] for x in b]
  assert [x["step"] for x in a] == [x["step"] for x in b]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_array_equal(x["image"], y["image"])  # Pixel-exact.


@pytest.fixture(scope="module")
def full_stream():
  config = _config()
  return config, _stream(config)


def test_stream_follows_the_plan(full_stream):
  config, stream = full_stream
  plan = plan_lib.plan_from_config(config)
  assert [b["examples_seen"] for b in stream] == [
      plan.examples_at_step(s) for s in range(plan.total_updates)]
  assert [b["step"] for b in stream] == list(range(plan.total_updates))
  for b in stream:
    size = plan.at(b["examples_seen"]).batch_size
    assert b["image"].shape == (size, 8, 8, 1) and b["image"].dtype == np.uint8
    assert b["label"].shape == (size,) and b["label"].dtype == np.int32
  assert stream[-1]["examples_seen"] + len(stream[-1]["label"]) == plan.total_examples


def test_every_epoch_shows_every_example_once(full_stream):
  config, stream = full_stream
  n = config.dataset.num_train_examples
  labels = np.concatenate([b["label"] for b in stream])
  source = sources.train_source(config)
  stream_order = order.ExampleOrder(n, config.seed)
  for epoch in range(len(labels) // n):
    perm = stream_order.permutation(epoch)
    assert sorted(perm) == list(range(n))
    np.testing.assert_array_equal(
        labels[epoch * n:(epoch + 1) * n], [source[int(i)][1] for i in perm])
  assert not np.array_equal(stream_order.permutation(0), stream_order.permutation(1))


@pytest.mark.parametrize("augment_kind", ["pad_crop_flip", "inception"])
@pytest.mark.parametrize("process_count", [2, 4])
def test_process_count_does_not_change_the_examples(process_count, augment_kind):
  config = _config(augment_kind=augment_kind)
  _assert_same(_stitched(config, process_count), _stitched(config, 1))


def test_workers_and_prefetch_do_not_change_the_examples(full_stream):
  config, stream = full_stream
  for workers, depth in [(0, 0), (3, 4)]:
    config = _config()
    config.dataset.num_workers = workers
    config.dataset.prefetch_batches = depth
    _assert_same(_stream(config), stream)


# Mid-epoch; epoch and stage start; mid-stage 1 and 2; the last step.
@pytest.mark.parametrize("step", [5, 16, 19, 26, 29])
def test_restart_continues_the_same_stream(full_stream, step):
  config, stream = full_stream
  plan = plan_lib.plan_from_config(config)
  resumed = _stream(config, start_examples=plan.examples_at_step(step))
  _assert_same(resumed, stream[step:])


def test_restart_with_two_processes_continues_the_same_stream(full_stream):
  config, stream = full_stream
  plan = plan_lib.plan_from_config(config)
  start = plan.examples_at_step(21)
  halves = [_stream(config, start_examples=start, process_index=p, process_count=2)
            for p in range(2)]
  for (a, b), whole in zip(zip(*halves), stream[21:]):
    np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]),
                                  whole["image"])


def test_restart_at_the_end_yields_nothing(full_stream):
  config, _ = full_stream
  plan = plan_lib.plan_from_config(config)
  assert _stream(config, start_examples=plan.total_examples) == []


def test_batch_spanning_an_epoch_boundary():
  config = _config(num_train_examples=200, augment_kind="none")  # 200 = 12.5 x 16.
  stream = _stream(config)
  spanning = next(b for b in stream if b["examples_seen"] == 192)
  source = sources.train_source(config)
  stream_order = order.ExampleOrder(200, config.seed)
  want = np.concatenate([stream_order.permutation(0)[192:],
                         stream_order.permutation(1)[:8]])
  expected = np.stack([source[int(i)][0] for i in want])
  np.testing.assert_array_equal(spanning["image"], expected)
  np.testing.assert_array_equal(spanning["label"], [source[int(i)][1] for i in want])


def test_schedule_change_moves_only_the_cuts(full_stream):
  config, stream = full_stream
  other = _config()
  other.schedule.batch_size = 32
  other.schedule.milestones_epochs = (0.5, 2.0, 3.0)
  other_stream = _stream(other)
  cuts = [b["examples_seen"] for b in stream]
  other_cuts = [b["examples_seen"] for b in other_stream]
  assert cuts != other_cuts
  flat = lambda s, key: np.concatenate([b[key] for b in s])
  common = min(len(flat(stream, "label")), len(flat(other_stream, "label")))
  for key in ("label", "image"):
    np.testing.assert_array_equal(flat(stream, key)[:common],
                                  flat(other_stream, key)[:common])


def test_augmentation_is_keyed_by_epoch_and_example(full_stream):
  config, _ = full_stream
  a = keyed_random.uniforms(config.seed, keyed_random.AUGMENT_STREAM, 0, 7, np.arange(3))
  b = keyed_random.uniforms(config.seed, keyed_random.AUGMENT_STREAM, 1, 7, np.arange(3))
  c = keyed_random.uniforms(config.seed, keyed_random.AUGMENT_STREAM, 0, 7, np.arange(3))
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, c)
  assert ((a >= 0) & (a < 1)).all()


def test_seed_changes_the_order():
  config = _config()
  other = _config()
  other.seed = 1
  a, b = _stream(config)[0], _stream(other)[0]
  assert not np.array_equal(a["image"], b["image"])


def test_closing_stops_the_workers():
  config = _config()
  config.dataset.num_workers = 2
  batches = train_batches(config, plan_lib.plan_from_config(config))
  first = next(batches)
  batches.close()
  assert first["examples_seen"] == 0
  assert list(batches) == []
  assert not [t for t in threading.enumerate()
              if t.name.startswith("input_pipeline")]

