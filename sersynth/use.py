"""Using a distilled set away from its run: ``sersynth export``, ``sersynth train``, ``sersynth predict``.

    sersynth export  --distilled=W/distill/distilled.npz --format=npy --out=DIR
    sersynth train   --distilled=W/distill/distilled.npz --model=cnn6 --out=model.npz
    sersynth export-model --model=model.npz --out=model.onnx [--int8]
    sersynth predict --model=model.npz|model.onnx a.wav b.wav [--list=files.csv] [--out=preds.csv|preds.json]

``train`` reads the distilled set alone (no recordings, no cache) and trains with the protocol of its
run (optimiser, epochs, batch, augmentation) at the lr the run's evaluation chose on validation for the
model family, trained from random initialisations (the learned lr before the set was evaluated).
``predict`` extracts each file's features exactly as the cache did
(:func:`sersynth.data.features.clip_features`) and normalises them with the statistics stored in the
model file. A file that cannot be used gets one ``error:`` line and
the others still get their prediction; the exit status is then 1. An ``.onnx`` model (from
``export-model``, :mod:`sersynth.edge`) is run by onnxruntime alone: predict then never imports JAX.
"""
from __future__ import annotations

import csv
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from sersynth import artifact, compile_cache

F = flags.FLAGS
KEY_FLAGS = {"export": ("distilled", "format", "out"),   # (every command but export also has --compile_cache)
             "train": ("distilled", "model", "out", "epochs", "lr", "seed", "cache"),
             "predict": ("model", "list", "out", "batch"),
             "export-model": ("model", "out", "int8", "distilled", "cache")}


class UseError(ValueError):
    """A bad flag or input of export / train / predict: printed as one ``error:`` line."""


def define_flags(command: str) -> None:
    if command in ("export", "train"):
        flags.DEFINE_string("distilled", None, "a distilled set: a run's distill/distilled.npz (or an exported .npz)")
    if command == "export":
        flags.DEFINE_enum("format", "npz", ["npz", "npy"], "npz: one self-describing file; npy: a folder of .npy "
                          "arrays (x, labels, targets, mel_mean, mel_std) and meta.json")
        flags.DEFINE_string("out", None, "file (npz) or folder (npy) to write")
    if command == "train":
        flags.DEFINE_string("model", "", "network to train (convnet, cnn6, vgg15, resnet9; '' = the model that "
                            "guided the distillation, at its size)")
        flags.DEFINE_integer("width", 0, "convnet channels (0: the guiding model's when it is a convnet, else 128)")
        flags.DEFINE_float("width_mult", 0, "cnn6 / vgg15 / resnet9 channel scale (0: the guiding model's, else 1)")
        flags.DEFINE_integer("epochs", 0, "training epochs (0: the run's evaluation epochs)")
        flags.DEFINE_float("lr", 0, "learning rate (0: the one the run's evaluation chose on validation for this "
                           "model family; before any evaluation, the learned lr, or the experts' with "
                           "--eval_optimizer=expert)")
        flags.DEFINE_integer("seed", 0, "initialisation and batch-order seed")
        flags.DEFINE_string("cache", "", "optional: a feature cache made with the same features, to print the "
                            "model's validation / test UAR (training never reads it)")
        flags.DEFINE_string("out", None, "model file to write (.npz)")
    if command == "predict":
        flags.DEFINE_string("model", None, "a model file written by sersynth train (.npz), or its edge model "
                            "written by sersynth export-model (.onnx, run with onnxruntime, no JAX)")
        flags.DEFINE_string("list", "", "CSV file listing recordings (a 'path' column, else the first column); "
                            "relative paths are read from the CSV's folder")
        flags.DEFINE_string("out", "", "also write the predictions to this .csv or .json")
        flags.DEFINE_integer("batch", 64, "clips per forward pass")
    if command != "export":
        compile_cache.define_flag()
    if command == "export-model":
        flags.DEFINE_string("model", None, "a model file written by sersynth train (.npz)")
        flags.DEFINE_enum("format", "onnx", ["onnx"], "edge format")
        flags.DEFINE_string("out", None, "the edge model to write (.onnx)")
        flags.DEFINE_bool("int8", False, "int8 post-training quantisation, calibrated on the distilled set only")
        flags.DEFINE_string("distilled", "", "calibration set for --int8 ('' = the distilled set the model was "
                            "trained on, as its file records)")
        flags.DEFINE_string("cache", "", "optional: a feature cache made with the same features, to print the "
                            "edge model's test UAR and how often its labels agree with the JAX model's")


