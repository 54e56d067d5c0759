"""
Byte-level BPE on the whole text as one sequence: no split pattern, no special tokens.
"""
from __future__ import annotations

from .base import Tokenizer


class BasicTokenizer(Tokenizer):

    def train(self, text: str, vocab_size: int, verbose: bool = False,
              classic: bool = False) -> None:
        """Learn vocab_size - 256 merges from text; classic=True runs the readable classic loop."""
        self._train_chunks([text] if text else [], vocab_size, verbose, classic)

    def encode(self, text: str) -> list[int]:
        # the whole text is one chunk: caching it would only double memory
        return list(self._encode_chunk(text.encode("utf-8")))

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encode(text)
