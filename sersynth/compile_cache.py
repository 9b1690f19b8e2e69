"""XLA's persistent compilation cache, shared by every ``sersynth`` command that compiles: a program
compiled once (by a run, an earlier run, a table cell, ``sersynth train``) is loaded from disk
instead of compiled again."""
from __future__ import annotations

import os

from absl import flags

HELP = ("folder of XLA's persistent compilation cache, so programs compiled once (by this command, an earlier "
        "one, another table cell) are loaded instead of compiled again; auto: $JAX_COMPILATION_CACHE_DIR, else "
        "$XDG_CACHE_HOME/sersynth/xla (~/.cache/sersynth/xla); none: off")


def define_flag() -> None:
    flags.DEFINE_string("compile_cache", "auto", HELP)


def folder(setting: str, environ: dict | None = None) -> str | None:
    """The folder ``--compile_cache=setting`` names (None: off)."""
    environ = os.environ if environ is None else environ
    if setting == "none":
        return None
    if setting != "auto":
        return setting
    return environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sersynth", "xla")


def use(setting: str) -> str | None:
    """Points XLA's persistent compilation cache at :func:`folder` (programs compiled in under 0.3 s
    are not stored) and returns the folder. The folder is not bounded: deleting it only costs
    compile time."""
    import jax

    path = folder(setting)
    jax.config.update("jax_enable_compilation_cache", path is not None)
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
    return path
