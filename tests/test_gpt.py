"""gpt.py (LB-GPT): the model, the config, the data pipeline, training, resume, sampling, errors."""
import functools
import http.server
import json
import math
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

import gpt
from conftest import make_corpus, run_main, run_script, tiny_args
from minbpe import RegexTokenizer

CFG = gpt.ModelConfig(vocab_size=300, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)


def test_causality():
    torch.manual_seed(0)
    model = gpt.GPT(CFG).eval()
    x = torch.randint(0, 300, (2, 16))
    base, _ = model(x)
    for t in range(15):
        changed = x.clone()
        changed[:, t + 1:] = torch.randint(0, 300, changed[:, t + 1:].shape)
        logits, _ = model(changed)
        assert torch.equal(logits[:, :t + 1], base[:, :t + 1])  # later tokens never reach earlier logits
        assert not torch.equal(logits[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize("vocab_size", [300, 1024])
def test_initial_loss_is_uniform(vocab_size):
    torch.manual_seed(0)
    model = gpt.GPT(gpt.ModelConfig(vocab_size, 32, 2, 2, 32))
    x, y = torch.randint(0, vocab_size, (2, 8, 32))
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(vocab_size)) < 0.05


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = gpt.GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.randint(0, 300, (2, 4, 16))
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_heads_are_separate_modules():
    model = gpt.GPT(CFG)
    heads = model.blocks[0].attn.heads
    assert len(heads) == 4 and all(h.key.weight.shape == (8, 32) for h in heads)


# --- configuration ----------------------------------------------------------------------


def test_config_overrides_are_typed():
    cfg = gpt.load_config(["--n_layer=3", "--dropout=0.25", "--resume", "--prompt=O Romeo", "--bias=true",
                           "--device=cpu"], "gpt")
    assert cfg["n_layer"] == 3 and cfg["dropout"] == 0.25 and cfg["resume"] is True
    assert cfg["prompt"] == "O Romeo" and cfg["bias"] is True
    assert cfg["ckpt"].endswith(os.path.join("model_dict", "gpt.pt"))
    assert gpt.load_config(["--device=cpu"], "gpt_")["sample_file"].endswith(os.path.join("generate_text", "gpt_.txt"))


@pytest.mark.parametrize("argv, message", [
    (["--n_layr=3"], "unknown config key 'n_layr'; did you mean --n_layer?"),
    (["--n_layer=three"], "--n_layer=three: expected int"),
    (["--resume=maybe"], "--resume=maybe: expected bool"),
    (["--n_embd=100", "--n_head=3"], "divisible by n_head"),
    (["--block_size=0"], "block_size must be at least 1"),
    (["--dropout=1.0"], "dropout must be in [0, 1)"),
    (["--dropout=-0.1"], "dropout must be in [0, 1)"),
    (["--vocab_size=100"], "vocab_size must be at least 256"),
    (["--mode=dance"], "mode must be"),
    (["--dtype=float8"], "dtype must be"),
    (["--top_p=0"], "top_p must be in (0, 1]"),
    (["--temperature=-1"], "temperature must be >= 0"),
    (["--device=cuda:7"] if not torch.cuda.is_available() else ["--device=tpu"], "device"),
    (["n_layer=3"], "unexpected argument"),
    (["--resume", "--overwrite"], "contradict"),
])
def test_config_errors_are_one_line(argv, message, capsys, tmp_path):
    assert run_main(["--mode=eval", f"--ckpt={tmp_path / 'none.pt'}"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_data_file(home, capsys):
    assert run_main(["--data=no/such/file.txt", "--mode=train", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "no/such/file.txt not found" in err and err.count("\n") == 1


def test_offline_download_fails_with_hint(home, corpus, capsys):
    url = "http://127.0.0.1:9/input.txt"  # nothing listens on the discard port
    assert run_main(tiny_args(home, corpus) + ["--data=data/input.txt", f"--data_url={url}", "--mode=train"]) == 2
    err = capsys.readouterr().err
    assert "could not download" in err and "--data=PATH" in err and err.count("\n") == 1
    assert not (home / "data" / "input.txt").exists()


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1 (loopback only)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_verifies_checksum(home, corpus, http_server, capsys):
    root, base = http_server
    (root / "shakes.txt").write_text(corpus.read_text())
    url = f"{base}/shakes.txt"
    args = tiny_args(home, corpus) + ["--data=data/input.txt", f"--data_url={url}", "--mode=train"]
    assert run_main(args + ["--data_sha256=" + "0" * 64]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert not (home / "data" / "input.txt").exists() and not list((home / "data").glob("*tmp"))
    cfg = gpt.load_config(args + ["--data_sha256=" + gpt.sha256_file(str(corpus))], "gpt")
    assert gpt.resolve_data(cfg) == str(home / "data" / "input.txt")
    assert (home / "data" / "input.txt").read_text() == corpus.read_text()
    # --data=URL downloads to data/<name> (checksum only for the canonical URL)
    cfg = gpt.load_config(tiny_args(home, corpus) + [f"--data={url}"], "gpt")
    assert gpt.resolve_data(cfg) == str(home / "data" / "shakes.txt")


def test_non_utf8_and_too_small(home, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1") * 100)
    assert run_main([f"--data={bad}", "--mode=train", "--device=cpu"]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    small = tmp_path / "small.txt"
    small.write_text("To be or not to be. " * 30)
    assert run_main([f"--data={small}", "--mode=train", "--device=cpu", "--block_size=128", "--vocab_size=260"]) == 2
    assert "too small" in capsys.readouterr().err


# --- data pipeline ------------------------------------------------------------------------


def test_piecewise_encoding_equals_one_encode():
    text = make_corpus(400, seed=3)
    tok = RegexTokenizer()
    tok.train(text, 320)
    ids = gpt.encode_with_progress(tok, text, block=500)  # forces many pieces
    assert ids.tolist() == tok.encode_ordinary(text)


def test_dataset_cache_split_and_bits_per_byte(home, corpus):
    cfg = gpt.load_config(tiny_args(home, corpus), "gpt")
    data = gpt.Dataset(cfg)
    assert len(list((home / "tokenizers").glob("*.model"))) == 1
    caches = list((home / "data").glob("*.npy"))
    assert len(caches) == 1
    ids = np.load(caches[0])
    assert ids.tolist() == data.tok.encode_ordinary(corpus.read_text())
    n = int(0.9 * len(ids))
    assert data.splits["train"].tolist() == ids[:n].tolist() and data.splits["val"].tolist() == ids[n:].tolist()
    val_bytes = len(data.tok.decode(ids[n:].tolist()).encode("utf-8"))
    assert data.bpb(2.0, "val") == pytest.approx(2.0 * (len(ids) - n) / val_bytes / math.log(2))
    x, y = data.batch("train", torch.Generator().manual_seed(0))
    assert x.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1])
    tokens = sum(y.numel() for _, y in data.windows("val"))
    assert tokens == len(ids) - n - 1  # every val token predicted once
    again = gpt.Dataset(cfg)  # reuses tokenizer and cache
    assert len(list((home / "data").glob("*.npy"))) == 1 and again.tok.merges == data.tok.merges


# --- training, sampling, evaluation ------------------------------------------------------


def test_lr_schedule():
    cfg = {"learning_rate": 1.0, "min_lr": 0.1, "warmup_iters": 10, "lr_decay_iters": 110}
    assert gpt.lr_at(0, cfg) < gpt.lr_at(9, cfg) < 1.0
    assert gpt.lr_at(10, cfg) == pytest.approx(1.0)
    assert gpt.lr_at(60, cfg) == pytest.approx(0.55)
    assert gpt.lr_at(110, cfg) == gpt.lr_at(500, cfg) == 0.1


def test_train_sample_eval_end_to_end(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=30", "--eval_interval=10")
    assert run_main(args + ["--mode=train"]) == 0
    ckpt = torch.load(home / "model_dict" / "gpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 30 and ckpt["layout"] == "looped"
    records = [json.loads(line) for line in open(home / "model_dict" / "gpt.jsonl")]
    log = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in log] == [0, 10, 20, 30]
    assert [r["iter"] for r in records if "loss" in r] == [10, 20, 30]  # step records at log_interval
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    assert {"train_loss", "val_bpb", "lr", "tokens_per_s", "elapsed_s"} <= set(log[-1])
    assert ckpt["best_val_loss"] == min(r["val_loss"] for r in log)

    capsys.readouterr()
    assert run_main(args + ["--mode=sample", "--prompt=ROMEO:", "--temperature=0"]) == 0
    out = capsys.readouterr().out
    sample_text = (home / "generate_text" / "gpt.txt").read_text()
    assert sample_text.startswith("# gpt.py samples from") and "iteration 30" in sample_text
    streamed = out.split("--- sample 1/1 ---\n")[1].split("\nsamples written")[0]
    assert streamed.startswith("ROMEO:") and streamed in sample_text

    for _ in range(2):
        assert run_main(args + ["--mode=eval"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("train:", "val:"))]
    assert len(lines) == 4 and lines[:2] == lines[2:] and "bits per byte" in lines[1]


def test_eval_is_deterministic_and_exact(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=10", "--eval_interval=10")
    assert run_main(args + ["--mode=train"]) == 0
    cfg = gpt.load_config(args, "gpt")
    a = gpt.evaluate_checkpoint(gpt.GPT, cfg)
    b = gpt.evaluate_checkpoint(gpt.GPT, cfg)
    assert a == b
    # the same number by a plain loop over the val split
    ckpt = gpt.load_checkpoint(cfg["ckpt"])
    model = gpt.model_from_checkpoint(gpt.GPT, ckpt, cfg).eval()
    data = gpt.Dataset(cfg)
    val = torch.from_numpy(data.splits["val"].astype(np.int64))
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(val) - 1, 32):
            x, y = val[s:s + 32][None], val[s + 1:s + 33][None]
            x = x[:, :y.shape[1]]
            total += model(x, y)[1].item() * y.numel()
            count += y.numel()
    assert a["val"]["loss"] == pytest.approx(total / count, rel=1e-5)


def test_auto_mode_trains_then_samples_then_only_samples(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=5", "--eval_interval=5")
    assert run_main(args) == 0
    assert (home / "model_dict" / "gpt.pt").exists() and (home / "generate_text" / "gpt.txt").exists()
    mtime = os.path.getmtime(home / "model_dict" / "gpt.pt")
    capsys.readouterr()
    assert run_main(args) == 0
    assert "sampling from it" in capsys.readouterr().out
    assert os.path.getmtime(home / "model_dict" / "gpt.pt") == mtime


def test_fresh_train_never_destroys_a_checkpoint(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=5", "--eval_interval=5", "--mode=train")
    assert run_main(args) == 0
    before = (home / "model_dict" / "gpt.pt").read_bytes()
    assert run_main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert (home / "model_dict" / "gpt.pt").read_bytes() == before
    assert run_main(args + ["--overwrite", "--seed=2"]) == 0
    assert (home / "model_dict" / "gpt.pt.bak").read_bytes() == before


def state_of(path):
    return torch.load(path, weights_only=True)["model"]


def test_resume_equals_uninterrupted(home, corpus):
    common = tiny_args(home, corpus, "--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=16", "--mode=train")
    full = common + [f"--ckpt={home / 'full.pt'}"]
    assert run_main(full + ["--max_iters=16"]) == 0
    part = common + [f"--ckpt={home / 'part.pt'}"]
    assert run_main(part + ["--max_iters=6"]) == 0  # stops between evaluations
    assert run_main(part + ["--max_iters=16", "--resume"]) == 0
    a, b = state_of(home / "full.pt"), state_of(home / "part.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_full = [r for r in map(json.loads, open(home / "full.jsonl")) if "val_loss" in r]
    log_part = [r for r in map(json.loads, open(home / "part.jsonl")) if "val_loss" in r]
    key = lambda log: [(r["iter"], r["train_loss"], r["val_loss"]) for r in log]  # noqa: E731
    assert [r for r in key(log_part) if r[0] != 6] == key(log_full)


def test_ctrl_c_saves_and_resumes_exactly(home, corpus):
    common = tiny_args(home, corpus, "--dropout=0.1", "--eval_interval=1000", "--lr_decay_iters=60", "--mode=train")
    proc = run_script(home, common + [f"--ckpt={home / 'int.pt'}", "--max_iters=100000"])
    deadline = time.time() + 120
    while not (home / "int.pt").exists() and time.time() < deadline:  # written after the first evaluation
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in out and "Traceback" not in err
    stopped_at = torch.load(home / "int.pt", weights_only=True)["iter_num"]
    assert stopped_at > 0
    end = f"--max_iters={stopped_at + 10}"
    assert run_main(common + [f"--ckpt={home / 'full.pt'}", end]) == 0
    assert run_main(common + [f"--ckpt={home / 'int.pt'}", end, "--resume"]) == 0
    a, b = state_of(home / "full.pt"), state_of(home / "int.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_checkpoint(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=5", "--eval_interval=1000", "--mode=train")
    assert run_main(args) == 0
    good = (home / "model_dict" / "gpt.pt").read_bytes()
    assert run_main(args + ["--max_iters=30", "--resume", "--learning_rate=1e38", "--min_lr=1e38",
                            "--grad_clip=0", "--log_interval=1"]) == 1
    err = capsys.readouterr().err
    last = err.strip().split("\n")[-1].split("\r")[-1]  # after tqdm's bars
    assert last.startswith("error: loss is") and "kept" in last and "Traceback" not in err
    assert (home / "model_dict" / "gpt.pt").read_bytes() == good


def test_bad_checkpoints_are_one_line_errors(home, corpus, capsys, tmp_path):
    args = tiny_args(home, corpus)
    assert run_main(args + ["--mode=sample", f"--ckpt={tmp_path / 'none.pt'}"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    assert run_main(args + ["--mode=eval", f"--ckpt={tmp_path / 'junk.pt'}"]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    torch.save({"model": {}}, tmp_path / "other.pt")
    assert run_main(args + ["--mode=sample", f"--ckpt={tmp_path / 'other.pt'}"]) == 2
    assert "not a Dual-GPT checkpoint" in capsys.readouterr().err


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_loading_never_runs_pickled_code(home, corpus, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": Boom()}, tmp_path / "evil.pt")
    assert run_main(tiny_args(home, corpus) + ["--mode=sample", f"--ckpt={tmp_path / 'evil.pt'}"]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "pwned.txt").exists()


def test_resume_with_other_shape_is_an_error(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=2", "--eval_interval=2", "--mode=train")
    assert run_main(args) == 0
    assert run_main(args + ["--resume", "--n_embd=64"]) == 2
    assert "n_embd=32" in capsys.readouterr().err


# --- sampling -----------------------------------------------------------------------------


def reference_filter(logits, top_k, top_p):
    """Straightforward per-row top-k / top-p, for comparison."""
    out = logits.clone()
    for row in out:
        order = sorted(range(len(row)), key=lambda i: -row[i].item())
        keep = set(order[:top_k]) if top_k else set(order)
        probs = torch.softmax(row, dim=-1)
        if top_p < 1:
            total, nucleus = 0.0, set()
            for i in order:
                nucleus.add(i)
                total += probs[i].item()
                if total >= top_p:
                    break
            keep &= nucleus
        for i in range(len(row)):
            if i not in keep:
                row[i] = float("-inf")
    return out


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.5), (3, 0.9), (1, 1.0), (0, 0.01)])
def test_filter_logits_matches_reference(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(4, 20) * 3
    assert torch.equal(gpt.filter_logits(logits, top_k, top_p), reference_filter(logits, top_k, top_p))


def test_prompt_handling(home, corpus, tmp_path, capsys):
    args = tiny_args(home, corpus, "--max_iters=2", "--eval_interval=2")
    assert run_main(args + ["--mode=train"]) == 0
    long_prompt = tmp_path / "prompt.txt"
    long_prompt.write_text(make_corpus(50, seed=9))  # far longer than block_size
    assert run_main(args + ["--mode=sample", f"--prompt=FILE:{long_prompt}"]) == 0
    assert run_main(args + ["--mode=sample", "--prompt="]) == 0
    assert run_main(args + ["--mode=sample", "--prompt=FILE:/no/such/prompt"]) == 2
    assert "cannot read prompt file" in capsys.readouterr().err
    capsys.readouterr()
    assert run_main(args + ["--mode=sample", "--temperature=0", "--num_samples=2"]) == 0
    text = (home / "generate_text" / "gpt.txt").read_text()
    s1, s2 = text.split("--- sample 1 ---")[1].split("--- sample 2 ---")
    assert s1.strip() == s2.strip()  # greedy is deterministic


# --- time budget, MFU, mixed precision ------------------------------------------------------


def test_lr_schedule_follows_the_clock():
    cfg = {"learning_rate": 1.0, "min_lr": 0.1, "warmup_iters": 10, "lr_decay_iters": 110}
    assert gpt.lr_at(5, cfg, 0.9) == gpt.lr_at(5, cfg)  # warm-up is counted in steps
    assert gpt.lr_at(500, cfg, 0.0) == pytest.approx(1.0)
    assert gpt.lr_at(11, cfg, 0.5) == pytest.approx(0.55)
    assert gpt.lr_at(11, cfg, 1.0) == gpt.lr_at(11, cfg, 3.0) == 0.1


def test_max_minutes_budget_decays_fully_and_plots(home, corpus):
    args = tiny_args(home, corpus, "--max_minutes=0.05", "--max_iters=0", "--eval_interval=50", "--mode=train")
    t0 = time.time()
    assert run_main(args) == 0
    wall = time.time() - t0
    ckpt = torch.load(home / "model_dict" / "gpt.pt", weights_only=True)
    assert ckpt["iter_num"] > 10 and 3.0 <= ckpt["train_s"] < wall  # evaluation time is not counted
    records = [json.loads(line) for line in open(home / "model_dict" / "gpt.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["lr"] < 2e-4 + 0.05 * (3e-3 - 2e-4)  # ended (almost) fully decayed to min_lr
    assert all(0 < r["mfu"] < 1 for r in steps)
    assert [r["train_s"] for r in records] == sorted(r["train_s"] for r in records)
    png = home / "model_dict" / "gpt.loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib_image(png).shape[0] > 100


def matplotlib_image(path):
    import matplotlib.image
    return matplotlib.image.imread(path)


def test_dtype_auto(monkeypatch):
    monkeypatch.setattr(gpt, "cpu_has_bf16", lambda: False)
    assert gpt.resolve_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(gpt, "cpu_has_bf16", lambda: True)
    assert gpt.resolve_dtype("auto", "cpu") == "bfloat16"
    assert gpt.resolve_dtype("float32", "cpu") == "float32"


def test_bfloat16_autocast_trains(home, corpus):
    args = tiny_args(home, corpus, "--max_iters=30", "--eval_interval=30", "--mode=train", "--dtype=bfloat16")
    assert run_main(args) == 0
    evals = [r for r in map(json.loads, open(home / "model_dict" / "gpt.jsonl")) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    weights = torch.load(home / "model_dict" / "gpt.pt", weights_only=True)["model"]
    assert all(w.dtype == torch.float32 for w in weights.values())  # fp32 master weights


def test_flops_per_token_by_hand():
    model = gpt.GPT(gpt.ModelConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=8, bias=False))
    C, L, V = 8, 2, 300
    per_layer = 4 * C * C + 8 * C * C + 2 * C  # attention q,k,v,proj; MLP; two LayerNorm weights
    weights = V * C + L * per_layer + C  # tied embedding/head, blocks, final LayerNorm (wpe excluded)
    assert gpt.flops_per_token(model) == 6 * weights + 12 * L * C * 16


# --- torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, expected", [
    ({"compile": "true"}, True), ({"compile": "false", "max_minutes": 10.0}, False),
    ({"max_minutes": 5.0}, True), ({"max_minutes": 1.0}, False),
    ({"max_minutes": 0.0, "max_iters": 50000}, False),  # CPU, duration unknown
    ({"max_minutes": 0.0, "max_iters": 5000, "device": "cuda"}, True),
    ({"max_minutes": 0.0, "max_iters": 200, "device": "cuda"}, False),
])
def test_compile_auto_decision(overrides, expected):
    cfg = dict({"compile": "auto", "max_minutes": 0.0, "max_iters": 100, "device": "cpu"}, **overrides)
    assert gpt.should_compile(cfg) is expected


def test_compiled_training_matches_eager(home, corpus):
    args = tiny_args(home, corpus, "--max_iters=8", "--eval_interval=8", "--mode=train")
    assert run_main(args + ["--compile=false", f"--ckpt={home / 'eager.pt'}"]) == 0
    assert run_main(args + ["--compile=True", f"--ckpt={home / 'compiled.pt'}"]) == 0
    eager, compiled = state_of(home / "eager.pt"), state_of(home / "compiled.pt")
    assert all((eager[k] - compiled[k]).abs().max().item() < 1e-4 for k in eager)


def test_compile_failure_falls_back_to_eager(home, corpus, capsys, monkeypatch):
    def broken_compile(model):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        return fail

    monkeypatch.setattr(gpt.torch, "compile", broken_compile)
    args = tiny_args(home, corpus, "--max_iters=4", "--eval_interval=4", "--mode=train", "--compile=true")
    assert run_main(args) == 0
    assert "torch.compile failed (RuntimeError: no C++ compiler found); training without it" in capsys.readouterr().out
    assert torch.load(home / "model_dict" / "gpt.pt", weights_only=True)["iter_num"] == 4
