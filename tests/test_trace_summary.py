"""benchmarks.trace_summary: device kernels only, overlapping streams counted once, categories."""
from __future__ import annotations

import gzip
import json

import pytest

from benchmarks import trace_summary


def _write(path, events):
    path.mkdir(parents=True)
    with gzip.open(path / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def _meta(pid, tid, process, thread):
    return [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}},
            {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": thread}}]


def test_device_kernels_busy_time_and_categories(tmp_path):
    events = [*_meta(1, 7, "/device:GPU:0", "Stream #7(Compute)"), *_meta(1, 8, "/device:GPU:0", "Stream #8(Compute)"),
              *_meta(2, 3, "/host:CPU", "python"),
              {"ph": "X", "pid": 1, "tid": 7, "ts": 0.0, "dur": 60.0, "name": "sm90_xmma_fprop_implicit_gemm_bf16"},
              {"ph": "X", "pid": 1, "tid": 8, "ts": 40.0, "dur": 30.0, "name": "input_scatter_fusion_4",
               "args": {"hlo_op": "input_scatter_fusion.4"}},
              {"ph": "X", "pid": 1, "tid": 7, "ts": 90.0, "dur": 10.0, "name": "loop_add_fusion"},
              {"ph": "X", "pid": 2, "tid": 3, "ts": 0.0, "dur": 500.0, "name": "PjitFunction(outer_step)"}]
    _write(tmp_path / "run" / "plugins", events)
    s = trace_summary.summarise(tmp_path / "run")
    assert s["source"] == "device" and s["n_kernels"] == 3
    assert s["span_ms"] == pytest.approx(0.1)                  # 0 .. 100 us: the host event is not a kernel
    assert s["busy_ms"] == pytest.approx(0.08)                 # 0-70 (two streams overlap) + 90-100
    assert s["busy_%"] == pytest.approx(80.0)
    assert s["kernel_ms"] == pytest.approx(0.1)
    assert list(s["categories"]) == ["convolution", "pooling / scatter", "elementwise fusion"]
    assert s["categories"]["convolution"]["%"] == pytest.approx(60.0)
    assert s["top"][0]["kernel"].startswith("sm90_xmma") and s["top"][0]["calls"] == 1


def test_no_trace_is_one_clear_error(tmp_path, capsys):
    assert trace_summary.main(["trace_summary", str(tmp_path)]) == 1
    assert "no perfetto_trace.json.gz under" in capsys.readouterr().err
