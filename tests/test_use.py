"""Using a distilled set away from its run, through the installed ``sersynth`` command: a
self-describing distilled.npz, export, train on it alone, predict recordings; one feature extraction
for the cache and for predict."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sersynth import artifact, use
from sersynth.io import CorruptFile, atomic_save_npz, load_npz

SERSYNTH = Path(sys.executable).parent / "sersynth"     # the console script `pip install -e .` made


def sersynth(*args, cwd=None) -> subprocess.CompletedProcess:
    assert SERSYNTH.is_file(), "sersynth is not installed: pip install -e ."
    return subprocess.run([str(SERSYNTH), *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def distilled(finished_run):
    return finished_run[0] / "distill" / "distilled.npz"


def test_distilled_set_describes_itself(finished_run, distilled):
    ds = artifact.load_set(distilled)
    manifest = json.loads((finished_run[0] / "cache" / "manifest.json").read_text())
    assert ds.classes == manifest["classes"] == ["anger", "sadness", "happiness"]
    f = ds.meta["features"]
    assert (f["sample_rate"], f["n_fft"], f["hop_length"], f["n_mels"], f["clip_seconds"]) == (16000, 512, 256, 16, 0.5)
    assert f["n_samples"] == 8000 and f["frames"] == ds.x.shape[1] == 32
    assert ds.meta["cache_hash"] == manifest["hash"] and ds.meta["corpus"] == "embedded"
    assert ds.meta["format"] == artifact.SET_FORMAT and ds.meta["sersynth_version"]
    assert ds.mel_mean.shape == ds.mel_std.shape == (16,) and (ds.mel_std > 0).all()
    report = json.loads((finished_run[0] / "report.json").read_text())
    assert ds.lr == pytest.approx(report["summary"]["learned_lr"]) and ds.targets.shape == (6, 3)
    assert ds.meta["train"]["epochs"] == 5 and ds.meta["model"]["name"] == "convnet"
    # what `train` will use: the lr the evaluation chose for new models trained on the set
    chosen = report["results"]["distilled_random_init"]["extra"]["lr"]
    assert ds.meta["lr_for_training"] == chosen and ds.meta["lr_for_training_by_model"] == {"convnet": chosen}


def _rewrite(src: Path, dst: Path, **changes) -> Path:
    arrays = load_npz(src)
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    return atomic_save_npz(dst, arrays)


@pytest.mark.parametrize("change,message", [
    ({"meta_json": None}, "has no sersynth metadata"),
    ({"targets": np.zeros((6, 4), np.float32)}, "do not agree with 3 classes"),
    ({"x": np.zeros((6, 31, 16), np.float32)}, "the metadata says (32, 16)"),
    ({"mel_std": np.ones(8, np.float32)}, "mel_std has shape (8,)"),
    ({"meta_json": np.array(json.dumps({"format": artifact.MODEL_FORMAT}))}, "not a sersynth.distilled_set file"),
])
def test_loading_checks_the_set(distilled, tmp_path, change, message):
    bad = _rewrite(distilled, tmp_path / "bad.npz", **change)
    with pytest.raises(CorruptFile, match=None) as e:
        artifact.load_set(bad)
    assert message in str(e.value) and str(bad) in str(e.value)


def test_export_npz_and_npy(distilled, tmp_path):
    proc = sersynth("export", f"--distilled={distilled}", f"--out={tmp_path / 'set.npz'}")
    assert proc.returncode == 0, proc.stderr
    a, b = load_npz(distilled), load_npz(tmp_path / "set.npz")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    proc = sersynth("export", f"--distilled={distilled}", "--format=npy", f"--out={tmp_path / 'npy'}")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "x.npy"), a["x"])
    meta = json.loads((tmp_path / "npy" / "meta.json").read_text())
    assert meta["classes"] == ["anger", "sadness", "happiness"] and meta["lr"] == pytest.approx(float(a["lr"]))
    proc = sersynth("export", f"--distilled={tmp_path / 'nope.npz'}", f"--out={tmp_path / 'x.npz'}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error:")


def _wavs(finished_run) -> list[str]:
    manifest = json.loads((finished_run[0] / "cache" / "manifest.json").read_text())
    root = Path(manifest["root"])
    return [str(root / f["path"]) for f in manifest["files"]]


def test_predict_features_equal_the_cache(finished_run):
    """predict extracts features with the cache's own function: a training clip's row is reproduced."""
    from sersynth.data import cache as cache_lib

    fs = cache_lib.load(finished_run[0] / "cache")
    ds = artifact.load_set(finished_run[0] / "distill" / "distilled.npz")
    paths = _wavs(finished_run)[:5]
    x, ok, failed = use.features_of(ds.meta["features"], paths)
    assert ok == paths and not failed
    np.testing.assert_allclose((x - fs.mel_mean) / fs.mel_std, fs.x[:5], rtol=1e-5, atol=1e-5)


def test_train_then_predict_through_the_command(finished_run, distilled, tmp_path):
    model = tmp_path / "model.npz"
    stale = tmp_path / "xla" / "jit_stale-0123-cache"         # a 2 MB program last used a day ago
    stale.parent.mkdir()
    stale.write_bytes(b"\0" * 2**21)
    os.utime(stale, (time.time() - 86_400,) * 2)
    proc = sersynth("train", f"--distilled={distilled}", f"--out={model}", "--epochs=20",
                    f"--cache={finished_run[0] / 'cache'}", f"--compile_cache={tmp_path / 'xla'}",
                    "--compile_cache_max_mb=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(p.name.startswith("jit_") for p in (tmp_path / "xla").iterdir())    # programs stored there
    assert not stale.exists()                                   # the cache was pruned to 1 MB first
    assert "trained convnet" in proc.stdout and "UAR on the cache: val" in proc.stdout
    m = artifact.load_model(model)
    assert m.classes == ["anger", "sadness", "happiness"] and m.meta["epochs"] == 20
    report = json.loads((finished_run[0] / "report.json").read_text())
    chosen = report["results"]["distilled_random_init"]["extra"]["lr"]
    assert m.meta["trained_on"]["n_samples"] == 6 and m.meta["lr"] == pytest.approx(chosen)
    wavs = _wavs(finished_run)[:3]
    (tmp_path / "empty.wav").write_bytes(b"")
    sf.write(tmp_path / "short.wav", np.zeros(100, np.float32) + 0.1, 16000)
    bad = [str(tmp_path / "empty.wav"), str(tmp_path / "short.wav"), str(tmp_path / "missing.wav")]
    with open(tmp_path / "files.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path"], [os.path.relpath(wavs[2], tmp_path)]])
    proc = sersynth("predict", f"--model={model}", wavs[0], wavs[1], *bad, f"--list={tmp_path / 'files.csv'}",
                    f"--out={tmp_path / 'preds.csv'}")
    assert proc.returncode == 1
    errors = proc.stderr.strip().splitlines()
    assert [line.split(": ")[1] for line in errors[-3:]] == bad
    assert "too short" in errors[-2] and "no such file" in errors[-1]
    with open(tmp_path / "preds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == [Path(w).name for w in wavs]
    assert all(r["emotion"] in m.classes and sum(float(r[c]) for c in m.classes) == pytest.approx(1, abs=1e-3)
               for r in rows)
    assert Path(wavs[0]).name in proc.stdout and "emotion" in proc.stdout.splitlines()[0]
    # the command's labels are the model's labels on the cache's rows of the same files
    from sersynth.data import cache as cache_lib

    fs = cache_lib.load(finished_run[0] / "cache")
    labels = [m.classes[i] for i in use.predict_probs(m, fs.x[:3] * fs.mel_std + fs.mel_mean).argmax(axis=1)]
    assert [r["emotion"] for r in rows] == labels


def test_train_another_family_and_refusals(distilled, tmp_path):
    ds = artifact.load_set(distilled)
    spec = use.model_spec(ds, "cnn6", width_mult=0.125)
    m, info = use.train_model(ds, spec, epochs=2, lr=0.01)
    assert m.meta["model"]["name"] == "cnn6" and info["epochs"] == 2 and np.isfinite(info["final_loss"])
    artifact.save_model(tmp_path / "m.npz", m)
    assert artifact.load_model(tmp_path / "m.npz").meta["model"]["width_mult"] == 0.125
    bad = dataclasses.replace(m, params=m.params[:-1])
    artifact.save_model(tmp_path / "bad.npz", bad)
    with pytest.raises(CorruptFile, match="parameters, a cnn6 of this shape has"):
        artifact.load_model(tmp_path / "bad.npz")
    proc = sersynth("train", f"--distilled={distilled}", f"--out={tmp_path / 'm.onnx'}")
    assert proc.returncode == 2 and "written as .npz" in proc.stderr
    proc = sersynth("predict", f"--model={distilled}", "a.wav")
    assert proc.returncode == 2 and "not a sersynth.model file" in proc.stderr.strip().splitlines()[-1]


def test_the_command_lists_its_commands_and_main_flags():
    proc = sersynth()
    assert proc.returncode == 2 and all(c in proc.stdout for c in ("prepare", "run", "export", "train", "predict",
                                                                   "export-model"))
    proc = sersynth("run", "--help")
    assert proc.returncode == 0
    assert [f for f in ("--corpus:", "--corpus_dir:", "--workdir:", "--protocol:", "--model:", "--ipc:")
            if f not in proc.stdout] == []
    assert "--lr_lr" not in proc.stdout             # the rest: --helpfull
    proc = sersynth("nope")
    assert proc.returncode == 2 and "unknown command 'nope'" in proc.stderr
