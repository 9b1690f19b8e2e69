"""Evaluation throughput: several seeds trained on a distilled-size set (vmap vs loop, scan vs host).

    python -m benchmarks.evaluate                    # 5 seeds on 35 samples (quick-start ipc 5 x 7 classes)

Same measurement as benchmarks.experts (both go through sersynth.train.fit) with evaluation-sized
defaults: the whole synthetic set as one batch, one step per epoch. model_epochs_per_s is then
seed-steps per second.
"""
from __future__ import annotations

from absl import app, flags

from benchmarks import experts

F = flags.FLAGS

if __name__ == "__main__":
    F.set_default("n", 35)
    F.set_default("batch_size", 35)
    F.set_default("n_models", 5)
    F.set_default("epochs", 50)
    app.run(experts.main)
