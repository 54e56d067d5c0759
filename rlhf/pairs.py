"""Preference pairs as text, in the format Hugging Face TRL and its datasets use ("standard,
explicit prompt"): a JSON-lines file, one object per line with the string fields prompt, chosen and
rejected (other fields are kept out of the way, not read). Reading checks every line and names the
first bad one; encoding turns the texts into the model's tokens, right-padded with PAD so that
pairs of any lengths share a batch.

Shapes: n pairs; prompts (n, Tp), chosen and rejected (n, Tc) (one width for both), each row its
tokens then PAD.
"""
from __future__ import annotations

import json
import os

import torch

from dualgpt import UserError
from dualgpt.files import atomic_open
from rlhf.preference import PAD

FIELDS = ("prompt", "chosen", "rejected")


def read_pairs(path: str) -> list[dict]:
    """Every pair of a JSON-lines file, with its line number under "line"; blank lines are skipped.
    A file that is not UTF-8, a line that is not a JSON object with the three string fields, a pair
    whose chosen and rejected texts are equal, or a file with no pair is a one-line error naming
    the line."""
    if not os.path.isfile(path):
        raise UserError(f"no pairs file {path}")
    pairs = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}, line {number}"
            try:
                # a byte-order mark (Notepad) is not text
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not UTF-8 text (byte {e.start} of the line)") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: a JSON object with prompt, chosen and rejected is "
                                f"expected, got {type(row).__name__}")
            for field in FIELDS:
                if field not in row:
                    raise UserError(f"{where}: no {field!r} field (each line needs "
                                    f"{', '.join(FIELDS)})")
                if not isinstance(row[field], str):
                    raise UserError(f"{where}: {field!r} must be a string, got "
                                    f"{type(row[field]).__name__}")
                try:
                    row[field].encode("utf-8")
                # JSON can spell a lone half of a surrogate pair, "\ud800": no character
                except UnicodeEncodeError:
                    raise UserError(f"{where}: {field!r} holds an escape that is no character (a "
                                    "lone surrogate)") from None
            if row["chosen"] == row["rejected"]:
                raise UserError(f"{where}: chosen and rejected are the same text: nothing is "
                                "preferred")
            pairs.append({"line": number, **{field: row[field] for field in FIELDS}})
    if not pairs:
        raise UserError(f"{path} has no pairs: each line is a JSON object with "
                        f"{', '.join(FIELDS)}")
    return pairs


def write_pairs(path: str, pairs: list[dict], **extra) -> None:
    """The pairs as a JSON-lines file, written whole or not at all, non-ASCII text as it is (not
    escaped); extra: fields besides the three."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({**{field: p[field] for field in FIELDS}, **extra},
                                ensure_ascii=False) + "\n" for p in pairs)


def padded(rows: list[list[int]]) -> torch.Tensor:
    """Token lists of any lengths as one (n, longest) tensor, each row right-padded with PAD."""
    out = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def encode_pairs(pairs: list[dict], tokenizer, block_size: int, path: str) -> dict:
    """The pairs in the model's tokens: prompts, chosen and rejected, right-padded with PAD. A
    prompt longer than the window leaves keeps its last tokens (the same for both sides, so both
    are judged on one context); a pair whose longer completion leaves no room for one prompt token,
    or with an empty text, is a one-line error naming its line. Also returns how many prompts were
    cut."""
    prompts, chosen, rejected, cut = [], [], [], 0
    for pair in pairs:
        ids = {field: tokenizer.encode_ordinary(pair[field]) for field in FIELDS}
        where = f"{path}, line {pair['line']}"
        empty = [field for field in FIELDS if not ids[field]]
        if empty:
            raise UserError(f"{where}: {empty[0]!r} is empty (a prompt needs a token to start "
                            f"from, a completion a token to score)")
        room = block_size - max(len(ids["chosen"]), len(ids["rejected"]))
        if room < 1:
            raise UserError(f"{where}: the longer completion is {block_size - room} tokens, the "
                            "model's window "
                            f"{block_size}: it must leave room for at least one prompt token")
        cut += len(ids["prompt"]) > room
        prompts.append(ids["prompt"][-room:])
        chosen.append(ids["chosen"])
        rejected.append(ids["rejected"])
    # both sides to one width: a pair's two completions line up
    completions = padded(chosen + rejected)
    return {"prompts": padded(prompts), "chosen": completions[:len(pairs)],
            "rejected": completions[len(pairs):],
            "prompts_cut": cut}
