"""Validation-chosen distillation settings (``--tune``): a small, budgeted, resumable search.

MTT's results hinge on a few settings (image lr, inner steps against expert epochs, the starting lr,
initialisation) whose good values move from corpus to corpus. ``--tune`` tries a grid of them, each
trial a short distillation from the same experts and feature cache, scored by the validation UAR
of models trained on its synthetic set (the runner's own validation evaluation; test speakers are
never read), and runs the final distillation with the best trial's values.

Each trial is written to ``<distill>/tune/trial_NNN.json`` when it finishes and checkpoints into its
own folder while it runs, so an interrupted search resumes where it stopped; ``tune.json`` holds
every trial and the chosen values, which the run's report repeats.

Grid syntax (``--tune_grid``): ``name=v1,v2;name=v1,v2`` over the fields of
:class:`sersynth.distill.DistillConfig` listed in :data:`TUNABLE` (flag spellings in parentheses).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Callable

import numpy as np

from sersynth.io import atomic_write_json, read_json

# DistillConfig field -> (value parser, flag name)
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
TUNABLE: dict[str, tuple[Callable[[str], object], str]] = {
    "lr_img": (float, "lr_img"), "lr_init": (float, "lr_init"), "lr_lr": (float, "lr_lr"), "lr_min": (float, "lr_min"),
    "syn_steps": (int, "syn_steps"), "expert_epochs": (int, "expert_epochs"),
    "min_start_epoch": (int, "min_start_epoch"), "max_start_epoch": (int, "max_start_epoch"),
    "batch_syn": (int, "batch_syn"),
    "init": (str, "syn_init"), "init_mix": (int, "syn_init_mix"), "init_noise": (float, "syn_init_noise"),
    "augment": (lambda v: _BOOL[v.lower()], "syn_augment"), "learn_labels": (lambda v: _BOOL[v.lower()], "learn_labels"),
    "label_init": (str, "label_init"),
}
_BY_FLAG = {flag: field for field, (_, flag) in TUNABLE.items()}


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """The search: ``grid`` as ``((field, (values...)), ...)``; ``iterations`` outer steps per trial
    (0: the run's); at most ``max_trials`` trials, a seeded sample of the grid when it is larger
    (0: the whole grid)."""
    grid: tuple[tuple[str, tuple], ...] = ()
    iterations: int = 0
    max_trials: int = 0

    def validate(self) -> None:
        if not self.grid:
            raise ValueError("--tune needs --tune_grid, e.g. lr_img=100,300,1000;syn_steps=10,20")
        for name, values in self.grid:
            if name not in TUNABLE:
                raise ValueError(f"--tune_grid: {name!r} cannot be tuned; choose from {names()}")
            if not values:
                raise ValueError(f"--tune_grid: {name} has no values")
        if self.iterations < 0 or self.max_trials < 0:
            raise ValueError("--tune_iterations and --tune_trials must be >= 0")

    def trials(self, seed: int) -> list[dict]:
        """The values of each trial, in a fixed order (the grid's, or a seeded sample of it)."""
        names = [name for name, _ in self.grid]
        combos = [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in self.grid))]
        if self.max_trials and len(combos) > self.max_trials:
            keep = np.sort(np.random.default_rng(seed).choice(len(combos), self.max_trials, replace=False))
            combos = [combos[i] for i in keep]
        return combos

    def to_json(self) -> dict:
        return {"grid": {name: list(values) for name, values in self.grid}, "iterations": self.iterations,
                "max_trials": self.max_trials}


def field_and_parser(name: str) -> tuple[str, Callable[[str], object]] | None:
    """The DistillConfig field a tunable name (field or flag spelling) stands for, and its value parser."""
    field = _BY_FLAG.get(name.strip(), name.strip())
    return (field, TUNABLE[field][0]) if field in TUNABLE else None


def names() -> str:
    return ", ".join(sorted(_BY_FLAG))


def parse_grid(text: str) -> tuple[tuple[str, tuple], ...]:
    """``"lr_img=100,300;syn_init=mix,real"`` -> ``(("lr_img", (100.0, 300.0)), ("init", ("mix", "real")))``.

    Names are DistillConfig fields or their flag names (``syn_init``, ``syn_augment``, ...)."""
    grid = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, values = part.partition("=")
        found = field_and_parser(name)
        if not sep or found is None:
            raise ValueError(f"--tune_grid: cannot read {part!r}; write name=v1,v2 with a name from {names()}")
        field, parse = found
        try:
            grid.append((field, tuple(parse(v.strip()) for v in values.split(",") if v.strip())))
        except (ValueError, KeyError):
            raise ValueError(f"--tune_grid: bad value in {part!r}") from None
    return tuple(grid)


def search(cfg: TuneConfig, seed: int, out_dir: str | Path, run_trial: Callable[[int, dict], dict],
           progress: bool = False) -> dict:
    """Runs (or resumes) every trial and returns ``{"trials": [...], "chosen": values, ...}``.

    ``run_trial(index, values) -> {"val_uar": float, ...}`` distils with ``values`` and scores the
    result on validation. Finished trials are read back from ``trial_NNN.json`` (when made with the
    same values) instead of being run again. The chosen trial has the highest ``val_uar``
    (ties: the earlier trial)."""
    from tqdm import tqdm

    out = Path(out_dir)
    rows = []
    for i, values in enumerate(tqdm(cfg.trials(seed), desc="tune", unit="trial", disable=not progress)):
        path = out / f"trial_{i:03d}.json"
        if path.is_file():
            row = read_json(path, advice="delete it to run that trial again")
            if isinstance(row, dict) and row.get("values") == values and "val_uar" in row:
                rows.append(row)
                continue
        t0 = time.perf_counter()
        row = {"trial": i, "values": values, **run_trial(i, values)}
        row["seconds"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(path, row)
        rows.append(row)
    best = max(range(len(rows)), key=lambda k: (rows[k]["val_uar"], -k))
    result = {**cfg.to_json(), "trials": rows, "chosen": rows[best]["values"], "chosen_trial": best,
              "chosen_val_uar": rows[best]["val_uar"], "scored_on": "validation speakers"}
    atomic_write_json(out / "tune.json", result)
    return result
