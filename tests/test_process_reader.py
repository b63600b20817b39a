"""The reader on worker processes (catfeat.images.process_reader): same batches as the thread reader,
hostile files included; a crashing decoder costs one file; clear errors where workers cannot run."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, real_data, save_image
from catfeat.images import process_reader
from catfeat.images.decoders import get_decoder
from catfeat.images.listing import list_images
from catfeat.images.reader import choose_reader, iter_batches
from catfeat.images.process_reader import ReaderStartError, crash_reason


def crashing_decode(path, sizes):
    """A decoder that dies (as a segfaulting C library would) on files named crash*; module level,
    so worker processes can import it."""
    if os.path.basename(os.fsdecode(path)).startswith("crash"):
        os._exit(139)
    return get_decoder("opencv").decode(path, sizes)


def _mixed_folder(root: Path) -> list[Path]:
    """Real photos, a PNG, random bytes, a truncated JPEG, a folder, a FIFO and a broken link,
    all named like images."""
    photos = sorted(real_data().glob("*.jpg"))[:6]
    root.mkdir()
    for p in photos:
        (root / p.name).write_bytes(p.read_bytes())
    save_image(root / "gen.png", 1)
    (root / "noise.jpg").write_bytes(os.urandom(3000))
    (root / "cut.jpg").write_bytes(photos[0].read_bytes()[:5000])
    (root / "dir.jpg").mkdir()
    os.mkfifo(root / "fifo.jpg")
    os.symlink(root / "gone.jpg", root / "link.jpg")
    return sorted(root.iterdir())


def _read(paths, reader, decode=None, start=0, batch_size=4):
    return list(iter_batches(paths, (224, 299), batch_size, start=start, workers=2, reader=reader, decode=decode))


def _same(a, b) -> None:
    assert [x.start for x in a] == [x.start for x in b]
    for x, y in zip(a, b):
        assert x.errors == y.errors
        np.testing.assert_array_equal(x.ok, y.ok)
        for s in x.images:
            np.testing.assert_array_equal(x.images[s], y.images[s])


def test_processes_give_the_same_batches_as_threads_hostile_files_included(tmp_path):
    paths = _mixed_folder(tmp_path / "mixed")
    threads = _read(paths, "threads", start=1)
    processes = _read(paths, "processes", start=1)
    _same(threads, processes)
    reasons = {paths[p].name: r for b in processes for p, r in b.errors.items()}
    assert set(reasons) == {"noise.jpg", "cut.jpg", "dir.jpg", "fifo.jpg", "link.jpg"}
    assert sum(int(b.ok.sum()) for b in processes) == len(paths) - 1 - len(reasons)  # start=1 skips one


def test_a_decoder_that_kills_its_worker_costs_only_that_file(tmp_path):
    photos = sorted(real_data().glob("*.jpg"))[:7]
    folder = tmp_path / "p"
    folder.mkdir()
    for k, p in enumerate(photos):
        (folder / (f"crash{k}.jpg" if k == 3 else p.name)).write_bytes(p.read_bytes())
    paths = sorted(folder.iterdir())
    got = _read(paths, "processes", decode=crashing_decode)
    reasons = {paths[p].name: r for b in got for p, r in b.errors.items()}
    assert reasons == {"crash3.jpg": crash_reason(139)}  # os._exit(139) in crashing_decode
    reference = _read([p for p in paths if not p.name.startswith("crash")], "threads",
                      decode=get_decoder("opencv").decode)
    ours = {s: np.concatenate([b.images[s] for b in got]) for s in (224, 299)}
    theirs = {s: np.concatenate([b.images[s] for b in reference]) for s in (224, 299)}
    for s in ours:
        np.testing.assert_array_equal(ours[s], theirs[s])


def test_workers_dying_on_most_files_stop_the_read_instead_of_skipping_them(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    for k in range(4):
        save_image(folder / f"crash{k}.jpg", k)
    with pytest.raises(ReaderStartError, match="--reader threads"):
        _read(sorted(folder.iterdir()), "processes", decode=crashing_decode)


def test_a_script_without_a_main_guard_reads_on_processes_once(tmp_path):
    data = tmp_path / "d"
    for k in range(6):
        save_image(data / f"cat.{k}.jpg", k)
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from catfeat.images.listing import list_images
        from catfeat.images.reader import iter_batches
        paths = list_images({str(data)!r}).paths()
        batches = list(iter_batches(paths, (32,), 4, workers=2, reader="processes"))
        print("read", sum(int(b.ok.sum()) for b in batches))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n").count("read 6") == 1  # the script ran once, not once per worker


def test_too_little_shared_memory(monkeypatch, tmp_path):
    paths = [save_image(tmp_path / f"cat.{k}.jpg", k) for k in range(3)]
    monkeypatch.setattr(process_reader, "shared_memory_free", lambda: 1000)
    with pytest.raises(ReaderStartError, match="shared memory.*--reader threads"):
        _read(paths, "processes")
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert choose_reader("auto", None, 10**6, (224, 299), 128) == "threads"  # auto falls back
    monkeypatch.setattr(process_reader, "shared_memory_free", lambda: 1 << 40)
    assert choose_reader("auto", None, 10**6, (224, 299), 128) == "processes"


def test_auto_reads_on_processes_only_with_many_cores_and_images(monkeypatch):
    monkeypatch.setattr(process_reader, "shared_memory_free", lambda: 1 << 40)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert choose_reader("auto", None, 10**6, (224,), 32) == "threads"
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert choose_reader("auto", None, 100, (224,), 32) == "threads"
    assert choose_reader("auto", None, 10**5, (224,), 32) == "processes"
    assert choose_reader("auto", 2, 10**5, (224,), 32) == "threads"  # --workers 2 asks for two decoders
    assert choose_reader("threads", None, 10**5) == "threads"
    with pytest.raises(ValueError, match="auto, threads, processes"):
        choose_reader("gpu", None, 10)


def test_extraction_on_processes_writes_the_same_cache_and_says_so(kaggle_dir, tmp_path):
    import h5py

    from catfeat.extraction.run import run_extraction

    fast = dict(weights=None, batch_size=4, progress=False, workers=2)
    a = run_extraction(kaggle_dir, "r50", tmp_path / "threads", reader="threads", **fast)
    b = run_extraction(kaggle_dir, "r50", tmp_path / "processes", reader="processes", **fast)
    assert (a.reader, b.reader) == ("threads", "processes")
    assert "decoder on processes" in b.summary()
    with h5py.File(a.paths["ResNet50"]) as fa, h5py.File(b.paths["ResNet50"]) as fb:
        for ds in ("train", "test", "train_names", "label"):
            np.testing.assert_array_equal(fa[ds][()], fb[ds][()])
    assert list_images(kaggle_dir).names  # the folder is untouched


class LateCopy:
    """A device copy that reads the host pixels only when it is waited for, as an asynchronous DMA
    may: reusing the host memory before ``copy_done`` would show as another batch's pixels."""

    def __init__(self, host):
        self.host, self.data = host, None

    def wait(self):
        if self.data is None:
            self.data, self.host = np.array(self.host), None