# --- export --------------------------------------------------------------------------------------
def export(src: str, fmt: str, out: str) -> Path:
    ds = artifact.load_set(src)
    out_path = Path(out)
    if fmt == "npz":
        return artifact.save_set(out_path, ds)
    import io as _io

    from sersynth.io import atomic_write_bytes, atomic_write_json

    for name, arr in (("x", ds.x), ("labels", ds.labels), ("targets", ds.targets), ("mel_mean", ds.mel_mean),
                      ("mel_std", ds.mel_std)):
        buf = _io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        atomic_write_bytes(out_path / f"{name}.npy", buf.getvalue())
    atomic_write_json(out_path / "meta.json", {**ds.meta, "lr": ds.lr})     # the set's own format and version
    return out_path


# --- train ---------------------------------------------------------------------------------------
def model_spec(ds: artifact.DistilledSet, name: str = "", width: int = 0, width_mult: float = 0):
    """The network to train on ``ds``: the guiding model by default; another family at its defaults
    (or ``width`` / ``width_mult``), with the guiding model's normalisation and kernel."""
    from sersynth.models import ModelSpec

    guide = ModelSpec.from_json(ds.meta["model"])
    if not name or name == guide.name:
        spec = guide
    else:
        spec = ModelSpec(name=name, n_classes=guide.n_classes, input_shape=guide.input_shape, norm=guide.norm,
                         compute_dtype=guide.compute_dtype, kernel=guide.kernel, depth=guide.depth)
    spec = dataclasses.replace(spec, width=width or spec.width, width_mult=width_mult or spec.width_mult)
    spec.validate()
    return spec


def train_model(ds: artifact.DistilledSet, spec, *, epochs: int = 0, lr: float = 0.0, seed: int = 0,
                source: str = "") -> tuple[artifact.TrainedModel, dict]:
    """Trains one model of ``spec`` on the distilled set alone with its run's evaluation protocol."""
    import jax

    from sersynth import train
    from sersynth.models import flat_model

    tc = train.TrainConfig(**{**ds.meta["train"], **({"epochs": epochs} if epochs else {})})
    lr = lr or ds.meta.get("lr_for_training_by_model", {}).get(spec.name) or ds.meta.get("lr_for_training") or tc.lr
    fm = flat_model(spec)
    key = jax.random.key(seed)
    init = fm.init(jax.random.fold_in(key, 0))[None]
    t0 = time.perf_counter()
    params, losses, _ = train.fit(fm, tc, ds.x, ds.targets, init, jax.random.fold_in(key, 1)[None], lr=lr)
    seconds = time.perf_counter() - t0
    info = {"epochs": tc.epochs, "lr": float(lr), "seed": seed, "seconds": round(seconds, 3),
            "final_loss": float(np.asarray(losses)[0, -1]), "n_params": fm.n_params, "n_samples": int(ds.x.shape[0])}
    meta = {"model": spec.to_json(), "classes": ds.classes, "features": ds.meta["features"],
            "corpus": ds.meta.get("corpus"), "cache_hash": ds.meta.get("cache_hash"),
            "trained_on": {"distilled_set": source, "n_samples": int(ds.x.shape[0]),
                           "distill_sersynth_version": ds.meta.get("sersynth_version")},
            "train": dataclasses.asdict(tc), **info}
    return artifact.TrainedModel(np.asarray(params[0], np.float32), ds.mel_mean, ds.mel_std, meta), info


