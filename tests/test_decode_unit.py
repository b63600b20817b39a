"""Every reader goes through the one per-image unit, ``catfeat.images.unit.decode_timed``, under a byte budget.

Each path (threads, processes, Ray's decode tasks, predict) reads the same hostile folder under a
budget smaller than two of its images: everything still completes, the image larger than the whole
budget is decoded alone (the budget's peak is exactly its declared size: it was held, and never
beside another), and each file is skipped or reported damaged with the reason the unit gives it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from conftest import make_kaggle, save_image, sharpen_head

SIZES = [32]
BIG = 200 * 150 * 4  # declared bytes of each big image
HUGE = 400 * 300 * 4  # of the one larger than the whole budget


def hostile_folder(root: Path) -> list[Path]:
    """Big images, one larger than the budget, a truncated JPEG (damaged), junk, an empty file."""
    paths = [save_image(root / f"big{k}.png", k, (200, 150)) for k in range(3)]
    paths.insert(1, save_image(root / "huge.png", 9, (400, 300)))
    whole = save_image(root / "trunc.jpg", 5, (120, 90)).read_bytes()
    (root / "trunc.jpg").write_bytes(whole[:len(whole) // 2] + b"\xff\xd9")  # decodes, the rest gray
    (root / "junk.jpg").write_bytes(b"this is not a JPEG at all" * 10)
    (root / "empty.png").write_bytes(b"")
    paths += [save_image(root / "big3.png", 3, (200, 150)), root / "trunc.jpg", root / "junk.jpg",
              root / "empty.png"]
    return paths


def reference(paths, decode=None) -> list[tuple]:
    """(arrays or None, reason or None) of each path from the unit itself, with no budget."""
    from catfeat.images.unit import decode_timed

    return [decode_timed(p, SIZES, None, decode)[:2] for p in paths]


def small_budget():
    from catfeat.images.listing import ByteBudget

    return ByteBudget(int(1.5 * BIG))  # room for one big image at a time, not two; less than the huge one


def check_rows(paths, want, got) -> None:
    """``got``: (ok, reason or damaged, {size: array} or None) per path, in order."""
    assert len(got) == len(paths)
    for p, (arrays, reason), (ok, why, images) in zip(paths, want, got):
        assert ok == (arrays is not None), p
        assert why == reason, p  # the same skip reason, or the same damage report
        if ok:
            for s in SIZES:
                np.testing.assert_array_equal(images[s], arrays[s])


def test_the_folder_has_every_kind_of_row(tmp_path):
    paths = hostile_folder(tmp_path)
    want = reference(paths)
    kinds = {p.name: ("ok" if a is not None and not r else "damaged" if a is not None else "skipped")
             for p, (a, r) in zip(paths, want)}
    assert kinds["huge.png"] == "ok" and kinds["trunc.jpg"] == "damaged"
    assert kinds["junk.jpg"] == kinds["empty.png"] == "skipped"


def test_thread_reader_uses_the_unit_under_the_budget(tmp_path):
    from catfeat.images.decoders import get_decoder
    from catfeat.images.reader import iter_batches
    from catfeat.images.unit import unit_decode

    paths = hostile_folder(tmp_path)
    want = reference(paths, unit_decode(get_decoder("auto").decode))
    budget = small_budget()
    got = []
    for b in iter_batches(paths, SIZES, batch_size=3, workers=4, budget=budget, reader="threads"):
        k = 0
        for i, ok in enumerate(b.ok):
            row = b.start + i
            images = {s: b.images[s][k] for s in SIZES} if ok else None
            k += bool(ok)
            got.append((bool(ok), b.errors.get(row) if not ok else b.damaged.get(row), images))
    check_rows(paths, want, got)
    assert budget.peak == HUGE and budget.used == 0  # the huge one ran, alone; everything released


def test_process_reader_uses_the_unit_under_the_budget(tmp_path):
    from catfeat.images.decoders import get_decoder
    from catfeat.images.process_reader import ProcessReader

    paths = hostile_folder(tmp_path)
    decode = get_decoder("auto").decode
    want = reference(paths, decode)
    n = len(paths)
    with ProcessReader(SIZES, n, workers=2, slots=1, decode=decode, budget=small_budget().limit) as reader:
        rows = reader.collect(0, paths, reader.submit(0, paths))
        got = [(ok, why, {s: reader.slots[0][s][i].copy() for s in SIZES} if ok else None)
               for i, (ok, why, _) in enumerate(rows)]
        peak, used = reader.budget.peak, reader.budget.used
    check_rows(paths, want, got)
    assert peak == HUGE and used == 0


def _ray_batch(paths) -> dict:
    return {"pos": np.arange(len(paths), dtype=np.int64),
            "path": np.array([os.fsencode(p) for p in paths], dtype=object)}


def _ray_rows(out: dict) -> list[tuple]:
    return [(bool(ok), reason or None, {s: out[f"img{s}"][i] for s in SIZES} if ok else None)
            for i, (ok, reason) in enumerate(zip(out["ok"], out["reason"]))]


def test_ray_decode_task_uses_the_unit_under_a_budget(tmp_path):
    from catfeat.extraction.ray_engine import decode_batch
    from catfeat.images.decoders import get_decoder
    from catfeat.images.unit import unit_decode

    paths = hostile_folder(tmp_path)
    want = reference(paths, unit_decode(get_decoder("auto").decode))
    budget = small_budget()
    out = decode_batch(_ray_batch(paths), SIZES, "auto", budget=budget)
    check_rows(paths, want, _ray_rows(out))  # a damaged row: ok, with the damage as its reason
    assert budget.peak == HUGE and budget.used == 0
    # with --skip-damaged the damaged one is refused, with the decoder's reason
    strict = decode_batch(_ray_batch(paths), SIZES, "auto", skip_damaged=True, budget=int(1.5 * BIG))
    i = [p.name for p in paths].index("trunc.jpg")
    assert not strict["ok"][i] and strict["reason"][i].endswith("skipped (--skip-damaged)")
    assert strict["ok"].sum() == out["ok"].sum() - 1


def test_ray_tasks_on_a_cluster_decode_under_a_budget_smaller_than_one_image(tmp_path, ray_cluster):
    from catfeat.extraction.ray_engine import decode_batch
    from catfeat.images.decoders import get_decoder
    from catfeat.images.unit import unit_decode

    paths = hostile_folder(tmp_path)
    want = reference(paths, unit_decode(get_decoder("auto").decode))
    ds = ray_cluster.data.from_items([{"pos": i, "path": os.fsencode(p)} for i, p in enumerate(paths)])
    ds = ds.map_batches(decode_batch, fn_kwargs={"sizes": SIZES, "budget": BIG // 2}, batch_size=4,
                        batch_format="numpy", num_cpus=1)
    out = sorted(ds.take_all(), key=lambda r: r["pos"])
    check_rows(paths, want, [(bool(r["ok"]), r["reason"] or None, {32: r["img32"]} if r["ok"] else None)
                             for r in out])


def test_predict_uses_the_unit_under_the_budget(tmp_path):
    import catfeat
    from catfeat.images.reader import iter_batches
    from catfeat.predict import build_predictor, predict_images

    data = make_kaggle(tmp_path / "data", n_per_class=3, n_test=1)
    catfeat.run_extraction(data, "lite0", tmp_path / "features", weights=None, batch_size=4, seed=3, progress=False)
    X, y, _ = catfeat.load_features("lite0", tmp_path / "features")
    head = catfeat.FusedHead(epochs=1, early_stopping=False, random_state=0).fit(X, y)
    sharpen_head(head, X)  # answers that differ per image
    head.save(tmp_path / "head", features=tmp_path / "features")  # records the decoder: auto, as the reader below
    predictor = build_predictor(tmp_path / "head", features_dir=tmp_path / "features", allow_random=True)
    paths = hostile_folder(tmp_path / "odd")
    # the reasons the extraction's reader gives
    reasons = {}
    for b in iter_batches(paths, [224], batch_size=len(paths), workers=2):
        reasons.update({str(paths[i]): why for i, why in b.errors.items()})
    assert set(reasons) == {str(tmp_path / "odd" / n) for n in ("junk.jpg", "empty.png")}
    budget = small_budget()
    df = predict_images(tmp_path / "head", paths, batch_size=3, predictor=predictor, budget=budget)
    assert budget.peak == HUGE and budget.used == 0
    bad = df[df["error"] != ""]
    assert dict(zip(bad["file"], bad["error"])) == reasons
    good = df[df["error"] == ""]
    assert sorted(good["file"]) == sorted(str(p) for p in paths if str(p) not in reasons)
    assert np.isfinite(good[["p_0", "p_1"]].to_numpy()).all()
    # the same probabilities as predicting the good files alone, without a budget
    alone = predict_images(tmp_path / "head", list(good["file"]), batch_size=3, predictor=predictor)
    np.testing.assert_allclose(alone[["p_0", "p_1"]].to_numpy(), good[["p_0", "p_1"]].to_numpy(), atol=1e-3)
    assert good["p_1"].std() > 0.05  # the comparison above could fail


def test_each_file_header_is_read_once_per_decode(tmp_path, monkeypatch):
    """The byte budget's estimate and the OpenCV decoder share one header read per file (Pillow's
    ``Image.open``); the decode itself reads the file once more (its bytes), nothing else opens it."""
    from PIL import Image

    from catfeat.images.decoders import get_decoder
    from catfeat.images.listing import ByteBudget
    from catfeat.images.unit import decode_timed

    photos = [save_image(tmp_path / f"cat.{k}.jpg", k, (120, 90)) for k in range(3)]
    opened, real_open = [], Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(os.fspath(fp)) or real_open(fp, *a, **k))
    reads, real_read = [], os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: reads.append(os.fspath(p)) or real_read(p, *a, **k))
    budget = ByteBudget()
    for p in photos + photos:  # the second time round: read again (a new decode), once each
        arrays, reason, _, _ = decode_timed(p, SIZES, budget, get_decoder("opencv").decode)
        assert arrays is not None and reason is None
    assert budget.peak == 120 * 90 * 4
    assert opened == [os.fspath(p) for p in photos * 2]  # not twice in a row: budget + decoder share it
    assert [r for r in reads if r.endswith(".jpg")] == [os.fspath(p) for p in photos * 2]
