"""The corpus behind --data, a UTF-8 text file or a folder of .txt files, made ready for training
in bounded memory on every core: read in blocks, never whole; its tokenizer trained on it, or on an
even sample of a large one; its token ids encoded block by block in parallel and written to a
token file.

The token file, data/<name>_<corpus hash>_<tokenizer hash>.npy, is a NumPy .npy file: a 128-byte
header (dtype and length), then the ids one after another as in nanoGPT's train.bin, uint16
(uint32 for a vocabulary over 65,536): np.load(path, mmap_mode="r") reads it without loading it,
np.memmap(path, np.uint16, mode="r", offset=128) too. It is written to a temp file that takes its
name only when whole, so a run stopped while writing leaves nothing a later run would take for
whole: that run removes the temp file, says so, and prepares the file again.

A block ends where the split patterns of GPT-2 and GPT-4 always break the text (before a letter
that starts a line, or before a space between two letters), so the blocks' ids, one after another,
are the ids of the whole text encoded at once (tested). A folder's files are its documents, in the
order of their paths, each but the last followed by a blank line and encoded on its own: no token
spans two documents.
"""
from __future__ import annotations

import codecs
import hashlib
import io
import multiprocessing
import multiprocessing.pool
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass

import numpy as np

import config as default_config
from dualgpt import UserError, repo_path
from dualgpt.files import atomic_open, write_json, write_text
from dualgpt.runtime import progress
from minbpe import RegexTokenizer

BLOCK = 1 << 20  # bytes of text encoded at a time, by one process
CUT = re.compile(rb"\n(?=[A-Za-z])|[A-Za-z](?= [A-Za-z])")  # a block may end after a match
DOCUMENT_END = "\n\n"  # after each document of a folder but the last


@dataclass
class Corpus:
    """The files of --data, their sizes, and the hash of their contents (a single file's: the
    sha256 of its bytes)."""
    path: str
    files: list[str]
    sizes: list[int]
    hash: str

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path.rstrip(os.sep)))[0]

    @property
    def bytes(self) -> int:
        return sum(self.sizes)


def resolve_data(data: str) -> str:
    """The text's path: config.py's default is the clone's from any folder; another, the user's."""
    path = repo_path(data) if data == default_config.data else os.path.abspath(data)
    if not os.path.exists(path):
        raise UserError(f"data {data} not found; pass --data=PATH to a UTF-8 text file or a "
                        "folder of .txt files")
    return path


def open_corpus(path: str) -> Corpus:
    """The corpus at path, read once through: its hash, and one line for what no training can
    use (an empty corpus, a folder without .txt files, a binary file, bytes that are not UTF-8)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path)
                       for name in names if name.endswith(".txt"))
        if not files:
            raise UserError(f"{path} has no .txt files (a folder of data is its .txt files, "
                            "subfolders included)")
    else:
        files = [path]
    digest, sizes = hashlib.sha256(), []
    for file in files:
        try:
            sizes.append(os.path.getsize(file))
            if len(files) > 1:  # a folder: each file's place and size too
                name = os.path.relpath(file, path)
                digest.update(f"{name}\0{sizes[-1]}\0".encode("utf-8"))
            check_and_hash(file, digest)
        except OSError as e:  # a broken link, a file without read permission
            raise UserError(f"cannot read {file} ({e.strerror}); fix it or pass another "
                            "--data") from None
    corpus = Corpus(path, files, sizes, digest.hexdigest())
    if not corpus.bytes:
        raise UserError(f"{path} is empty; pass --data=PATH to a UTF-8 text file or a folder of "
                        ".txt files")
    return corpus


def check_and_hash(file: str, digest) -> None:
    """Feed the file's bytes to digest, checking they are text: no NUL byte, valid UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
            nul = block.find(b"\0")
            if nul >= 0:
                raise UserError(f"{file} looks binary (a NUL byte at byte {offset + nul}); "
                                "pass a UTF-8 text file or a folder of them")
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:  # e.start counts from the decoder's pending bytes
                at = offset + e.start - len(decoder.getstate()[0])
                raise UserError(f"{file} is not UTF-8 text (byte {max(at, 0)}); convert it or "
                                "pass another --data") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{file} is not UTF-8 text (it ends inside a character, byte "
                        f"{offset - 1}); convert it or pass another --data") from None


def next_cut(f, position: int, size: int) -> int:
    """The first place at or after position where a block may end, or the end of the file."""
    while position < size:
        f.seek(position)
        window = f.read(1 << 16)
        match = CUT.search(window[:-1] if position + len(window) < size else window)
        if match:
            return position + match.end()
        position += max(len(window) - 1, 1)  # the last byte again: a match needs the next one
    return size


