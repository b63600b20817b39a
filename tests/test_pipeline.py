"""The extraction stages: dispatch order, one device copy per input size, the writer thread, backend choice."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from catfeat.extraction.stages import InBackground, ModelRunner, WriterThread, run_stages
from catfeat.images.unit import decode_rows


class Batch:
    def __init__(self, start, n, sizes=(8,)):
        self.start, self.ok, self.errors = start, np.ones(n, bool), {}
        self.images = {s: np.full((n, s, s, 3), start % 251, np.uint8) for s in sizes}

    def __len__(self):
        return len(self.ok)


class Recorder:
    """A stub backbone: dispatch records the event and returns the batch; fetch turns it into features."""

    def __init__(self, name, events, batch_size=4, dim=3):
        self.name, self.events, self.batch_size, self.dim = name, events, batch_size, dim

    def dispatch(self, x):
        self.events.append(("dispatch", self.name, int(x[0, 0, 0, 0])))
        return x

    def fetch(self, handle, n):
        self.events.append(("fetch", self.name, int(handle[0, 0, 0, 0])))
        return np.repeat(handle[:n, :1, 0, 0].astype(np.float32), self.dim, axis=1)


@pytest.mark.backend_neutral
def test_batches_are_dispatched_ahead_of_a_slow_read_back_in_order():
    """The dispatching thread never waits for the device: while batch 0's features are still being
    read back, the next ``depth`` batches are already dispatched to every backbone; writes keep order."""
    events = []
    release = threading.Event()

    class SlowFetch(Recorder):
        def fetch(self, handle, n):
            release.wait(10)
            return super().fetch(handle, n)

    runner = ModelRunner({"a": (8, SlowFetch("a", events)), "b": (8, SlowFetch("b", events))}, to_device=lambda x: x)
    written = []
    batches = [Batch(4 * k, 4) for k in range(6)] + [Batch(24, 2)]
    job = threading.Thread(target=run_stages, args=(iter(batches), runner, lambda b, f: written.append((b.start, f))),
                           kwargs={"depth": 2})
    job.start()
    deadline = time.monotonic() + 10
    while ("dispatch", "b", 12) not in events and time.monotonic() < deadline:
        time.sleep(0.01)
    # batch 0 is being read back, 4 and 8 wait in the queue, 12 is dispatched and waits for room
    assert [e for e in events if e[0] == "dispatch"] == [("dispatch", m, s) for s in (0, 4, 8, 12) for m in "ab"]
    assert not any(e[0] == "fetch" for e in events) and written == []
    time.sleep(0.2)
    assert ("dispatch", "a", 16) not in events  # bounded: no more than depth + 2 batches in flight
    release.set()
    job.join(10)
    assert [s for s, _ in written] == [0, 4, 8, 12, 16, 20, 24]
    assert written[-1][1]["a"].shape == (2, 3) and np.all(written[1][1]["b"] == 4)


@pytest.mark.backend_neutral
def test_trace_stamps_every_batch_in_order():
    runner = ModelRunner({"a": (8, Recorder("a", []))}, to_device=lambda x: x)
    trace, secs = [], {}
    run_stages(iter([Batch(0, 4), Batch(4, 4)]), runner, lambda b, f: None, seconds=secs, trace=trace)
    assert [t[0] for t in trace] == [0, 4]
    assert all(t[1] <= t[2] <= t[3] <= t[4] for t in trace)
    assert {"wait", "queue", "write", "to_device", "model:a"} <= set(secs)


@pytest.mark.backend_neutral
def test_pixels_cross_to_the_device_once_per_input_size():
    copies = []
    events = []
    runner = ModelRunner({"a": (8, Recorder("a", events)), "b": (8, Recorder("b", events)),
                          "c": (16, Recorder("c", events))}, to_device=lambda x: copies.append(x.shape) or x)
    feats = runner(Batch(0, 4, sizes=(8, 16)).images)
    assert sorted(copies) == [(4, 8, 8, 3), (4, 16, 16, 3)]
    assert set(feats) == {"a", "b", "c"}
    assert runner(Batch(0, 4, sizes=(8, 16)).images, only=["c"]).keys() == {"c"}


@pytest.mark.backend_neutral
def test_a_short_batch_is_padded_to_the_fixed_shape_and_cut_back():
    events = []
    runner = ModelRunner({"a": (8, Recorder("a", events, batch_size=4))}, to_device=lambda x: x)
    shapes = []
    orig = runner.runners["a"][1].dispatch
    runner.runners["a"][1].dispatch = lambda x: shapes.append(x.shape) or orig(x)
    out = runner(Batch(0, 6).images)
    assert shapes == [(4, 8, 8, 3), (4, 8, 8, 3)] and out["a"].shape == (6, 3)


@pytest.mark.backend_neutral
def test_writer_thread_keeps_order_and_hands_errors_to_the_caller():
    seen = []
    w = WriterThread(lambda b, f: seen.append(b), depth=1)
    for k in range(20):
        w.put(k, None)
    w.close()
    assert seen == list(range(20))

    def fail(b, f):
        if b == 2:
            raise OSError("disk full")
    w = WriterThread(fail, depth=1)
    with pytest.raises(OSError, match="disk full"):
        for k in range(50):
            w.put(k, None)
        w.close()


@pytest.mark.backend_neutral
def test_an_error_in_the_model_stage_stops_the_writer_without_writing_later_batches():
    written = []
    release = threading.Event()

    def slow_write(b, f):
        release.wait(5)
        written.append(b.start)

    class Boom(Recorder):
        def fetch(self, handle, n):
            if int(handle[0, 0, 0, 0]) == 8:
                release.set()
                raise RuntimeError("device lost")
            return super().fetch(handle, n)

    runner = ModelRunner({"a": (8, Boom("a", []))}, to_device=lambda x: x)
    with pytest.raises(RuntimeError, match="device lost"):
        run_stages(iter([Batch(0, 4), Batch(4, 4), Batch(8, 4), Batch(12, 4)]), runner, slow_write)
    assert 8 not in written and 12 not in written


@pytest.mark.backend_neutral
def test_in_background_keeps_order_runs_off_the_caller_and_raises_in_place():
    threads = []

    def items():
        for k in range(5):
            threads.append(threading.current_thread().name)
            yield k
        raise OSError("disk gone")

    it = InBackground(items(), depth=2)
    got = [next(it) for _ in range(5)]
    with pytest.raises(OSError, match="disk gone"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    it.close()
    assert got == [0, 1, 2, 3, 4] and set(threads) == {"catfeat-reader"}


@pytest.mark.backend_neutral
def test_in_background_close_stops_the_generator_and_runs_its_cleanup():
    made, cleaned = [], threading.Event()

    def items():
        try:
            for k in range(1000):
                made.append(k)
                yield k
        finally:
            cleaned.set()

    it = InBackground(items(), depth=2)
    assert next(it) == 0
    time.sleep(0.2)
    assert len(made) <= 4  # bounded: the one taken, two queued, one waiting for room
    it.close()
    assert cleaned.is_set() and len(made) <= 5


@pytest.mark.backend_neutral
def test_decode_rows_turns_every_failure_into_a_reason(tmp_path):
    from catfeat.images.listing import DecodeError

    def decode(path, sizes):
        if path == "bad":
            raise DecodeError("not an image")
        if path == "worse":
            raise MemoryError("huge")
        return {s: np.zeros((s, s, 3), np.uint8) for s in sizes}

    rows = decode_rows(["ok", "bad", "worse"], [8], decode)
    assert rows[0][1] is None and rows[0][0][8].shape == (8, 8, 3)
    assert rows[1][1] == "not an image" and rows[2][1].startswith("cannot decode (MemoryError")


def test_forward_dispatch_fetch_equals_a_plain_call():
    from catfeat.models.registry import get_backbone
    from catfeat.models.forward import Forward, pad_batch, to_device

    f = Forward(get_backbone("lite0"), None, 0, "float32", batch_size=4)
    x = np.random.RandomState(0).randint(0, 256, (3, 224, 224, 3)).astype(np.uint8)
    direct = f(x)
    # the same batch shape as the plain call (padded only where the backend needs a fixed shape)
    split = f.fetch(f.dispatch(to_device(pad_batch(x, 4) if f.fixed_batch else x)), 3)
    np.testing.assert_array_equal(direct, split)
    assert direct.shape == (3, 1280) and direct.dtype == np.float32


@pytest.mark.parametrize("plugin, env, expected", [
    ("jax_cuda12_plugin", {}, "jax"),
    ("jax_cuda12_plugin", {"KERAS_BACKEND": "tensorflow"}, "tensorflow"),
    (None, {}, None),
])
@pytest.mark.backend_neutral
def test_gpu_extra_makes_jax_the_default_backend(tmp_path, plugin, env, expected):
    if plugin:
        (tmp_path / plugin).mkdir()
        (tmp_path / plugin / "__init__.py").write_text("")
    clean = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    clean.update(env, PYTHONPATH=os.pathsep.join([str(tmp_path), clean.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", "import catfeat, os; print(os.environ.get('KERAS_BACKEND'))"],
                         env=clean, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == str(expected)
