"""``sersynth table``: the paper's experiments from one command: guiding models x ipc values x
evaluation models, every method at every cell, with the paper's figures beside ours.

    sersynth table --flagfile=experiments/flags/table_cpu.flags --workdir=W
    sersynth table --flagfile=experiments/flags/table_paper.flags --corpus_dir=DEMOS --workdir=W   # a GPU

Every run flag applies (the table runs ordinary runs); ``--guide_models``, ``--ipcs`` and
``--eval_models`` span the table. One feature cache (``W/cache``); experts trained once per guiding
model (``W/experts_<guide>``) and reused by every ipc; each (guide, ipc) is an ordinary run directory
``W/<guide>_ipc<k>`` that distils and evaluates every method (distilled from fixed and random
initialisations, random subset, herding, k-center, DM) on the guiding model and on every other
evaluation model. A finished cell is reused and an interrupted table resumes where it stopped.

Writes ``W/table.csv`` (one row per guide, eval model, ipc, method), ``W/table.md`` (the
cross-architecture matrix at each ipc, the ipc sweep, full data; the paper's figures beside ours)
and ``W/plots/uar_vs_ipc.png``, ``W/plots/cross_arch.png``.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import sys
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from sersynth import pipeline, runner
from sersynth.io import DirectoryLocked, atomic_write_bytes, lock_dir, read_json

F = flags.FLAGS
flags.DEFINE_list("guide_models", ["cnn6", "resnet9", "vgg15"], "models whose experts guide a distillation")
flags.DEFINE_list("ipcs", ["1", "5", "10"], "synthetic samples per class, one distillation each")
flags.DEFINE_string("guide_settings", "", "distillation settings of one guide's cells, e.g. "
                    "'resnet9:lr_img=100;resnet9:lr_lr=1e-5' (any name --tune_grid takes)")

# The paper's figures (Chang et al., Interspeech 2025; DEMoS, UAR %, validation / test)
PAPER_FULL = {"cnn6": (88.8, 88.3), "resnet9": (74.6, 81.1), "vgg15": (86.8, 87.0)}
PAPER_IPC150 = {("cnn6", "cnn6"): (74.9, 65.1), ("cnn6", "resnet9"): (40.7, 39.9), ("cnn6", "vgg15"): (50.2, 51.3),
                ("resnet9", "cnn6"): (73.2, 67.1), ("resnet9", "resnet9"): (39.1, 40.5),
                ("resnet9", "vgg15"): (34.3, 29.2), ("vgg15", "cnn6"): (72.3, 65.9),
                ("vgg15", "resnet9"): (38.1, 37.4), ("vgg15", "vgg15"): (74.1, 61.2)}
# method -> (label, result on the guiding model, result on another evaluation model)
METHODS = {
    "distilled_fixed_init": ("distilled, fixed init", "distilled_fixed_init", None),
    "distilled": ("distilled, random init", "distilled_random_init", "distilled_random_init"),
    "random_subset": ("random subset", "random_subset_fixed_init", "random_subset_random_init"),
    "herding": ("herding", "herding_subset_fixed_init", "herding_subset_random_init"),
    "kcenter": ("k-center", "kcenter_subset_fixed_init", "kcenter_subset_random_init"),
    "dm": ("DM", "dm_fixed_init", "dm_random_init"),
    "full_data": ("full data", "full_data_reference", "full_data_reference"),
}
COLUMNS = ["guide_model", "eval_model", "ipc", "method", "n_samples", "fraction_of_train", "val_uar_mean",
           "val_uar_std", "test_uar_mean", "test_uar_std", "val_wa_mean", "val_wa_std", "test_wa_mean", "test_wa_std",
           "seeds", "p_vs_distilled", "run_dir"]


def parse_guide_settings(text: str) -> dict[str, dict]:
    """``"resnet9:lr_img=100;resnet9:lr_lr=1e-5"`` -> ``{"resnet9": {"lr_img": 100.0, "lr_lr": 1e-05}}``:
    DistillConfig values for one guide's cells (names as ``--tune_grid`` takes them). A model that
    does not guide this sweep may be named (a flag file's settings for a guide left out apply to nothing)."""
    from sersynth import tune
    from sersynth.models import MODELS

    guides = sorted(MODELS)
    out: dict[str, dict] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        guide, sep, setting = part.partition(":")
        name, sep2, value = setting.partition("=")
        found = tune.field_and_parser(name)
        if not (sep and sep2) or guide.strip() not in guides or found is None:
            raise ValueError(f"--guide_settings: cannot read {part!r}; write guide:name=value with a model "
                             f"({', '.join(guides)}) and a name from {tune.names()}")
        try:
            out.setdefault(guide.strip(), {})[found[0]] = found[1](value.strip())
        except (ValueError, KeyError):
            raise ValueError(f"--guide_settings: bad value in {part!r}") from None
    return out


def cell_configs(base: pipeline.RunConfig, guides: list[str], ipcs: list[int], evals: list[str],
                 settings: dict[str, dict] | None = None) -> list[tuple[str, int, pipeline.RunConfig]]:
    """One ordinary run per (guide, ipc), sharing the cache, the corpus and each guide's experts;
    ``settings[guide]`` replaces distillation settings in that guide's cells."""
    root = Path(base.workdir)
    settings = settings or {}
    out = []
    for g in guides:
        for ipc in ipcs:
            cfg = dataclasses.replace(
                base, workdir=str(root / f"{g}_ipc{ipc}"), cache_dir=base.cache_dir or str(root / "cache"),
                corpus_dir=base.corpus_dir or (str(root / "corpus") if base.corpus == "embedded" else ""),
                experts_dir=str(root / f"experts_{g}"), model={**base.model, "name": g},
                distill=dataclasses.replace(base.distill, **settings.get(g, {}), ipc=ipc),
                eval_models=tuple(e for e in evals if e != g),
                baselines=("kcenter", "dm"), overwrite=False)
            out.append((g, ipc, cfg))
    return out


def run_cells(cells, first_stages: tuple[str, ...]) -> tuple[dict[tuple[str, int], dict], dict[tuple[str, int], str]]:
    """Runs (or reuses) every cell; returns each finished cell's report, and why the others failed.
    A cell whose distillation or experts diverge (or that cannot run as asked) does not stop the
    cells after it; running the command again retries it and reuses the rest."""
    from sersynth.distill import DistillDiverged
    from sersynth.experts import ExpertsDiverged

    reports, failed = {}, {}
    for n, (g, ipc, cfg) in enumerate(cells):
        done = cfg.paths["report"]
        if pipeline.evaluated_already(cfg):
            logging.info("cell %s ipc %d: finished already (%s), reused", g, ipc, done)
            reports[(g, ipc)] = read_json(done)
            continue
        stages = first_stages if n == 0 else tuple(s for s in first_stages if s != "prepare")
        logging.info("cell %d of %d: guide %s, ipc %d -> %s", n + 1, len(cells), g, ipc, cfg.workdir)
        try:
            reports[(g, ipc)] = pipeline.run(dataclasses.replace(cfg, stages=stages))
        except (DistillDiverged, ExpertsDiverged, pipeline.RunError) as e:
            if not (cfg.paths["cache"] / "manifest.json").is_file():
                raise                          # the cache every cell needs was not made
            failed[(g, ipc)] = str(e)
            logging.error("cell %s ipc %d failed (the other cells go on): %s", g, ipc, e)
    return reports, failed


def _paired_p(a: list[float], b: list[float]) -> float:
    """Two-sided paired t-test over seeds (NaN with fewer than 2 pairs or no variance)."""
    if len(a) != len(b) or len(a) < 2:
        return float("nan")
    d = np.asarray(a) - np.asarray(b)
    if np.std(d) == 0:
        return float("nan") if np.all(d == 0) else 0.0
    from scipy import stats

    return float(stats.ttest_rel(a, b).pvalue)


def rows(cells, reports: dict) -> list[dict]:
    """One row per (guide, eval model, ipc, method)."""
    out = []
    for g, ipc, cfg in cells:
        rep = reports[(g, ipc)]
        n_train = rep["results"]["full_data"]["n_train"]
        per_model = {g: (rep["results"], 1)} | {e: (o["results"], 2) for e, o in rep.get("other_models", {}).items()}
        for e, (results, col) in per_model.items():
            distilled = results.get(METHODS["distilled_fixed_init" if col == 1 else "distilled"][col])
            for method, spec in METHODS.items():
                key = spec[col]
                if key is None or key not in results:
                    continue
                r = results[key]
                p = float("nan") if method.startswith("distilled") or method == "full_data" or distilled is None \
                    else _paired_p(distilled["uar"]["test"], r["uar"]["test"])
                out.append({"guide_model": g, "eval_model": e, "ipc": ipc, "method": method,
                            "n_samples": r["n_train"], "fraction_of_train": r["n_train"] / n_train,
                            **{f"{s}_{m}_{k}": r[f"{s}_{m}_{k}"] for s in ("val", "test") for m in ("uar", "wa")
                               for k in ("mean", "std")},
                            "seeds": len(r["uar"]["test"]), "p_vs_distilled": p, "run_dir": cfg.workdir})
    return out


def to_csv(table: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in table:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _pct(r: dict | None, split: str = "test") -> str:
    if r is None:
        return "–"
    return f"{r[f'{split}_uar_mean'] * 100:.1f} ± {r[f'{split}_uar_std'] * 100:.1f}"


def markdown(table: list[dict], guides: list[str], ipcs: list[int], evals: list[str], corpus: str) -> str:
    idx = {(r["guide_model"], r["eval_model"], r["ipc"], r["method"]): r for r in table}
    lines = [f"# sersynth table: {corpus}", "",
             "Test UAR (%), mean ± std over seeds. Rows guide the distillation (their experts' trajectories are "
             "matched); columns are trained on the result. On the diagonal the distilled set is trained from the "
             "distillation's fixed initialisations (the paper's setting), elsewhere from random ones. Paper: "
             "Chang et al., Interspeech 2025, DEMoS (validation / test)."]
    for ipc in ipcs:
        lines += ["", f"## Cross-architecture, ipc {ipc}", "", "| guide \\ trained | " + " | ".join(evals) + " |",
                  "|---|" + "---:|" * len(evals)]
        for g in guides:
            cells = []
            for e in evals:
                r = idx.get((g, e, ipc, "distilled_fixed_init" if g == e else "distilled"))
                cell = _pct(r)
                if ipc == 150 and (g, e) in PAPER_IPC150:
                    cell += f" (paper {PAPER_IPC150[(g, e)][1]:.1f})"
                cells.append(cell)
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
    for e in evals:
        g = e if e in guides else guides[0]
        lines += ["", f"## ipc sweep: {e} trained, {g} guiding", "",
                  "| method | " + " | ".join(f"ipc {k}" for k in ipcs) + " |", "|---|" + "---:|" * len(ipcs)]
        for method, (label, *_) in METHODS.items():
            if method == "full_data":
                continue
            cells = [idx.get((g, e, k, method)) for k in ipcs]
            if any(c is not None for c in cells):
                lines.append(f"| {label} | " + " | ".join(_pct(c) for c in cells) + " |")
        frac = [idx.get((g, e, k, "distilled")) for k in ipcs]
        lines.append("| fraction of training clips | " + " | ".join(
            "–" if c is None else f"{c['fraction_of_train'] * 100:.2f}%" for c in frac) + " |")
    lines += ["", "## Full data", "", "| model | ours: val / test | paper: val / test |", "|---|---:|---:|"]
    for e in evals:
        r = next((x for x in table if x["eval_model"] == e and x["method"] == "full_data"), None)
        ours = "–" if r is None else f"{r['val_uar_mean'] * 100:.1f} / {r['test_uar_mean'] * 100:.1f}"
        paper = PAPER_FULL.get(e)
        lines.append(f"| {e} | {ours} | {'–' if paper is None else f'{paper[0]:.1f} / {paper[1]:.1f}'} |")
    lines += ["", "`p_vs_distilled` in table.csv: two-sided paired t-test over seeds (same initialisations) of "
              "each baseline's test UAR against the distilled set's.", ""]
    return "\n".join(lines)


PLOTS = ("uar_vs_ipc.png", "cross_arch.png")


def plot(table: list[dict], guides: list[str], ipcs: list[int], evals: list[str], out_dir: Path) -> list[Path]:
    from sersynth.report import _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, len(evals), figsize=(4.5 * len(evals), 3.4), squeeze=False)
    for ax, e in zip(axes[0], evals):
        g = e if e in guides else guides[0]
        for method, (label, *_) in METHODS.items():
            pts = [(r["ipc"], r["test_uar_mean"] * 100) for r in table
                   if r["guide_model"] == g and r["eval_model"] == e and r["method"] == method]
            if not pts:
                continue
            pts.sort()
            if method == "full_data":
                ax.axhline(np.mean([v for _, v in pts]), color="k", ls="--", lw=0.9, label=label)
            else:
                ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=label)
        ax.set(xscale="log", xlabel="samples per class", ylabel="test UAR (%)", title=f"{e} trained, {g} guiding")
        ax.legend(fontsize=6)
    paths = [_save(fig, out_dir / PLOTS[0])]
    fig, axes = plt.subplots(1, len(ipcs), figsize=(3.2 * len(ipcs) + 1, 3.0), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        m = np.full((len(guides), len(evals)), np.nan)
        for i, g in enumerate(guides):
            for j, e in enumerate(evals):
                r = next((x for x in table if (x["guide_model"], x["eval_model"], x["ipc"]) == (g, e, ipc)
                          and x["method"] == ("distilled_fixed_init" if g == e else "distilled")), None)
                if r is not None:
                    m[i, j] = r["test_uar_mean"] * 100
        im = ax.imshow(m, cmap="viridis", vmin=np.nanmin(m) if np.isfinite(m).any() else 0,
                       vmax=np.nanmax(m) if np.isfinite(m).any() else 1)
        for (i, j), v in np.ndenumerate(m):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(evals)), evals, fontsize=7)
        ax.set_yticks(range(len(guides)), guides, fontsize=7)
        ax.set(title=f"ipc {ipc}: test UAR", xlabel="trained", ylabel="guide")
        fig.colorbar(im, ax=ax, fraction=0.046)
    paths.append(_save(fig, out_dir / PLOTS[1]))
    return paths