def _check_fits(m: artifact.TrainedModel, classes, shape: tuple, what: str) -> None:
    """Refuses data (``what``: the flag and its value) whose classes or ``[frames, n_mels]`` are not the model's."""
    f = m.meta["features"]
    if list(classes) != m.classes or tuple(shape) != (f["frames"], f["n_mels"]):
        raise UseError(f"{what}: its classes or features differ from the model's")


def _cache_for(m: artifact.TrainedModel, cache_dir: str):
    from sersynth.data import cache as cache_lib

    fs = cache_lib.load(cache_dir)
    _check_fits(m, fs.classes, fs.x.shape[1:], f"--cache {cache_dir}")
    return fs


def score_on_cache(m: artifact.TrainedModel, cache_dir: str) -> dict:
    """Validation / test UAR of a trained model on a feature cache made with the same features."""
    import jax.numpy as jnp

    from sersynth import evaluate
    from sersynth.models import ModelSpec, flat_model

    fs = _cache_for(m, cache_dir)
    # the cache's rows are normalised with its own training statistics; re-normalise with the model's
    fs = dataclasses.replace(fs, x=((fs.x * fs.mel_std + fs.mel_mean) - m.mel_mean) / m.mel_std)
    sets = {s: fs.subset(s) for s in ("val", "test") if fs.subset(s)[0].shape[0]}
    uar, _, _ = evaluate.score(flat_model(ModelSpec.from_json(m.meta["model"])), jnp.asarray(m.params)[None],
                               sets, fs.n_classes)
    return {s: float(v[0]) for s, v in uar.items()}


# --- predict -------------------------------------------------------------------------------------
def read_list(path: str) -> list[str]:
    """Recordings listed in a CSV: the ``path`` column, else the first; relative to the CSV's folder."""
    p = Path(path)
    if not p.is_file():
        raise UseError(f"--list {path} does not exist")
    with open(p, newline="") as f:
        rows = [r for r in csv.reader(f) if r and r[0].strip()]
    if not rows:
        return []
    col = rows[0].index("path") if "path" in rows[0] else 0
    body = rows[1:] if "path" in rows[0] else rows
    return [str(Path(r[col]) if Path(r[col]).is_absolute() else p.parent / r[col]) for r in body]


def features_of(f: dict, paths: list[str]) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """dB log-Mel features (settings ``f``: a model's ``meta["features"]``) of every usable file, the
    files they belong to, and why the others failed."""
    from sersynth.data import features

    cfg = features.FeatureConfig(**{k: f[k] for k in ("sample_rate", "n_fft", "hop_length", "n_mels", "fmin",
                                                        "fmax", "clip_seconds")})
    rows, ok, failed = [], [], {}
    for path in paths:
        if not Path(path).is_file():
            failed[path] = "no such file"
            continue
        x, reason = features.clip_features(path, int(f["n_samples"]), cfg)
        if x is None:
            failed[path] = reason
            continue
        rows.append(x)
        ok.append(path)
    x = np.stack(rows).astype(np.float32) if rows else np.zeros((0, f["frames"], f["n_mels"]), np.float32)
    return x, ok, failed


def predict_probs(m: artifact.TrainedModel, x_db: np.ndarray, batch: int = 64) -> np.ndarray:
    """``[N, C]`` class probabilities of dB features ``x_db`` (normalised here with the model's statistics)."""
    import jax
    import jax.numpy as jnp

    from sersynth.models import ModelSpec, flat_model

    fm = flat_model(ModelSpec.from_json(m.meta["model"]))
    fwd = jax.jit(lambda p, xb: jax.nn.softmax(fm.apply(p, xb).astype(jnp.float32), axis=-1))
    params = jnp.asarray(m.params)
    x = (x_db - m.mel_mean) / m.mel_std
    out = [np.asarray(fwd(params, jnp.asarray(x[i:i + batch]))) for i in range(0, x.shape[0], max(1, batch))]
    return np.concatenate(out) if out else np.zeros((0, len(m.classes)), np.float32)