def _lent_run(paths, copy_done):
    """Real photos through run_stages from the process reader with lent slots (few, and a slow writer
    so the reader is always ahead): {batch start: the pixels the model saw}, and how many were lent."""
    import time

    from catfeat.extraction.stages import InBackground, ModelRunner, run_stages

    class Pixels:  # a stub backbone whose "features" are the pixels it was given
        batch_size = 2

        def dispatch(self, x):
            return x

        def fetch(self, handle, n):
            handle.wait()
            return handle.data[:n].reshape(n, -1).astype(np.float32)

    seen, lent = {}, []

    def write(batch, feats):
        time.sleep(0.02)
        seen[batch.start] = feats["px"]

    batches = iter_batches(paths, (32,), 2, workers=2, prefetch=0, reader="processes", lend=True)
    source = InBackground(b for b in batches if lent.append(b.release is not None) or True)
    try:
        run_stages(source, ModelRunner({"px": (32, Pixels())}, to_device=LateCopy, copy_done=copy_done), write)
    finally:
        source.close()
    return seen, sum(lent)


def test_a_lent_slot_is_reused_only_after_its_copy_to_the_device(tmp_path):
    """The process reader lends its shared memory (no copy out); the slot is decoded into again only
    once the runner has waited for the batch's device copy. 6 slots for 12 batches: each reused."""
    paths = sorted(real_data().glob("*.jpg"))[:24]
    expected = {b.start: b.images[32].reshape(len(b), -1).astype(np.float32)
                for b in iter_batches(paths, (32,), 2, workers=2, reader="threads")}
    seen, lent = _lent_run(paths, lambda xs: [x.wait() for x in xs])
    assert lent == 12 and sorted(seen) == sorted(expected)
    for start, px in expected.items():
        np.testing.assert_array_equal(seen[start], px, err_msg=f"batch {start}")


def test_decoders_leave_the_driver_threads_a_core_each_on_a_gpu(monkeypatch):
    from catfeat.images.reader import DRIVER_THREADS, reader_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert DRIVER_THREADS == 3 and reader_workers(True) == 13 and reader_workers(False) == 16
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert reader_workers(True) == 1 and reader_workers(False) == 2
