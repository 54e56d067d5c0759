"""
Byte-level BPE that first splits text with a regex (GPT-2 or GPT-4 style), so
merges never cross word, number or punctuation boundaries; supports special tokens.
"""
from __future__ import annotations

import regex as re

from .base import Tokenizer

GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


class RegexTokenizer(Tokenizer):

    def __init__(self, pattern: str | None = None):
        super().__init__(GPT4_SPLIT_PATTERN if pattern is None else pattern)
        self._set_pattern(self.pattern)

    def _set_pattern(self, pattern: str) -> None:
        compiled = re.compile(pattern)  # raises before anything changes
        self.pattern, self.compiled_pattern = pattern, compiled

    def _split(self, text: str) -> list[str]:
        return self.compiled_pattern.findall(text)

    def train(self, text: str, vocab_size: int, verbose: bool = False,
              classic: bool = False) -> None:
        """Learn vocab_size - 256 merges from text; classic=True runs the readable classic loop."""
        self._train_chunks(self._split(text), vocab_size, verbose, classic)

    def encode(self, text: str, allowed_special: str | set = "none_raise") -> list[int]:
        """Encode text. allowed_special: "all", "none" (specials are plain text),
        "none_raise" (ValueError if a special token occurs) or a set of allowed specials."""
        if allowed_special == "all":
            special = self.special_tokens
        elif allowed_special == "none":
            special = {}
        elif allowed_special == "none_raise":
            special = {}
            for token in self.special_tokens:
                if token in text:
                    raise ValueError(f"text contains the special token {token!r}; pass "
                                     "allowed_special='all' "
                                     "(or a set naming it) to encode it as a special token, or "
                                     "'none' for plain text")
        elif isinstance(allowed_special, (set, frozenset)):
            unknown = set(allowed_special) - set(self.special_tokens)
            if unknown:
                raise ValueError("allowed_special names unregistered special tokens: "
                                 f"{sorted(unknown)}")
            special = {k: v for k, v in self.special_tokens.items() if k in allowed_special}
        else:
            raise ValueError("allowed_special must be 'all', 'none', 'none_raise' or a set, got "
                             f"{allowed_special!r}")
        if not special:
            return self.encode_ordinary(text)
        # longest first, so a special token that contains another one wins
        special_pattern = "(" + "|".join(re.escape(k) for k in sorted(special, key=len,
                                                                      reverse=True)) + ")"
        ids: list[int] = []
        for part in re.split(special_pattern, text):
            if part in special:
                ids.append(special[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids
