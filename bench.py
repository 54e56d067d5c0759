"""
Benchmarks, measured as ratios within one run (never as timed test assertions).

    python bench.py                       # everything
    python bench.py --only=tokenizer      # one or more sections, comma-separated
    python bench.py --steps=3 --quick     # a fast smoke run

Prints markdown tables and writes them to generate_text/bench.md.
"""

import os
import platform
import statistics
import sys
import time
import types

import regex as re
import torch

from dualgpt import UserError
from dualgpt.cli import exit_codes
from dualgpt.files import atomic_open
from dualgpt.runconfig import declarations, defaults, load_config
from dualgpt.runtime import machine_name
from minbpe import RegexTokenizer
from minbpe.base import train_classic

HERE = os.path.dirname(os.path.abspath(__file__))


class Keys:
    """bench.py's keys (python bench.py --steps=3), declared as config.py's are."""
    only = "tokenizer,train,sample,quality,compile,rlhf"  # sections, comma-separated
    data = os.path.join(HERE, "data", "input.txt")  # the text every section reads
    vocab_size: "[256, 2**16]" = 4096  # the tokenizer section's vocabulary
    steps: "[1, 10000]" = 10  # timed training steps per variant
    quick = False  # fewer repeats and smaller shapes: a smoke run
    budget: "(0, 86400]" = 67.0  # seconds of training per run in the quality section
    dtype: "float32 | bfloat16" = "float32"  # the training-step section's autocast dtype
    lecture_batch: "[0, 4096]" = 0  # batch at the lecture shape (0: 16 on CPU, 64 on GPU)


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
    from dualgpt.runtime import resolve_device
    from dualgpt.train import make_optimizer
    device = resolve_device("auto")
    peak = matmul_peak(device, args.dtype)
    rows = []
    for shape_name, shape, batch in shapes(args, device):
        base = None
        for name, cls, impl in variants():
            model = build(cls, impl, shape, device)
            opt = make_optimizer(model, weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.99),
                                 device=device)
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
    from dualgpt.runtime import resolve_device
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


# nanoGPT's documented CPU recipe ("baby GPT", character level), here byte level = character level
# for this text
NANOGPT_BABY = dict(vocab_size=256, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                    dropout=0.0,
                    learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99, bias=False)


def train_for(overrides: dict, budget_s: float, workdir: str, data: str) -> dict:
    """Train gpt_.py for a wall-clock budget with config overrides; score it on the whole val
    split."""
    import json

    import gpt_
    from dualgpt.evaluation import evaluate_checkpoint
    from dualgpt.runconfig import model_config, script_config
    from dualgpt.train import train
    ckpt = os.path.join(workdir, "quality.pt")
    for leftover in (ckpt, ckpt[:-3] + ".jsonl"):
        if os.path.exists(leftover):
            os.remove(leftover)
    argv = [f"--{k}={v}" for k, v in overrides.items()] + [
        f"--max_minutes={budget_s / 60}", "--eval_interval=1000000000", "--mode=train",
        f"--ckpt={ckpt}", f"--data={data}"]
    cfg = script_config(argv, "gpt_")
    train(gpt_.SMGPT, cfg)
    steps = [r for r in map(json.loads, open(ckpt[:-3] + ".jsonl")) if "loss" in r]
    result = evaluate_checkpoint(gpt_.SMGPT, dict(cfg, mode="eval"))
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steps) if steps else 0.0
    model = gpt_.SMGPT(model_config(cfg, gpt_.SMGPT.config_class))
    flops_per_s = flops_per_token(model) * tokens_per_s
    return {"val_bpb": result["val"]["bpb"], "val_loss": result["val"]["loss"],
            "dtype": cfg["dtype"],
            "iters": steps[-1]["iter"] if steps else 0, "tokens_per_s": tokens_per_s,
            "mfu": flops_per_s / matmul_peak(cfg["device"], cfg["dtype"])}


