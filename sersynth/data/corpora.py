"""Corpus registry: how to find a corpus's audio files and read label and speaker from each.

Each entry turns a folder, exactly as the corpus ships, into a list of :class:`Item` plus a list of
files it had to skip (with the reason). Labels are mapped to a canonical emotion vocabulary.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

from sersynth.data.synth_corpus import DEMOS_CODES


@dataclasses.dataclass(frozen=True)
class Item:
    path: str          # relative to the corpus root, '/'-separated
    label: str         # canonical emotion name
    speaker: str
    gender: str = ""


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    scan: Callable[[Path], tuple[list[Item], list[dict]]]
    default_emotions: tuple[str, ...]


class CorpusError(ValueError):
    """The folder is not the named corpus, or a file name breaks its scheme."""


# DEMoS (Parada-Cabaleiro et al., 2020), file name legend of the corpus distribution:
#   DEMOS/{PR|NP}_<gender f|m>_<speaker id>_<emotion code><take>.wav, neutral clips under NEU/.
# PR = prototypical (selected) samples, NP = non-prototypical. Emotion codes: col guilt, dis
# disgust, gio happiness, pau fear, rab anger, sor surprise, tri sadness, neu neutral.
_DEMOS_NAME = re.compile(r"^(?P<tag>PR|NP)_(?P<g>[fm])_(?P<spk>\d+)_(?P<emo>[a-z]{3})[^/]*\.wav$", re.IGNORECASE)
_DEMOS_EMOTION = {code: name for name, code in DEMOS_CODES.items()}


def _scan_demos(root: Path) -> tuple[list[Item], list[dict]]:
    wavs = sorted(p for sub in ("DEMOS", "NEU") if (root / sub).is_dir() for p in (root / sub).rglob("*")
                  if p.is_file() and p.suffix.lower() == ".wav")
    if not wavs:
        raise CorpusError(f"{root} holds no DEMOS/ or NEU/ folder with .wav files; is it a DEMoS corpus?")
    items, skipped = [], []
    for p in wavs:
        rel = p.relative_to(root).as_posix()
        m = _DEMOS_NAME.match(p.name)
        if not m:
            skipped.append({"path": rel, "reason": "name does not match <PR|NP>_<g>_<NN>_<emo>*.wav"})
            continue
        code = m["emo"].lower()
        if code not in _DEMOS_EMOTION:
            raise CorpusError(f"{rel}: unknown DEMoS emotion code {code!r} (known: {sorted(_DEMOS_EMOTION)})")
        items.append(Item(rel, _DEMOS_EMOTION[code], f"{m['g'].lower()}{int(m['spk']):02d}", m["g"].lower()))
    return items, skipped


REGISTRY: dict[str, Corpus] = {
    "demos": Corpus("demos", "DEMoS Italian elicited emotional speech (68 speakers)", _scan_demos,
                    ("anger", "disgust", "fear", "guilt", "happiness", "sadness", "surprise")),
}
# The embedded corpus is written in the DEMoS layout.
REGISTRY["embedded"] = dataclasses.replace(REGISTRY["demos"], name="embedded",
                                           description="embedded synthetic emotional speech (DEMoS layout)")


def get(name: str) -> Corpus:
    if name not in REGISTRY:
        raise CorpusError(f"unknown corpus {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