def prediction_rows(classes: list[str], paths: list[str], probs: np.ndarray) -> list[dict]:
    return [{"path": p, "emotion": classes[int(np.argmax(pr))],
             **{c: round(float(v), 4) for c, v in zip(classes, pr)}} for p, pr in zip(paths, probs)]


def table(rows: list[dict], classes: list[str]) -> str:
    width = max([len("file"), *(len(Path(r["path"]).name) for r in rows)])
    head = f"{'file':<{width}}  {'emotion':<10} " + " ".join(f"{c[:9]:>9}" for c in classes)
    lines = [head] + [f"{Path(r['path']).name:<{width}}  {r['emotion']:<10} "
                      + " ".join(f"{r[c]:>9.3f}" for c in classes) for r in rows]
    return "\n".join(lines)


def write_predictions(path: str, rows: list[dict], classes: list[str]) -> None:
    from sersynth.io import atomic_write_bytes, atomic_write_json

    if path.endswith(".json"):
        atomic_write_json(path, rows)
    elif path.endswith(".csv"):
        import io as _io

        buf = _io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["path", "emotion", *classes], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_bytes(path, buf.getvalue().encode())
    else:
        raise UseError(f"--out {path}: write .csv or .json")


# --- commands ------------------------------------------------------------------------------------
def _required(*names: str) -> None:
    missing = [f"--{n}" for n in names if not F[n].value]
    if missing:
        raise UseError(f"{', '.join(missing)} required")


def _no_arguments_and(argv, *names: str, out_suffix: str = "", out_kind: str = "") -> None:
    """The checks of a command that takes only flags: no positional arguments, the ``names`` given,
    and (with ``out_suffix``) ``--out`` ending in it."""
    if len(argv) > 1:
        raise UseError(f"unexpected arguments: {' '.join(argv[1:])}")
    _required(*names)
    if out_suffix and not F.out.endswith(out_suffix):
        raise UseError(f"--out {F.out}: {out_kind} is written as {out_suffix}")


def main_export(argv) -> None:
    _no_arguments_and(argv, "distilled", "out")
    out = export(F.distilled, F.format, F.out)
    print(f"wrote {out} ({F.format})")


def main_train(argv) -> None:
    _no_arguments_and(argv, "distilled", "out", out_suffix=".npz", out_kind="a model file")
    compile_cache.apply_flags()
    ds = artifact.load_set(F.distilled)
    spec = model_spec(ds, F.model, F.width, F.width_mult)
    print(f"distilled set: {artifact.describe(ds.meta)}; {ds.x.shape[0]} samples")
    m, info = train_model(ds, spec, epochs=F.epochs, lr=F.lr, seed=F.seed, source=str(F.distilled))
    if F.cache:
        scores = score_on_cache(m, F.cache)
        m = dataclasses.replace(m, meta={**m.meta, "uar_on_cache": {"cache": F.cache, **scores}})
        print("UAR on the cache: " + ", ".join(f"{s} {v:.3f}" for s, v in scores.items()))
    artifact.save_model(F.out, m)
    print(f"trained {spec.name} ({info['n_params']:,} parameters) on {info['n_samples']} distilled samples: "
          f"{info['epochs']} epochs at lr {info['lr']:.4g} in {info['seconds']:.1f} s, final loss "
          f"{info['final_loss']:.4f}; wrote {F.out}")


def load_any_model(path: str):
    """A model file to predict with: an edge model (``.onnx``, onnxruntime) or a trained one (``.npz``, JAX)."""
    if path.endswith(".onnx"):
        from sersynth import edge

        try:
            return edge.load(path)
        except edge.EdgeError as e:             # onnxruntime missing
            raise UseError(str(e)) from None
    return artifact.load_model(path)


