"""Tokenizer files of the byte-level BPE family, both ways: GPT-2's vocab.json + merges.txt and the
tokenizers library's tokenizer.json read into minbpe's RegexTokenizer (same tokens, same merges in
the same order, raw bytes as ids 0-255) with the map from our ids to theirs; and a RegexTokenizer
of ours written as those files.

The files hold tokens as text: GPT-2's byte-to-unicode table writes each byte as a printable
character.
"""
from __future__ import annotations

import json
import os

from dualgpt import UserError
from dualgpt.files import write_json, write_text
from minbpe.regex import GPT2_SPLIT_PATTERN, RegexTokenizer


def byte_characters() -> dict[int, str]:
    """GPT-2's byte-to-unicode table: each byte as a printable character, so that vocab.json and
    merges.txt are text. Printable Latin-1 bytes stand for themselves; the others, in order, for
    the characters from 256 on."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


CHARACTER_OF = byte_characters()
BYTE_OF = {c: b for b, c in CHARACTER_OF.items()}


def as_text(token: bytes) -> str:
    return "".join(CHARACTER_OF[b] for b in token)


def as_bytes(text: str) -> bytes | None:
    """A vocab.json entry's bytes; None for a string the table cannot have written (a special
    token)."""
    return bytes(BYTE_OF[c] for c in text) if all(c in BYTE_OF for c in text) else None


def read_tokenizer_files(folder: str) -> tuple[dict[str, int], list[tuple[str, str]],
                                               dict[str, int] | None, str]:
    """vocab (token text -> id), merges in rank order, special tokens (text -> id) and split
    pattern, from tokenizer.json or from vocab.json + merges.txt (whose special tokens are the
    vocabulary's tokens that no byte or merge makes: None here, found once the merges are
    known)."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        model = data.get("model", {})
        if model.get("type") != "BPE":
            raise UserError(f"{path}: a {model.get('type')} model; only byte-level BPE (GPT-2's) "
                            "can be read")
        if data.get("normalizer") is not None:
            raise UserError(f"{path}: a {data['normalizer'].get('type')} normalizer changes the "
                            f"text before it is split; minbpe has none")
        if any(not t.get("special", False) for t in data.get("added_tokens", [])):
            raise UserError(f"{path}: added tokens that are not special tokens; minbpe knows "
                            "special ones only")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        return model["vocab"], merges, specials, split_pattern(data.get("pre_tokenizer"), path)
    vocab_path = os.path.join(folder, "vocab.json")
    merges_path = os.path.join(folder, "merges.txt")
    if not (os.path.exists(vocab_path) and os.path.exists(merges_path)):
        raise UserError(f"{folder} has no tokenizer: it needs tokenizer.json, or vocab.json and "
                        "merges.txt")
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().split("\n")
                  if line and not line.startswith("#version")]
    return vocab, merges, None, GPT2_SPLIT_PATTERN


