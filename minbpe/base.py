"""
Shared pieces of the byte-level BPE tokenizers, adapted from Karpathy's minbpe (same interface and
.model/.vocab file format, so files move both ways): the classic helpers and training loop, then an
incremental trainer that gives the same merges far faster, the cached encoder, and the file format.
"""
from __future__ import annotations

import heapq
import sys
import unicodedata
import warnings
from itertools import chain, repeat

from tqdm.auto import tqdm

MODEL_VERSION = "minbpe v1"
# training costs about (unique chunk bytes x merges); above this (a few seconds) show a progress
# bar
LONG_TRAINING = 1_000_000_000
# encoder cache bound: keeps memory flat on an unbounded stream of new chunks
CACHE_SIZE = 1 << 18


def get_stats(ids: list[int], counts: dict | None = None) -> dict:
    """Count every adjacent pair in ids (overlaps included), in first-seen order."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids: list[int], pair: tuple[int, int], idx: int) -> list[int]:
    """Replace every non-overlapping occurrence of pair, left to right, with idx."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_classic(chunks: list[bytes], num_merges: int) -> tuple[dict, dict]:
    """The classic BPE training loop, as upstream minbpe writes it: count every adjacent pair over
    all chunks, merge the most frequent into a new token everywhere, repeat. Ties go to the pair
    seen first (max keeps the first of equal counts, and the counts are in first-seen order). Every
    merge recounts the whole text: on Tiny Shakespeare at 4096 tokens, about 45 minutes, where
    train_bpe below gives the same merges (tested) in about a second (bench.py --only=tokenizer).
    Returns (merges, vocab)."""
    ids = [list(chunk) for chunk in chunks]
    merges = {}
    vocab = {idx: bytes([idx]) for idx in range(256)}
    for i in range(num_merges):
        stats = {}
        for chunk_ids in ids:  # count the pairs of every chunk
            get_stats(chunk_ids, stats)
        if not stats:
            warn_out_of_pairs(i, num_merges)
            break
        pair = max(stats, key=stats.get)  # the most frequent pair
        idx = 256 + i  # becomes the next token
        ids = [merge(chunk_ids, pair, idx) for chunk_ids in ids]
        merges[pair] = idx
        vocab[idx] = vocab[pair[0]] + vocab[pair[1]]
    return merges, vocab


def merges_for(vocab_size: int) -> int:
    """The merges a vocabulary of vocab_size needs past the 256 bytes."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the byte alphabet), got {vocab_size}")
    return vocab_size - 256


def warn_out_of_pairs(done: int, wanted: int) -> None:
    warnings.warn(f"BPE training stopped after {done} merges: the text has no adjacent pairs left "
                  f"(vocab size {256 + done} instead of {256 + wanted})", stacklevel=5)


def replace_control_characters(s: str) -> str:
    # control characters would garble the human-readable .vocab file
    return "".join(ch if unicodedata.category(ch)[0] != "C" else f"\\u{ord(ch):04x}" for ch in s)


def render_token(t: bytes) -> str:
    return replace_control_characters(t.decode("utf-8", errors="replace"))


def _merge_with_sites(ids: list[int], a: int, b: int,
                      new_id: int) -> tuple[list[int], list[int], list[int]]:
    """Merge (a, b) -> new_id in ids.

    Returns (new ids, start indices of old pairs that touch a merged token,
    start indices of new pairs that touch a new token). Every other pair is
    unchanged, so these two lists are the whole difference in pair counts.
    """
    out: list[int] = []
    old_sites: list[int] = []
    new_sites: list[int] = []
    n, start = len(ids), 0
    try:
        i = ids.index(a)
    except ValueError:
        return ids, old_sites, new_sites
    while i < n:
        if i + 1 < n and ids[i + 1] == b:
            out.extend(ids[start:i])
            m = len(out)
            out.append(new_id)
            # old pairs starting at i-1, i, i+1 touch the merged tokens; skip i-1 if the
            # previous merge already listed it (it ended at i-1)
            old_sites.extend((i - 1, i,
                              i + 1) if not old_sites or old_sites[-1] < i - 1 else (i, i + 1))
            new_sites.extend((m - 1, m) if not new_sites or new_sites[-1] < m - 1 else (m,))
            start = i + 2
            i = start
        else:
            i += 1
        try:
            i = ids.index(a, i)
        except ValueError:
            break
    if not old_sites:
        return ids, old_sites, new_sites
    out.extend(ids[start:])
    return out, old_sites, new_sites


def most_frequent(heap: list, pair_count: dict) -> list[tuple[int, int]]:
    """Pop every current pair of the highest count off the heap of (-count, pair); entries whose
    count has changed since they were pushed are stale and dropped."""
    best: dict[tuple[int, int], None] = {}  # ordered, and a pair pushed twice is there once
    while heap and not best:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) == -neg and neg < 0:
            best[pair] = None
            while heap and heap[0][0] == neg:
                _, other = heapq.heappop(heap)
                if pair_count.get(other, 0) == -neg:
                    best[other] = None
    return list(best)


def train_bpe(chunks: list[bytes], counts: list[int], num_merges: int,
              show_progress: bool) -> tuple[dict, dict]:
    """Incremental BPE training over deduplicated chunks (first-appearance order, each with its
    count).

    Gives exactly train_classic's merges (tested on hundreds of corpora), but instead of recounting
    the whole text at every merge it keeps the pair counts and changes only those next to where the
    merged pair occurred (`where` remembers which chunks may hold a pair), and finds the most
    frequent pair with a heap of counts (stale entries are skipped; ties resolved by first
    occurrence, as max does there). Returns (merges, vocab).
    """
    seqs = [list(c) for c in chunks]
    pair_count: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}  # pair -> chunks that may contain it (a superset)
    for idx, (seq, c) in enumerate(zip(seqs, counts)):
        for pair in zip(seq, seq[1:]):
            pair_count[pair] = pair_count.get(pair, 0) + c
            where.setdefault(pair, set()).add(idx)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)

    def first_occurrence(pair: tuple[int, int]) -> tuple[int, int]:
        candidates = where[pair]
        while True:
            idx = min(candidates)
            seq = seqs[idx]
            for pos, p in enumerate(zip(seq, seq[1:])):
                if p == pair:
                    return idx, pos
            candidates.discard(idx)

    merges: dict[tuple[int, int], int] = {}
    vocab = {i: bytes([i]) for i in range(256)}
    bar = tqdm(total=num_merges, desc="bpe merges", unit="merge", disable=not show_progress,
               leave=False)
    for i in range(num_merges):
        # pop the best count, resolving ties by first occurrence
        best = most_frequent(heap, pair_count)
        if not best:
            warn_out_of_pairs(i, num_merges)
            break
        pair = min(best, key=first_occurrence) if len(best) > 1 else best[0]
        for other in best:
            if other != pair:
                heapq.heappush(heap, (-pair_count[other], other))

        new_id = 256 + i
        a, b = pair
        changed = set()
        for idx in where.pop(pair):
            seq = seqs[idx]
            new_seq, old_sites, new_sites = _merge_with_sites(seq, a, b, new_id)
            if not old_sites:
                continue
            c = counts[idx]
            for j in old_sites:
                if 0 <= j < len(seq) - 1:
                    p = (seq[j], seq[j + 1])
                    pair_count[p] -= c
                    changed.add(p)
            for k in new_sites:
                if 0 <= k < len(new_seq) - 1:
                    p = (new_seq[k], new_seq[k + 1])
                    pair_count[p] = pair_count.get(p, 0) + c
                    where.setdefault(p, set()).add(idx)
                    changed.add(p)
            seqs[idx] = new_seq
        for p in changed:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
            else:
                del pair_count[p]
                where.pop(p, None)
        merges[pair] = new_id
        vocab[new_id] = vocab[a] + vocab[b]
        bar.update()
        if show_progress:
            bar.set_postfix_str(render_token(vocab[new_id]), refresh=False)
    bar.close()
    return merges, vocab


class _ChunkCache(dict):
    """chunk (str) -> token ids; computes and stores missing chunks on lookup."""

    def __init__(self, encode_chunk):
        super().__init__()
        self.encode_chunk = encode_chunk

    def __missing__(self, chunk: str) -> tuple[int, ...]:
        ids = self.encode_chunk(chunk.encode("utf-8"))
        if len(self) < CACHE_SIZE:
            self[chunk] = ids
        return ids


class Tokenizer:
    """Base class: merges, vocab, special tokens, encode/decode and the file format."""

    def __init__(self, pattern: str = ""):
        self.merges: dict[tuple[int, int], int] = {}
        self.pattern = pattern
        self.special_tokens: dict[str, int] = {}
        self.vocab = self._build_vocab()
        self.clear_cache()

    # --- subclasses override these -------------------------------------------------
    def _split(self, text: str) -> list[str]:
        return [text] if text else []

    def _chunk_bytes(self, chunk_bytes: bytes) -> bytes:
        return chunk_bytes

    # --- vocab and caches ------------------------------------------------------------
    def _build_vocab(self) -> dict[int, bytes]:
        vocab = {idx: bytes([idx]) for idx in range(256)}
        for (p0, p1), idx in self.merges.items():
            vocab[idx] = vocab[p0] + vocab[p1]
        for special, idx in self.special_tokens.items():
            vocab[idx] = special.encode("utf-8")
        return vocab

    def clear_cache(self) -> None:
        """Forget every encoded chunk (encoding then starts cold) and rebuild the special-token
        lookup."""
        self._cache = _ChunkCache(self._encode_chunk)
        self.inverse_special_tokens = {v: k for k, v in self.special_tokens.items()}

    # --- training ----------------------------------------------------------------------
    def _train_chunks(self, chunks: list[str], vocab_size: int, verbose: bool,
                      classic: bool = False) -> None:
        if classic:  # the loop to read; the same merges as below, many times slower
            self.merges, self.vocab = train_classic([ch.encode("utf-8") for ch in chunks],
                                                    merges_for(vocab_size))
            self.special_tokens = {}
            self.clear_cache()
            return
        counts: dict[str, int] = {}
        for ch in chunks:  # dict keeps first-appearance order, which the tie-break needs
            counts[ch] = counts.get(ch, 0) + 1
        self.train_counts(counts, vocab_size, verbose)

    def train_counts(self, counts: dict[str, int], vocab_size: int, verbose: bool = False) -> None:
        """Learn vocab_size - 256 merges from each chunk's count, the chunks in the order they
        first appear in the text (ties go to the pair seen first): what train() learns from that
        text, for text too large to hold (count its chunks a piece at a time)."""
        num_merges = merges_for(vocab_size)
        encoded = [ch.encode("utf-8") for ch in counts]
        total_bytes = sum(len(b) for b in encoded)
        # a long run shows a bar on its own, but only on a terminal (in a log it would be
        # carriage-return noise)
        show = verbose or total_bytes * num_merges > LONG_TRAINING and sys.stderr.isatty()
        self.merges, self.vocab = train_bpe(encoded, list(counts.values()), num_merges, show)
        self.special_tokens = {}
        self.clear_cache()

    # --- encoding ----------------------------------------------------------------------
    def _encode_chunk(self, chunk_bytes: bytes) -> tuple[int, ...]:
        """Classic rank-based merge: repeatedly merge the lowest-ranked pair present.

        Merging only its leftmost occurrence each round is equivalent to merging all of
        them at once (a new token's pairs always rank higher than the token itself), so
        each round is one min/index over the pair ranks, a slice assignment, and two
        lookups for the pairs next to the new token.
        """
        ids = list(self._chunk_bytes(chunk_bytes))
        get, inf = self.merges.get, float("inf")
        # ranks[i]: rank of (ids[i], ids[i+1])
        ranks = list(map(get, zip(ids, ids[1:]), repeat(inf)))
        while ranks:
            rank = min(ranks)
            if rank == inf:
                break
            i = ranks.index(rank)
            ids[i:i + 2] = (rank,)
            left = (get((ids[i - 1], rank), inf),) if i else ()
            right = (get((rank, ids[i + 1]), inf),) if i + 1 < len(ids) else ()
            ranks[max(i - 1, 0):i + 2] = left + right
        return tuple(ids)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating any special-token strings as ordinary text."""
        return list(chain.from_iterable(map(self._cache.__getitem__, self._split(text))))

    def decode(self, ids: list[int]) -> str:
        vocab = self.vocab  # special tokens included (_build_vocab)
        try:
            parts = [vocab[idx] for idx in ids]
        except KeyError as e:
            raise ValueError(f"invalid token id {e.args[0]!r}: not in the vocabulary "
                             f"(0..{max(vocab) if vocab else 0} and special tokens)") from None
        return b"".join(parts).decode("utf-8", errors="replace")

    # --- special tokens --------------------------------------------------------------------
    def register_special_tokens(self, special_tokens: dict[str, int]) -> None:
        for token, idx in special_tokens.items():
            if not token:
                raise ValueError("a special token must be a non-empty string")
            if any(ch.isspace() for ch in token):
                raise ValueError(f"special token {token!r} contains whitespace, which the .model "
                                 "format cannot store")
            if idx in self.vocab and self.vocab[idx] != token.encode("utf-8"):
                raise ValueError(f"special token {token!r}: id {idx} is already taken by an "
                                 "ordinary token")
        self.special_tokens = dict(special_tokens)
        self.vocab = self._build_vocab()
        self.clear_cache()

    # --- files --------------------------------------------------------------------------------
    def model_text(self) -> str:
        """The .model file (the public minbpe format): version, split pattern, special tokens, then
        the merges in the order they were learned."""
        if "\n" in self.pattern or "\r" in self.pattern:
            raise ValueError("the split pattern contains a line break, which the .model format "
                             "cannot store")
        lines = [MODEL_VERSION, self.pattern, str(len(self.special_tokens))]
        lines += [f"{special} {idx}" for special, idx in self.special_tokens.items()]
        lines += [f"{idx1} {idx2}" for idx1, idx2 in self.merges]
        return "\n".join(lines) + "\n"

    def vocab_text(self) -> str:
        """The .vocab file, for humans: each token, and the two tokens it merges."""
        inverted = {idx: pair for pair, idx in self.merges.items()}
        lines = []
        for idx, token in self.vocab.items():
            if idx in inverted:
                left, right = (render_token(self.vocab[i]) for i in inverted[idx])
                lines.append(f"[{left}][{right}] -> [{render_token(token)}] {idx}")
            else:
                lines.append(f"[{render_token(token)}] {idx}")
        return "\n".join(lines) + "\n"

    def save(self, file_prefix: str) -> None:
        """Write <prefix>.model (loadable) and <prefix>.vocab (for humans)."""
        for suffix, text in ((".model", self.model_text()), (".vocab", self.vocab_text())):
            with open(file_prefix + suffix, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)

    def load(self, model_file: str) -> None:
        """Read a .model file; raises ValueError naming the file and line, and changes nothing on
        error."""
        if not str(model_file).endswith(".model"):
            raise ValueError(f"{model_file}: expected a .model file")
        try:
            with open(model_file, encoding="utf-8", newline="\n") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{model_file}: cannot read tokenizer file "
                             f"({e.__class__.__name__}: {e})") from None
        self.load_text(text, model_file)

    def load_text(self, text: str, source: str = ".model text") -> None:
        """Read the text of a .model file; a ValueError names the source and line."""
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()

        def fail(lineno: int, what: str):
            raise ValueError(f"{source}, line {lineno}: {what}")

        if len(lines) < 3:
            fail(len(lines) + 1, "file is truncated (expected version, pattern and "
                 "special-token count)")
        if lines[0].strip() != MODEL_VERSION:
            fail(1, f"unsupported version {lines[0].strip()[:40]!r} (expected {MODEL_VERSION!r})")
        pattern = lines[1].rstrip("\r")
        try:
            num_special = int(lines[2])
        except ValueError:
            fail(3, f"expected the number of special tokens, got {lines[2][:40]!r}")
        if num_special < 0 or len(lines) < 3 + num_special:
            fail(len(lines) + 1, f"file is truncated (expected {num_special} special tokens)")
        special_tokens = {}
        for n in range(3, 3 + num_special):
            parts = lines[n].split()
            if len(parts) != 2 or not parts[1].isdigit():
                fail(n + 1, f"expected '<special token> <id>', got {lines[n][:40]!r}")
            special_tokens[parts[0]] = int(parts[1])
        merges = {}
        idx = 256
        for n in range(3 + num_special, len(lines)):
            parts = lines[n].split()
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                fail(n + 1, f"expected a merge '<id> <id>', got {lines[n][:40]!r}")
            p0, p1 = int(parts[0]), int(parts[1])
            if p0 >= idx or p1 >= idx:
                fail(n + 1, f"merge ({p0}, {p1}) refers to a token that does not exist yet (next "
                     f"id {idx})")
            merges[(p0, p1)] = idx
            idx += 1
        try:  # first: a pattern that does not compile leaves the tokenizer as it was
            self._set_pattern(pattern)
        except Exception as e:  # regex's own error class: a pattern cut or altered in the file
            fail(2, f"the split pattern does not compile ({e})")
        self.merges, self.special_tokens = merges, special_tokens
        self.vocab = self._build_vocab()
        self.clear_cache()

    def _set_pattern(self, pattern: str) -> None:
        self.pattern = pattern