def bench_quality(args) -> str:
    import tempfile

    import config
    runs = [("nanoGPT baby GPT shape, vocab 256 (byte level)", NANOGPT_BABY),
            (f"defaults ({config.n_layer}x{config.n_head}x{config.n_embd}, block "
             f"{config.block_size}, "
             f"vocab {config.vocab_size})", {})]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, overrides in runs:
            r = train_for(overrides, args.budget, workdir, args.data)
            rows.append([name, r["dtype"], f"{r['iters']:,}", f"{r['tokens_per_s']:,.0f}",
                         f"{r['mfu']:.1%}",
                         f"{r['val_loss']:.4f}", f"**{r['val_bpb']:.3f}**"])
    return (f"### Time to quality: gpt_.py trained for {args.budget:g} s of wall time (evaluation "
            f"excluded), val bits per byte over the whole val split\n\n"
            + table(["configuration", "dtype", "steps", "tokens/s", "MFU", "val loss/token",
                     "val bpb"], rows))


def timed_steps(model, optimizer, batches, steps: int, device: str, dtype: str) -> float:
    """Median seconds of a training step (forward, backward, AdamW) after two warm-up steps."""
    from dualgpt.runtime import autocast
    times = []
    for step in range(steps + 2):
        x, y = batches[step % len(batches)]
        t0 = time.perf_counter()
        with autocast(device, dtype):
            loss = model(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
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
    from dualgpt.runtime import resolve_device, resolve_dtype
    from dualgpt.train import compile_model, make_optimizer
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
        optimizer = make_optimizer(model, 0.1, 1e-3, (0.9, 0.99), device)
        eager_s = timed_steps(model, optimizer, batches, args.steps, device, dtype)
        # a cold compile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dualgpt-inductor-")
        torch._dynamo.reset()
        t0 = time.perf_counter()
        compiled = compile_model(model, config.batch_size, shape["block_size"], device, dtype)
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


def bench_rlhf(args) -> str:
    """The time of each rlhf.py stage on the shipped SM-GPT model (--quick: the quick preset), run
    as a user runs it, in a copy of the code so that the user's own results are left alone."""
    import re as plain_re
    import shutil
    import subprocess
    import tempfile

    argv = ["--quick"] if args.quick else []
    with tempfile.TemporaryDirectory() as root:
        for name in ("gpt.py", "gpt_.py", "rlhf.py", "config.py", "rlhf_config.py", "dualgpt",
                     "minbpe",
                     "rlhf_lib", "model_dict/shipped"):
            copy = shutil.copytree if os.path.isdir(os.path.join(HERE, name)) else shutil.copy
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            copy(os.path.join(HERE, name), os.path.join(root, name))
        t0 = time.perf_counter()
        result = subprocess.run([sys.executable, "rlhf.py", f"--data={args.data}", *argv],
                                cwd=root,
                                capture_output=True, text=True)
        total = time.perf_counter() - t0
    if result.returncode != 0:
        return f"### rlhf.py {' '.join(argv)}: failed\n\n{result.stderr.strip()[-500:]}"
    seconds: dict[str, float] = {}
    for stage, s in plain_re.findall(r"^\[seed \d+, (\w+): (\d+) s\]$", result.stdout,
                                     flags=plain_re.M):
        seconds[stage] = seconds.get(stage, 0.0) + float(s)
    rows = [[stage, f"{s:.0f} s"] for stage, s in seconds.items()] + [["total", f"{total:.0f} s"]]
    return (f"### rlhf.py {' '.join(argv) or '(defaults)'}: seconds per stage, "
            f"{machine_name('cpu')}\n\n"
            + table(["stage", "time"], rows))


ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
SECTIONS = {"tokenizer": bench_tokenizer, "train": bench_train, "sample": bench_sample,
            "quality": bench_quality,
            "compile": bench_compile, "rlhf": bench_rlhf}


def main(argv: list[str] | None = None) -> None:
    with exit_codes():
        cfg = load_config(sys.argv[1:] if argv is None else argv, "bench.py", defaults(Keys),
                          declarations(Keys), __doc__)
        sections = [s.strip() for s in cfg["only"].split(",") if s.strip()]
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown or not sections:
            raise UserError(f"unknown section {(unknown or [''])[0]!r}; choose from "
                            f"{', '.join(SECTIONS)}")
        if not os.path.isfile(cfg["data"]):
            raise UserError(f"data file {cfg['data']} not found; run `python gpt.py` once to "
                            f"download it, or pass --data=PATH")
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
    with atomic_open(os.path.join(HERE, "generate_text", "bench.md"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
