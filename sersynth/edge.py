"""An edge model: a trained sersynth model as one ONNX file, optionally quantised to int8.

    sersynth export-model --model=model.npz --out=model.onnx [--int8] [--distilled=SET] [--cache=CACHE]

The ONNX graph takes log-Mel spectrograms in dB as the feature cache computes them, ``x [B, frames,
n_mels]`` (before normalisation), applies the model's per-bin normalisation, the network and a
softmax, and returns ``probs [B, n_classes]``. Its metadata (``metadata_props["sersynth"]``, JSON)
carries the class names and feature settings, so a device (or ``sersynth predict``) needs only the
file, the feature extraction and onnxruntime: no JAX.

Conversion uses jax2onnx; int8 post-training static quantisation (per-channel int8 weights, uint8
activations, QDQ) uses onnxruntime's quantiser, calibrated on the distilled set only: the
recordings never reach the edge model, not even for calibration.

Only the export imports JAX (and jax2onnx); :class:`OnnxModel` and :func:`load` import onnxruntime
alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from sersynth.io import CorruptFile, atomic_write_bytes

ONNX_FORMAT = "sersynth.onnx_model"
INPUT, OUTPUT = "x", "probs"


class EdgeError(ValueError):
    """An edge-export request that cannot be met (missing package, no calibration set)."""


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EdgeError(f"{module} is not installed: pip install 'sersynth[edge]' (jax2onnx, onnx, onnxruntime)") \
            from None


@contextlib.contextmanager
def _quiet():
    """The converter and the quantiser log every pass at INFO (and warn about shape helpers they
    leave untyped); a user sees the one line export-model prints."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def to_onnx_bytes(m, *, batch: str = "B") -> bytes:
    """The float32 ONNX model of a :class:`sersynth.artifact.TrainedModel` (normalisation and softmax
    inside the graph, a symbolic batch axis)."""
    jax2onnx = _need("jax2onnx")
    import jax
    import jax.numpy as jnp

    from sersynth.models import ModelSpec, flat_model

    spec = ModelSpec.from_json(m.meta["model"])
    if spec.compute_dtype != "float32":
        spec = dataclasses.replace(spec, compute_dtype="float32")        # the edge model computes in float32
    fm = flat_model(spec)
    params = jnp.asarray(m.params)
    mean, std = jnp.asarray(m.mel_mean), jnp.asarray(m.mel_std)

    def forward(x):
        return jax.nn.softmax(fm.apply(params, (x - mean) / std), axis=-1)

    frames, n_mels = spec.input_shape
    with _quiet():
        proto = jax2onnx.to_onnx(forward, [(batch, frames, n_mels)], model_name=f"sersynth_{spec.name}",
                                 input_names=[INPUT], output_names=[OUTPUT])
    meta = {"format": ONNX_FORMAT, "classes": m.classes, "features": m.meta["features"], "model": spec.to_json(),
            "corpus": m.meta.get("corpus"), "cache_hash": m.meta.get("cache_hash"),
            "trained_on": m.meta.get("trained_on"), "int8": False}
    prop = proto.metadata_props.add()
    prop.key, prop.value = "sersynth", json.dumps(meta, sort_keys=True)
    return proto.SerializeToString()


def _set_meta(proto, **updates) -> None:
    for prop in proto.metadata_props:
        if prop.key == "sersynth":
            prop.value = json.dumps({**json.loads(prop.value), **updates}, sort_keys=True)


def quantize_int8(float_bytes: bytes, calib_x_db: np.ndarray) -> bytes:
    """Static int8 quantisation of a float ONNX model, calibrated on ``calib_x_db`` ``[N, frames,
    n_mels]`` (dB features: the distilled set, un-normalised)."""
    onnx = _need("onnx")
    quant = _need("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calib_x_db.shape[0] == 0:
        raise EdgeError("int8 calibration needs at least one sample")

    class Reader(quant.CalibrationDataReader):
        def __init__(self):
            self._it = iter([{INPUT: calib_x_db[i:i + 1].astype(np.float32)} for i in range(calib_x_db.shape[0])])

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory(prefix="sersynth-int8-") as tmp, _quiet():
        src, pre, dst = (Path(tmp) / n for n in ("float.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(float_bytes)
        quant_pre_process(str(src), str(pre))
        # the softmax stays float: uint8 probabilities would move in steps of 1/255
        keep_float = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Softmax"]
        quant.quantize_static(str(pre), str(dst), Reader(), quant_format=quant.QuantFormat.QDQ, per_channel=True,
                              weight_type=quant.QuantType.QInt8, activation_type=quant.QuantType.QUInt8,
                              nodes_to_exclude=keep_float)
        proto = onnx.load(str(dst))
    _set_meta(proto, int8=True, calibration={"samples": int(calib_x_db.shape[0]), "source": "distilled set"})
    return proto.SerializeToString()


def export(m, out: str | Path, *, int8: bool = False, calib_x_db: np.ndarray | None = None) -> Path:
    """Writes the edge model of ``m`` to ``out`` (atomically): float32, or int8 calibrated on
    ``calib_x_db``."""
    data = to_onnx_bytes(m)
    if int8:
        if calib_x_db is None:
            raise EdgeError("--int8 needs a calibration set: --distilled=SET")
        data = quantize_int8(data, calib_x_db)
    return atomic_write_bytes(out, data)


@dataclasses.dataclass
class OnnxModel:
    """An exported edge model run by onnxruntime (no JAX)."""
    session: object
    meta: dict
    path: str

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def probs(self, x_db: np.ndarray, batch: int = 64) -> np.ndarray:
        """``[N, C]`` class probabilities of dB features ``x_db [N, frames, n_mels]``."""
        out = [self.session.run([OUTPUT], {INPUT: x_db[i:i + batch].astype(np.float32)})[0]
               for i in range(0, x_db.shape[0], max(1, batch))]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)


def load(path: str | Path, threads: int = 0) -> OnnxModel:
    """An edge model written by :func:`export`, ready to run (``threads`` 0: onnxruntime's choice)."""
    ort = _need("onnxruntime")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--model {path} does not exist")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
        raise CorruptFile(f"{path} is not a readable ONNX model ({str(e).splitlines()[0][:160]})") from None
    raw = session.get_modelmeta().custom_metadata_map.get("sersynth")
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise CorruptFile(f"{path} is an ONNX model without sersynth metadata; export it with sersynth export-model")
    return OnnxModel(session, meta, str(p))
