"""Deterministic synthetic passages with realistic length mixes (no download needed)."""

from __future__ import annotations

import numpy as np

# Frequent English words plus some topical ones: enough variety that WordPiece splits vary.
_WORDS = (
    "the of and to in is was for on that with as by it from at his an are be this which or had not but "
    "first one were their also has its have new after who they two her she been other when there all "
    "during into school time may years more most only over city some world would where later up such "
    "used many can state about national out known university united then made age de these him under "
    "ocean tide moon gravity protein cell energy market price bank coffee engine software algorithm "
    "learning machine network river mountain climate temperature vaccine immune bacteria virus species "
    "century empire war king church music film album song team season league game player company "
    "government law court election population village county district railway station bridge island "
    "computer data system process method theory model research study patient treatment disease blood "
    "heart brain muscle bone skin water carbon oxygen hydrogen metal glass plastic paper cotton wheat"
).split()


def passages(n: int, mix: str = "msmarco", seed: int = 0) -> list[str]:
    """``n`` passages. ``msmarco``: about 56 words mean with a long tail (lognormal, 5..240);
    ``long``: 330..380 words, near 512 BERT tokens each; ``short``: 8..24 words (queries, titles,
    short passages)."""
    rng = np.random.default_rng(seed)
    if mix == "msmarco":
        lengths = np.clip(rng.lognormal(mean=3.9, sigma=0.45, size=n), 5, 240).astype(int)
    elif mix == "long":
        lengths = rng.integers(330, 380, size=n)
    elif mix == "short":
        lengths = rng.integers(8, 25, size=n)
    else:
        raise ValueError(f"mix: {mix!r} is not one of 'msmarco', 'long', 'short'")
    words = np.array(_WORDS)
    out = []
    for length in lengths:
        picks = words[rng.integers(0, len(words), size=length)]
        numbers = rng.random(length) < 0.03
        picks = np.where(numbers, rng.integers(1, 3000, size=length).astype(str), picks)
        out.append(" ".join(picks).capitalize() + ".")
    return out
