"""Where distilled sets stand against coresets, read from stored run reports.

    python -m benchmarks.standings                        # the runs listed in STANDINGS below
    python -m benchmarks.standings --report=W/report.json --report=W2/report.json   # your own runs

Prints one markdown row per report: the training clips' share the small sets hold, the full-data
reference, the distilled set from the experts' (fixed) and from random initialisations, the random
subset and herding (test UAR %, mean ± std over the evaluation seeds), the random-init distilled set
as a share of the reference, and a verdict against each coreset. A lead counts only when it is larger
than the seed spread (the larger of the two standard deviations): "beats" / "loses" by the margin, else
"ties". Nothing is re-run; the figures are those of the reports.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

from sersynth.report import test_uar, verdict

RESULTS = Path(__file__).resolve().parent / "results"

# (corpus, setting, report under benchmarks/results): on the embedded quick-start and on each corpus
# espeak-ng wrote in a real layout (sersynth.data.espeak_corpus), small.flags (its k-means start, and its
# earlier mixed start with 100 iterations from start epochs 0-9 at --lr_img=300) and small_herding.flags;
# benchmarks/RESULTS.md has every run.
MIXED = "the earlier small.flags (mixed start)"
STANDINGS = [
    ("embedded (quick-start)", "quickstart.flags (k-means start, 150 iterations)", "quickstart_cpu_2026-11-30.json"),
    ("embedded (quick-start)", "the earlier quickstart.flags (mixed start, 100 iterations)",
     "quickstart_cpu_2026-11-29.json"),
    ("embedded (quick-start)", "quickstart.flags with small_herding.flags' distillation",
     "quickstart_small_herding_cpu_2026-11-29.json"),
    ("embedded (quick-start)", "quickstart.flags, --tune over start and window (chose small_herding.flags')",
     "quickstart_tune_start_window_cpu_2026-11-29.json"),
    ("espeak RAVDESS, 8 actors", "small_herding.flags", "espeak_ravdess8_herd5_window5_15_cpu_2026-11-29.json"),
    ("espeak RAVDESS, 8 actors", "small.flags (k-means start)", "espeak_ravdess8_kmeans5_cpu_2026-11-30.json"),
    ("espeak RAVDESS, 24 actors", MIXED, "espeak_ravdess24_mix_cpu_2026-11-27.json"),
    ("espeak RAVDESS, 24 actors", "small_herding.flags",
     "espeak_ravdess24_herd5_window5_15_cpu_2026-11-29.json"),
    ("espeak RAVDESS, 24 actors", MIXED + ", ipc 10", "espeak_ravdess24_ipc10_cpu_2026-11-27.json"),
    ("espeak RAVDESS, 24 actors", "small_herding.flags, ipc 10",
     "espeak_ravdess24_herd10_window5_15_cpu_2026-11-29.json"),
    ("espeak CREMA-D, 91 actors", MIXED, "espeak_cremad91_ipc5_cpu_2026-11-28.json"),
    ("espeak CREMA-D, 91 actors", "small_herding.flags", "espeak_cremad91_herd5_window5_15_cpu_2026-11-29.json"),
    ("espeak CREMA-D, 91 actors", MIXED + ", 300 iterations, ipc 10",
     "espeak_cremad91_ipc10_it300_cpu_2026-11-29.json"),
    ("espeak CREMA-D, 91 actors", "small_herding.flags, ipc 10",
     "espeak_cremad91_herd10_window5_15_cpu_2026-11-29.json"),
    ("espeak EmoDB, fold 0", "small_herding.flags", "espeak_emodb_fold0_herd_window5_15_cpu_2026-11-29.json"),
    ("espeak EmoDB, fold 0", "small.flags (k-means start)", "espeak_emodb_fold0_kmeans_window5_15_cpu_2026-11-30.json"),
    ("espeak EmoDB, fold 1", MIXED, "espeak_emodb_fold1_cpu_2026-11-29.json"),
    ("espeak EmoDB, fold 1", "small_herding.flags at 100 iterations",
     "espeak_emodb_fold1_herd_window5_15_cpu_2026-11-29.json"),
    ("espeak EmoDB, fold 1", "small_herding.flags", "espeak_emodb_fold1_herd_window5_15_cpu_2026-11-30.json"),
    ("espeak EmoDB, fold 1", "small.flags (k-means start)", "espeak_emodb_fold1_kmeans_window5_15_cpu_2026-11-30.json"),
    ("espeak EmoDB, fold 2", "small_herding.flags", "espeak_emodb_fold2_herd_window5_15_cpu_2026-11-30.json"),
]

flags.DEFINE_multi_string("report", [], "a run's report.json (repeatable); default: the runs in STANDINGS")
flags.DEFINE_string("json", "", "also write the rows here")
F = flags.FLAGS

SETS = ("full_data_reference", "distilled_fixed_init", "distilled_random_init", "random_subset_fixed_init",
        "herding_subset_fixed_init")


def row(report: dict, corpus: str = "", setting: str = "") -> dict:
    """One standings row from a run's report.json."""
    res = report["results"]
    missing = [k for k in SETS if k not in res]
    if missing:
        raise ValueError(f"the report has no {', '.join(missing)} (a run evaluated without them?)")
    fig = {k: test_uar(res[k]) for k in SETS}
    summary = report["summary"]
    out = {"corpus": corpus or report["corpus"], "setting": setting,
           "ipc": summary["ipc"], "share_pct": 100.0 * summary["fraction_of_train"]}
    out.update({k: {"mean": m, "std": s} for k, (m, s) in fig.items()})
    out["ratio_random_init"] = fig["distilled_random_init"][0] / fig["full_data_reference"][0]
    out["vs_random_subset"] = verdict(fig["distilled_random_init"], fig["random_subset_fixed_init"])
    out["vs_herding"] = verdict(fig["distilled_random_init"], fig["herding_subset_fixed_init"])
    return out


def markdown(rows: list[dict]) -> str:
    head = ("| corpus | setting | ipc (share of training clips) | full-data reference | distilled, fixed init "
            "| distilled, random init (of reference) | random subset | herding "
            "| random init against random subset / herding |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        cell = {k: f"{r[k]['mean']:.1f} ± {r[k]['std']:.1f}" for k in SETS}
        lines.append(f"| {r['corpus']} | {r['setting']} | {r['ipc']} ({r['share_pct']:.1f}%) "
                     f"| {cell['full_data_reference']} | {cell['distilled_fixed_init']} "
                     f"| {cell['distilled_random_init']} ({r['ratio_random_init']:.2f}) "
                     f"| {cell['random_subset_fixed_init']} | {cell['herding_subset_fixed_init']} "
                     f"| {r['vs_random_subset']} / {r['vs_herding']} |")
    return "\n".join(lines)


def main(argv):
    del argv
    runs = ([("", "", Path(p)) for p in F.report] if F.report
            else [(c, s, RESULTS / name) for c, s, name in STANDINGS])
    rows = []
    for corpus, setting, path in runs:
        try:
            report = json.loads(Path(path).read_text())
            rows.append(row(report, corpus, setting))
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"{path}: cannot read a standings row: {e}")
    print(markdown(rows))
    if F.json:
        Path(F.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    app.run(main)
