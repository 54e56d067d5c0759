"""Sampling and evaluation: top-k/top-p against a plain reference, prompts, exact deterministic eval."""
import re
import types

import numpy as np
import pytest
import torch
from conftest import dataset, make_corpus, run_main, tiny_args

import gpt
import gpt_
from dualgpt import checkpoint, evaluation, sampling
from dualgpt.runconfig import script_config


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
    assert torch.equal(sampling.filter_logits(logits, top_k, top_p), reference_filter(logits, top_k, top_p))


def test_prompt_handling(home, corpus, tmp_path, capsys):
    args = tiny_args(home, corpus, "--max_iters=2", "--eval_interval=2", n_layer=2)
    assert run_main(args + ["--mode=train"]) == 0
    long_prompt = tmp_path / "prompt.txt"
    long_prompt.write_text(make_corpus(50, seed=9))  # far longer than block_size
    capsys.readouterr()
    assert run_main(args + ["--mode=sample", f"--prompt=FILE:{long_prompt}"]) == 0
    assert re.search(r"^note: the prompt is \d+ tokens; the model reads its last 32$", capsys.readouterr().out, re.M)
    assert run_main(args + ["--mode=sample", "--prompt="]) == 0
    assert "note: the prompt is" not in capsys.readouterr().out
    assert run_main(args + ["--mode=sample", "--prompt=FILE:/no/such/prompt"]) == 2
    assert "cannot read prompt file" in capsys.readouterr().err
    capsys.readouterr()
    assert run_main(args + ["--mode=sample", "--temperature=0", "--num_samples=2"]) == 0
    text = (home / "generate_text" / "gpt.txt").read_text()
    s1, s2 = text.split("--- sample 1 ---")[1].split("--- sample 2 ---")
    assert s1.strip() == s2.strip()  # greedy is deterministic


def test_eval_is_deterministic_and_exact(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=10", "--eval_interval=10", n_layer=2)
    assert run_main(args + ["--mode=train"]) == 0
    cfg = script_config(args, "gpt")
    a = evaluation.evaluate_checkpoint(gpt.LBGPT, cfg)
    b = evaluation.evaluate_checkpoint(gpt.LBGPT, cfg)
    assert a == b
    # the same number by a plain loop over the val split
    ckpt = checkpoint.load_checkpoint(cfg["ckpt"])
    model = checkpoint.model_from_checkpoint(gpt.LBGPT, ckpt, cfg["ckpt"], "cpu").eval()
    ds = dataset(cfg)
    val = torch.from_numpy(ds.splits["val"].astype(np.int64))
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(val) - 1, 32):
            x, y = val[s:s + 32][None], val[s + 1:s + 33][None]
            x = x[:, :y.shape[1]]
            total += model(x, y)[1].item() * y.numel()
            count += y.numel()
    assert a["val"]["loss"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("kv_cache", [True, False])
def test_a_sample_ends_before_the_first_stop_string_with_and_without_the_kv_cache(home, corpus, capsys, kv_cache):
    """The same sample as without --stop, cut before the first of the stop strings in what was generated;
    nothing of the stop string is printed."""
    args = tiny_args(home, corpus, "--max_iters=2", "--eval_interval=2", script="gpt_", n_layer=2) + [
        "--prompt=KING:", "--max_new_tokens=60", "--temperature=1.0", f"--kv_cache={kv_cache}"]
    assert run_main(args + ["--mode=train"], gpt_.SMGPT, "gpt_") == 0
    assert run_main(args + ["--mode=sample"], gpt_.SMGPT, "gpt_") == 0
    whole = (home / "generate_text" / "gpt_.txt").read_text().split("--- sample 1 ---\n")[1][len("KING:"):-1]
    first, later = whole[20:22], whole[40:43]  # two stop strings: the first to occur ends it
    escape = lambda t: t.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "\\n").replace("\t", "\\t")  # noqa: E731
    capsys.readouterr()
    assert run_main(args + ["--mode=sample", f"--stop={escape(later)}|{escape(first)}"], gpt_.SMGPT, "gpt_") == 0
    cut = whole[:min(whole.find(first), whole.find(later))]
    assert (home / "generate_text" / "gpt_.txt").read_text().split("--- sample 1 ---\n")[1] == "KING:" + cut + "\n"
    printed = capsys.readouterr().out.split("--- sample 1/1 ---\n")[1]
    assert printed.startswith("KING:" + cut + "\n") and len(cut) <= 20


def test_stop_strings_are_split_at_bars_and_unescaped():
    assert sampling.stop_strings(r"\n\n|ROMEO:") == ["\n\n", "ROMEO:"]
    assert sampling.stop_strings(r"a\|b|c\\d|") == ["a|b", "c\\d"]
    assert sampling.stop_strings("") == []


def test_the_whole_split_windows_give_contiguous_targets():
    """nanoGPT's model view()s its targets: scoring it through full_loss failed on the sliced ones."""
    from dualgpt.evaluation import windows
    data = types.SimpleNamespace(splits={"val": np.arange(200, dtype=np.uint16)}, block_size=8, batch_size=4,
                                 device="cpu")
    pairs = list(windows(data, "val"))
    assert all(y.is_contiguous() for _, y in pairs)
    assert torch.equal(torch.cat([y.flatten() for _, y in pairs]), torch.arange(1, 200))
