"""The run: prepare -> experts -> distill -> evaluate, each stage reading the artifacts of the one before.

A run directory holds ``config.json`` (the resolved configuration), ``metrics.jsonl``, ``experts/``,
``distill/`` (checkpoints and ``distilled.npz``), ``report.json``, ``plots/*.png`` and ``audio/*.wav``.
The feature cache lives in ``cache/`` unless ``cache_dir`` points elsewhere (e.g. a cache carried to
an accelerator machine). Nothing here imports librosa or soundfile at module level: a run on a
prepared cache needs neither.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sersynth import artifact, dist
from sersynth import distill as distill_lib
from sersynth import dm as dm_lib
from sersynth import evaluate as eval_lib
from sersynth import experts as experts_lib
from sersynth import privacy
from sersynth import protocol
from sersynth import report as report_lib
from sersynth import train
from sersynth import tune as tune_lib
from sersynth.data import cache as cache_lib
from sersynth.io import (DirectoryLocked, as_json, atomic_copy, atomic_write_bytes, atomic_write_json, hold_dir,
                         lock_dir, read_json, without_added_later)
from sersynth.models import MODELS, ModelSpec, flat_model

STAGES = ("prepare", "experts", "distill", "evaluate")
# settings that change only how a distilled set is evaluated: a run directory re-evaluated under other
# values (--stage=evaluate) keeps the earlier evaluation in EARLIER_EVALUATIONS
EVALUATION_SETTINGS = ("eval_seeds", "eval_fixed_inits", "eval_epochs", "eval_lr_grid", "eval_lr_extend",
                       "eval_lr_choice", "eval_optimizer", "eval_batch_size", "eval_select_every", "eval_patience",
                       "reference_epochs", "render_per_class", "privacy_audit", "baselines", "eval_models", "dm")
EARLIER_EVALUATIONS = "earlier_evaluations"
# those of them the distillation's own validation (which iteration is kept) trains with
SELECTION_SETTINGS = ("eval_seeds", "eval_epochs", "eval_optimizer", "eval_batch_size", "eval_select_every",
                      "eval_patience")
# how each validated iteration picks its training lr: the lr training on the set will use (the learned
# one, or the experts' with --eval_optimizer=expert), or the best of the final evaluation's candidates
SELECT_LR = ("learned", "candidates")
VAL_AT_LR = "val_uar_at_lr_"              # metrics.jsonl: a candidates validation's UAR per lr (these keys + lr)


NOT_DISTILLED = ("validation preferred the starting set (iteration 0) to every distilled one: the 'distilled' "
                 "set reported is the initialisation, not a distillation; try another --lr_img, --lr_lr or "
                 "--iterations")


class RunError(ValueError):
    """A run cannot start or continue as asked (one-line message for the user)."""


def run_identity(recorded: dict) -> dict:
    """A run's settings (``RunConfig.to_json()`` or a config.json written by any version) without the
    settings added after runs were recorded, where they hold the value that reproduces the older
    behaviour (``mia_holdout`` off, ``eval_fixed_inits`` 0; ``distill.ADDED_LATER`` in the
    distillation's and DM's settings, ``train.ADDED_LATER`` in the experts'):
    a run recorded before or after a setting existed is the same run."""
    d = without_added_later(recorded, {"mia_holdout": 0.0, "select_lr": "learned", "eval_lr_choice": "each",
                                       "eval_fixed_inits": 0, "eval_lr_extend": 0})
    for part, added in (("distill", distill_lib.ADDED_LATER), ("dm", distill_lib.ADDED_LATER),
                        ("expert_train", train.ADDED_LATER)):
        if isinstance(d.get(part), dict):
            d[part] = without_added_later(d[part], added)
    return d


@dataclasses.dataclass(frozen=True)
class RunConfig:
    workdir: str
    stages: tuple[str, ...] = STAGES
    seed: int = 0
    overwrite: bool = False
    progress: bool = True
    tensorboard: bool = False             # also write metrics.jsonl's rows as TensorBoard events (<workdir>/tensorboard)
    # data
    corpus: str = "embedded"
    corpus_dir: str = ""                  # "" -> <workdir>/corpus (embedded corpus is generated there);
                                          # several corpora: comma-separated, in --corpus order
    fold: int = -1                        # fold protocols: -1 every fold (then aggregate), else this fold
    cache_dir: str = ""                   # "" -> <workdir>/cache
    embedded_speakers: int = 30
    embedded_utterances: int = 10
    prepare: dict = dataclasses.field(default_factory=dict)   # PrepareConfig fields (features nested)
    # model and training
    model: dict = dataclasses.field(default_factory=dict)     # ModelSpec fields except n_classes/input_shape
    expert_train: train.TrainConfig = train.TrainConfig()
    n_experts: int = 5
    trajectory_dtype: str = "float32"
    parallel: str = ""                    # "" -> per backend
    epoch_mode: str = ""                  # "" -> per backend
    # distillation
    distill: distill_lib.DistillConfig = distill_lib.DistillConfig()
    mesh_devices: int = 0                 # spread experts, the synthetic set and evaluation seeds over N devices
    eval_every: int = 0                   # validation evaluation of the synthetic set every N iterations
    checkpoint_every: int = 50
    log_every: int = 10
    # evaluation
    eval_seeds: int = 5
    eval_fixed_inits: int = 0             # fixed-init settings train from this many of the experts' inits (0: all)
    eval_epochs: int = 300                # epochs on distilled / subset data
    eval_lr_grid: tuple[float, ...] = (0.3, 1.0, 3.0)   # lr candidates: the learned lr and expert lr x each
    eval_lr_extend: int = 0               # best lr = the largest candidate: try up to N more, each x3 the last
    eval_lr_choice: str = "each"          # each setting chooses its lr | shared: the random subset's choice for all
    select_lr: str = "learned"            # validation during distillation trains at: learned | candidates
    eval_optimizer: str = "learned_sgd"   # learned_sgd | mtt | expert (see protocol.eval_config)
    eval_batch_size: int = 0              # minibatch when training on small sets; 0 = the experts' batch size
    eval_select_every: int = 0            # keep each model at its best validation UAR, checked every N epochs (0: last)
    eval_patience: int = 0                # stop when no model improved on validation for N checks (0: never)
    reference_epochs: int = 0             # full-data reference models: epochs (0 = the experts'), best on validation
    tune: tune_lib.TuneConfig = tune_lib.TuneConfig()   # --tune: grid searched on validation before distilling
    render_per_class: int = 2
    privacy_audit: bool = True            # distances to the closest training clip + membership inference
    mia_holdout: float = 0.0              # share of each training speaker's clips kept out of every stage, as
                                          # same-speaker non-members for membership inference (0: none)
    baselines: tuple[str, ...] = ()       # beyond random subset and herding: kcenter, dm (protocol.BASELINES)
    eval_models: tuple[str, ...] = ()     # also train these model families on every small set (cross-architecture)
    experts_dir: str = ""                 # '' -> <workdir>/experts; shared by several runs (sersynth table)
    dm: dm_lib.DMConfig = dm_lib.DMConfig()   # DM's settings (its ipc and initialisation follow the distillation's)

    @property
    def paths(self) -> dict[str, Path]:
        w = Path(self.workdir)
        return {"corpus": Path(self.corpus_dir) if self.corpus_dir else w / "corpus",
                "cache": Path(self.cache_dir) if self.cache_dir else w / "cache",
                "experts": Path(self.experts_dir) if self.experts_dir else w / "experts",
                "distill": w / "distill", "report": w / "report.json",
                "metrics": w / "metrics.jsonl", "plots": w / "plots", "audio": w / "audio", "config": w / "config.json"}

    def to_json(self) -> dict:
        """The settings that define the run's results, as JSON: where the run directory lives is not
        one of them (a moved or differently spelled run directory is the same run), and folders
        given explicitly are recorded resolved."""
        d = dataclasses.asdict(self)
        for volatile in ("stages", "overwrite", "progress", "tensorboard", "fold", "workdir"):
            d.pop(volatile)
        for key in ("cache_dir", "corpus_dir", "experts_dir"):
            d[key] = ",".join(str(Path(p).resolve()) for p in d[key].split(",")) if d[key] else ""
        return run_identity(as_json(d))

    def validate(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise RunError(f"--stage: unknown stage(s) {bad}; choose from all, {', '.join(STAGES)}")
        if self.tensorboard and importlib.util.find_spec("tensorboardX") is None:
            raise RunError("--tensorboard needs tensorboardX: pip install tensorboardX (or sersynth[dev])")
        try:
            self.expert_train.validate("expert_")
            self.distill.validate(self.expert_train.epochs)
            distill_lib.data_mesh(self.mesh_devices)
        except ValueError as e:
            raise RunError(str(e)) from None
        if self.n_experts < 1 or self.eval_seeds < 1 or self.eval_epochs < 1:
            raise RunError("--n_experts, --eval_seeds and --eval_epochs must be >= 1")
        if self.trajectory_dtype not in experts_lib.STORAGE_DTYPES:
            raise RunError(f"--trajectory_dtype must be one of {experts_lib.STORAGE_DTYPES}")
        if self.parallel not in ("", *train.PARALLEL) or self.epoch_mode not in ("", "scan", "host"):
            raise RunError("--parallel must be vmap, loop or auto; --epoch_mode scan, host or auto")
        if self.eval_optimizer not in protocol.EVAL_OPTIMIZERS:
            raise RunError(f"--eval_optimizer must be one of {', '.join(protocol.EVAL_OPTIMIZERS)}, "
                           f"got {self.eval_optimizer!r}")
        if not 0 <= self.mia_holdout < 0.5:
            raise RunError(f"--mia_holdout must be in [0, 0.5), got {self.mia_holdout}")
        if min(self.eval_select_every, self.reference_epochs, self.eval_patience, self.eval_fixed_inits) < 0:
            raise RunError("--eval_select_every, --eval_patience, --reference_epochs and --eval_fixed_inits "
                           "must be >= 0")
        if self.eval_fixed_inits > self.n_experts:
            raise RunError(f"--eval_fixed_inits={self.eval_fixed_inits} needs as many experts (--n_experts="
                           f"{self.n_experts})")
        bad = [m for m in self.eval_models if m not in MODELS]
        if bad:
            raise RunError(f"--eval_models: unknown {', '.join(bad)}; choose from {', '.join(MODELS)}")
        bad = [b for b in self.baselines if b not in protocol.BASELINES]
        if bad:
            raise RunError(f"--baselines: unknown {', '.join(bad)}; choose from {', '.join(protocol.BASELINES)}")
        try:
            self.dm.validate()
        except ValueError as e:
            raise RunError(str(e)) from None
        if self.eval_patience and not self.eval_select_every:
            raise RunError("--eval_patience needs --eval_select_every (the validation checks it counts)")
        if self.eval_batch_size < 0:
            raise RunError(f"--eval_batch_size must be >= 0, got {self.eval_batch_size}")
        if self.eval_lr_grid and min(self.eval_lr_grid) <= 0:
            raise RunError("--eval_lr_grid needs positive multipliers (or none: the learned lr alone)")
        if self.eval_lr_extend < 0:
            raise RunError(f"--eval_lr_extend must be >= 0, got {self.eval_lr_extend}")
        if self.eval_lr_choice not in protocol.LR_CHOICES:
            raise RunError(f"--eval_lr_choice must be one of {', '.join(protocol.LR_CHOICES)}, "
                           f"got {self.eval_lr_choice!r}")
        if self.select_lr not in SELECT_LR:
            raise RunError(f"--select_lr must be one of {', '.join(SELECT_LR)}, got {self.select_lr!r}")
        if self.tune.grid:
            try:
                self.tune.validate()
            except ValueError as e:
                raise RunError(str(e)) from None
        if "prepare" in self.stages:
            self._validate_corpus()
        elif not (self.paths["cache"] / "manifest.json").is_file():
            raise RunError(f"no feature cache in {self.paths['cache']}; run the prepare stage or set --cache_dir")

    def prepare_config(self):
        """The :class:`sersynth.data.prepare.PrepareConfig` of the prepare stage."""
        from sersynth.data import features, prepare

        pc = dict(self.prepare)
        feat = features.FeatureConfig(**pc.pop("features", {}))
        return prepare.PrepareConfig(corpus=self.corpus, features=feat, **pc)

    def _validate_corpus(self) -> None:
        """What the prepare stage would refuse, refused before the run directory is written to."""
        from sersynth.data import corpora

        try:
            self.prepare_config().features.validate()
            names = [n.strip() for n in self.corpus.split(",") if n.strip()]
            for name in names:
                corpora.get(name)
        except ValueError as e:
            raise RunError(str(e)) from None
        if self.corpus == "embedded":
            return
        if not self.corpus_dir:
            raise RunError(f"--corpus={self.corpus} needs --corpus_dir (the corpus folder as it ships)")
        dirs = self.corpus_dir.split(",")
        if len(dirs) != len(names):
            raise RunError(f"--corpus names {len(names)} corpora but --corpus_dir gives {len(dirs)} folder(s)")
        missing = [d for d in dirs if not Path(d).is_dir()]
        if missing:
            raise RunError(f"--corpus_dir {','.join(missing)} does not exist")


COMMAND_FILE = "command.flags"


def _recorded_stage_seconds(cfg: RunConfig) -> dict:
    """``<workdir>/stage_seconds.json``: wall time of each stage as last run ({} if absent or unreadable)."""
    path = Path(cfg.workdir) / "stage_seconds.json"
    try:
        times = read_json(path) if path.is_file() else {}
    except ValueError:
        return {}
    return times if isinstance(times, dict) else {}


def _record_stage_seconds(cfg: RunConfig, stage: str, seconds: float) -> None:
    atomic_write_json(Path(cfg.workdir) / "stage_seconds.json",
                      {**_recorded_stage_seconds(cfg), stage: round(seconds, 3)})


def _stage_seconds(cfg: RunConfig, ex: experts_lib.Experts, distilled: dict, evaluate: float) -> dict:
    """Seconds per stage: prepare as last run; experts, the ``--tune`` search (only with one) and
    distillation as recorded with their artifacts (summed over resumed parts); this evaluation's."""
    tune = distilled["meta"].get("tune_seconds")
    out = {"prepare": _recorded_stage_seconds(cfg).get("prepare"), "experts": ex.meta.get("train_seconds_total"),
           **({"tune": tune} if tune is not None else {}), "distill": distilled["meta"].get("seconds"),
           "evaluate": round(evaluate, 3)}
    out["total"] = round(sum(v for v in out.values() if v is not None), 3)
    return out


_TENSORBOARD: dict[str, Any] = {}       # one event writer per run directory, open for the process


def _tensorboard(cfg: RunConfig):
    folder = str(Path(cfg.workdir) / "tensorboard")
    if folder not in _TENSORBOARD:
        from tensorboardX import SummaryWriter

        _TENSORBOARD[folder] = SummaryWriter(folder, flush_secs=10)
    return _TENSORBOARD[folder]


def close_tensorboard() -> None:
    while _TENSORBOARD:
        _TENSORBOARD.popitem()[1].close()


def _log_metrics(cfg: RunConfig, row: dict) -> None:
    """Appends ``row`` to metrics.jsonl (and, with ``--tensorboard``, its numbers as scalars tagged
    ``stage/name``, at step ``iteration`` or ``epoch``; an expert's under ``experts/name/expert_i``)."""
    if not dist.is_writer():
        return
    with open(cfg.paths["metrics"], "a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")
    if cfg.tensorboard:
        writer = _tensorboard(cfg)
        step = int(row.get("iteration", row.get("epoch", 0)))
        suffix = f"/expert_{row['expert']}" if row.get("stage") == "experts" else ""
        for key, value in row.items():
            if key not in ("stage", "iteration", "epoch", "expert") and isinstance(value, (int, float)):
                writer.add_scalar(f"{row.get('stage', 'run')}/{key}{suffix}", float(value), step)


def log_expert_curves(cfg: RunConfig, ex: experts_lib.Experts) -> None:
    """The experts' training curves into metrics.jsonl: per expert and epoch, the mean training
    loss of that epoch and the validation UAR after it (epoch 0: the initialisation). Once per run
    directory (a resumed or repeated experts stage does not log them again)."""
    path = cfg.paths["metrics"]
    if path.is_file() and any('"stage": "experts"' in line for line in path.read_text().splitlines()):
        return
    val, loss = ex.meta.get("val_uar_curve") or [], ex.meta.get("loss_curve") or []
    for e in range(ex.params.shape[0]):
        for k in range(ex.n_epochs + 1):
            row = {"stage": "experts", "expert": e, "epoch": k}
            if k and e < len(loss):
                row["loss"] = loss[e][k - 1]
            if e < len(val):
                row["val_uar"] = val[e][k]
            if len(row) > 3:
                _log_metrics(cfg, row)


def check_workdir(cfg: RunConfig) -> None:
    """Refuses to mix two configurations in one run directory, or to silently redo a finished run."""
    p = cfg.paths
    if p["config"].is_file() and not cfg.overwrite:
        old = read_json(p["config"], advice="use another --workdir, or --overwrite to start the run afresh")
        if not isinstance(old, dict):
            raise RunError(f"{p['config']} is not a sersynth run configuration; use another --workdir, or "
                           "--overwrite to start the run afresh")
        old.pop("workdir", None)            # recorded by earlier versions; a run may move
        old, new = run_identity(old), cfg.to_json()
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if set(cfg.stages) != {"evaluate"} or not set(diff) <= set(EVALUATION_SETTINGS):
                raise RunError(f"{cfg.workdir} holds a run with other settings (differ: {', '.join(diff)}); "
                               "use another --workdir or --overwrite"
                               + ("" if set(diff) - set(EVALUATION_SETTINGS) else
                                  " (or --stage=evaluate alone to re-evaluate its distilled set)"))
            if dist.is_writer():
                kept = keep_earlier_evaluation(cfg)
                logging.info("re-evaluating with other evaluation settings (%s); %s", ", ".join(diff),
                             f"the earlier evaluation is kept in {kept}" if kept else "there was no earlier report")
        if p["report"].is_file() and "evaluate" in cfg.stages and set(cfg.stages) == set(STAGES):
            raise RunError(f"{cfg.workdir} holds a finished run (report.json); use --overwrite to redo it")
    if cfg.overwrite and dist.is_writer():
        for key in ("distill", "plots", "audio") + (() if cfg.experts_dir else ("experts",)):   # shared experts stay
            shutil.rmtree(p[key], ignore_errors=True)
        for key in ("report", "metrics"):
            p[key].unlink(missing_ok=True)
    atomic_write_json(p["config"], cfg.to_json())


def evaluated_already(cfg: RunConfig) -> bool:
    """Whether ``cfg.workdir`` holds a report made under ``cfg``'s settings (compared by
    :func:`run_identity`, so one made before a setting existed counts): a fold or table cell to reuse."""
    p = cfg.paths
    return p["report"].is_file() and p["config"].is_file() and run_identity(read_json(p["config"])) == cfg.to_json()


def selection_settings(cfg: RunConfig) -> dict:
    """The evaluation settings the distillation's validation trains with (recorded in its meta.json)."""
    d = cfg.to_json()
    keys = SELECTION_SETTINGS + (("eval_lr_grid",) if cfg.select_lr == "candidates" else ())
    return {k: d[k] for k in keys}


def keep_earlier_evaluation(cfg: RunConfig) -> Path | None:
    """Moves the run's evaluation outputs (report, plots, audio) with the config.json they were made
    under into ``<workdir>/earlier_evaluations/<n>`` (n = 1, 2, ...) and returns that folder; ``None``
    (nothing moved) when the run has no report (its evaluation never finished)."""
    p = cfg.paths
    if not p["report"].is_file():
        return None
    root = Path(cfg.workdir) / EARLIER_EVALUATIONS
    n = 1 + max((int(d.name) for d in root.glob("*") if d.name.isdigit()), default=0)
    dest = root / str(n)
    dest.mkdir(parents=True)
    atomic_copy(p["config"], dest / "config.json")
    for path in (p["report"], Path(cfg.workdir) / "report.md", p["plots"], p["audio"]):
        if path.exists():
            path.replace(dest / path.name)
    return dest


def stage_prepare(cfg: RunConfig) -> cache_lib.FeatureSet:
    from sersynth.data import prepare, synth_corpus

    p = cfg.paths
    pcfg = cfg.prepare_config()
    feat = pcfg.features
    if cfg.corpus == "embedded":
        with hold_dir(p["corpus"], "embedded corpus"):   # runs sharing a --corpus_dir generate it once
            synth_corpus.generate(p["corpus"], synth_corpus.CorpusConfig(
                n_speakers=cfg.embedded_speakers, utterances=cfg.embedded_utterances,
                emotions=tuple(pcfg.emotions) or synth_corpus.PAPER_EMOTIONS, seed=cfg.seed,
                sample_rate=max(feat.sample_rate, 16000)), progress=cfg.progress)
    with hold_dir(p["cache"], "feature cache"):        # runs sharing a --cache_dir prepare it once
        fs = prepare.prepare(p["corpus"], p["cache"], pcfg, progress=cfg.progress)
    logging.info("feature cache %s\n%s", p["cache"], prepare.summary(fs))
    return fs


def _model(cfg: RunConfig, fs: cache_lib.FeatureSet):
    spec = ModelSpec(n_classes=fs.n_classes, input_shape=tuple(fs.x.shape[1:]), **cfg.model)
    try:
        return flat_model(spec)
    except ValueError as e:
        raise RunError(str(e)) from None


def stage_experts(cfg: RunConfig, fs: cache_lib.FeatureSet) -> experts_lib.Experts:
    fm = _model(cfg, fs)
    x, y = fs.subset("train")
    with hold_dir(cfg.paths["experts"], "experts"):     # runs sharing an --experts_dir train them once
        ex = experts_lib.train_experts(
            fm, cfg.expert_train, x, y, fs.n_classes, cfg.n_experts, cfg.seed, cfg.paths["experts"],
            cache_hash=fs.hash, storage_dtype=cfg.trajectory_dtype, parallel=cfg.parallel or None,
            epoch_mode=cfg.epoch_mode or None, eval_set=fs.subset("val"), progress=cfg.progress,
            mesh=distill_lib.data_mesh(cfg.mesh_devices))
    logging.info("experts: %d x %d epochs, %d parameters, val UAR %s", cfg.n_experts, ex.n_epochs,
                 fm.n_params, np.round(ex.meta.get("final_val_uar", []), 3))
    log_expert_curves(cfg, ex)
    return ex


def distill_config(cfg: RunConfig, values: dict | None = None) -> distill_lib.DistillConfig:
    """The distillation settings of this run, with a tuning trial's or the tuned ``values`` applied
    (``--lr_init=0`` is measured later, from the experts: :func:`sersynth.distill.measure_lr_init`)."""
    return dataclasses.replace(cfg.distill, **(values or {}))


def stage_distill(cfg: RunConfig, fs: cache_lib.FeatureSet, ex: experts_lib.Experts) -> dict:
    fm = _model(cfg, fs)
    x, y = fs.subset("train")
    try:
        experts_lib.check_compatible(ex, fm.spec, fs.hash)
        distill_config(cfg).validate(ex.n_epochs)
    except ValueError as e:
        raise RunError(str(e)) from None
    val = {"val": fs.subset("val")}
    inits = jnp.asarray(ex.inits[:cfg.eval_seeds])     # validation during distillation: eval_seeds of the experts' inits
    dist_dir = cfg.paths["distill"]

    def evaluate(state):
        """Validation UAR of the state's set: trained at the lr training on it will use, or (``select_lr``
        candidates) at each of the final evaluation's lr candidates, scored by the best, so that the
        starting set (a real-clip or coreset start, at the starting lr) is judged as fairly as the rest."""
        targets = dist.to_host(distill_lib.targets_of(state.params, state.labels, fs.n_classes))
        x_syn, learned = dist.to_host(state.params["x"]), float(distill_lib.inner_lr(state.params))

        def train_at(lr):
            return protocol.train_small(cfg, fm, x_syn, targets, lr, inits, jax.random.key(cfg.seed + 7), val,
                                        fs.n_classes, "val")

        if cfg.select_lr == "learned":
            return train_at(protocol.syn_lr(cfg, learned)).mean_std("val")[0]
        r = eval_lib.choose_lr(train_at, protocol.lr_candidates(cfg, learned))
        _log_metrics(cfg, {"stage": "distill_validation", "iteration": int(state.step),
                           **{VAL_AT_LR + lr: v for lr, v in r.extra["lr_val_uar"].items()}})
        return r.mean_std("val")[0]

    def measured(dcfg):
        return distill_lib.measure_lr_init(fm, dcfg, ex.params, x, y, fs.n_classes, cfg.seed)

    def distill_with(dcfg, folder, evaluate_every, tag):
        dcfg = measured(dcfg)
        return distill_lib.distill(
            fm, dcfg, ex.params, x, y, fs.n_classes, cfg.seed, checkpoint_path=folder / "checkpoint.npz",
            checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
            on_log=lambda row: _log_metrics(cfg, {"stage": tag, **row}),
            evaluate_every=evaluate_every, evaluate=evaluate if evaluate_every else None, progress=cfg.progress,
            mesh=distill_lib.data_mesh(cfg.mesh_devices),
            provenance=distill_lib.run_fingerprint(dcfg, fm.spec.to_json(), fs.hash, ex.meta["fingerprint"], cfg.seed))

    tuned, values = None, {}
    continues_trial = cfg.tune.iterations <= cfg.distill.iterations     # not a longer trial (0: the run's own)
    if cfg.tune.grid:
        tuned = tune_search(cfg, ex.n_epochs, distill_with, dist_dir / "tune")
        values = tuned["chosen"]
        logging.info("tune: chose %s (validation UAR %.3f of %d trials)", values, tuned["chosen_val_uar"],
                     len(tuned["trials"]))
        if continues_trial:
            continue_trial(dist_dir / "tune" / f"trial_{tuned['chosen_trial']:03d}", dist_dir)
    dcfg = measured(distill_config(cfg, values))
    if dcfg.lr_init != cfg.distill.lr_init:
        logging.info("--lr_init=0: starting the learned lr at %.4g, measured from the experts", dcfg.lr_init)
    t0 = time.perf_counter()
    final, best, evaluations = distill_with(dcfg, dist_dir, cfg.eval_every, "distill")
    seconds = time.perf_counter() - t0
    if (dist_dir / "checkpoint.npz").is_file():      # every resumed part of the distillation
        seconds = distill_lib.checkpoint_seconds(dist_dir / "checkpoint.npz")
    chosen = best
    selected = int(chosen.step)               # the rule that kept it (ties: the later state) decides
    targets = dist.to_host(distill_lib.targets_of(chosen.params, chosen.labels, fs.n_classes))
    out = {"x": dist.to_host(chosen.params["x"]), "labels": dist.to_host(chosen.labels), "targets": targets,
           "lr": np.asarray(distill_lib.inner_lr(chosen.params))}
    # what the set came from: in distilled.npz (which stands alone) and in meta.json alike
    made_from = {"model": fm.spec.to_json(), "cache_hash": fs.hash, "experts": ex.meta["fingerprint"],
                 "distill": dataclasses.asdict(dcfg), "selected_iteration": selected, "classes": fs.classes}
    artifact.save_set(dist_dir / "distilled.npz", artifact.DistilledSet(
        out["x"], out["labels"], targets, float(out["lr"]), fs.mel_mean, fs.mel_std,
        {**made_from, "corpus": fs.manifest.get("corpus"), "fold": fs.manifest.get("fold") if fs.n_folds > 1 else None,
         "features": artifact.feature_settings(fs.manifest),
         **training_meta(cfg, protocol.syn_lr(cfg, float(out["lr"])))}))
    meta = {**made_from, "evaluations": evaluations, "seconds": seconds, "lr_floor_iterations": int(final.n_lr_floor),
            "selected_under": selection_settings(cfg)}
    if tuned is not None:
        meta["tune"] = tuned
        meta["tune_seconds"] = tune_seconds(tuned, continued=continues_trial)
    atomic_write_json(dist_dir / "meta.json", meta)
    logging.info("distilled %d samples in %.1f s; selected iteration %d (val UAR %s)", out["x"].shape[0], seconds,
                 selected, f"{max(e['score'] for e in evaluations):.3f}" if evaluations else "n/a")
    if evaluations and selected == 0:
        logging.warning(NOT_DISTILLED)
    return {**out, "meta": meta}


def continue_trial(trial_dir: Path, dist_dir: Path) -> None:
    """The final distillation continues the chosen tuning trial instead of starting again: with the
    same settings, seed and experts it is the same run so far (the trial stopped at ``--tune_iterations``
    or ran them all). Its checkpoints are copied into ``dist_dir`` unless a distillation is already
    there; :func:`sersynth.distill.distill` resumes from them only when their provenance matches."""
    if (dist_dir / "checkpoint.npz").exists() or not (trial_dir / "checkpoint.npz").is_file():
        return
    for name in ("checkpoint.best.npz", "checkpoint.npz"):       # the checkpoint last: it is what says resume
        if (trial_dir / name).is_file():
            atomic_copy(trial_dir / name, dist_dir / name)
    logging.info("tune: the distillation continues trial %s", trial_dir.name)


def tune_seconds(tuned: dict, continued: bool) -> float:
    """What the ``--tune`` search cost beyond the final distillation: every trial's seconds, but the
    chosen one's when the distillation continued it (its seconds are the distillation's own)."""
    return round(sum(t["seconds"] for i, t in enumerate(tuned["trials"])
                     if not (continued and i == tuned["chosen_trial"])), 3)


def tune_search(cfg: RunConfig, n_expert_epochs: int, distill_with, folder: Path) -> dict:
    """``--tune``: every trial distils for ``tune.iterations`` (default: the run's) from the same
    experts, validating as the run does (every ``eval_every`` iterations, else at the end); a
    trial's score is its best validation UAR after the starting set (iteration 0 is the same for
    every trial and says nothing about the settings). Trials whose settings cannot be distilled
    (e.g. more expert epochs than stored) are refused before any trial runs."""
    n_it = cfg.tune.iterations or cfg.distill.iterations
    trials = cfg.tune.trials(cfg.seed)
    configs = [dataclasses.replace(distill_config(cfg, values), iterations=n_it) for values in trials]
    for dcfg, values in zip(configs, trials):
        try:
            dcfg.validate(n_expert_epochs)
        except ValueError as e:
            raise RunError(f"--tune_grid trial {values}: {e}") from None

    def run_trial(i, values):
        dcfg = configs[i]
        final, _, evaluations = distill_with(dcfg, folder / f"trial_{i:03d}", cfg.eval_every or n_it, f"tune{i}")
        after = [e for e in evaluations if e["step"] > 0]
        best = max(after, key=lambda e: (e["score"], e["step"]))
        return {"val_uar": best["score"], "iteration": int(best["step"]), "lr_init": dcfg.lr_init,
                "learned_lr": float(distill_lib.inner_lr(final.params)), "evaluations": evaluations}

    return tune_lib.search(cfg.tune, cfg.seed, folder, run_trial, progress=cfg.progress)


def load_distilled(cfg: RunConfig) -> dict:
    d = cfg.paths["distill"]
    if not (d / "distilled.npz").is_file() or not (d / "meta.json").is_file():
        raise RunError(f"no distilled set in {d}; run the distill stage first")
    ds = artifact.load_set(d / "distilled.npz")
    return {"x": ds.x, "labels": ds.labels, "targets": ds.targets, "lr": np.float32(ds.lr),
            "meta": read_json(d / "meta.json", "re-run the distill stage (--stage=distill,evaluate)")}


HELD_OUT = -1        # split code of the clips --mia_holdout keeps out of every stage


def membership_holdout(cfg: RunConfig, fs: cache_lib.FeatureSet) -> cache_lib.FeatureSet:
    """With ``--mia_holdout=F``: the view of ``fs`` in which F of each training speaker's training
    clips (at least one, never all) leave the training split (split code :data:`HELD_OUT`), so no
    stage sees them and membership inference has non-members of the members' own speakers. The view
    has a hash of its own (experts trained on it are not the full split's) and lists the held-out
    files in its manifest (``membership_holdout``). The per-Mel-bin normalisation is computed again
    over the clips that stay in training, so nothing of the held-out clips reaches any stage."""
    if cfg.mia_holdout <= 0:
        return fs
    train = np.flatnonzero(fs.split == cache_lib.SPLIT_CODES["train"])
    rng = np.random.default_rng(cfg.seed + 7919)
    held = []
    for s in np.unique(fs.speaker[train]):
        idx = train[fs.speaker[train] == s]
        n = min(max(1, int(round(cfg.mia_holdout * idx.size))), idx.size - 1)
        held.extend(rng.choice(idx, n, replace=False).tolist() if n > 0 else [])
    held = np.sort(np.asarray(held, int))
    split = fs.split.copy()
    split[held] = HELD_OUT
    files = fs.manifest.get("files", [])
    # "-renorm": views made before the normalisation left the held-out clips out are other features
    manifest = dict(fs.manifest, hash=f"{fs.hash}-mia{cfg.mia_holdout:g}-renorm",
                    membership_holdout={"fraction": cfg.mia_holdout, "n_clips": int(held.size),
                                        "files": [files[i]["path"] for i in held] if len(files) == fs.split.size else
                                        held.tolist()})
    return fs.with_split(split, manifest)


def _training_speakers(fs: cache_lib.FeatureSet) -> np.ndarray | None:
    """The speaker of each training clip, for the speaker-identity audit (None: one speaker)."""
    spk = fs.speaker[fs.split == cache_lib.SPLIT_CODES["train"]]
    return spk if np.unique(spk).size >= 2 else None


def training_meta(cfg: RunConfig, lr: float | None) -> dict:
    """What ``distilled.npz`` tells ``sersynth train``: the run's evaluation protocol and the lr to train at
    (``None``: the protocol's own, the experts' lr)."""
    return {"train": protocol.eval_config(cfg).identity(), "eval_optimizer": cfg.eval_optimizer,
            "lr_for_training": lr}


def record_training_choice(cfg: RunConfig, guide: str, results: dict, cross: dict) -> dict:
    """Writes what the evaluation learned about training on the distilled set into ``distilled.npz``
    (which ``sersynth train`` reads): the lr each evaluated model family chose on validation when
    trained on it from random initialisations (a new model, as ``train`` makes), and the evaluation
    protocol it was trained with. Done at every evaluation, so a re-evaluation under other settings
    (``--stage=evaluate --eval_optimizer=mtt``) leaves the file describing the evaluation in the report,
    not the first one. Returns the metadata written."""
    path = cfg.paths["distill"] / "distilled.npz"
    ds = artifact.load_set(path)
    by_model = {guide: float(results["distilled_random_init"].extra["lr"])}
    by_model.update({name: float(c["results"]["distilled_random_init"]["extra"]["lr"]) for name, c in cross.items()})
    meta = {**ds.meta, **training_meta(cfg, by_model[guide]), "lr_for_training_by_model": by_model,
            "lr_for_training_source": "chosen on validation UAR by the run's evaluation, training from random "
                                      "initialisations"}
    artifact.save_set(path, dataclasses.replace(ds, meta=meta))
    return meta


def _privacy_audit(cfg: RunConfig, fm, fs: cache_lib.FeatureSet, distilled: dict, results: dict, full_params,
                   train: tuple, sets: dict) -> dict:
    """The privacy audit of the distilled set (:func:`privacy.audit`) against the run's training split, with
    the validation and test clips as non-members and the clips ``--mia_holdout`` kept out, if any."""
    (x_tr, y_tr), x_syn = train, distilled["x"]
    x_hold = np.concatenate([sets["val"][0], sets["test"][0]])
    y_hold = np.concatenate([sets["val"][1], sets["test"][1]])
    spk_hold = np.concatenate([fs.speaker[fs.split == cache_lib.SPLIT_CODES[s]] for s in ("val", "test")])
    spk_train = _training_speakers(fs)
    dcfg = distill_lib.DistillConfig(**distilled["meta"]["distill"])
    held = fs.split == HELD_OUT
    return privacy.audit(fm, x_syn, x_tr, y_tr, x_hold, y_hold,
                         {"full_data": full_params,
                          "distilled_fixed_init": results["distilled_fixed_init"].params,
                          "distilled_random_init": results["distilled_random_init"].params},
                         seed=cfg.seed, mel_std=fs.mel_std, labels=distilled["labels"],
                         sources=distill_lib.init_sources(dcfg, x_tr, y_tr, fs.n_classes,
                                                          distill_lib.init_key(cfg.seed)),
                         speakers=spk_train,
                         unseen_speakers=None if spk_train is None else ~np.isin(spk_hold, spk_train),
                         same_speaker=(fs.x[held], fs.y[held]) if cfg.mia_holdout else None)


def _summary(fs: cache_lib.FeatureSet, distilled: dict, results: dict, x_tr: np.ndarray) -> dict:
    """The report's headline figures: test UAR against the full-data reference and the coresets, storage
    and training time, the learned lr and the chosen iteration."""
    x_syn, lr = distilled["x"], float(distilled["lr"])
    n_syn = x_syn.shape[0]

    def test(name: str) -> float:
        return results[name].mean_std("test")[0]

    full, experts, fixed = test("full_data_reference"), test("full_data"), test("distilled_fixed_init")
    full_feature_bytes = int(x_tr.nbytes)
    train_audio_bytes = int(sum(f.get("bytes", 0) for f in fs.manifest["files"] if f["split"] == "train"))
    syn_bytes = int(x_syn.astype(np.float32).nbytes)
    return {
        "uar_ratio_fixed": fixed / max(full, 1e-9),
        "uar_ratio_random": test("distilled_random_init") / max(full, 1e-9),
        "uar_ratio_fixed_vs_experts": fixed / max(experts, 1e-9),
        "reference_test_uar": full,
        "distilled_minus_subset_test_uar": fixed - test("random_subset_fixed_init"),
        "distilled_minus_herding_test_uar": fixed - test("herding_subset_fixed_init"),
        **{f"distilled_minus_{short}_test_uar": fixed - test(name)
           for short, name in (("kcenter", "kcenter_subset_fixed_init"), ("dm", "dm_fixed_init")) if name in results},
        "fraction_of_train": n_syn / x_tr.shape[0],
        "distilled_bytes": syn_bytes, "full_feature_bytes": full_feature_bytes, "full_audio_bytes": train_audio_bytes,
        "storage_ratio_features": syn_bytes / full_feature_bytes,
        "storage_ratio_audio": syn_bytes / max(train_audio_bytes, 1),
        "train_seconds_full_per_model": results["full_data_reference"].seconds_per_model(),
        "train_seconds_distilled_per_model": results["distilled_fixed_init"].seconds_per_model(),
        "learned_lr": lr, "lr_floor_iterations": distilled["meta"].get("lr_floor_iterations", 0),
        "ipc": n_syn // fs.n_classes, "selected_iteration": distilled["meta"]["selected_iteration"],
        "distill_seconds": distilled["meta"]["seconds"],
    }


def _warnings(cfg: RunConfig, distilled: dict, summary: dict) -> list[str]:
    """What the report must say about how the distilled set was chosen."""
    warnings = [NOT_DISTILLED] if distilled["meta"].get("evaluations") and summary["selected_iteration"] == 0 else []
    before, now = distilled["meta"].get("selected_under"), selection_settings(cfg)   # None: made before recorded
    if before is not None and before != now:
        changed = sorted(k for k in before if before[k] != now.get(k))
        warnings.append(f"the distilled set's iteration was chosen on validation under other evaluation settings "
                        f"({', '.join(f'{k}={before[k]}' for k in changed)}) than it is evaluated with here")
    return warnings


def _plots_and_audio(cfg: RunConfig, fs: cache_lib.FeatureSet, ex: experts_lib.Experts, distilled: dict,
                     results: dict, audit: dict | None) -> dict:
    """The run's plots and Griffin-Lim renders of the distilled set; their paths, relative to the workdir."""
    p, x_syn, classes = cfg.paths, distilled["x"], fs.classes
    rows = [json.loads(line) for line in p["metrics"].read_text().splitlines()] if p["metrics"].is_file() else []
    # a resumed distillation logs the iterations after its last checkpoint again: keep the last of each
    rows = list({(r.get("iteration"), "loss" in r): r for r in rows if r.get("stage") == "distill"}.values())
    features = fs.manifest["features"]
    plots = [report_lib.plot_curves(rows, p["plots"] / "distill_curves.png"),
             report_lib.plot_spectrograms(x_syn, distilled["labels"], classes,
                                          p["plots"] / "distilled_spectrograms.png",
                                          seconds_per_frame=features["hop_length"] / features["sample_rate"]),
             report_lib.plot_confusions({"full data": results["full_data_reference"].confusion["test"],
                                         "distilled, fixed init": results["distilled_fixed_init"].confusion["test"],
                                         "random subset": results["random_subset_fixed_init"].confusion["test"],
                                         "herding": results["herding_subset_fixed_init"].confusion["test"]},
                                        classes, p["plots"] / "confusion_test.png")]
    if audit is not None:
        plots.append(report_lib.plot_privacy(audit, p["plots"] / "privacy.png"))
    if ex.meta.get("val_uar_curve"):
        plots.append(report_lib.plot_expert_curves(ex.meta["val_uar_curve"], p["plots"] / "experts_val_uar.png",
                                                   distilled["meta"]["distill"].get("max_start_epoch"),
                                                   distilled["meta"]["distill"].get("min_start_epoch", 0)))
    audio = report_lib.render_audio(x_syn, distilled["labels"], classes, fs.mel_mean, fs.mel_std, features,
                                    p["audio"], cfg.render_per_class) if dist.is_writer() else []
    return {"plots": [str(x.relative_to(cfg.workdir)) for x in plots],
            "audio": [str(x.relative_to(cfg.workdir)) for x in audio]}


def stage_evaluate(cfg: RunConfig, fs: cache_lib.FeatureSet, ex: experts_lib.Experts, distilled: dict) -> dict:
    """Trains every setting (the distilled set, the coresets, the full-data reference; other models on
    request), audits privacy on request, and writes report.json, report.md, the plots and the renders."""
    t_start = time.perf_counter()
    fm = _model(cfg, fs)
    if distilled["meta"]["cache_hash"] != fs.hash or distilled["meta"]["experts"] != ex.meta["fingerprint"]:
        raise RunError("the distilled set was made from another feature cache or other experts; re-run distill")
    x_tr, y_tr = fs.subset("train")
    sets = {"val": fs.subset("val"), "test": fs.subset("test")}
    key = jax.random.key(cfg.seed + 11)
    x_syn, t_syn, lr = distilled["x"], distilled["targets"], float(distilled["lr"])

    store = cfg.paths["experts"] if cfg.experts_dir else None      # shared by runs (sersynth table): one reference each
    results, cands, pools = protocol.train_every_setting(cfg, fm, ex, x_tr, y_tr, sets, fs.n_classes, x_syn, t_syn,
                                                         lr, key, store)
    cross = {}
    for name in cfg.eval_models:
        if name == fm.spec.name:
            continue
        fm_other = _model(dataclasses.replace(cfg, model={**cfg.model, "name": name}), fs)
        res = protocol.train_other_model(cfg, fm_other, x_tr, y_tr, sets, fs.n_classes, pools, cands,
                                         jax.random.fold_in(key, 1000 + len(cross)), store)
        cross[name] = {"model": fm_other.spec.to_json(), "n_params": fm_other.n_params,
                       "results": {k: r.to_json() for k, r in res.items()}}
        logging.info("evaluated on %s: %s", name, ", ".join(f"{k} {r.mean_std('test')[0]:.3f}" for k, r in res.items()))

    audit = _privacy_audit(cfg, fm, fs, distilled, results, jnp.asarray(ex.params[:, -1], jnp.float32),
                           (x_tr, y_tr), sets) if cfg.privacy_audit else None
    summary = _summary(fs, distilled, results, x_tr)
    if audit is not None:
        summary.update(privacy.headline(audit))
    report = {"corpus": fs.manifest["corpus"], "classes": fs.classes, "cache_hash": fs.hash,
              "experts_val_uar_curve": ex.meta.get("val_uar_curve"),
              "model": fm.spec.to_json(), "n_params": fm.n_params, "backend": jax.default_backend(),
              "devices": [str(d) for d in jax.devices()], "jax_version": jax.__version__,
              "results": {k: r.to_json() for k, r in results.items()}, "summary": summary, "privacy": audit,
              "protocol": fs.manifest.get("protocol", "speaker"), "fold": fs.manifest.get("fold", 0),
              "model_selection": "on the validation split; the test split is read once, for this report",
              "distill": distilled["meta"].get("distill"), "lr_candidates": cands}
    if cross:
        report["other_models"] = cross
    if "membership_holdout" in fs.manifest:
        report["membership_holdout"] = fs.manifest["membership_holdout"]
    if distilled["meta"].get("tune"):
        report["tune"] = distilled["meta"]["tune"]
    warnings = _warnings(cfg, distilled, summary)
    if warnings:
        report["warnings"] = warnings
    report["artifacts"] = _plots_and_audio(cfg, fs, ex, distilled, results, audit)
    report["stage_seconds"] = _stage_seconds(cfg, ex, distilled, time.perf_counter() - t_start)
    if dist.is_writer():          # just before the report, so the two describe the same evaluation
        record_training_choice(cfg, fm.spec.name, results, cross)
    atomic_write_json(cfg.paths["report"], report)
    atomic_write_bytes(Path(cfg.workdir) / "report.md", report_lib.markdown(report, cfg.to_json()).encode())
    return report


def run(cfg: RunConfig, command: str | None = None) -> dict | None:
    """Runs the requested stages in order; each later stage loads what an earlier run wrote.

    With a cross-validation protocol (the cache has several folds) every fold (or ``cfg.fold``) runs
    in ``<workdir>/fold<k>/`` on the shared cache; folds already evaluated are reused, so an
    interrupted run resumes, and folds can be run apart (``--fold=k``, e.g. one per machine) and
    aggregated by a final run of all folds. The aggregate report pools every fold's seeds.
    """
    try:
        return _run(cfg, command)
    finally:
        close_tensorboard()


def _run(cfg: RunConfig, command: str | None) -> dict | None:
    cfg.validate()
    try:
        lock_dir(cfg.workdir)
    except DirectoryLocked as e:
        raise RunError(str(e)) from None
    check_workdir(cfg)
    if command is not None:          # the runner's flags as a re-runnable flag file (report.md: Reproduce)
        atomic_write_bytes(Path(cfg.workdir) / COMMAND_FILE, command.encode())
    # multi-host: process 0 prepares (and generates the embedded corpus); the others load its cache
    t0 = time.perf_counter()
    fs = stage_prepare(cfg) if "prepare" in cfg.stages and dist.is_writer() else None
    if fs is not None:
        _record_stage_seconds(cfg, "prepare", time.perf_counter() - t0)
    dist.barrier("prepare")
    fs = fs or cache_lib.load(cfg.paths["cache"])
    if fs.n_folds == 1 and cfg.fold <= 0:
        return _run_stages(cfg, fs)
    try:
        folds = [fs.select_fold(cfg.fold).manifest["fold"]] if cfg.fold >= 0 else list(range(fs.n_folds))
    except cache_lib.CacheError as e:
        raise RunError(str(e)) from None
    stages = tuple(s for s in cfg.stages if s != "prepare")
    if not stages:
        return None
    reports = {}
    for k in folds:
        sub = dataclasses.replace(cfg, workdir=str(Path(cfg.workdir) / f"fold{k}"), cache_dir=str(cfg.paths["cache"]),
                                  stages=stages, fold=k)
        done = sub.paths["report"]
        if "evaluate" in stages and not cfg.overwrite and evaluated_already(sub):
            logging.info("fold %d: evaluated already (%s), reused", k, done)
            reports[k] = read_json(done)
            continue
        logging.info("fold %d of %d: %s", k + 1, fs.n_folds, fs.manifest["fold_info"][k])
        check_workdir(sub)
        reports[k] = _run_stages(sub, fs.select_fold(k))
    if "evaluate" not in stages:
        return None
    finished = {k: read_json(Path(cfg.workdir) / f"fold{k}" / "report.json") for k in range(fs.n_folds)
                if (Path(cfg.workdir) / f"fold{k}" / "report.json").is_file()}
    if len(finished) < fs.n_folds:
        logging.info("%d of %d folds evaluated; run --fold=-1 (all) once the others are done to aggregate",
                     len(finished), fs.n_folds)
        return reports[folds[-1]]
    report = aggregate_folds(finished, fs.manifest)
    report["artifacts"] = {"plots": [str(report_lib.plot_folds(report, cfg.paths["plots"] / "folds_test_uar.png")
                                         .relative_to(cfg.workdir))]}
    atomic_write_json(cfg.paths["report"], report)
    atomic_write_bytes(Path(cfg.workdir) / "report.md", report_lib.markdown(report, cfg.to_json()).encode())
    if dist.is_writer():
        print(report_lib.summary_table(report))
    return report


def aggregate_folds(reports: dict[int, dict], manifest: dict) -> dict:
    """Pools per-seed scores of every fold (so mean = mean of fold means), sums confusions, averages
    the summary; keeps each fold's test UAR per setting."""
    first = reports[min(reports)]

    def pool(name: str, rs: list[dict]) -> dict:
        splits_ = list(rs[0]["uar"])
        return eval_lib.Result(name, {s: sum((x["uar"][s] for x in rs), []) for s in splits_},
                               {s: sum((x["wa"][s] for x in rs), []) for s in splits_},
                               {s: np.sum([x["confusion"][s] for x in rs], axis=0).tolist() for s in splits_},
                               float(sum(x["train_seconds"] for x in rs)),
                               int(round(np.mean([x["n_train"] for x in rs]))), {"folds": len(rs)}).to_json()

    results = {name: pool(name, [reports[k]["results"][name] for k in sorted(reports)]) for name in first["results"]}
    other = {}                                   # other trained models (--eval_models): pooled the same way
    for model, entry in first.get("other_models", {}).items():
        if all(model in reports[k].get("other_models", {}) for k in reports):
            other[model] = {**{k: v for k, v in entry.items() if k != "results"},
                            "results": {name: pool(name, [reports[k]["other_models"][model]["results"][name]
                                                          for k in sorted(reports)]) for name in entry["results"]}}
    summary = {k: float(np.mean([reports[f]["summary"][k] for f in reports]))
               for k, v in first["summary"].items()
               if isinstance(v, (int, float)) and all(k in reports[f]["summary"] for f in reports)}
    full = results.get("full_data_reference", results["full_data"])["test_uar_mean"]
    summary["uar_ratio_fixed"] = results["distilled_fixed_init"]["test_uar_mean"] / max(full, 1e-9)
    summary["uar_ratio_random"] = results["distilled_random_init"]["test_uar_mean"] / max(full, 1e-9)
    per_fold = [{"fold": k, **manifest["fold_info"][k],
                 "test_uar": {n: reports[k]["results"][n]["test_uar_mean"] for n in reports[k]["results"]}}
                for k in sorted(reports)]
    return {**{k: first[k] for k in ("corpus", "classes", "model", "n_params", "backend", "devices", "jax_version")},
            "cache_hash": manifest["hash"], "protocol": manifest.get("protocol"), "n_folds": len(reports),
            "results": results, "summary": summary, "folds": per_fold, **({"other_models": other} if other else {})}


def _run_stages(cfg: RunConfig, fs: cache_lib.FeatureSet) -> dict | None:
    fs = membership_holdout(cfg, fs)
    # Barriers: in a multi-host run every process decides "resume or compute" from the same files.
    dist.barrier(f"{cfg.workdir}:experts")
    if "experts" in cfg.stages:
        ex = stage_experts(cfg, fs)
    elif {"distill", "evaluate"} & set(cfg.stages):
        ex = experts_lib.load(cfg.paths["experts"])
    dist.barrier(f"{cfg.workdir}:distill")
    if "distill" in cfg.stages:
        distilled = stage_distill(cfg, fs, ex)
    elif "evaluate" in cfg.stages:
        distilled = load_distilled(cfg)
    dist.barrier(f"{cfg.workdir}:evaluate")
    if "evaluate" in cfg.stages:
        report = stage_evaluate(cfg, fs, ex, distilled)
        if dist.is_writer():
            print(report_lib.summary_table(report))
        return report
    return None
