"""Every accelerator figure of benchmarks/RESULTS.md from one command: one JSON and one markdown file.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python -m benchmarks.suite --out=suite_gpu \
        --cache_dir=CACHE --prepare   # prepare the paper-sized embedded corpus into CACHE first (needs librosa)
    python -m benchmarks.suite --scale=tiny --out=suite_cpu   # the same programme at tiny sizes (CPU check)

Runs, each as its own process with its own time limit, most wanted first (a row that fails or
runs out of time is recorded as such, the others still run; rows that no longer fit
``--budget_s`` are recorded as skipped; suite.json and suite.md are rewritten after every row,
so a suite stopped from outside keeps the rows it finished; each row's output is in OUT/logs/):
  0. with ``--prepare``: data prep of the paper-shaped embedded corpus (``--utterances``: 8 gives
     3,808 clips, 20 the paper-sized 9,520) into ``--cache_dir``;
  1. the paper's model and settings end to end on ``--cache_dir`` (prepared by row 0, or elsewhere:
     the distillation needs no audio libraries) at a shorter schedule (ipc 50, 12 expert epochs, 20
     outer steps from a measured starting lr, 30 evaluation epochs, 3 seeds), in float32 and in
     bfloat16 with the same seeds: stage times and every setting's test UAR from report.json;
  2. the paper-model outer step (CNN-6, ipc 150, batch 256) across remat policies and dtypes (the
     bfloat16 row profiled: busy %, largest kernel category), and with the other max-pool implementation;
  3. training several models, loop vs vmap, at the paper's and the quick-start's sizes;
  4. the PyTorch reference ratio at the paper's input size (ConvNet width 128, 20 inner steps);
  5. temporary memory and time vs syn_steps (nested remat);
  6. the paper's other two models (ResNet-9, VGG-15): outer step and training rate, float32 (what
     ``table_paper.flags`` costs).
On one H100 rows 0-1 take about 8 minutes (the default ``--budget_s``) and rows 2-5 about 8 more:
where one call may run 10 minutes, run ``--rows=prepare,pipeline,pipeline_bf16`` and the rest apart.
"""
from __future__ import annotations

import json
import os
import shutil
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
flags.DEFINE_bool("prepare", False, "first prepare --cache_dir from the paper-shaped embedded corpus, timed")
flags.DEFINE_integer("utterances", 8, "--scale=paper: utterances per speaker and emotion of the embedded corpus the "
                     "pipeline rows prepare and run on (8: 3,808 clips; 20: the paper-sized 9,520)")
flags.DEFINE_integer("budget_s", 500, "seconds for the whole suite: each row's limit is cut to what is left")
flags.DEFINE_list("rows", [], "run only these rows (names as in suite.md; empty: all)")
F = flags.FLAGS

PAPER_IN = ["--frames=373", "--n_mels=64"]
CNN6 = ["--model=cnn6", "--width_mult=1", *PAPER_IN]


