"""Expert trajectories: N models trained on the full training split, parameters saved every epoch.

Stored in a folder as ``trajectories.npz`` (``params [E, epochs + 1, P]`` in the storage dtype,
``losses [E, epochs]``) plus ``meta.json`` (model spec, training config, feature-cache hash, timing
and each expert's validation UAR), so a distillation against another model or cache refuses to start.
Experts are trained in chunks (all at once under ``vmap``, one by one in ``loop`` mode); each
finished chunk is saved, so an interrupted run resumes with the chunks still to do.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from sersynth import train
from sersynth.io import as_json, atomic_save_npz, atomic_write_json, fingerprint, load_npz, read_json, is_writer
from sersynth.models import FlatModel, ModelSpec

STORAGE_DTYPES = ("float32", "float16")


class ExpertsMismatch(ValueError):
    """Stored trajectories were made for another model, training config or feature cache."""


@dataclasses.dataclass
class Experts:
    params: np.ndarray       # [E, epochs + 1, P] (storage dtype)
    meta: dict

    @property
    def n_epochs(self) -> int:
        return self.params.shape[1] - 1

    @property
    def inits(self) -> np.ndarray:
        """``[E, P]`` float32: the initialisations the trajectories (and distillation) started from."""
        return np.asarray(self.params[:, 0], np.float32)


def _meta(spec: ModelSpec, cfg: train.TrainConfig, cache_hash: str, n_experts: int, seed: int, storage: str) -> dict:
    return {"model": spec.to_json(), "train": cfg.identity(), "cache_hash": cache_hash,
            "n_experts": n_experts, "seed": seed, "storage_dtype": storage}


def train_experts(fm: FlatModel, cfg: train.TrainConfig, x_train, y_train, n_classes: int, n_experts: int,
                  seed: int, out_dir: str | Path, *, cache_hash: str, storage_dtype: str = "float32",
                  parallel: str | None = None, epoch_mode: str | None = None, eval_set=None,
                  progress: bool = True, mesh=None) -> Experts:
    """Trains (or resumes, or reuses) ``n_experts`` experts and writes them to ``out_dir``.

    Expert i always draws from the key ``fold_in(seed, 1 + i)``, so vmap, loop and a device mesh
    give the same experts. Finished chunks (all experts under vmap; one per device under loop) are
    kept, so an interrupted run resumes."""
    from tqdm import tqdm

    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"--trajectory_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
    out = Path(out_dir)
    meta = _meta(fm.spec, cfg, cache_hash, n_experts, seed, storage_dtype)
    tag = fingerprint(meta)
    if (out / "meta.json").is_file() and read_json(out / "meta.json").get("fingerprint") == tag:
        return load(out)
    parallel = parallel or train.default_parallel(fm.n_params)
    chunk = n_experts if parallel == "vmap" else (1 if mesh is None else min(mesh.devices.size, n_experts))
    root = jax.random.key(seed)
    inits = fm.init_many(jax.random.split(jax.random.fold_in(root, 0), n_experts))
    targets = train.one_hot(y_train, n_classes)
    params, losses, seconds = [], [], 0.0
    for c0 in tqdm(range(0, n_experts, chunk), desc="experts", unit="chunk", disable=not progress or chunk == n_experts):
        part = out / f"chunk_{tag}_{c0:03d}.npz"
        if part.is_file():
            z = load_npz(part, advice="delete it to retrain those experts")
        else:
            t0 = time.perf_counter()
            ids = np.arange(c0, min(c0 + chunk, n_experts))
            keys = jax.vmap(lambda i: jax.random.fold_in(root, 1 + i))(jax.numpy.asarray(ids))
            _, loss, traj = train.fit(fm, cfg, x_train, targets, inits[ids], keys, parallel=parallel,
                                      epoch_mode=epoch_mode, record=True, progress=progress, mesh=mesh,
                                      desc=f"expert {c0}" if chunk == 1 else "experts")
            _check_finite(traj, loss, ids, cfg)
            z = {"params": traj.astype(storage_dtype), "losses": loss,
                 "seconds": np.array(time.perf_counter() - t0)}
            atomic_save_npz(part, z)
        params.append(z["params"])
        losses.append(z["losses"])
        seconds += float(z["seconds"])
    params = np.concatenate(params)
    meta.update(fingerprint=tag, n_epochs=int(params.shape[1] - 1), n_params=int(params.shape[2]),
                train_seconds_total=seconds, train_seconds_per_expert=seconds / n_experts,
                trajectory_bytes=int(params.nbytes), loss_curve=np.concatenate(losses).round(6).tolist())
    if eval_set is not None:
        x_eval, y_eval = eval_set
        meta["val_uar_curve"] = validation_curve(fm, params, x_eval, y_eval, n_classes)
        meta["final_val_uar"] = [row[-1] for row in meta["val_uar_curve"]]
    atomic_save_npz(out / "trajectories.npz", {"params": params, "losses": np.concatenate(losses)})
    atomic_write_json(out / "meta.json", meta)
    for p in out.glob(f"chunk_{tag}_*.npz") if is_writer() else ():
        p.unlink()
    return Experts(params, meta)


def validation_curve(fm: FlatModel, params: np.ndarray, x_val, y_val, n_classes: int) -> list[list[float]]:
    """Validation UAR of every expert after every stored epoch, ``[E][epochs + 1]``: whether the
    experts converged (and so are teachers worth matching) is read off this curve."""
    flat = np.asarray(params, np.float32).reshape(-1, params.shape[-1])          # [E * (epochs + 1), P]
    pred = train.predict(fm, jax.numpy.asarray(flat), x_val)
    scores = [train.uar(y_val, p, n_classes) for p in pred]
    return np.asarray(scores).reshape(params.shape[0], params.shape[1]).round(4).tolist()


def _check_finite(traj: np.ndarray, losses: np.ndarray, ids: np.ndarray, cfg: train.TrainConfig) -> None:
    """Refuses to store a diverged expert: its trajectory would make every later stage meaningless."""
    bad = ~np.all(np.isfinite(traj.reshape(traj.shape[0], traj.shape[1], -1)), axis=2)     # [S, epochs + 1]
    if bad.any():
        s, e = np.argwhere(bad)[0]
        raise ExpertsDiverged(f"expert {int(ids[s])} diverged: non-finite parameters after epoch {int(e)} "
                              f"(loss {float(losses[s, max(int(e) - 1, 0)]):.3g}); lower --expert_lr (now {cfg.lr:g})")


class ExpertsDiverged(ValueError):
    """Training an expert produced NaN/Inf parameters."""


def load(out_dir: str | Path) -> Experts:
    out = Path(out_dir)
    if not (out / "meta.json").is_file() or not (out / "trajectories.npz").is_file():
        raise FileNotFoundError(f"no expert trajectories in {out}; run the experts stage first")
    advice = "re-run the experts stage with --overwrite, or delete the experts folder"
    return Experts(load_npz(out / "trajectories.npz", advice)["params"], read_json(out / "meta.json", advice))


def check_compatible(experts: Experts, spec: ModelSpec, cache_hash: str) -> None:
    """Raises :class:`ExpertsMismatch` when the experts cannot guide a distillation of ``spec`` on this cache."""
    if experts.meta["cache_hash"] != cache_hash:
        raise ExpertsMismatch(f"experts were trained on feature cache {experts.meta['cache_hash']}, "
                              f"this run uses {cache_hash}; re-run the experts stage")
    if as_json(experts.meta["model"]) != as_json(spec.to_json()):
        raise ExpertsMismatch(f"experts were trained for model {experts.meta['model']}, this run asks for "
                              f"{spec.to_json()}; re-run the experts stage")