def blocks_of(corpus: Corpus) -> list[tuple[str, int, int, str]]:
    """Every block of the corpus in order: (file, start, end, text to append: a document's end)."""
    blocks = []
    for i, (file, size) in enumerate(zip(corpus.files, corpus.sizes)):
        suffix = DOCUMENT_END if i < len(corpus.files) - 1 else ""
        with open(file, "rb") as f:
            start = 0
            while start < size:
                end = next_cut(f, start + BLOCK, size) if start + BLOCK < size else size
                blocks.append((file, start, end, suffix if end == size else ""))
                start = end
    return blocks


def sample_of(corpus: Corpus, sample_bytes: int) -> list[tuple[str, int, int, str]]:
    """The blocks a tokenizer is trained on: all of a corpus up to sample_bytes; else
    sample_bytes / BLOCK blocks spread evenly over a larger one (the same for the same corpus)."""
    if corpus.bytes <= sample_bytes:
        return blocks_of(corpus)
    n = max(1, sample_bytes // BLOCK)
    starts = np.cumsum([0] + corpus.sizes)
    sample = []
    for k in range(n):
        at = k * corpus.bytes // n
        i = int(np.searchsorted(starts, at, side="right")) - 1  # the file holding byte `at`
        file, size = corpus.files[i], corpus.sizes[i]
        with open(file, "rb") as f:
            start = next_cut(f, at - starts[i], size) if at > starts[i] else 0
            end = next_cut(f, start + BLOCK, size) if start + BLOCK < size else size
        if start < end:
            suffix = DOCUMENT_END if end == size and i < len(corpus.files) - 1 else ""
            sample.append((file, int(start), int(end), suffix))
    return sample


def read_block(block: tuple[str, int, int, str]) -> str:
    file, start, end, suffix = block
    with open(file, "rb") as f:
        f.seek(start)
        return f.read(end - start).decode("utf-8") + suffix  # checked by open_corpus


def tokenizer_for(corpus: Corpus, vocab_size: int, sample_mb: int) -> tuple[RegexTokenizer, str]:
    """A tokenizer of vocab_size for the corpus and its .model text: a previous run's in
    tokenizers/ for the same corpus, size and sample, else the one the clone ships in
    tokenizers/shipped/, else trained on the corpus (or its sample, recorded beside the file)."""
    sampled = corpus.bytes > sample_mb * 1_000_000
    name = f"{corpus.name}_v{vocab_size}_{corpus.hash[:8]}" + (f"_s{sample_mb}mb" if sampled
                                                                 else "")
    prefix = repo_path("tokenizers", name)
    for candidate in (prefix + ".model", repo_path("tokenizers", "shipped", name + ".model")):
        if os.path.exists(candidate):
            tok = RegexTokenizer()
            try:
                tok.load(candidate)
                if len(tok.vocab) == vocab_size:
                    with open(candidate, encoding="utf-8") as f:
                        return tok, f.read()
                print(f"note: not using {candidate} (it has {len(tok.vocab)} tokens, not "
                      f"{vocab_size}); training anew")
            except ValueError as e:  # minbpe's message names the file and the line
                print(f"note: not using {candidate}, which is unreadable ({e}); training anew")
    tok, sample = RegexTokenizer(), sample_of(corpus, sample_mb * 1_000_000)
    what = f"a {sum(e - s for _, s, e, _ in sample) / 1e6:.0f} MB sample of " if sampled else ""
    print(f"training a {vocab_size}-token BPE tokenizer on {what}{os.path.basename(corpus.path)}")
    counts: dict[str, int] = {}
    for block in progress(sample, desc="counting chunks", unit="block", leave=False):
        # in order: first appearances decide ties
        for chunk in tok.compiled_pattern.findall(read_block(block)):
            counts[chunk] = counts.get(chunk, 0) + 1
    tok.train_counts(counts, vocab_size)  # shows a bar when it takes long, on a terminal
    if sampled:
        write_json(prefix + ".sample.json", {
            "corpus": corpus.path, "corpus_hash": corpus.hash, "corpus_bytes": corpus.bytes,
            "blocks": [[os.path.relpath(f, corpus.path) if f != corpus.path else "", s, e]
                       for f, s, e, _ in sample]})
    write_text(prefix + ".vocab", tok.vocab_text())
    write_text(prefix + ".model", tok.model_text())
    return tok, tok.model_text()


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def token_ids(corpus: Corpus, tokenizer_text: str, vocab_size: int, workers: int) -> np.ndarray:
    """The corpus's token ids for this tokenizer, memory-mapped from its token file, written first
    if there is none (or, said in one line, if the one there is damaged)."""
    tok_hash = hashlib.sha256(tokenizer_text.encode("utf-8")).hexdigest()
    path = repo_path("data", f"{corpus.name}_{corpus.hash[:8]}_{tok_hash[:8]}.npy")
    ids = load_token_file(path, vocab_size)
    if ids is None:
        write_tokens(corpus, tokenizer_text, vocab_size, path, workers)
        ids = np.load(path, mmap_mode="r")
    return ids


def load_token_file(path: str, vocab_size: int) -> np.ndarray | None:
    """The token ids at path (memory-mapped), or None to encode again: when there is no file, or,
    with a one-line notice, when it is unreadable, cut short or holds what no encoding gives."""
    if not os.path.exists(path):
        return None
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
        if ids.ndim == 1 and ids.dtype.kind in "iu" and len(ids) and 0 <= ids.min() \
                and ids.max() < vocab_size:
            return ids
        problem = "its contents are not token ids of this tokenizer"
    except Exception as e:  # whatever np.load makes of a damaged header: encode again
        problem = f"{e.__class__.__name__}: {(str(e).splitlines() or [''])[0][:80]}"
    print(f"note: the token file {path} is unreadable ({problem}); encoding the text again")
    return None


def npy_header(dtype: type, length: int) -> bytes:
    """The .npy header of a 1-D array: 128 bytes for any length (tested), so it can be written
    last, over a placeholder, once the length is known."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(
        np.dtype(dtype)), "fortran_order": False, "shape": (length,)})
    return header.getvalue()


_tokenizer: RegexTokenizer | None = None  # each encoding process's own, and its ids' dtype
_dtype: type = np.uint16


def load_tokenizer(tokenizer_text: str, vocab_size: int) -> None:
    global _tokenizer, _dtype
    _tokenizer, _dtype = RegexTokenizer(), token_dtype(vocab_size)
    _tokenizer.load_text(tokenizer_text)


def encode_block(block: tuple[str, int, int, str]) -> np.ndarray:
    return np.array(_tokenizer.encode_ordinary(read_block(block)), dtype=_dtype)


def worker_start(tokenizer_text: str, vocab_size: int) -> None:
    """An encoding process. Ctrl-C is the main process's to handle: it stops the pool. (A killed
    main process stops it too: the pool's queue closes, and each process ends.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    load_tokenizer(tokenizer_text, vocab_size)


def cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def start_pool(workers: int, tokenizer_text: str, vocab_size: int) -> multiprocessing.pool.Pool:
    """The encoding processes, forked where the system has it (they start at once, sharing the
    code). A Ctrl-C while the pool starts is held until it is whole, then stops it: a pool
    interrupted half-made is left running, and forks processes that wait forever (seen under
    load)."""
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    pressed: list[bool] = []
    main = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True)) if main else None
    try:
        pool = context.Pool(workers, initializer=worker_start,
                            initargs=(tokenizer_text, vocab_size))
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if pressed:
        pool.terminate()
        pool.join()
        raise KeyboardInterrupt
    return pool