def programme(scale: str, cache_dir: str, workdir: Path, prepare: bool = False,
              utterances: int = 8) -> list[tuple[str, list[str], int]]:
    """``(name, argv after python -m, time limit s)`` of each benchmark, most wanted first."""
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
        rows = [("distill_step_f32", ["benchmarks.distill_step", *CNN6, "--ipc=150", "--batch_syn=256",
                                      "--syn_steps=20", "--unroll=1", "--remat=step,nested", "--repeats=2"], 75),
                ("distill_step_bf16", ["benchmarks.distill_step", *CNN6, "--ipc=150", "--batch_syn=256",
                                       "--syn_steps=20", "--unroll=1", "--remat=step", "--repeats=2",
                                       "--compute_dtype=bfloat16", "--peak_tflops=790",
                                       f"--trace_dir={workdir}_traces"], 60),
                ("distill_step_bf16_window_pool", ["benchmarks.distill_step", *CNN6, "--ipc=150", "--batch_syn=256",
                                                   "--syn_steps=20", "--unroll=1", "--remat=step", "--repeats=2",
                                                   "--compute_dtype=bfloat16", "--max_pool=window"], 60),
                ("experts_paper", ["benchmarks.experts", *CNN6, "--n=1024", "--n_models=5", "--batch_size=32",
                                   "--epochs=1", "--variants=loop/scan,vmap/scan"], 90),
                ("experts_small", ["benchmarks.experts", "--variants=loop/scan,vmap/scan"], 45),
                ("reference_torch", ["benchmarks.reference_torch", *PAPER_IN, "--width=128", "--depth=3", "--ipc=1",
                                     "--syn_steps=20", "--unroll=1", "--remat=none,nested", "--repeats=3"], 90),
                ("memory_vs_syn_steps", ["benchmarks.memory_vs_syn_steps", *PAPER_IN, "--width=128", "--depth=3",
                                         "--ipc=1", "--syn_steps=20,80", "--remat=nested", "--unroll=1",
                                         "--repeats=2"], 75)]
        for model, limit in (("resnet9", 75), ("vgg15", 110)):
            rows += [(f"distill_step_{model}", ["benchmarks.distill_step", f"--model={model}", "--width_mult=1",
                                                *PAPER_IN, "--ipc=150", "--batch_syn=256", "--syn_steps=20",
                                                "--unroll=1", "--remat=step", "--repeats=2"], limit),
                     (f"experts_{model}", ["benchmarks.experts", f"--model={model}", "--width_mult=1", *PAPER_IN,
                                           "--n=1024", "--n_models=2", "--batch_size=32", "--epochs=1",
                                           "--variants=loop/scan"], limit // 2 + 20)]
        # the paper's model and settings at a shorter schedule, the starting lr measured (--lr_init=0)
        run_flags = [f"--embedded_utterances={utterances}", "--ipc=50", "--expert_train_epochs=12",
                     "--max_start_epoch=8", "--iterations=20", "--eval_every=10", "--eval_epochs=30", "--eval_seeds=3",
                     "--noprivacy_audit", "--render_per_class=1", "--lr_init=0"]
    corpus = run_flags[:5] if scale == "tiny" else run_flags[:1]
    stages = ["--stage=experts,distill,evaluate", f"--cache_dir={cache_dir}"] if cache_dir else []
    head = []
    if prepare and cache_dir:
        head.append(("prepare", ["experiments.run", "--flagfile=experiments/flags/paper_demos.flags",
                                 f"--workdir={workdir}_prepare", "--noprogress", "--stage=prepare",
                                 f"--cache_dir={cache_dir}", *corpus], 240))
    if cache_dir or scale == "tiny":
        # the same run in float32 and in bfloat16 (same seeds): time and test UAR of each
        for name, dtype, limit in (("pipeline", "float32", 250), ("pipeline_bf16", "bfloat16", 200)):
            head.append((name, ["experiments.run", "--flagfile=experiments/flags/paper_demos.flags",
                                f"--workdir={workdir}_{dtype}", "--noprogress", *run_flags, *stages,
                                f"--compute_dtype={dtype}"], limit if scale == "paper" else 150))
    rows = head + rows
    return rows


def _arg(argv: list[str], name: str) -> str:
    return next(a for a in argv if a.startswith(f"--{name}=")).split("=", 1)[1]


def run_one(name: str, argv: list[str], limit: int, json_path: Path, log_path: Path) -> dict:
    """Runs one row in its own process; its whole output goes to ``log_path``."""
    is_run = argv[0] == "experiments.run"
    cmd = [sys.executable, "-m", *argv] + ([] if is_run else [f"--json={json_path}"])
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, timeout=limit)
            status = "ok" if proc.returncode == 0 else \
                f"exit {proc.returncode}: {log_path.read_text().strip()[-300:]}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit} s"
    row = {"name": name, "status": status, "seconds": round(time.perf_counter() - t0, 1), "command": " ".join(argv)}
    if is_run:
        workdir = Path(_arg(argv, "workdir"))
        manifest_path = Path(_arg(argv, "cache_dir")) / "manifest.json" if "--stage=prepare" in argv else None
        if manifest_path is not None and manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            row["rows"] = [{"clips": manifest["extracted_files"] + manifest["reused_files"],
                            "frames": manifest["frames"], "n_mels": manifest["n_mels"],
                            "cores": os.cpu_count(), "seconds": row["seconds"]}]
        if (workdir / "report.json").is_file():
            report = json.loads((workdir / "report.json").read_text())
            row["rows"] = [{"stage": k, "seconds": v} for k, v in report.get("stage_seconds", {}).items()]
            row["summary"] = {k: report["summary"].get(k) for k in ("uar_ratio_random", "uar_ratio_fixed")}
            row["summary"].update({f"test_uar_{k}": r["test_uar_mean"] for k, r in report["results"].items()})
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


def write(out: Path, env: dict, results: list[dict]) -> None:
    """Rewrites suite.json and suite.md with the rows so far (atomic, so a stopped suite keeps them)."""
    for name, text in (("suite.json", json.dumps({"env": env, "scale": F.scale, "results": results}, indent=2)
                        + "\n"), ("suite.md", markdown(env, results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def main(argv):
    del argv
    if F.prepare and not F.cache_dir:
        raise app.UsageError("--prepare needs --cache_dir (where the prepared cache goes)")
    out = Path(F.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = environment()
    results = []
    deadline = time.perf_counter() + F.budget_s
    with tempfile.TemporaryDirectory() as tmp:
        rows = programme(F.scale, F.cache_dir, Path(tmp) / "run", F.prepare, F.utterances)
        unknown = set(F.rows) - {name for name, _, _ in rows}
        if unknown:
            raise app.UsageError(f"--rows: no row named {', '.join(sorted(unknown))} in this programme")
        for name, args, limit in rows:
            if F.rows and name not in F.rows:
                continue
            left = int(deadline - time.perf_counter())
            if left < 15:
                results.append({"name": name, "status": f"skipped: {F.budget_s} s budget spent", "seconds": 0,
                                "command": " ".join(args)})
            else:
                results.append(run_one(name, args, min(limit, left), Path(tmp) / f"{name}.json",
                                       out / "logs" / f"{name}.log"))
                if name.startswith("pipeline"):    # the whole report, beside the table
                    report = Path(_arg(args, "workdir")) / "report.json"
                    if report.is_file():
                        shutil.copyfile(report, out / f"{name}_report.json")
            print(f"{name}: {results[-1]['status']} ({results[-1]['seconds']} s)", flush=True)
            write(out, env, results)
    print(f"wrote {out / 'suite.json'} and {out / 'suite.md'}")


if __name__ == "__main__":
    app.run(main)
