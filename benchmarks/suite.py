"""Every accelerator figure of benchmarks/RESULTS.md from one command: one JSON and one markdown file.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python -m benchmarks.suite --out=suite_gpu \
        --cache_dir=CACHE          # a paper-sized feature cache prepared elsewhere (optional)
    python -m benchmarks.suite --scale=tiny --out=suite_cpu   # the same programme at tiny sizes (CPU check)

Runs, each as its own process with its own time limit (a row that fails or runs out of time is
recorded as such, the others still run):
  1. the PyTorch reference ratio at the paper's input size (ConvNet width 128, 20 inner steps);
  2. temporary memory and time vs syn_steps (nested remat);
  3. training several models, loop vs vmap, at the quick-start's and the paper's sizes;
  4. the paper-model outer step (CNN-6, ipc 150, batch 256) across remat policies and dtypes;
  5. the paper pipeline end to end at reduced epochs and iterations on ``--cache_dir`` (the machine
     needs no audio libraries: the cache is prepared elsewhere), its stage times from report.json.
Budgeted to fit 8 minutes on one H100 at ``--scale=paper``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from benchmarks.common import _fmt, environment

flags.DEFINE_enum("scale", "paper", ["paper", "tiny"], "paper: the accelerator programme; tiny: a fast CPU check")
flags.DEFINE_string("out", "suite", "folder for suite.json and suite.md")
flags.DEFINE_string("cache_dir", "", "paper-sized feature cache for the end-to-end row ('' skips it)")
F = flags.FLAGS

PAPER_IN = ["--frames=373", "--n_mels=64"]
CNN6 = ["--model=cnn6", "--width_mult=1", *PAPER_IN]


def programme(scale: str, cache_dir: str, workdir: Path) -> list[tuple[str, list[str], int]]:
    """``(name, argv after python -m, time limit s)`` of each benchmark."""
    if scale == "tiny":
        small = ["--frames=24", "--n_mels=16", "--width=8", "--depth=2", "--repeats=1"]
        rows = [("reference_torch", ["benchmarks.reference_torch", *small, "--ipc=1", "--syn_steps=4",
                                     "--unroll=0", "--remat=none,nested"], 300),
                ("memory_vs_syn_steps", ["benchmarks.memory_vs_syn_steps", *small, "--syn_steps=4,8",
                                         "--remat=nested", "--unroll=1"], 300),
                ("experts_small", ["benchmarks.experts", "--n=64", "--n_models=2", "--epochs=1",
                                   "--variants=loop/host,vmap/host", "--frames=24", "--n_mels=16"], 300),
                ("distill_step", ["benchmarks.distill_step", *small, "--ipc=2", "--syn_steps=4",
                                  "--remat=step,nested", "--unroll=0"], 300)]
        run_flags = ["--embedded_speakers=6", "--embedded_utterances=2", "--emotions=anger,sadness",
                     "--clip_seconds=0.5", "--n_mels=16", "--model=convnet", "--width=4", "--depth=1",
                     "--expert_train_epochs=3", "--n_experts=2", "--ipc=1", "--iterations=4", "--eval_every=2",
                     "--syn_steps=2", "--expert_epochs=1", "--max_start_epoch=2", "--eval_epochs=3",
                     "--eval_seeds=2", "--batch_syn=0", "--noprivacy_audit", "--render_per_class=1"]
    else:
        rows = [("reference_torch", ["benchmarks.reference_torch", *PAPER_IN, "--width=128", "--depth=3", "--ipc=1",
                                     "--syn_steps=20", "--unroll=1", "--remat=none,nested", "--repeats=3"], 90),
                ("memory_vs_syn_steps", ["benchmarks.memory_vs_syn_steps", *PAPER_IN, "--width=128", "--depth=3",
                                         "--ipc=1", "--syn_steps=20,80", "--remat=nested", "--unroll=1",
                                         "--repeats=2"], 75),
                ("experts_small", ["benchmarks.experts", "--variants=loop/scan,vmap/scan"], 45),
                ("experts_paper", ["benchmarks.experts", *CNN6, "--n=1024", "--n_models=5", "--batch_size=32",
                                   "--epochs=1", "--variants=loop/scan,vmap/scan"], 90),
                ("distill_step_f32", ["benchmarks.distill_step", *CNN6, "--ipc=150", "--batch_syn=256",
                                      "--syn_steps=20", "--unroll=1", "--remat=step,nested", "--repeats=2"], 75),
                ("distill_step_bf16", ["benchmarks.distill_step", *CNN6, "--ipc=150", "--batch_syn=256",
                                       "--syn_steps=20", "--unroll=1", "--remat=step", "--repeats=2",
                                       "--compute_dtype=bfloat16"], 60)]
        run_flags = ["--expert_train_epochs=6", "--max_start_epoch=3", "--iterations=10", "--eval_every=5",
                     "--eval_epochs=5", "--eval_seeds=2", "--noprivacy_audit"]
    stages = ["--stage=experts,distill,evaluate", f"--cache_dir={cache_dir}"] if cache_dir else []
    if cache_dir or scale == "tiny":
        rows.append(("pipeline", ["experiments.run", "--flagfile=experiments/flags/paper_demos.flags",
                                  f"--workdir={workdir}", "--noprogress", *run_flags, *stages], 150))
    return rows


def run_one(name: str, argv: list[str], limit: int, json_path: Path) -> dict:
    is_run = argv[0] == "experiments.run"
    cmd = [sys.executable, "-m", *argv] + ([] if is_run else [f"--json={json_path}"])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {limit} s"
    row = {"name": name, "status": status, "seconds": round(time.perf_counter() - t0, 1), "command": " ".join(argv)}
    if is_run:
        workdir = Path(next(a for a in argv if a.startswith("--workdir=")).split("=", 1)[1])
        if (workdir / "report.json").is_file():
            report = json.loads((workdir / "report.json").read_text())
            row["rows"] = [{"stage": k, "seconds": v} for k, v in report.get("stage_seconds", {}).items()]
            row["summary"] = {k: report["summary"].get(k) for k in ("uar_ratio_random", "uar_ratio_fixed")}
    elif json_path.is_file():
        row["rows"] = json.loads(json_path.read_text()).get("rows", [])
    return row


def markdown_table(rows: list[dict]) -> list[str]:
    columns = max((list(x) for x in rows), key=len)
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
        ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]


def markdown(env: dict, results: list[dict]) -> str:
    lines = ["# sersynth benchmark suite", "",
             f"{env['device']} ({env['backend']}, {env['n_devices']} device(s)); jax {env['jax']}; {env['date']}", ""]
    for r in results:
        lines += [f"## {r['name']}: {r['status']}, {r['seconds']} s", "", f"`python -m {r['command']}`", ""]
        if r.get("rows"):
            lines += markdown_table(r["rows"])
        if r.get("summary"):
            lines += ["", ", ".join(f"{k} {v:.3f}" for k, v in r["summary"].items() if v is not None)]
        lines.append("")
    return "\n".join(lines)


def main(argv):
    del argv
    out = Path(F.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, args, limit in programme(F.scale, F.cache_dir, Path(tmp) / "run"):
            results.append(run_one(name, args, limit, Path(tmp) / f"{name}.json"))
            print(f"{name}: {results[-1]['status']} ({results[-1]['seconds']} s)", flush=True)
    (out / "suite.json").write_text(json.dumps({"env": env, "scale": F.scale, "results": results}, indent=2) + "\n")
    (out / "suite.md").write_text(markdown(env, results))
    print(f"wrote {out / 'suite.json'} and {out / 'suite.md'}")


if __name__ == "__main__":
    app.run(main)
