"""XLA's persistent compilation cache, shared by every ``sersynth`` command that compiles: a program
compiled once (by a run, an earlier run, a table cell, ``sersynth train``) is loaded from disk
instead of compiled again."""
from __future__ import annotations

import os

from absl import flags, logging

HELP = ("folder of XLA's persistent compilation cache, so programs compiled once (by this command, an earlier "
        "one, another table cell) are loaded instead of compiled again; auto: $JAX_COMPILATION_CACHE_DIR, else "
        "$XDG_CACHE_HOME/sersynth/xla (~/.cache/sersynth/xla); none: off")


def define_flag() -> None:
    flags.DEFINE_string("compile_cache", "auto", HELP)
    flags.DEFINE_integer("compile_cache_max_mb", 4096, "at the start of the command, the oldest programs (by last "
                         "use as the file system records it) are deleted until the compilation cache holds at most "
                         "this many MB; 0: unbounded", lower_bound=0)


def apply_flags() -> str | None:
    """:func:`use` with ``--compile_cache`` and ``--compile_cache_max_mb``."""
    F = flags.FLAGS
    return use(F.compile_cache, F.compile_cache_max_mb)


def folder(setting: str, environ: dict | None = None) -> str | None:
    """The folder ``--compile_cache=setting`` names (None: off)."""
    environ = os.environ if environ is None else environ
    if setting == "none":
        return None
    if setting != "auto":
        return setting
    return environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sersynth", "xla")


def prune(path: str, max_bytes: int) -> tuple[int, int]:
    """Deletes the least recently used files of the flat folder ``path`` (last use: the later of a
    file's access and modification times) until the rest hold at most ``max_bytes``; returns the
    files and bytes deleted. jax's own bound (``JAX_COMPILATION_CACHE_MAX_SIZE``) is not used: it
    needs an access-time file beside each program and fails to store any program once the folder
    holds one written without it. A file another process deletes first, or is still reading, is
    harmless: a program missing from the cache is compiled again."""
    entries = []
    try:
        with os.scandir(path) as it:
            for e in it:
                try:
                    if e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        entries.append((max(st.st_atime, st.st_mtime), st.st_size, e.path))
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return 0, 0
    total = sum(size for _, size, _ in entries)
    removed = freed = 0
    for _, size, file in sorted(entries):
        if total <= max_bytes:
            break
        try:
            os.remove(file)
            removed, freed = removed + 1, freed + size
        except FileNotFoundError:
            pass
        total -= size
    return removed, freed


def use(setting: str, max_mb: int = 0) -> str | None:
    """Points XLA's persistent compilation cache at :func:`folder` (programs compiled in under 0.3 s
    are not stored) and returns the folder; with ``max_mb`` > 0 it first shrinks the folder to that
    size with :func:`prune`. Deleting programs only costs compile time."""
    import jax

    path = folder(setting)
    if path is not None and max_mb > 0:
        removed, freed = prune(path, max_mb * 2**20)
        if removed:
            logging.info("compile cache %s: deleted the %d least recently used programs (%.0f MB) to stay under "
                         "--compile_cache_max_mb=%d", path, removed, freed / 2**20, max_mb)
    jax.config.update("jax_enable_compilation_cache", path is not None)
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
    return path
