"""
Benchmarks, measured as ratios within one run (never as timed test assertions).

    python bench.py                       # everything
    python bench.py --only=tokenizer      # one or more sections, comma-separated
    python bench.py --steps=3 --quick     # a fast smoke run

Prints markdown tables and writes them to generate_text/bench.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import regex as re

from minbpe import RegexTokenizer
from minbpe.base import atomic_open, get_stats, merge

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "input.txt")


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bench_tokenizer(args) -> str:
    text = open(args.data, encoding="utf-8").read()
    mb = len(text.encode("utf-8")) / 1e6
    vocab_size = args.vocab_size
    tok = RegexTokenizer()
    train_s = best_of(lambda: tok.train(text, vocab_size), 1 if args.quick else 3)

    # classic: a full recount per merge; time the first merges on the full text and scale linearly
    # (later merges scan fewer tokens, so this overstates the classic time by a little)
    classic_merges = 3 if args.quick else 8
    ids = [list(ch.encode("utf-8")) for ch in re.findall(tok.compiled_pattern, text)]
    classic = []
    t0 = time.perf_counter()
    for idx in range(256, 256 + classic_merges):  # the public minbpe training loop
        stats = {}
        for chunk_ids in ids:
            get_stats(chunk_ids, stats)
        classic.append(max(stats, key=stats.get))
        ids = [merge(chunk_ids, classic[-1], idx) for chunk_ids in ids]
    classic_s = (time.perf_counter() - t0) / classic_merges * (vocab_size - 256)
    assert classic == list(tok.merges)[:classic_merges], "trainer disagrees with the classic algorithm"

    rows = [[f"train RegexTokenizer, vocab {vocab_size}, {mb:.2f} MB", f"{train_s:.2f} s",
             f"classic (est. from {classic_merges} merges): {classic_s:.0f} s", f"{classic_s / train_s:.0f}x faster"]]

    repeats = 1 if args.quick else 5

    def cold():
        tok._reset_cache()
        return tok.encode_ordinary(text)

    ours_cold = best_of(cold, repeats)
    ours_warm = best_of(lambda: tok.encode_ordinary(text), repeats)
    split_s = best_of(lambda: tok.compiled_pattern.findall(text), repeats)
    rows.append(["regex split alone", f"{mb / split_s:.1f} MB/s", "", ""])
    try:
        import tiktoken
    except ImportError:
        rows.append(["encode (cold cache / warm cache)", f"{mb / ours_cold:.1f} / {mb / ours_warm:.1f} MB/s",
                     "tiktoken not installed", ""])
    else:
        ranks = {token: idx for idx, token in tok.vocab.items()}
        enc = tiktoken.Encoding("bench", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens={})
        tik_s = best_of(lambda: enc.encode_ordinary(text), repeats)
        same = enc.encode_ordinary(text) == tok.encode_ordinary(text)
        for name, s in (("encode, cold cache (fresh tokenizer)", ours_cold), ("encode, warm cache", ours_warm)):
            rows.append([name, f"{mb / s:.1f} MB/s", f"tiktoken same ranks: {mb / tik_s:.1f} MB/s",
                         f"{tik_s / s:.2f}x tiktoken, identical ids: {same}"])
    return "### Tokenizer (Tiny Shakespeare, pure Python, 1 thread)\n\n" + table(
        ["what", "ours", "reference", "ratio"], rows)


SECTIONS = {"tokenizer": bench_tokenizer}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections: {', '.join(SECTIONS)}")
    parser.add_argument("--data", default=DEFAULT_DATA, help="text file (default: data/input.txt)")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller shapes: a smoke run")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.exit(2, f"error: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}\n")
    if not os.path.exists(args.data):
        parser.exit(2, f"error: data file {args.data} not found; run `python gpt.py` once to download it, "
                       f"or pass --data=PATH\n")
    header = (f"## Dual-GPT benchmarks\n\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}, command: `python bench.py {' '.join(argv or sys.argv[1:])}`")
    out = [header]
    print(header + "\n", flush=True)
    for name in sections:
        result = SECTIONS[name](args)
        print(result + "\n", flush=True)
        out.append(result)
    with atomic_open(os.path.join(HERE, "generate_text", "bench.md"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
