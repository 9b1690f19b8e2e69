"""Edge models per family: parameters, ONNX file size, CPU latency and test UAR, float32 and int8.

    python -m benchmarks.edge --distilled=W/distill/distilled.npz --cache=W/cache \\
        [--families=convnet,cnn6,vgg15,resnet9] [--width_mult=0.25] [--json=benchmarks/results/edge_cpu.json]

Each family is trained on the distilled set alone (``sersynth train``'s function: the run's
evaluation protocol), exported with ``sersynth export-model``'s function as float32 ONNX and as int8
calibrated on the distilled set, then run by onnxruntime on one thread: latency is the median over
100 single-clip calls (after 5 warm-up calls) on the cache's test clips. Test UAR is of the ONNX
models on the cache's test split (its features in dB, as ``predict`` computes them); ``agree_int8``
is the share of test clips where the int8 model's label equals the JAX model's.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from benchmarks.common import print_header, table, write_json

flags.DEFINE_string("distilled", None, "a distilled set (a run's distill/distilled.npz)")
flags.DEFINE_string("cache", None, "the feature cache of the run (its test split is scored)")
flags.DEFINE_list("families", ["convnet", "cnn6", "vgg15", "resnet9"], "model families (convnet: the guiding "
                  "model when it is one)")
flags.DEFINE_float("width_mult", 0.25, "cnn6 / vgg15 / resnet9 channel scale")
flags.DEFINE_integer("epochs", 0, "training epochs (0: the run's evaluation epochs)")
flags.DEFINE_integer("clips", 100, "latency: single-clip calls timed")
flags.DEFINE_integer("seed", 0, "training seed")
flags.DEFINE_string("json", "", "write results here")
F = flags.FLAGS


def latency_ms(model, x_db: np.ndarray, n: int) -> float:
    for i in range(5):
        model.probs(x_db[i % len(x_db)][None])
    times = []
    for i in range(n):
        clip = x_db[i % len(x_db)][None]
        t0 = time.perf_counter()
        model.probs(clip)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv):
    del argv
    from sersynth import artifact, edge, use
    from sersynth.train import uar

    env = print_header("edge")
    ds = artifact.load_set(F.distilled)
    calib = ds.x * ds.mel_std + ds.mel_mean
    rows, x_db = [], None
    with tempfile.TemporaryDirectory(prefix="sersynth-edge-") as tmp:
        for family in F.families:
            spec = use.model_spec(ds, family, width_mult=F.width_mult if family != "convnet" else 0)
            m, info = use.train_model(ds, spec, epochs=F.epochs, seed=F.seed, source=F.distilled)
            if x_db is None:              # every family shares the set's classes and features: read the cache once
                x_db, y = use.cache_test_split(m, F.cache)
            n = len(m.classes)
            jax_labels = use.predict_probs(m, x_db).argmax(1)
            row = {"family": family, "params": info["n_params"], "train_s": info["seconds"],
                   "uar_jax": float(uar(y, jax_labels, n))}
            for kind in ("float32", "int8"):
                path = Path(tmp) / f"{family}_{kind}.onnx"
                t0 = time.perf_counter()
                edge.export(m, path, int8=kind == "int8", calib_x_db=calib)
                row[f"export_s_{kind}"] = round(time.perf_counter() - t0, 2)
                om = edge.load(path, threads=1)
                labels = om.probs(x_db).argmax(1)
                row[f"kib_{kind}"] = round(path.stat().st_size / 1024, 1)
                row[f"ms_{kind}"] = latency_ms(om, x_db, F.clips)
                row[f"uar_{kind}"] = float(uar(y, labels, n))
                row[f"agree_{kind}"] = float(np.mean(labels == jax_labels))
            rows.append(row)
            print(table([row], list(row)), flush=True)
    cols = ["family", "params", "kib_float32", "kib_int8", "ms_float32", "ms_int8", "uar_jax", "uar_float32",
            "uar_int8", "agree_float32", "agree_int8"]
    print(f"\n{artifact.describe(ds.meta)}; {ds.x.shape[0]} distilled samples; test clips {len(y)}")
    print(table(rows, cols))
    write_json(F.json, {"env": env, "distilled": artifact.describe(ds.meta), "width_mult": F.width_mult,
                        "rows": rows})


if __name__ == "__main__":
    flags.mark_flags_as_required(["distilled", "cache"])
    app.run(main)
