"""Shared helpers for benchmarks: environment header, timing, JSON output."""
from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import jax


def environment() -> dict:
    import flax
    import numpy
    import optax

    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "n_devices": jax.device_count(), "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}


def print_header(name: str) -> dict:
    env = environment()
    print(f"# {name}: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    return env


def time_call(fn, *args, repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """(first call incl. compile seconds, median steady-state seconds) of ``fn(*args)``."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    return (stats or {}).get("peak_bytes_in_use")


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"wrote {path}")


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    out = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    out += ["  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def define_model_flags(flags_module, frames: int = 47, n_mels: int = 32) -> None:
    """Model and input-shape flags shared by the benchmarks (defaults: the quick-start model at the
    1.5 s clips, 47 frames, of the tables in benchmarks/RESULTS.md; today's quick-start clips are
    1.0 s, ``--frames=32``)."""
    F = flags_module
    F.DEFINE_string("model", "convnet", "model family")
    F.DEFINE_integer("width", 16, "convnet width")
    F.DEFINE_integer("depth", 3, "convnet depth")
    F.DEFINE_float("width_mult", 0.125, "cnn6/vgg15/resnet9 width multiplier")
    F.DEFINE_integer("classes", 7, "classes")
    F.DEFINE_integer("frames", frames, "frames")
    F.DEFINE_integer("n_mels", n_mels, "Mel bins")
    F.DEFINE_string("compute_dtype", "float32", "activation dtype")
    F.DEFINE_enum("max_pool", "auto", ["auto", "blocks", "window"], "2x2 max-pool implementation (models.set_max_pool)")


def spec_from_flags(F):
    from sersynth.models import ModelSpec, set_max_pool

    set_max_pool(F.max_pool)
    return ModelSpec(name=F.model, n_classes=F.classes, input_shape=(F.frames, F.n_mels), width=F.width,
                     depth=F.depth, width_mult=F.width_mult, compute_dtype=F.compute_dtype)


def useful_flops(fm, cfg, n_classes: int, state, traj) -> float:
    """FLOPs of the outer step's own work: XLA's cost analysis of the same step fully unrolled and
    without rematerialisation, taken from the lowered program (nothing is compiled). The compiled
    program's own analysis counts a rolled loop's body once, and rematerialisation's recomputation
    is not useful work."""
    from sersynth import distill

    plain = dataclasses.replace(cfg, remat="none", unroll=cfg.syn_steps)
    lowered = jax.jit(distill.make_outer_step(fm, plain, n_classes)).lower(state, traj, jax.random.key(1))
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", 0.0))
