"""Programmatic oracles for preference tuning: functions from text to a score that stand in for a
human labeller (the protocol of Gao et al. 2022, arXiv 2210.10760, and the DPO paper's sentiment task).

An oracle has a score, which labels the preference pairs (the oracle score), and a judge, which only
reports results. For the default sentiment oracle they are two disjoint halves of one lexicon: no stage
ever trains or selects on the judge's words, so a rise in the judge's score is a rise in sentiment, not in
the oracle score's own words.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import sys
from typing import Callable

from dualgpt import UserError

# Words that carry sentiment in Shakespeare, each list ordered by how often it occurs in Tiny Shakespeare,
# so that alternating between the halves gives each half a similar share of common and rare words.
POSITIVE = ["good", "love", "true", "fair", "noble", "honour", "sweet", "heaven", "grace", "peace", "dear", "gentle",
            "hope", "welcome", "friend", "gracious", "comfort", "joy", "happy", "faith", "kind", "mercy", "worthy",
            "beauty", "tender", "honest", "virtue", "loving", "brave", "pleasure", "merry", "rich", "blessed", "glad",
            "glory", "precious", "smile", "bright", "lovely", "delight"]
NEGATIVE = ["death", "blood", "fear", "dead", "die", "tears", "shame", "sorrow", "kill", "war", "grief", "grave", "hate",
            "false", "villain", "foul", "woe", "traitor", "weep", "sin", "slain", "fool", "hell", "murder", "sad",
            "curse", "poison", "base", "sick", "bitter", "despair", "pain", "vile", "wretched", "cruel", "evil",
            "plague", "tyrant", "wicked", "misery"]
WORD = re.compile(r"[a-z]+")


@dataclasses.dataclass(frozen=True)
class Oracle:
    name: str
    score: Callable[[str], float]  # the oracle score: what labels the preference pairs
    judge: Callable[[str], float] | None  # the held-out judge: reports only (None: the oracle has none)


class Lexicon:
    """Score = positive words minus negative words (whole words, any case)."""

    def __init__(self, positive: list[str], negative: list[str]):
        self.weights = {**{w: 1 for w in positive}, **{w: -1 for w in negative}}

    def __call__(self, text: str) -> float:
        return float(sum(self.weights.get(word, 0) for word in WORD.findall(text.lower())))


def syllables(word: str) -> int:
    """A rule-of-thumb count: groups of vowels, less a silent final e; at least one."""
    groups = len(re.findall(r"[aeiouy]+", word))
    if word.endswith("e") and not word.endswith(("le", "ee")) and groups > 1:
        groups -= 1
    return max(1, groups)


def verse(text: str) -> float:
    """How close the completion's lines come to ten syllables (iambic pentameter): minus the mean distance
    from 10 over its lines of words (speaker names, all capitals and a colon, are not lines of verse)."""
    lines = [line for line in text.split("\n") if WORD.search(line.lower()) and not re.fullmatch(r"[A-Z ]+:", line.strip())]
    if not lines:
        return -10.0
    return -sum(abs(sum(map(syllables, WORD.findall(line.lower()))) - 10) for line in lines) / len(lines)


def user_oracle(spec: str) -> Callable[[str], float]:
    """module:function from the current folder or the path: a function from text to a float."""
    module_name, _, function_name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"oracle {spec!r}: cannot load it ({e.__class__.__name__}: {e}); give module:function, "
                        f"a function from text to a float") from None
    if not callable(function):
        raise UserError(f"oracle {spec!r}: {function_name} is not a function")
    return function


def checked(oracle_name: str, function: Callable[[str], float]) -> Callable[[str], float]:
    """The function, turning exceptions and non-numbers into a one-line UserError."""

    def score(text: str) -> float:
        try:
            value = float(function(text))
        except Exception as e:
            raise UserError(f"oracle {oracle_name!r} failed on a completion ({e.__class__.__name__}: "
                            f"{str(e)[:100]})") from None
        if not math.isfinite(value):
            raise UserError(f"oracle {oracle_name!r} returned {value} for a completion; it must return a finite number")
        return value

    return score


def get_oracle(spec: str) -> Oracle:
    """sentiment (lexicon half A labels, half B judges) | verse | module:function."""
    if spec == "sentiment":
        return Oracle("sentiment", Lexicon(POSITIVE[0::2], NEGATIVE[0::2]), Lexicon(POSITIVE[1::2], NEGATIVE[1::2]))
    if spec == "verse":
        return Oracle("verse", verse, None)
    if ":" in spec:
        oracle = Oracle(spec, checked(spec, user_oracle(spec)), None)
        oracle.score("To be, or not to be: that is the question.")  # fail now, not after minutes of sampling
        return oracle
    raise UserError(f"unknown oracle {spec!r}: use sentiment, verse, or module:function (your own, text -> float)")