def probs_of(m, x_db: np.ndarray, batch: int = 64) -> np.ndarray:
    return m.probs(x_db, batch) if hasattr(m, "probs") else predict_probs(m, x_db, batch)


def main_predict(argv) -> None:
    _required("model")
    if not F.model.endswith(".onnx"):       # an edge model runs without JAX
        compile_cache.apply_flags()
    m = load_any_model(F.model)
    paths = list(argv[1:]) + (read_list(F.list) if F.list else [])
    if not paths:
        raise UseError("no recordings: name them after the flags, or --list=files.csv")
    x, ok, failed = features_of(m.meta["features"], paths)
    rows = prediction_rows(m.classes, ok, probs_of(m, x, F.batch))
    if rows:
        print(table(rows, m.classes))
    for path, reason in failed.items():
        print(f"error: {path}: {reason}", file=sys.stderr)
    if F.out:
        write_predictions(F.out, rows, m.classes)
    if failed:
        sys.exit(1)


def cache_test_split(m: artifact.TrainedModel, cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """The test split of a feature cache as dB features (``[N, frames, n_mels]``) and labels, checked
    against the model's classes and feature shape."""
    fs = _cache_for(m, cache_dir)
    x, y = fs.subset("test")
    return (x * fs.mel_std + fs.mel_mean).astype(np.float32), np.asarray(y)


def edge_agreement(m: artifact.TrainedModel, onnx_model, x_db: np.ndarray, y: np.ndarray) -> dict:
    """Test UAR of the JAX model and of its edge model, and how often their labels agree."""
    from sersynth.train import uar

    n = len(m.classes)
    ref = predict_probs(m, x_db).argmax(1)
    got = onnx_model.probs(x_db).argmax(1)
    return {"clips": int(y.size), "uar_jax": float(uar(y, ref, n)), "uar_onnx": float(uar(y, got, n)),
            "label_agreement": float(np.mean(ref == got))}


def main_export_model(argv) -> None:
    _no_arguments_and(argv, "model", "out", out_suffix=".onnx", out_kind="an edge model")
    from sersynth import edge

    compile_cache.apply_flags()
    m = artifact.load_model(F.model)
    calib = None
    if F.int8:
        source = F.distilled or (m.meta.get("trained_on") or {}).get("distilled_set")
        if not source:
            raise UseError("--int8: the model does not record its distilled set; name one with --distilled=SET")
        ds = artifact.load_set(source)
        _check_fits(m, ds.classes, ds.x.shape[1:], f"--distilled {source}")
        calib = ds.x * ds.mel_std + ds.mel_mean
    t0 = time.perf_counter()
    try:
        out = edge.export(m, F.out, int8=F.int8, calib_x_db=calib)
    except edge.EdgeError as e:
        raise UseError(str(e)) from None
    kind = f"int8 (calibrated on {calib.shape[0]} distilled samples)" if F.int8 else "float32"
    print(f"wrote {out}: {kind}, {out.stat().st_size / 1024:.1f} KiB, in {time.perf_counter() - t0:.1f} s")
    if F.cache:
        x_db, y = cache_test_split(m, F.cache)
        a = edge_agreement(m, edge.load(out), x_db, y)
        print(f"test split ({a['clips']} clips): UAR {a['uar_jax']:.3f} (JAX) / {a['uar_onnx']:.3f} (ONNX); "
              f"labels agree on {100 * a['label_agreement']:.1f}%")


MAINS = {"export": main_export, "train": main_train, "predict": main_predict, "export-model": main_export_model}


def cli(argv: list[str], command: str) -> None:
    from sersynth.cli import short_help
    from sersynth.io import CorruptFile

    define_flags(command)
    short_help(argv, KEY_FLAGS[command], f"sersynth {command}: " + __doc__.split("\n\n")[0])

    def main(args):
        try:
            MAINS[command](args)
        except (UseError, CorruptFile, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(main, argv=argv)