def write_tokens(corpus: Corpus, tokenizer_text: str, vocab_size: int, path: str,
                 workers: int) -> None:
    """Encode the corpus block by block in `workers` processes (0: one per core; 1: this process
    alone), writing the ids in order to path, atomically."""
    blocks = blocks_of(corpus)
    workers = max(1, min(workers or cores(), len(blocks)))
    print(f"encoding {os.path.basename(corpus.path)} ({corpus.bytes / 1e6:.1f} MB, "
          f"{len(corpus.files)} file{'s' * (len(corpus.files) > 1)}) in {workers} "
          f"process{'es' * (workers > 1)}")
    bar = progress(total=corpus.bytes, desc="encoding", unit="B", unit_scale=True,
                   unit_divisor=1000)
    dtype = token_dtype(vocab_size)
    with atomic_open(path, "wb") as f:
        f.write(npy_header(dtype, 0))  # a placeholder: the length is known at the end
        pool = None if workers == 1 else start_pool(workers, tokenizer_text, vocab_size)
        if pool is None:  # this process encodes
            load_tokenizer(tokenizer_text, vocab_size)
        try:
            results = pool.imap(encode_block, blocks) if pool else map(encode_block, blocks)
            for block, ids in zip(blocks, results):
                f.write(ids.tobytes())
                bar.update(block[2] - block[1])
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        length = (f.tell() - len(npy_header(dtype, 0))) // np.dtype(dtype).itemsize
        f.seek(0)
        f.write(npy_header(dtype, length))
    bar.close()

