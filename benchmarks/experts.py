"""Training several models on the same data: vmap vs one-by-one, lax.scan epochs vs host loops.

    python -m benchmarks.experts                     # quick-start model and data size, CPU
    python -m benchmarks.experts --n_models=8 --model=cnn6 --width_mult=1 --frames=373 --n_mels=64 --n=3729

This is the cost of recording expert trajectories and of the multi-seed evaluation (both use
sersynth.train.fit). Prints epochs/s (one epoch of one model = one unit), and the bytes of the stored
trajectories in float32 and float16.
"""
from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from benchmarks.common import define_model_flags, print_header, spec_from_flags, table, write_json
from sersynth import train
from sersynth.models import flat_model

define_model_flags(flags)
flags.DEFINE_integer("n", 840, "training samples")
flags.DEFINE_integer("n_models", 4, "experts / seeds trained together")
flags.DEFINE_integer("epochs", 2, "timed epochs (after one warm-up epoch)")
flags.DEFINE_integer("batch_size", 64, "minibatch")
flags.DEFINE_list("variants", ["loop/host", "loop/scan", "vmap/host", "vmap/scan"], "parallel/epoch_mode pairs")
flags.DEFINE_string("json", "", "write results here")
F = flags.FLAGS


def main(argv):
    del argv
    env = print_header("experts")
    fm = flat_model(spec_from_flags(F))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(F.n, F.frames, F.n_mels)).astype(np.float32)
    t = train.one_hot(rng.integers(0, F.classes, F.n), F.classes)
    init = fm.init_many(jax.random.split(jax.random.key(0), F.n_models))
    rows = []
    for variant in F.variants:
        parallel, mode = variant.split("/")
        warm = train.TrainConfig(lr=0.01, epochs=1, batch_size=F.batch_size)
        t0 = time.perf_counter()
        jax.block_until_ready(train.fit(fm, warm, x, t, init, jax.random.key(1), parallel=parallel, epoch_mode=mode)[0])
        first = time.perf_counter() - t0
        cfg = train.TrainConfig(lr=0.01, epochs=F.epochs, batch_size=F.batch_size)
        t0 = time.perf_counter()
        jax.block_until_ready(train.fit(fm, cfg, x, t, init, jax.random.key(1), parallel=parallel, epoch_mode=mode)[0])
        seconds = time.perf_counter() - t0                  # fit reuses the steps compiled by the first call
        rows.append({"variant": variant, "first_epoch_s": first, "s_per_epoch_all_models": seconds / F.epochs,
                     "model_epochs_per_s": F.n_models * F.epochs / seconds})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    best = max(rows, key=lambda r: r["model_epochs_per_s"])
    print(f"{F.model} ({fm.n_params} params), {F.n_models} models, {F.n} samples [{F.frames}, {F.n_mels}], "
          f"batch {F.batch_size}; first_epoch_s includes compilation, the steady state reuses it")
    print(table(rows, list(rows[0])))
    print(f"fastest: {best['variant']}")
    per_epoch = F.n_models * fm.n_params
    print(f"trajectory bytes per stored epoch ({F.n_models} experts): float32 {per_epoch * 4:,}, "
          f"float16 {per_epoch * 2:,}")
    write_json(F.json, {"env": env, "rows": rows, "n_params": fm.n_params})


if __name__ == "__main__":
    app.run(main)
