"""The GPU ladder (benchmarks/gpu_ladder.py) runs on a CPU in CI, tiny, so that it never rots: every
rung printed with its rate, a limiting stage named, under JAX as on the GPU machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO, make_kaggle

RUNGS = ["ceiling", "copy", "driver", "writer", "contention", "reader", "reader_writer", "whole_steady", "whole"]

# Two tiny backbones at two input sizes, registered in the ladder's process under names of their own.
TINY = textwrap.dedent("""
    import sys
    import keras
    from catfeat.models import registry

    def tiny(include_top, weights, input_shape, pooling):
        inp = keras.Input(input_shape)
        x = keras.layers.Conv2D(8, 3, strides=4, activation="relu")(inp)
        return keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x))

    for name, size in (("Tiny32", 32), ("Tiny48", 48)):
        spec = registry.BackboneSpec(name, (name.lower(),), "__main__:tiny", size, size, 8, "tf", None, None, None,
                                     has_classifier=False)
        registry.REGISTRY[name] = registry._LOOKUP[name.lower()] = spec
    sys.path.insert(0, "benchmarks")
    import gpu_ladder
    sys.exit(gpu_ladder.main(sys.argv[1:]))
""")


def test_the_ladder_prints_every_rung_and_names_the_limiting_stage(tmp_path):
    data = make_kaggle(tmp_path / "data", n_per_class=6, n_test=0, size=(40, 30))
    out = tmp_path / "ladder.json"
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(REPO)}
    args = ["--models", "tiny32,tiny48", "--data", str(data), "--batch-size", "2", "--reader", "processes",
            "--rung-seconds", "0.2", "--min-batches", "3", "--precision", "float32", "--json", str(out)]
    proc = subprocess.run([sys.executable, "-c", TINY, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    result = json.loads(out.read_text())
    rungs = {r["key"]: r for r in result["rungs"]}
    assert [k for k in rungs if k in RUNGS] == RUNGS and len(rungs) == len(RUNGS) + 1  # + the workers side rung
    for k, r in enumerate(result["rungs"], 1):
        assert r["img_s"] and r["img_s"] > 0, r
        assert f"rung {k:>2} {r['title']}" in text
        if r["parent"]:
            assert r["ratio"] == r["img_s"] / rungs[r["parent"]]["img_s"]
    assert result["backend"] == "jax" and set(result["copy_probe"]) == {"32", "48"}
    assert {"list", "open", "fill", "finish"} <= set(result["fixed_seconds"])
    assert " img/s + " in result["summary"] and " s fixed" in result["summary"]  # the steady pace, fixed costs
    named = [line for line in text.splitlines() if line.startswith("limiting stage: ")]
    assert named == [result["limiting"]]
    first = next((r for r in result["rungs"] if r["main"] and r["ratio"] is not None and r["ratio"] < 0.9), None)
    assert (first["stage"] in named[0]) if first else ("none" in named[0])
