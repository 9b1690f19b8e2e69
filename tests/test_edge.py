"""The edge model: ``sersynth export-model`` (ONNX float32 and int8) and ``sersynth predict`` on an
``.onnx`` file with onnxruntime alone, through the installed command."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sersynth import artifact, edge, use
from tests.test_use import _wavs, sersynth

pytest.importorskip("onnxruntime", reason="the edge extra: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def trained(finished_run, tmp_path_factory):
    """A model trained on the tiny run's distilled set, saved as the command writes it."""
    distilled = finished_run[0] / "distill" / "distilled.npz"
    ds = artifact.load_set(distilled)
    m, _ = use.train_model(ds, use.model_spec(ds), epochs=10, seed=1, source=str(distilled))
    path = tmp_path_factory.mktemp("edge") / "model.npz"
    artifact.save_model(path, m)
    return path, m


def test_float_edge_model_gives_the_jax_models_labels(finished_run, trained, tmp_path):
    path, m = trained
    cache = finished_run[0] / "cache"
    proc = sersynth("export-model", f"--model={path}", f"--out={tmp_path / 'm.onnx'}", f"--cache={cache}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "float32" in proc.stdout and "labels agree on 100.0%" in proc.stdout
    om = edge.load(tmp_path / "m.onnx")
    assert om.classes == m.classes and om.meta["features"] == m.meta["features"] and om.meta["int8"] is False
    x_db, y = use.cache_test_split(m, str(cache))
    np.testing.assert_allclose(om.probs(x_db), use.predict_probs(m, x_db), atol=1e-4)
    assert use.edge_agreement(m, om, x_db, y)["label_agreement"] == 1.0


def test_int8_edge_model_is_calibrated_on_the_distilled_set(finished_run, trained, tmp_path):
    path, m = trained
    out = tmp_path / "m8.onnx"
    proc = sersynth("export-model", f"--model={path}", f"--out={out}", "--int8", f"--cache={finished_run[0] / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "int8 (calibrated on 6 distilled samples)" in proc.stdout and "labels agree on" in proc.stdout
    om = edge.load(out)
    assert om.meta["int8"] is True and om.meta["calibration"] == {"samples": 6, "source": "distilled set"}
    import onnx

    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x_db, y = use.cache_test_split(m, str(finished_run[0] / "cache"))
    p = om.probs(x_db)
    assert p.shape == (y.size, 3) and np.allclose(p.sum(1), 1, atol=1e-3)


def test_predict_runs_an_edge_model_without_jax(finished_run, trained, tmp_path):
    path, m = trained
    onnx_path = tmp_path / "m.onnx"
    edge.export(m, onnx_path)
    wavs = _wavs(finished_run)[:4]
    (tmp_path / "empty.wav").write_bytes(b"")
    # jax, flax and optax made unimportable: the .onnx path of predict must not need them
    code = ("import sys\nfor name in ('jax', 'jaxlib', 'flax', 'optax', 'jax2onnx'):\n    sys.modules[name] = None\n"
            "from sersynth.cli import main\nmain(sys.argv)")
    proc = subprocess.run([sys.executable, "-c", code, "predict", f"--model={onnx_path}", *wavs,
                           str(tmp_path / "empty.wav"), f"--out={tmp_path / 'p.json'}"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'empty.wav'}")
    rows = json.loads((tmp_path / "p.json").read_text())
    x_db, ok, _ = use.features_of(m.meta["features"], wavs)
    assert [r["path"] for r in rows] == ok == wavs
    assert [r["emotion"] for r in rows] == [m.classes[i] for i in use.predict_probs(m, x_db).argmax(1)]


def test_export_model_refusals(trained, tmp_path):
    path, m = trained
    proc = sersynth("export-model", f"--model={path}", f"--out={tmp_path / 'm.npz'}")
    assert proc.returncode == 2 and "written as .onnx" in proc.stderr
    bare = artifact.TrainedModel(m.params, m.mel_mean, m.mel_std, {**m.meta, "trained_on": None})
    artifact.save_model(tmp_path / "bare.npz", bare)
    proc = sersynth("export-model", f"--model={tmp_path / 'bare.npz'}", f"--out={tmp_path / 'b.onnx'}", "--int8")
    assert proc.returncode == 2 and "name one with --distilled" in proc.stderr
    assert not (tmp_path / "b.onnx").exists()
    import onnx

    proto = onnx.load_from_string(edge.to_onnx_bytes(m))
    del proto.metadata_props[:]
    (tmp_path / "plain.onnx").write_bytes(proto.SerializeToString())
    proc = sersynth("predict", f"--model={tmp_path / 'plain.onnx'}", "a.wav")
    assert proc.returncode == 2 and "without sersynth metadata" in proc.stderr.strip().splitlines()[-1]
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    proc = sersynth("predict", f"--model={tmp_path / 'junk.onnx'}", "a.wav")
    assert proc.returncode == 2 and "not a readable ONNX model" in proc.stderr.strip().splitlines()[-1]


def test_predict_names_a_missing_onnxruntime(trained, tmp_path):
    _, m = trained
    edge.export(m, tmp_path / "m.onnx")
    code = "import sys\nsys.modules['onnxruntime'] = None\nfrom sersynth.cli import main\nmain(sys.argv)"
    proc = subprocess.run([sys.executable, "-c", code, "predict", f"--model={tmp_path / 'm.onnx'}", "a.wav"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: onnxruntime is not installed: pip install "
                                                    "'sersynth[edge]' (jax2onnx, onnx, onnxruntime)")
