"""Your own text, any size (dualgpt/corpus.py): a file or a folder read in blocks, its tokenizer trained on it or on a
sample, its ids encoded block by block on every core into a token file; what a stopped run leaves; bad input."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from bench import children
from conftest import ROOT, make_corpus, run_main, run_script, tiny_args

from dualgpt import corpus as corpus_module
from minbpe import RegexTokenizer
from minbpe.regex import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN

# words of 2 to 4 bytes a character
EXOTIC = ["café", "naïve", "Straße", "日本語", "😀", "ǅemal", "ﬁne", "Ωmega", "x²", "٣٤٥"]


def multibyte_text(n_lines: int, seed: int) -> str:
    """make_corpus's lines with every fifth word one of several bytes a character."""
    rng = random.Random(seed)
    words = make_corpus(n_lines, seed).split(" ")
    return " ".join(rng.choice(EXOTIC) if i % 5 == 4 else w for i, w in enumerate(words))


def write_folder(folder, docs):
    """Documents as a.txt, b/c.txt, b/d.txt, ... (the order of their paths), and a file that is not .txt."""
    names = ["a.txt", "b/c.txt", "b/d.txt", "e.txt"][: len(docs)]
    for name, doc in zip(names, docs):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(doc, encoding="utf-8")
    (folder / "notes.md").write_text("not read")
    return folder


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("pattern", [GPT4_SPLIT_PATTERN, GPT2_SPLIT_PATTERN], ids=["gpt4", "gpt2"])
def test_blocks_give_the_ids_of_each_document_encoded_at_once(home, tmp_path, monkeypatch, pattern, workers):
    """Blocks of 97 bytes (their nominal ends inside words, inside multi-byte characters), encoded in 1 or 2
    processes: the token file holds each document's ids encoded at once, the documents in the order of their paths,
    each but the last ending in a blank line; no token spans two documents."""
    docs = [multibyte_text(40, seed) for seed in range(3)]
    folder = write_folder(tmp_path / "books", docs)
    tok = RegexTokenizer(pattern)
    tok.train("".join(docs), 300)
    monkeypatch.setattr(corpus_module, "BLOCK", 97)
    corpus = corpus_module.open_corpus(str(folder))
    assert [f.split("books/")[1] for f in corpus.files] == ["a.txt", "b/c.txt", "b/d.txt"]
    blocks = corpus_module.blocks_of(corpus)
    assert len(blocks) > 30
    nominal_ends = [open(f, "rb").read()[s + 96:s + 98] for f, s, e, _ in blocks if s + 98 <= e]
    assert any(0x80 <= pair[1] < 0xC0 for pair in nominal_ends)  # a block's 97th byte ends inside a character
    assert any(pair.isalpha() for pair in nominal_ends)  # ... or inside a word
    ids = corpus_module.token_ids(corpus, tok.model_text(), len(tok.vocab), workers)
    expected = []
    for i, doc in enumerate(docs):
        expected += tok.encode_ordinary(doc + ("\n\n" if i < len(docs) - 1 else ""))
    assert ids.dtype == np.uint16
    assert ids.tolist() == expected


def test_a_folder_trains_the_tokenizer_train_learns_from_its_documents_joined(home, tmp_path):
    """Chunks counted block by block (tokenizer_for) give the merges of minbpe's train on the whole text."""
    docs = [multibyte_text(60, seed) for seed in range(3)]
    corpus = corpus_module.open_corpus(str(write_folder(tmp_path / "books", docs)))
    tok, text = corpus_module.tokenizer_for(corpus, 320, sample_mb=1)
    reference = RegexTokenizer()
    reference.train("\n\n".join(docs), 320)
    assert tok.merges == reference.merges
    assert (home / "tokenizers" / f"books_v320_{corpus.hash[:8]}.model").read_text() == text


def test_a_corpus_above_the_sample_size_trains_its_tokenizer_on_an_even_sample_recorded_beside_it(
        home, tmp_path, monkeypatch, capsys):
    """--tokenizer_sample_mb=1 on a 1.4 MB corpus: the tokenizer learns from 1 MB of blocks spread over the whole
    text (the merges of training on them, joined), named and recorded so that the same command gives the same one."""
    big = tmp_path / "big.txt"
    big.write_text(make_corpus(40_000, seed=5), encoding="utf-8")
    assert 1.2e6 < big.stat().st_size < 1.6e6
    monkeypatch.setattr(corpus_module, "BLOCK", 20_000)
    corpus = corpus_module.open_corpus(str(big))
    tok, text = corpus_module.tokenizer_for(corpus, 280, sample_mb=1)
    assert "training a 280-token BPE tokenizer on a 1 MB sample of big.txt" in capsys.readouterr().out
    name = f"big_v280_{corpus.hash[:8]}_s1mb"
    record = json.loads((home / "tokenizers" / f"{name}.sample.json").read_text())
    spans = [(start, end) for _, start, end in record["blocks"]]
    assert len(spans) == 50 and spans[0][0] == 0 and spans[-1][1] > 0.95 * corpus.bytes  # from start to end
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert sum(end - start for start, end in spans) >= 1_000_000
    reference = RegexTokenizer()
    reference.train("".join(big.read_bytes()[s:e].decode() for s, e in spans), 280)
    assert tok.merges == reference.merges
    assert (home / "tokenizers" / f"{name}.model").read_text() == text
    (home / "tokenizers" / f"{name}.model").unlink()
    assert corpus_module.tokenizer_for(corpus, 280, sample_mb=1)[1] == text  # the same sample again


