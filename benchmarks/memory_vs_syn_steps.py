"""Temporary memory and step time of the outer step as syn_steps grows, per remat policy.

    python -m benchmarks.memory_vs_syn_steps                   # tiny CPU model, rolled scans
    python -m benchmarks.memory_vs_syn_steps --unroll=0        # backend default unroll (full on CPU)

Same flags as benchmarks.distill_step (model, shapes); prints one table and the ratio of each
policy's temporary memory at the largest syn_steps to that at the smallest.
"""
from __future__ import annotations

from absl import app, flags

from benchmarks import distill_step
from benchmarks.common import print_header, spec_from_flags, table, write_json
from sersynth import distill
from sersynth.models import flat_model

F = flags.FLAGS


def main(argv):
    del argv
    env = print_header("memory_vs_syn_steps")
    spec = spec_from_flags(F)
    fm = flat_model(spec)
    steps = [int(s) for s in F.syn_steps]
    rows = []
    for remat in F.remat:
        for n in steps:
            cfg = distill.DistillConfig(ipc=F.ipc, syn_steps=n, expert_epochs=2, max_start_epoch=2,
                                        batch_syn=F.batch_syn, remat=remat, unroll=int(F.unroll[0]))
            rows.append(distill_step.measure(fm, cfg, F.classes, F.repeats))
            print(table(rows[-1:], ["remat", "syn_steps", "unroll", "temp_MB", "step_s"]), flush=True)
    cols = ["remat", "syn_steps", "unroll", "temp_MB", "args_MB", "step_s", "first_s"]
    print(f"model {F.model} ({fm.n_params} params), input [{F.frames}, {F.n_mels}], ipc {F.ipc}")
    print(table(rows, cols))
    for remat in F.remat:
        mine = [r for r in rows if r["remat"] == remat]
        print(f"{remat}: temp memory at syn_steps={mine[-1]['syn_steps']} / at {mine[0]['syn_steps']} = "
              f"{mine[-1]['temp_MB'] / mine[0]['temp_MB']:.2f}x")
    write_json(F.json, {"env": env, "spec": spec.to_json(), "rows": rows})


if __name__ == "__main__":
    F.set_default("syn_steps", ["10", "20", "40", "80", "160"])
    F.set_default("remat", ["none", "step", "nested"])
    F.set_default("unroll", ["1"])
    F.set_default("width", 8)
    F.set_default("depth", 2)
    F.set_default("frames", 24)
    F.set_default("n_mels", 16)
    F.set_default("ipc", 2)
    F.set_default("repeats", 1)
    app.run(main)
