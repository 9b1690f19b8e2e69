"""Shared tiny fixtures: an embedded corpus and its feature cache, built once per session."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# One XLA compilation cache for the session (this process and every command a test starts): programs
# compiled by one test are loaded by the next instead of compiled again. Set before JAX is imported.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sersynth-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

from sersynth.data import features, prepare, synth_corpus  # noqa: E402

TINY_CORPUS = synth_corpus.CorpusConfig(n_speakers=6, utterances=3, emotions=("anger", "sadness", "happiness"),
                                        min_syllables=2, max_syllables=3)
TINY_FEATURES = features.FeatureConfig(n_fft=512, hop_length=256, n_mels=16, clip_seconds=0.5)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    return synth_corpus.generate(tmp_path_factory.mktemp("corpus"), TINY_CORPUS, progress=False, workers=1)


@pytest.fixture(scope="session")
def tiny_cache(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    cfg = prepare.PrepareConfig(corpus="embedded", emotions=TINY_CORPUS.emotions, features=TINY_FEATURES, workers=1)
    return prepare.prepare(tiny_corpus, out, cfg, progress=False), out, cfg


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One tiny run of the whole pipeline through the runner command, shared by the tests that read it."""
    from tests.test_runner import TINY_FLAGS, run_cli

    workdir = tmp_path_factory.mktemp("run")
    proc = run_cli(f"--workdir={workdir}", *TINY_FLAGS)
    return workdir, proc