def test_more_than_65536_tokens_are_written_as_uint32(home, corpus):
    tok = RegexTokenizer()
    tok.train(corpus.read_text(), 300)
    ids = corpus_module.token_ids(corpus_module.open_corpus(str(corpus)), tok.model_text(), 70_000, 1)
    assert ids.dtype == np.uint32
    assert ids.tolist() == tok.encode_ordinary(corpus.read_text())
    assert {len(corpus_module.npy_header(np.uint16, n)) for n in (0, 1, 10 ** 6, 2 ** 62)} == {128}


PEAK = """
import resource, sys
import dualgpt
dualgpt.ROOT = sys.argv[2]
from dualgpt import corpus
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
corpus.BLOCK = 1 << 16
c = corpus.open_corpus(sys.argv[1])
before = peak()
tok, text = corpus.tokenizer_for(c, 300, 1)
corpus.token_ids(c, text, len(tok.vocab), 1)
print(peak() - before)
"""


def test_memory_stays_bounded_on_a_corpus_many_times_the_block(tmp_path):
    """Training the tokenizer on a 1 MB sample and encoding a 2.2 MB corpus (34 blocks of 64 KB) raises the process's
    peak memory by less than 1 MB: the text is never read whole (2.2 MB), nor its ids held as Python ints (that took
    about 21 bytes a byte of text)."""
    text = tmp_path / "c.txt"
    text.write_text(make_corpus(60_000, seed=1), encoding="utf-8")
    assert text.stat().st_size > 2_000_000
    done = subprocess.run([sys.executable, "-c", PEAK, str(text), str(tmp_path / "root")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < 1e6


def random_words(n_bytes: int, seed: int) -> str:
    """Lines of made-up words: most chunks are new to the tokenizer's cache, so encoding takes its full time."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < n_bytes:
        line = " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
                        for _ in range(rng.randint(4, 12))).capitalize() + "."
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


def stop_while_encoding(home, args, sig) -> tuple[int, str]:
    """python gpt.py args, sent sig while its two processes encode; returns its exit code and stderr once it and
    they have ended."""
    proc = run_script(home, args)
    deadline = time.time() + 60
    # the token file is being written and both encoding processes run (each block takes them about a second)
    while not (list((home / "data").glob(".big_*.npy.*.tmp")) and len(workers := children(proc.pid)) == 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) or running(home / "gpt.py"):
        assert time.time() < deadline, "an encoding process outlived its run"
        time.sleep(0.1)
    return proc.returncode, err


def running(script) -> bool:
    """Whether any process runs script (any of a run's processes: a pool forks replacements of its own)."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if str(script).encode() in f.read():
                    return True
        except OSError:
            pass
    return False


def test_a_run_stopped_while_encoding_leaves_no_token_file_and_the_next_prepares_again(home, tmp_path, capsys):
    """python gpt.py stopped while its two processes encode a 2 MB text, by Ctrl-C (exit 130, its temp file removed)
    then by SIGKILL (the temp file left): no token file, no encoding process left running; the next run (in-process)
    removes the killed run's temp file, says so, encodes again and trains on the right ids. (The tokenizer is a
    previous run's, as after a first run.)"""
    big = tmp_path / "big.txt"
    big.write_text(random_words(2_000_000, seed=2), encoding="utf-8")
    tok = RegexTokenizer()
    tok.train(big.read_text()[:50_000], 300)
    digest = corpus_module.open_corpus(str(big)).hash[:8]
    (home / "tokenizers").mkdir()
    tok.save(str(home / "tokenizers" / f"big_v300_{digest}"))
    args = tiny_args(home, big, "--max_iters=1", "--data_workers=2")
    code, err = stop_while_encoding(home, args, signal.SIGINT)
    assert code == 130, err
    assert not list((home / "data").iterdir())  # no token file, no temp file
    code, err = stop_while_encoding(home, args, signal.SIGKILL)
    assert code == -signal.SIGKILL
    (temp,) = (home / "data").iterdir()  # nothing could remove it
    assert temp.name.startswith(".big_") and not list((home / "data").glob("big_*.npy"))
    capsys.readouterr()
    assert run_main(args) == 0
    out = capsys.readouterr().out
    assert f"note: {home / 'data' / temp.name.split('.npy')[0][1:]}.npy was left half-written by a run that " \
           "stopped; removed" in out
    assert "encoding big.txt (2.0 MB, 1 file) in 2 processes" in out
    (token_file,) = (home / "data").iterdir()
    assert np.load(token_file).tolist() == tok.encode_ordinary(big.read_text())


def test_a_second_run_reuses_the_token_file_and_a_changed_corpus_is_prepared_again(home, corpus, capsys):
    args = tiny_args(home, corpus, "--mode=eval")
    assert run_main(tiny_args(home, corpus, "--max_iters=1")) == 0
    assert "encoding corpus.txt" in capsys.readouterr().out
    assert run_main(args) == 0
    assert "encoding" not in capsys.readouterr().out
    corpus.write_text(corpus.read_text().replace("ROMEO", "HAMLET"), encoding="utf-8")  # same size
    assert run_main(args) == 0  # the checkpoint's tokenizer, the new text's ids
    assert "encoding corpus.txt" in capsys.readouterr().out
    assert len(list((home / "data").glob("corpus_*.npy"))) == 2


def bad_inputs(tmp_path):
    """Each bad --data, and the start of its one line."""
    cases = {}
    (tmp_path / "empty.txt").write_text("")
    cases["empty.txt"] = "empty.txt is empty"
    (tmp_path / "nothing").mkdir()
    cases["nothing"] = "nothing has no .txt files"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("hello " * 1000)
    cases["notes"] = "notes has no .txt files"
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    cases["blank"] = "blank is empty"
    (tmp_path / "binary.txt").write_bytes(b"hello " * 1000 + b"\0\1\2")
    cases["binary.txt"] = "binary.txt looks binary (a NUL byte at byte 6000)"
    (tmp_path / "latin1.txt").write_bytes("café au lait ".encode() * 500 + "crème".encode("latin-1"))
    cases["latin1.txt"] = f"latin1.txt is not UTF-8 text (byte {len('café au lait '.encode()) * 500 + 2})"
    (tmp_path / "cut.txt").write_bytes("café ".encode() * 500 + "é".encode()[:1])
    cases["cut.txt"] = f"cut.txt is not UTF-8 text (it ends inside a character, byte {len('café '.encode()) * 500})"
    (tmp_path / "small.txt").write_text("To be or not to be. " * 10)
    cases["small.txt"] = "small.txt is too small: 200 bytes make at most 20 val tokens"
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "a.txt").write_text("hello " * 1000)
    (tmp_path / "linked" / "b.txt").symlink_to(tmp_path / "gone.txt")
    cases["linked"] = "cannot read " + str(tmp_path / "linked" / "b.txt") + " (No such file or directory)"
    return cases


def test_bad_data_is_one_line_and_exit_2(home, tmp_path, capsys, monkeypatch):
    """Every bad --data in-process, with blocks of 1,000 bytes (so a character and the UTF-8 check straddle two);
    each message names the file and, where there is one, the byte (a broken link in a folder: why it is unreadable)."""
    monkeypatch.setattr(corpus_module, "BLOCK", 1000)
    for name, message in bad_inputs(tmp_path).items():
        capsys.readouterr()
        assert run_main(tiny_args(home, tmp_path / name, "--mode=train")) == 2, name
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (name, err)
    assert not list((home / "tokenizers").glob("*")) and not (home / "data").exists()


def test_bad_data_through_the_command_line(home, tmp_path):
    """The same through python gpt.py, for a binary file: one line on stderr, exit 2, nothing written."""
    bad_inputs(tmp_path)
    proc = run_script(home, tiny_args(home, tmp_path / "binary.txt"))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.count("\n") == 1 and "binary.txt looks binary (a NUL byte at byte 6000)" in err


def test_a_full_disk_while_writing_tokens_is_one_line_exit_1_and_keeps_the_earlier_token_file(home, tmp_path, corpus):
    """A file-size limit (RLIMIT_FSIZE, as a full disk) stops the token file's write of a grown corpus: one line,
    exit 1, no temp file, and the token file of the corpus as it was stays as it was."""
    import resource
    assert run_main(tiny_args(home, corpus, "--max_iters=1")) == 0
    (earlier,) = (home / "data").glob("corpus_*.npy")
    before = earlier.read_bytes()
    with open(corpus, "a", encoding="utf-8") as f:
        f.write(make_corpus(3000, seed=9))
    limit = len(before)  # the grown corpus's ids need more; the tokenizer's files less
    proc = run_script(home, tiny_args(home, corpus, "--mode=eval"),
                      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and "could not write" in err and "nothing was written" in err
    assert [p.name for p in (home / "data").iterdir()] == [earlier.name]
    assert earlier.read_bytes() == before