def split_pattern(pre_tokenizer: dict | None, path: str) -> str:
    """The regex a tokenizer.json splits text with: GPT-2's (ByteLevel with its regex), or a
    Split's pattern before a ByteLevel that uses none (what export writes)."""
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex",
                                               True) and not steps[0].get("add_prefix_space"):
        return GPT2_SPLIT_PATTERN
    if (kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex")
            and "Regex" in steps[0].get("pattern", {})
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
        return steps[0]["pattern"]["Regex"]
    raise UserError(f"{path}: a pre-tokenizer of {kinds or 'nothing'} (as configured there), not "
                    f"a byte-level split minbpe makes")


def tokenizer_from_files(folder: str) -> tuple[RegexTokenizer, dict[int, int]]:
    """The folder's tokenizer as minbpe's RegexTokenizer (same tokens, same merges in the same
    order, raw bytes as ids 0-255), and the id of each of its tokens in the folder's numbering
    (ours -> theirs)."""
    vocab, merges, specials, pattern = read_tokenizer_files(folder)
    ids = {bytes([b]): b for b in range(256)}
    missing = [b for b in range(256) if as_text(bytes([b])) not in vocab]
    if missing:
        raise UserError(f"{folder}: the vocabulary lacks {len(missing)} of the 256 bytes (e.g. "
                        f"{missing[0]}); minbpe needs every byte to be a token")
    tokenizer = RegexTokenizer(pattern)
    for rank, (left, right) in enumerate(merges):
        parts = as_bytes(left), as_bytes(right)
        if None in parts or any(p not in ids for p in parts) or parts[0] + parts[1] in ids:
            raise UserError(f"{folder}: merge {rank + 1} ({left} {right}) joins a token that does "
                            f"not exist yet, or makes one that does")
        tokenizer.merges[(ids[parts[0]], ids[parts[1]])] = ids[parts[0] + parts[1]] = 256 + rank
    tokenizer.vocab = tokenizer._build_vocab()
    # vocab.json: its tokens that no byte or merge makes, if they look like <|endoftext|>
    if specials is None:
        specials = {text: i for text, i in vocab.items()
                    if as_bytes(text) not in ids and text.startswith("<") and text.endswith(">")}
    first_special = 256 + len(merges)
    try:
        tokenizer.register_special_tokens({text: first_special + k
                                           for k, text in enumerate(specials)})
    # minbpe's .model file cannot hold a special token with whitespace in it
    except ValueError as e:
        raise UserError(f"{folder}: {e}") from None
    theirs = {}
    for text, i in vocab.items():
        if text not in specials:
            token = as_bytes(text)
            if token not in ids:
                raise UserError(f"{folder}: the vocabulary's token {text!r} is neither a byte nor "
                                "made by a merge")
            theirs[ids[token]] = i
    theirs.update({first_special + k: i for k, i in enumerate(specials.values())})
    if len(theirs) != len(tokenizer.vocab):
        raise UserError(f"{folder}: {len(tokenizer.vocab) - len(theirs)} tokens that the merges "
                        f"make are missing from the vocabulary")
    return tokenizer, theirs


def tokenizer_json(tokenizer: RegexTokenizer) -> dict:
    """A tokenizer of ours as the `tokenizers` library's tokenizer.json: its split pattern, byte
    level, its BPE merges in order and its special tokens, with our ids. A tokenizer with two
    tokens of the same bytes (two merges that spell one string) cannot be written: the file names
    each token once."""
    seen = {}
    for i, token in tokenizer.vocab.items():
        if seen.setdefault(token, i) != i:
            raise UserError(f"tokens {seen[token]} and {i} of this tokenizer are the same bytes "
                            f"({token!r}); the tokenizers library's files name each token once, "
                            "so it cannot be written as them")
    pairs = sorted(tokenizer.merges.items(), key=lambda item: item[1])
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "post_processor": None,
        "added_tokens": [{"id": i, "content": text, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for text, i in tokenizer.special_tokens.items()],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {as_text(token): i for i, token in tokenizer.vocab.items()
                            if i not in tokenizer.inverse_special_tokens},
                  # "a b": the form every version of the library reads (a byte-level token never
                  # holds a space)
                  "merges": [f"{as_text(tokenizer.vocab[a])} "
                             f"{as_text(tokenizer.vocab[b])}" for (a, b), _ in pairs]},
    }


def write_tokenizer_files(folder: str, tokenizer: RegexTokenizer) -> None:
    """tokenizer.json, and GPT-2's vocab.json + merges.txt beside it (the same vocabulary and
    merges)."""
    spec = tokenizer_json(tokenizer)
    write_json(os.path.join(folder, "tokenizer.json"), spec)
    write_json(os.path.join(folder, "vocab.json"),
               {**spec["model"]["vocab"], **tokenizer.special_tokens})
    write_text(os.path.join(folder, "merges.txt"),
               "#version: 0.2\n" + "".join(f"{merge}\n" for merge in spec["model"]["merges"]))
