"""A straightforward PyTorch MTT outer step beside sersynth's, same model, shapes and loss.

    python -m benchmarks.reference_torch                     # quick-start shapes on CPU
    python -m benchmarks.reference_torch --frames=373 --n_mels=64 --width=128 --ipc=10 --syn_steps=20

The PyTorch side follows the official MTT recipe: the student's parameters as one flat tensor,
each inner step a forward pass with ``torch.func.functional_call``, ``torch.autograd.grad(...,
create_graph=True)`` and an SGD update with the learnable lr, then the normalised parameter distance
back-propagated to the synthetic spectrograms and the lr. Skips cleanly when torch is not installed.
"""
from __future__ import annotations

import importlib.util
import statistics
import time

import jax
from absl import app, flags

from benchmarks import distill_step
from benchmarks.common import print_header, table, write_json
from sersynth import distill
from sersynth.models import ModelSpec, flat_model

F = flags.FLAGS
flags.DEFINE_string("torch_device", "auto", "cpu, cuda or auto")


def torch_outer_step_time(n_classes, ipc, frames, n_mels, width, depth, syn_steps, repeats):
    import torch
    from torch import nn

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if F.torch_device == "auto" else F.torch_device
    layers, c, h, w = [], 1, frames, n_mels
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True), nn.ReLU(),
                   nn.AvgPool2d(2, 2, ceil_mode=True)]
        c, h, w = width, -(-h // 2), -(-w // 2)
    net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * h * w, n_classes)).to(dev)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def forward(flat, x):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return torch.func.functional_call(net, params, (x,))

    x_syn = torch.randn(n_classes * ipc, 1, frames, n_mels, device=dev, requires_grad=True)
    y_syn = torch.arange(n_classes, device=dev).repeat_interleave(ipc)
    lr = torch.tensor(0.01, device=dev, requires_grad=True)
    start = flat0.clone()
    target = flat0 + 0.05 * torch.randn_like(flat0)
    opt = torch.optim.SGD([x_syn], lr=100.0, momentum=0.5)
    opt_lr = torch.optim.SGD([lr], lr=1e-3, momentum=0.5)

    def outer():
        student = [start.clone().requires_grad_(True)]
        for _ in range(syn_steps):
            ce = nn.functional.cross_entropy(forward(student[-1], x_syn), y_syn)
            g = torch.autograd.grad(ce, student[-1], create_graph=True)[0]
            student.append(student[-1] - lr * g)
        loss = ((student[-1] - target) ** 2).sum() / ((start - target) ** 2).sum()
        opt.zero_grad(), opt_lr.zero_grad()
        loss.backward()
        opt.step(), opt_lr.step()
        if dev == "cuda":
            torch.cuda.synchronize()

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    outer()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outer()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
    return {"impl": f"torch {torch.__version__} ({dev})", "first_s": first, "step_s": statistics.median(times),
            "peak_device_MB": peak, "n_params": int(flat0.numel())}


def main(argv):
    del argv
    env = print_header("reference_torch")
    if importlib.util.find_spec("torch") is None:
        print("torch is not installed: nothing to compare (pip install torch to run this benchmark)")
        return
    spec = ModelSpec(name="convnet", n_classes=F.classes, input_shape=(F.frames, F.n_mels), width=F.width,
                     depth=F.depth)
    fm = flat_model(spec)
    rows = []
    for steps in map(int, F.syn_steps):
        ref = torch_outer_step_time(F.classes, F.ipc, F.frames, F.n_mels, F.width, F.depth, steps, F.repeats)
        rows.append({"syn_steps": steps, **ref})
        for remat in F.remat:
            cfg = distill.DistillConfig(ipc=F.ipc, syn_steps=steps, expert_epochs=2, max_start_epoch=2, remat=remat,
                                        unroll=int(F.unroll[0]))
            r = distill_step.measure(fm, cfg, F.classes, F.repeats)
            rows.append({"syn_steps": steps, "impl": f"sersynth jax {jax.__version__} remat={remat} "
                         f"unroll={r['unroll']}", "first_s": r["first_s"], "step_s": r["step_s"],
                         "peak_device_MB": r["peak_device_MB"], "n_params": r["n_params"],
                         "speedup_vs_torch": ref["step_s"] / r["step_s"]})
        print(table(rows[-1 - len(F.remat):], list(rows[-1])), flush=True)
    print(f"convnet width {F.width} depth {F.depth}, input [{F.frames}, {F.n_mels}], {F.classes} classes x ipc {F.ipc}, "
          "whole synthetic set per inner step")
    print(table(rows, ["syn_steps", "impl", "n_params", "first_s", "step_s", "peak_device_MB", "speedup_vs_torch"]))
    write_json(F.json, {"env": env, "rows": rows})


if __name__ == "__main__":
    F.set_default("remat", ["none", "nested"])
    app.run(main)
