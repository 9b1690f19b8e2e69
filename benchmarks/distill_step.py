"""Outer-step time, throughput, memory and FLOP/s of the MTT step.

    python -m benchmarks.distill_step                       # tiny CPU shapes
    python -m benchmarks.distill_step --model=cnn6 --ipc=10 --frames=373 --n_mels=64 --syn_steps=20 --batch_syn=70

Synthetic inputs and random trajectories: the step's cost does not depend on their values.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import trace_summary
from benchmarks.common import (define_model_flags, device_peak_bytes, print_header, spec_from_flags, table, time_call,
                               useful_flops, write_json)
from sersynth import distill
from sersynth.models import flat_model

define_model_flags(flags)
flags.DEFINE_integer("ipc", 5, "synthetic samples per class")
flags.DEFINE_list("syn_steps", ["10"], "inner steps (several: one row each)")
flags.DEFINE_integer("batch_syn", 0, "inner minibatch (0: all)")
flags.DEFINE_list("remat", ["nested"], "remat policies to compare")
flags.DEFINE_list("unroll", ["0"], "scan unroll factors to compare (0: backend default)")
flags.DEFINE_integer("repeats", 5, "timed repeats (median)")
flags.DEFINE_float("peak_tflops", 0.0, "device peak TFLOP/s for the utilisation column (0: omit)")
flags.DEFINE_string("json", "", "write results here")
flags.DEFINE_string("trace_dir", "", "also profile one step of each row into TRACE_DIR/<row> (jax.profiler, with a "
                    "perfetto trace) and print where its device time goes (benchmarks.trace_summary)")
F = flags.FLAGS
TRACES: list[dict] = []   # --trace_dir: each row's trace summary, for the JSON


def measure(fm, cfg: distill.DistillConfig, n_classes: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_classes * cfg.ipc, *fm.spec.input_shape)).astype(np.float32)
    y = np.repeat(np.arange(n_classes), cfg.ipc)
    state = distill.init_state(cfg, x, y, n_classes, jax.random.key(0))
    traj = jnp.asarray(rng.normal(scale=0.05, size=(2, cfg.max_start_epoch + cfg.expert_epochs, fm.n_params)),
                       jnp.float32)
    step = jax.jit(distill.make_outer_step(fm, cfg, n_classes))
    lowered = step.lower(state, traj, jax.random.key(1))
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float((cost or {}).get("flops", 0.0))
    run = lambda s: compiled(s, traj, jax.random.key(1))[0]
    first, median = time_call(run, state, repeats=repeats)
    row = {"syn_steps": cfg.syn_steps, "remat": cfg.remat, "unroll": distill.default_unroll(cfg, cfg.syn_steps),
           "n_params": fm.n_params, "first_s": first, "step_s": median,
           "syn_samples_per_s": cfg.syn_steps * (cfg.batch_syn or n_classes * cfg.ipc) / median,
           "temp_MB": mem.temp_size_in_bytes / 2**20, "args_MB": mem.argument_size_in_bytes / 2**20,
           "GFLOP": flops / 1e9, "peak_device_MB": None}
    useful = useful_flops(fm, cfg, n_classes, state, traj)
    row["useful_GFLOP"] = useful / 1e9
    row["useful_TFLOP_per_s"] = useful / 1e12 / median
    peak = device_peak_bytes()
    if peak:
        row["peak_device_MB"] = peak / 2**20
    if F.peak_tflops:
        row["util_%"] = 100 * useful / median / (F.peak_tflops * 1e12)
    if F.trace_dir:
        where = Path(F.trace_dir) / f"steps{cfg.syn_steps}_{cfg.remat}_unroll{row['unroll']}_{fm.spec.compute_dtype}"
        with jax.profiler.trace(str(where), create_perfetto_trace=True):
            jax.block_until_ready(run(state))
        summary = trace_summary.summarise(where)
        print(trace_summary.render(summary), flush=True)
        row["trace_busy_%"] = summary["busy_%"]
        first_cat = next(iter(summary["categories"].items()))
        row["trace_largest"] = f"{first_cat[0]} {first_cat[1]['%']}%"
        TRACES.append({"row": {k: row[k] for k in ("syn_steps", "remat", "unroll")}, **summary})
    return row


def is_oom(e: Exception) -> bool:
    """Whether XLA ran out of device memory (at compile or run time)."""
    text = f"{type(e).__name__}: {e}"
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def main(argv):
    del argv
    env = print_header("distill_step")
    spec = spec_from_flags(F)
    fm = flat_model(spec)
    rows = []
    for steps in map(int, F.syn_steps):
        for remat in F.remat:
            for unroll in map(int, F.unroll):
                cfg = distill.DistillConfig(ipc=F.ipc, syn_steps=steps, expert_epochs=2, max_start_epoch=2,
                                            batch_syn=F.batch_syn, remat=remat, unroll=unroll)
                try:
                    rows.append(measure(fm, cfg, F.classes, F.repeats))
                except Exception as e:  # noqa: BLE001 - an out-of-memory row is a result, not the end
                    if not is_oom(e):
                        raise
                    rows.append({"syn_steps": steps, "remat": remat, "unroll": unroll, "n_params": fm.n_params,
                                 "step_s": "OOM", "error": str(e).splitlines()[0][:200]})
                print(table(rows[-1:], list(rows[-1])), flush=True)
    print(f"model {F.model} ({fm.n_params} params), input [{F.frames}, {F.n_mels}], {F.classes} classes x ipc "
          f"{F.ipc}, batch_syn {F.batch_syn or 'all'}, {F.compute_dtype}; GFLOP: the compiled step's cost analysis, "
          "which counts a rolled loop body once; useful_GFLOP (and util_%): the same step unrolled, without remat")
    columns = max((list(r) for r in rows), key=len)
    print(table(rows, columns))
    write_json(F.json, {"env": env, "spec": spec.to_json(), "rows": rows, **({"traces": TRACES} if TRACES else {})})


if __name__ == "__main__":
    app.run(main)
