"""``sersynth``: one command for every step, each an absl program with its own flags.

    sersynth prepare --corpus=ravdess --root=DIR --out=CACHE     build a feature cache
    sersynth run --flagfile=FLAGS --workdir=W                    experts, distillation, evaluation, report
    sersynth table --flagfile=FLAGS --workdir=W                  the paper's tables: guides x ipc x models
    sersynth export --distilled=W/distill/distilled.npz --out=F  the distilled set, standing alone
    sersynth train --distilled=W/distill/distilled.npz --out=M   a model trained on the distilled set only
    sersynth export-model --model=M --out=M.onnx [--int8]        an edge model (ONNX, optionally int8)
    sersynth predict --model=M a.wav b.wav                       emotion of each recording (M: .npz or .onnx)

``sersynth COMMAND --help`` lists the flags a user needs first; ``--helpfull`` every flag.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prepare": ("sersynth.data.prepare", "build (or reuse) the feature cache of a corpus folder"),
    "run": ("sersynth.runner", "run the pipeline: prepare, experts, distill, evaluate (resumable)"),
    "table": ("sersynth.table", "guiding models x ipc x evaluation models, every method: table.csv, table.md, plots"),
    "export": ("sersynth.use", "write a run's distilled set as a self-describing .npz or a folder of .npy"),
    "train": ("sersynth.use", "train a model on a distilled set alone (no recordings, no cache)"),
    "export-model": ("sersynth.use", "write a trained model as an ONNX edge model (float32 or int8)"),
    "predict": ("sersynth.use", "predict the emotion of recordings with a trained or edge model"),
}


def usage() -> str:
    lines = [__doc__.strip().splitlines()[0], "", "usage: sersynth COMMAND [--flags]", "", "commands:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "sersynth COMMAND --help: the main flags; --helpfull: all of them"]
    return "\n".join(lines)


def short_help(argv: list[str], names: tuple[str, ...], doc: str | None) -> None:
    """With ``--help`` / ``-h`` in ``argv``: prints the command's summary and the flags ``names``
    (a user's first needs) with their help and defaults, then exits 0. Otherwise returns."""
    if not any(a in ("--help", "-h", "-?") for a in argv[1:]):
        return
    from absl import flags

    F = flags.FLAGS
    out = [(doc or "").strip(), "", "main flags (all of them: --helpfull):"]
    for name in names:
        if name in F:
            f = F[name]
            default = "" if f.default in (None, "", []) else f" (default: {f.default_as_str})"
            out.append(f"  --{name}: {f.help}{default}")
    print("\n".join(out))
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    module.cli([f"sersynth {name}", *argv[2:]], **({"command": name} if module.__name__ == "sersynth.use" else {}))


if __name__ == "__main__":
    main()
