"""Where a profiled step spends its device time: a summary of one ``jax.profiler`` trace.

    python -m benchmarks.trace_summary TRACE_DIR [--top=15]

TRACE_DIR is the folder given to ``jax.profiler.trace(..., create_perfetto_trace=True)`` (or
``benchmarks.distill_step --trace_dir``); the newest ``perfetto_trace.json.gz`` under it is read.
Device kernels are the complete events of the ``/device:*`` processes (on CPU, where there are none,
the XLA thunks of the host's XLA threads stand in). Printed: the traced span, the time some kernel
was running (busy %: the rest is the device waiting for the host or between launches), and kernel
time by category and by kernel, largest first.
"""
from __future__ import annotations

import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# first match wins; matched against the lower-cased kernel name and its HLO op
CATEGORIES = (("copy / layout", ("memcpy", "memset", "copy", "transpose", "nchwtonhwc", "nhwctonchw")),
              ("convolution", ("conv", "cudnn", "xmma", "implicit_gemm", "wgrad", "dgrad", "fprop")),
              ("matmul", ("gemm", "cublas", "cutlass", "nvjet", "matmul", "dot")),
              ("pooling / scatter", ("scatter", "reduce_window", "reduce-window")),
              ("reduction", ("reduce", "reduction")),
              ("elementwise fusion", ("fusion", "loop_", "input_", "triton")))


def category(name: str, hlo_op: str = "") -> str:
    text = f"{name} {hlo_op}".lower()
    for label, keys in CATEGORIES:
        if any(k in text for k in keys):
            return label
    return "other"


def find_trace(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {path}: trace with create_perfetto_trace=True")
    return found[-1]


def device_events(events: list[dict]) -> tuple[list[dict], str]:
    """The kernel events and where they came from ('device' or 'host XLA threads')."""
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    dev = [e for e in complete if procs.get(e["pid"], "").startswith("/device:")
           and "stream" in threads.get((e["pid"], e.get("tid")), "stream").lower()]
    if dev:
        return dev, "device"
    host = [e for e in complete if "hlo_op" in e.get("args", {}) and not e["name"].startswith("end:")]
    return host, "host XLA threads"


def busy_union(events: list[dict]) -> float:
    """Microseconds during which at least one event runs (overlapping streams counted once)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    total, start, end = 0.0, None, None
    for a, b in spans:
        if end is None or a > end:
            if end is not None:
                total += end - start
            start, end = a, b
        else:
            end = max(end, b)
    return total + (end - start if end is not None else 0.0)


def summarise(path: str | Path, top: int = 15) -> dict:
    trace = find_trace(path)
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    kernels, source = device_events(events)
    if not kernels:
        raise ValueError(f"{trace}: no kernel events")
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    kernel_total = sum(e["dur"] for e in kernels)
    by_cat, by_name, counts = defaultdict(float), defaultdict(float), defaultdict(int)
    for e in kernels:
        hlo = e.get("args", {}).get("hlo_op", "")
        by_cat[category(e["name"], hlo)] += e["dur"]
        key = re.sub(r"\.\d+$", "", e["name"])[:90]
        by_name[key] += e["dur"]
        counts[key] += 1
    pct = lambda us: round(100 * us / kernel_total, 1)
    busy = busy_union(kernels)
    return {"trace": str(trace), "source": source, "n_kernels": len(kernels), "span_ms": span / 1e3,
            "busy_ms": busy / 1e3, "busy_%": round(100 * busy / span, 1),
            "kernel_ms": kernel_total / 1e3,
            "categories": {k: {"ms": v / 1e3, "%": pct(v)} for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": k, "calls": counts[k], "ms": v / 1e3, "%": pct(v)}
                    for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]]}


def render(s: dict) -> str:
    lines = [f"trace {s['trace']} ({s['source']}): {s['n_kernels']} kernels over {s['span_ms']:.1f} ms, "
             f"busy {s['busy_ms']:.1f} ms ({s['busy_%']}%), kernel time {s['kernel_ms']:.1f} ms",
             "kernel time by category:"]
    lines += [f"  {k:20s} {v['ms']:10.1f} ms {v['%']:6.1f}%" for k, v in s["categories"].items()]
    lines.append("largest kernels:")
    lines += [f"  {r['ms']:10.1f} ms {r['%']:6.1f}% x{r['calls']:<6d} {r['kernel']}" for r in s["top"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = [a for a in argv[1:] if not a.startswith("--top=")]
    top = next((int(a.split("=", 1)[1]) for a in argv[1:] if a.startswith("--top=")), 15)
    if len(args) != 1:
        print("usage: python -m benchmarks.trace_summary TRACE_DIR [--top=N]", file=sys.stderr)
        return 2
    try:
        print(render(summarise(args[0], top)))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
