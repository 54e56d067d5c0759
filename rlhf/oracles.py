"""Programmatic oracles for preference tuning: functions from text to a score that stand in for a
human labeller (the protocol of Gao et al. 2022, arXiv 2210.10760, and the DPO paper's sentiment
task).

An oracle has a score, which labels the preference pairs (the oracle score), and a judge, which
only reports results. For the default sentiment oracle they are two disjoint halves of one lexicon:
no stage ever trains or selects on the judge's words, so a rise in the judge's score is a rise in
sentiment, not in the oracle score's own words.
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

# Words that carry sentiment in Shakespeare, in word families (love, loving, lovely; grace,
# gracious; death, dead, die, dying), split into two halves that no family spans: SCORE_* labels
# the pairs (the oracle score), JUDGE_* only judges. Families were dealt out by frequency in Tiny
# Shakespeare, each to the half with fewer occurrences so far, so the halves are about as common
# (positive 1974 and 1977 occurrences, negative 1235 and 1231, counted before the inflections of
# die, hate and sad joined their families). A family lists the inflections that same_family's
# four-letter rule would miss.
SCORE_POSITIVE = [("good",), ("true",), ("noble",), ("sweet",), ("dear",), ("gentle",),
                  ("welcome",), ("comfort",), ("happy",), ("kind",), ("beauty",), ("tender",),
                  ("brave",), ("pleasure",), ("blessed",), ("glad",), ("precious",), ("bright",)]
JUDGE_POSITIVE = [("love", "loving", "lovely"), ("grace", "gracious"), ("fair",), ("honour",),
                  ("heaven",), ("peace",), ("hope",), ("friend",), ("joy",), ("faith",),
                  ("mercy",), ("worthy",), ("honest",), ("virtue",), ("merry",), ("rich",),
                  ("glory",), ("smile",), ("delight",)]
SCORE_NEGATIVE = [("death", "dead", "die", "died", "dies", "dying"), ("kill",), ("grief",),
                  ("hate", "hated", "hates", "hating", "hatred"), ("villain",), ("traitor",),
                  ("weep",), ("fool",), ("murder",),
                  ("sad", "sadly", "sadness", "sadden", "saddened"), ("poison",), ("bitter",),
                  ("despair",), ("vile",), ("cruel",), ("plague",), ("wicked",)]
JUDGE_NEGATIVE = [("blood",), ("fear",), ("tears",), ("shame",), ("sorrow",), ("war",), ("grave",),
                  ("false",), ("foul",), ("woe",), ("sin",), ("slain",), ("hell",), ("curse",),
                  ("base",), ("sick",), ("pain",), ("wretched",), ("evil",), ("tyrant",),
                  ("misery",)]
WORD = re.compile(r"[a-z]+")


def words(families: list[tuple[str, ...]]) -> list[str]:
    return [w for family in families for w in family]


def same_family(a: str, b: str) -> bool:
    """A rule of thumb for words of one family that the lists above do not name: the same first
    four letters (or the whole of a shorter word)."""
    return a[:4] == b[:4]


@dataclasses.dataclass(frozen=True)
class Oracle:
    name: str
    score: Callable[[str], float]  # the oracle score: what labels the preference pairs
    # held-out judges: they only report (empty: the oracle has none)
    judges: dict[str, Callable[[str], float]]


class Lexicon:
    """Score = the sum of the weights of the text's words (whole words, any case): by default +1
    for a positive word and -1 for a negative one."""

    def __init__(self, positive: list[str] = (), negative: list[str] = (),
                 weights: dict[str, float] | None = None):
        self.weights = weights or {**{w: 1.0 for w in positive}, **{w: -1.0 for w in negative}}

    def __call__(self, text: str) -> float:
        return float(sum(self.weights.get(word, 0) for word in WORD.findall(text.lower())))


def afinn_judge(excluded: list[str]) -> Lexicon:
    """The AFINN-165 lexicon (Nielsen 2011: 3,382 English words rated -5 to +5 by hand, built with
    no regard to this repo), less every word of the families in `excluded` (the oracle score's
    words): a judge of sentiment that the tuned policies never saw a label from. Needs the afinn
    package."""
    try:
        from afinn import Afinn
    except ImportError:
        raise UserError("the afinn judge needs the afinn package: pip install afinn (or -r "
                        "requirements.txt)") from None
    afinn = Afinn()
    # multi-word phrases never match a word
    valences = afinn.read_word_file(afinn.full_filename("AFINN-en-165.txt"))
    return Lexicon(weights={w: float(v) for w, v in valences.items()
                            if " " not in w and not any(same_family(w, e) for e in excluded)})


def syllables(word: str) -> int:
    """A rule-of-thumb count: groups of vowels, less a silent final e; at least one."""
    groups = len(re.findall(r"[aeiouy]+", word))
    if word.endswith("e") and not word.endswith(("le", "ee")) and groups > 1:
        groups -= 1
    return max(1, groups)


def verse(text: str) -> float:
    """How close the completion's lines come to ten syllables (iambic pentameter): minus the mean
    distance from 10 over its lines of words (speaker names, all capitals and a colon, are not
    lines of verse)."""
    lines = [line for line in text.split("\n") if WORD.search(line.lower())
             and not re.fullmatch(r"[A-Z ]+:", line.strip())]
    if not lines:
        return -10.0
    return -sum(abs(sum(map(syllables,
                            WORD.findall(line.lower()))) - 10) for line in lines) / len(lines)


# a line that names who speaks next: "ROMEO:", "First Citizen:"
SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,30}:$", re.M)


def dialogue(text: str) -> float:
    """How many speakers' turns the completion starts: the lines that name a speaker (a capital,
    then up to 30 letters, spaces or apostrophes, and a colon). Tuning towards it writes short
    exchanges instead of speeches."""
    return float(len(SPEAKER.findall(text)))


def user_oracle(spec: str) -> Callable[[str], float]:
    """module:function from the current folder or the path: a function from text to a float."""
    module_name, _, function_name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"oracle {spec!r}: cannot load it ({e.__class__.__name__}: {e}); give "
                        f"module:function, a function from text to a float") from None
    if not callable(function):
        raise UserError(f"oracle {spec!r}: {function_name} is not a function")
    return function


def checked(oracle_name: str, function: Callable[[str], float]) -> Callable[[str], float]:
    """The function, turning exceptions and non-numbers into a one-line UserError."""

    def score(text: str) -> float:
        try:
            value = float(function(text))
        except Exception as e:
            raise UserError(f"oracle {oracle_name!r} failed on a completion "
                            f"({e.__class__.__name__}: "
                            f"{str(e)[:100]})") from None
        if not math.isfinite(value):
            raise UserError(f"oracle {oracle_name!r} returned {value} for a completion; it must "
                            "return a finite number")
        return value

    return score


def get_oracle(spec: str) -> Oracle:
    """sentiment (one half of the lexicon scores; the other half and AFINN judge) | verse |
    module:function."""
    if spec == "sentiment":
        return Oracle("sentiment", Lexicon(words(SCORE_POSITIVE), words(SCORE_NEGATIVE)),
                      {"lexicon": Lexicon(words(JUDGE_POSITIVE), words(JUDGE_NEGATIVE)),
                       "afinn": afinn_judge(words(SCORE_POSITIVE + SCORE_NEGATIVE))})
    if spec == "verse":
        return Oracle("verse", verse, {})
    if spec == "dialogue":
        return Oracle("dialogue", dialogue, {})
    if ":" in spec:
        oracle = Oracle(spec, checked(spec, user_oracle(spec)), {})
        # fail now, not after minutes of sampling
        oracle.score("To be, or not to be: that is the question.")
        return oracle
    raise UserError(f"unknown oracle {spec!r}: use sentiment, verse, dialogue, or module:function "
                    f"(your own, text -> float)")
