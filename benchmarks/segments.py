"""Can a student's plain SGD steps cover the experts' segments at all? The geometry of a run's expert
trajectories, read before distilling (or to explain a matching loss that stays near 1).

    python -m benchmarks.segments --experts=W/experts --cache=W/cache [--expert_epochs=2] [--steps=10]

For segments from epoch s to s + expert_epochs of each expert (``--starts``), printed:

* ``|d|``: the length of the segment's displacement d = theta(s + M) - theta(s);
* ``cos g``: the cosine between d and the descent direction -g of the whole training split at the
  segment's start (1: the segment is a gradient step; near 0: it is mostly minibatch noise,
  augmentation or the optimiser's preconditioning);
* ``cos Pg``: the same for -g preconditioned per parameter by 1 / RMS of 20 real minibatch gradients
  (roughly what Adam's second moments do);
* ``GD best``: the matching loss (MTT's normalised distance) of ``--steps`` full-batch gradient steps
  on the whole training split at the best lr of ``--lrs``: what the real data itself reaches under the
  inner loop's own optimiser;
* the parameter tensors holding most of ``|d|^2`` (``--top``), each with its share and its cosine.
"""
from __future__ import annotations

import numpy as np
from absl import app, flags

from benchmarks.common import print_header, table, write_json

flags.DEFINE_string("experts", None, "a run's experts folder (trajectories.npz, meta.json)")
flags.DEFINE_string("cache", None, "the feature cache the experts were trained on")
flags.DEFINE_integer("expert_epochs", 2, "segment length in expert epochs")
flags.DEFINE_list("starts", ["0:1", "0:3", "1:6", "1:9"], "segments as expert:start_epoch")
flags.DEFINE_integer("steps", 10, "full-batch gradient steps of the GD reference")
flags.DEFINE_list("lrs", ["0.003", "0.01", "0.03", "0.1", "0.3"], "lrs of the GD reference")
flags.DEFINE_integer("top", 3, "tensors listed per segment")
flags.DEFINE_string("json", "", "write results here")
F = flags.FLAGS


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from sersynth import experts as experts_lib
    from sersynth import train
    from sersynth.data import cache as cache_lib
    from sersynth.distill import loss_grad
    from sersynth.models import ModelSpec, flat_model

    env = print_header("segments")
    fs, ex = cache_lib.load(F.cache), experts_lib.load(F.experts)
    fm = flat_model(ModelSpec.from_json(ex.meta["model"]))
    experts_lib.check_compatible(ex, fm.spec, fs.hash)
    x, y = fs.subset("train")
    t = train.one_hot(y, fs.n_classes)
    grad = jax.jit(loss_grad(fm))
    rng = np.random.default_rng(0)
    batch = ex.meta["train"]["batch_size"]
    print(f"{fm.spec.name}: {fm.n_params} parameters, experts {ex.meta['train']['optimizer']} at lr "
          f"{ex.meta['train']['lr']}, batch {batch}, {ex.n_epochs} epochs; {x.shape[0]} training clips")

    def cos(a, b):
        return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))

    def gd_loss(start, target, lr):
        th = start
        for _ in range(F.steps):
            th = th - lr * grad(th, x, t)
        return float(jnp.sum((th - target) ** 2) / jnp.sum((start - target) ** 2))

    rows = []
    for spec in F.starts:
        e, s = (int(v) for v in spec.split(":"))
        if e >= ex.params.shape[0] or s + F.expert_epochs > ex.n_epochs:
            raise app.UsageError(f"--starts: {spec} is outside {ex.params.shape[0]} experts x {ex.n_epochs} epochs")
        start = jnp.asarray(ex.params[e, s], jnp.float32)
        target = jnp.asarray(ex.params[e, s + F.expert_epochs], jnp.float32)
        d, g = target - start, grad(start, x, t)
        minibatch = jnp.stack([grad(start, x[i], t[i]) for i in
                               (rng.permutation(x.shape[0])[:batch] for _ in range(20))])
        precond = 1.0 / (jnp.sqrt(jnp.mean(minibatch ** 2, axis=0)) + 1e-8)
        losses = {lr: gd_loss(start, target, float(lr)) for lr in F.lrs}
        best = min(losses, key=lambda k: losses[k] if np.isfinite(losses[k]) else np.inf)
        # the displacement and the gradient tensor by tensor (one tree structure, so the same leaf order)
        tensors = [("/".join(str(k.key) for k in path), float(jnp.sum(part ** 2)), cos(-gpart.ravel(), part.ravel()))
                   for (path, part), gpart in zip(jax.tree_util.tree_leaves_with_path(fm.unravel(d)),
                                                  jax.tree.leaves(fm.unravel(g)))]
        total = sum(sq for _, sq, _ in tensors)
        tensors.sort(key=lambda r: -r[1])
        rows.append({"segment": f"expert {e}, epoch {s}->{s + F.expert_epochs}", "|d|": float(jnp.linalg.norm(d)),
                     "cos g": cos(-g, d), "cos Pg": cos(-precond * g, d), "GD best": losses[best], "at lr": best,
                     "largest shares": "; ".join(f"{n} {sq / total:.2f} (cos {c:+.2f})"
                                                 for n, sq, c in tensors[:F.top])})
    print(table(rows, ["segment", "|d|", "cos g", "cos Pg", "GD best", "at lr", "largest shares"]))
    write_json(F.json, {"env": env, "experts": F.experts, "expert_epochs": F.expert_epochs, "steps": F.steps,
                        "rows": rows})


if __name__ == "__main__":
    flags.mark_flags_as_required(["experts", "cache"])
    app.run(main)