def write_outputs(w: Path, cells, reports: dict, failed: dict, guides: list[str], ipcs: list[int],
                  evals: list[str], corpus: str) -> str:
    """Writes table.csv, table.md and the plots from the finished cells and returns table.md.

    Every output is rewritten, so none is left from an earlier sweep: with no finished cell table.csv
    holds its header only, table.md lists the failures, and the plots are removed."""
    finished = [c for c in cells if (c[0], c[1]) in reports]
    table = rows(finished, reports)
    atomic_write_bytes(w / "table.csv", to_csv(table).encode())
    md = markdown(table, guides, ipcs, evals, next(iter(reports.values()))["corpus"] if reports else corpus)
    if failed:
        md += "\nCells that failed (left out above; the same command retries them):\n\n" + "".join(
            f"- {g}, ipc {ipc}: {why}\n" for (g, ipc), why in failed.items())
    atomic_write_bytes(w / "table.md", md.encode())
    if table:
        plot(table, guides, ipcs, evals, w / "plots")
    else:
        for name in PLOTS:
            (w / "plots" / name).unlink(missing_ok=True)
    return md


def main(argv) -> None:
    from sersynth.distill import DistillDiverged

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        base = runner.config_from_flags()
        try:
            ipcs = [int(v) for v in F.ipcs]
        except ValueError:
            raise pipeline.RunError(f"--ipcs must be integers, got {F.ipcs}") from None
        guides, evals = list(F.guide_models), list(F.eval_models) or list(F.guide_models)
        if not guides or not ipcs or min(ipcs) < 1:
            raise pipeline.RunError("--guide_models and --ipcs (each >= 1) must name at least one value")
        cells = cell_configs(base, guides, ipcs, evals, parse_guide_settings(F.guide_settings))
        for _, _, cfg in cells:
            cfg.validate()
        try:
            lock_dir(base.workdir)
        except DirectoryLocked as e:
            raise pipeline.RunError(str(e)) from None
        reports, failed = run_cells(cells, base.stages)
        if any(r is None for r in reports.values()):
            logging.info("not every cell was evaluated (--stage): no table written")
        else:
            print(write_outputs(Path(base.workdir), cells, reports, failed, guides, ipcs, evals, base.corpus))
        for (g, ipc), why in failed.items():
            print(f"error: cell {g} ipc {ipc}: {why}", file=sys.stderr)
        if failed:
            sys.exit(1)
    except (pipeline.RunError, ValueError, FileNotFoundError, FileExistsError, DistillDiverged) as e:
        logging.debug("table failed", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def cli(argv: list[str] | None = None) -> None:
    from sersynth.cli import short_help

    argv = list(sys.argv if argv is None else argv)
    short_help(argv, ("flagfile", "guide_models", "ipcs", "eval_models", "corpus", "corpus_dir", "workdir"), __doc__)
    flags.mark_flag_as_required("workdir")
    app.run(main, argv=argv)


if __name__ == "__main__":
    cli()
