"""Head-level research: head masks, statistics, probe scores, composition scores, --mode=heads."""
import json
import os
import re
import shutil

import matplotlib.image
from matplotlib.figure import Figure
import pytest
import torch
from conftest import ROOT, dataset, run_main, tiny_args
from test_hooks import plain_forward

import gpt
import gpt_
from dualgpt import checkpoint, heads, layouts, probes
from dualgpt.runconfig import script_config, model_config, parse_head_mask

CFG = gpt.ModelConfig(vocab_size=300, block_size=16, n_layer=3, n_head=4, n_embd=32, dropout=0.0, bias=False)


def models(cfg=CFG, impl="sdpa"):
    torch.manual_seed(0)
    lb = gpt.LBGPT(cfg).eval()
    sm = gpt_.SMGPT(cfg, attn_impl=impl).eval()
    sm.load_state_dict(layouts.convert_state_dict(lb.state_dict(), "LB-GPT", "SM-GPT", cfg.n_head))
    return lb, sm


@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
def test_masking_changes_logits_the_same_way_in_both_layouts(impl):
    lb, sm = models(impl=impl)
    x = torch.randint(0, 300, (2, 16))
    base = lb(x)[0], sm(x)[0]
    for model in (lb, sm):
        model.set_head_mask({(1, 2), (0, 0)})
    masked_lb, masked_sm = lb(x)[0], sm(x)[0]
    assert (masked_lb - base[0]).abs().max().item() > 1e-4
    assert (masked_lb - masked_sm).abs().max().item() <= 1e-5
    for model, unmasked in zip((lb, sm), base):  # an empty mask switches every head back on
        model.set_head_mask(parse_head_mask(""))
        assert torch.equal(model(x)[0], unmasked)


@pytest.mark.parametrize("layout", ["LB-GPT", "SM-GPT"])
def test_masking_a_whole_layer_removes_its_attention_branch(layout):
    lb, sm = models()
    model = lb if layout == "LB-GPT" else sm
    x = torch.randint(0, 300, (2, 16))
    model.set_head_mask({(1, h) for h in range(4)})
    masked = model(x)[0]
    model.set_head_mask(set())
    model.blocks[1].attn.forward = lambda h, *args: torch.zeros_like(h)  # the branch removed
    assert torch.equal(masked, model(x)[0])


@pytest.mark.parametrize("spec, message", [("0-3", "not layer.head"), ("a.b", "not layer.head"), ("1", "not layer.head"),
                                            ("0.9", "does not exist"), ("7.0", "does not exist")])
def test_bad_head_mask_is_one_line_error(home, corpus, spec, message, capsys):
    args = tiny_args(home, corpus, "--max_iters=2", "--eval_interval=2", n_layer=2)
    assert run_main(args + ["--mode=train"]) == 0
    capsys.readouterr()
    assert run_main(args + ["--mode=sample", f"--head_mask={spec}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: head_mask")
    assert message in err
    assert err.count("\n") == 1


def test_head_mask_applies_in_training(home, corpus):
    """A masked head gets no gradient, so AdamW leaves its weights at their initial values."""
    args = tiny_args(home, corpus, "--max_iters=6", "--eval_interval=6", "--mode=train", "--head_mask=1.0", n_layer=2)
    assert run_main(args) == 0
    trained = torch.load(home / "model_dict" / "gpt.pt", weights_only=True)["model"]
    cfg = script_config(args, "gpt")
    torch.manual_seed(cfg["seed"])
    initial = gpt.LBGPT(model_config(cfg, gpt.ModelConfig)).state_dict()
    for name in ("blocks.1.attn.heads.0.key.weight", "blocks.1.attn.heads.0.value.weight"):
        assert torch.equal(trained[name], initial[name])
    assert not torch.equal(trained["blocks.1.attn.heads.1.key.weight"], initial["blocks.1.attn.heads.1.key.weight"])


def page_data(path) -> dict:
    """The data an atlas page draws, as written into it."""
    return json.loads(re.search(r"^const data = (.*);$", path.read_text(), flags=re.M).group(1))


@pytest.mark.plots
def test_mode_heads_writes_maps_stats_composition_and_ablation(home, corpus, capsys, monkeypatch):
    args = tiny_args(home, corpus, "--max_iters=10", "--eval_interval=10", n_layer=2)
    assert run_main(args + ["--mode=train"]) == 0
    capsys.readouterr()
    prompt = "ROMEO: O my love, " * 12  # more tokens than the window: the maps show its end, and say so
    assert run_main(args + ["--mode=heads", "--heads_per_layer", f"--prompt={prompt}"]) == 0
    out = capsys.readouterr().out
    assert "heads by importance" in out and "largest K-composition" in out
    assert re.search(r"note: the prompt is \d+ tokens; the maps show its last 32\n", out)
    out_dir = home / "generate_text"
    for png in ["gpt.heads.png", "gpt.ablation.png", "gpt.heads.layer0.png", "gpt.heads.layer1.png",
                "gpt.composition.png"]:
        path = out_dir / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100
        assert image.shape[1] > 100
    report = json.loads((out_dir / "gpt.heads.json").read_text())
    rows = report["heads"]
    assert sorted((r["layer"], r["head"]) for r in rows) == [(layer, h) for layer in range(2) for h in range(2)]
    assert [r["loss_increase"] for r in rows] == sorted((r["loss_increase"] for r in rows), reverse=True)
    assert "label (probe / text)" in out and "ICL off" in out
    # the probe's record, its scores and labels (block 32: 15 tokens per copy), and the ICL score
    pool = probes.training_tokens(dataset(script_config(args, "gpt")).splits["train"])
    assert 0 < len(pool) < 300  # a small corpus: most of the 300 ids never occur, and are never drawn
    assert report["probe"] == {"sequences": 64, "length": 15, "seed": 1337, "tokens": len(pool),
                               "drawn_from": "ids in the train split", "label_threshold": 0.4}
    assert isinstance(report["icl_score"], float)
    for r in rows:
        assert not r["masked"]
        assert all(0 <= r[name] <= 1 for name in probes.PROBES + heads.TEXT_SCORES)
        assert r["label"] == heads.head_label(r)
        assert r["text_label"] == heads.head_label(r, heads.TEXT_SCORES)
        assert r["entropy"] >= 0
    # icl_change: the ICL score with that head also off, minus with all on
    _, model = checkpoint.checkpoint_model(gpt.LBGPT, script_config(args + ["--mode=heads"], "gpt"))
    probe = probes.repeated_tokens(64, 15, pool, 1337)
    assert set(probe.flatten().tolist()) <= set(pool.tolist())
    row = rows[0]
    model.set_head_mask({(row["layer"], row["head"])})
    assert probes.probe_scores(model, probe, 15)[1] - report["icl_score"] == pytest.approx(
        row["icl_change"], abs=1e-5)
    # composition: every head of layer 0 with every head of layer 1, the model's scores
    model.set_head_mask(set())
    scores = heads.composition_scores(model)
    pairs = report["composition"]["pairs"]
    assert [(p["from"], p["to"]) for p in pairs] == [([0, i], [1, j]) for i in range(2) for j in range(2)]
    for p in pairs:
        for kind in "qkv":
            assert p[kind] == pytest.approx(scores[kind][(*p["from"], *p["to"])].item(), abs=1e-6)
    assert 0 < report["composition"]["baseline"] < 1
    # the page: the val excerpt, the prompt's last 32 tokens and the probe, no mask
    data = page_data(out_dir / "gpt.heads.html")
    assert [(i["name"], len(i["tokens"])) for i in data["inputs"]] == [("val text", 32), ("prompt", 32),
                                                                       ("probe", 31)]
    assert data["mask"] == [] and data["heads"] == rows
    # deterministic, and the same from gpt_.py on the same checkpoint (the figures, checked above, not drawn again)
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: None)
    assert run_main(args + ["--mode=heads"]) == 0
    first = json.loads((out_dir / "gpt.heads.json").read_text())
    assert run_main(args + ["--mode=heads"]) == 0
    assert json.loads((out_dir / "gpt.heads.json").read_text()) == first
    assert run_main(args + ["--mode=heads"], gpt_.SMGPT, "gpt_") == 0
    sm = json.loads((out_dir / "gpt.heads.json").read_text())
    assert [(r["layer"], r["head"]) for r in sm["heads"]] == [(r["layer"], r["head"]) for r in first["heads"]]
    for a, b in zip(first["heads"], sm["heads"]):
        for key in ("loss_increase", "entropy", "previous_token", "duplicate_token", "induction",
                    "icl_change", "previous_token_text", "output_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    for a, b in zip(first["composition"]["pairs"], sm["composition"]["pairs"]):
        assert a == pytest.approx(b, abs=1e-6)
    # a masked run: its own files, nothing measured of the masked head, the mask on the page
    capsys.readouterr()
    assert run_main(args + ["--mode=heads", "--head_mask=1.0"]) == 0
    assert json.loads((out_dir / "gpt.heads.json").read_text()) == sm  # the unmasked run's, untouched
    masked = json.loads((out_dir / "gpt.masked-1.0.heads.json").read_text())
    off = next(r for r in masked["heads"] if (r["layer"], r["head"]) == (1, 0))
    assert off["masked"] and off["label"] == "" and all(off[k] is None for k in (
        "induction", "previous_token_text", "output_norm", "loss_increase", "icl_change"))
    assert masked["heads"][-1] is off  # sorted last
    on = [r for r in masked["heads"] if r is not off]
    assert all(r["output_norm"] > 0 and r["loss_increase"] is not None for r in on)
    assert masked["val_loss"] != first["val_loss"]  # measured with the head off
    assert page_data(out_dir / "gpt.masked-1.0.heads.html")["mask"] == [[1, 0]]
    assert re.search(r"1\.0 +masked", capsys.readouterr().out)
    # a probe longer than the window: one line, exit 2, nothing written
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    capsys.readouterr()
    assert run_main(args + ["--mode=heads", "--probe_length=16"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: probe_length 16 does not fit the model's block_size 32: a probe is "
                   "1 + 2 x probe_length tokens, so at most 15\n")
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before


def test_on_a_fresh_clone_the_head_modes_use_the_shipped_model_and_say_so(home, corpus, capsys, monkeypatch):
    """No model trained at model_dict/gpt.pt: --mode=heads (docs/heads.md's first command) and --mode=patch
    read model_dict/shipped/gpt.pt, with a one-line note, and write into generate_text/, never over the shipped
    model."""
    shipped = home / "model_dict" / "shipped" / "gpt.pt"
    shipped.parent.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "model_dict", "shipped", "gpt.pt"), shipped)
    digest = shipped.read_bytes()
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: None)
    common = [f"--data={corpus}", "--device=cpu", "--dtype=float32", "--eval_iters=1", "--batch_size=2"]
    assert run_main(["--mode=heads", "--probe_sequences=4", *common]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"note: no model trained at {home / 'model_dict' / 'gpt.pt'} yet; using the shipped "
                          f"one, {shipped}\n")
    assert json.loads((home / "generate_text" / "gpt.heads.json").read_text())["checkpoint"] == str(shipped)
    assert run_main(["--mode=patch", *common]) == 0
    assert "using the shipped one" in capsys.readouterr().out
    assert (home / "generate_text" / "gpt.patch.json").exists()
    assert shipped.read_bytes() == digest


def plain_composition(state: dict, cfg: gpt.ModelConfig) -> dict:
    """TransformerLens's composition scores pair by pair from an LB-GPT state dict: ln_1's weight folded
    into W_Q, W_K, W_V, these centred over d_model, W_O centred over d_model; then ||A B|| / (||A|| ||B||)."""
    hs, L, H = cfg.n_embd // cfg.n_head, cfg.n_layer, cfg.n_head

    def matrices(layer, head):  # the head's QK and OV, (C, C) each
        gain = state[f"blocks.{layer}.ln_1.weight"].double()
        read = {proj: gain[:, None] * state[f"blocks.{layer}.attn.heads.{head}.{proj}.weight"].double().T
                for proj in ("query", "key", "value")}
        read = {proj: w - w.mean(dim=0, keepdim=True) for proj, w in read.items()}
        w_o = state[f"blocks.{layer}.attn.proj.weight"].double()[:, head * hs:(head + 1) * hs].T  # (hs, C)
        w_o = w_o - w_o.mean(dim=1, keepdim=True)
        return read["query"] @ read["key"].T, read["value"] @ w_o

    def score(a, b):
        return (torch.linalg.matrix_norm(a @ b) / (torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b))).item()

    expected = {kind: torch.zeros(L, H, L, H) for kind in "qkv"}
    for a in range(L):
        for i in range(H):
            _, ov = matrices(a, i)
            for b in range(a + 1, L):
                for j in range(H):
                    qk, ov_later = matrices(b, j)
                    expected["q"][a, i, b, j] = score(ov, qk)
                    expected["k"][a, i, b, j] = score(ov, qk.T)
                    expected["v"][a, i, b, j] = score(ov, ov_later)
    return expected


def test_composition_scores_equal_a_pair_by_pair_reference_in_both_layouts():
    cfg = gpt.ModelConfig(vocab_size=50, block_size=8, n_layer=3, n_head=2, n_embd=16, bias=True)
    torch.manual_seed(0)
    lb = gpt.LBGPT(cfg).eval()
    for block in lb.blocks:  # LayerNorm gains of their own, so that folding them matters
        block.ln_1.weight.data = torch.rand(16) * 2 + 0.1
    sm = gpt_.SMGPT(cfg).eval()
    sm.load_state_dict(layouts.convert_state_dict(lb.state_dict(), "LB-GPT", "SM-GPT", cfg.n_head))
    expected = plain_composition(lb.state_dict(), cfg)
    for model in (lb, sm):
        scores = heads.composition_scores(model)
        for kind in "qkv":
            torch.testing.assert_close(scores[kind], expected[kind], atol=1e-6, rtol=0)
    assert expected["k"][0, 0, 1:].min() > 0 and expected["k"][1:, :, :2].max() == 0  # later layers only
    baseline = heads.composition_baseline(16, 8)
    assert 0 < baseline < 1


def test_statistics_against_a_hand_made_attention(monkeypatch):
    """previous-token / current-token / first-token / distance / entropy / output norm on a cache whose
    attention and outputs are known."""
    T = 8
    prev = torch.zeros(T, T)
    prev[0, 0] = 1
    for i in range(1, T):
        prev[i, i - 1] = 1
    z = torch.zeros(2, T, 1, 8)
    z[..., 0] = 3.0  # every output of norm 3

    def fake_cache(model, x, names):
        return None, {"blocks.0.attn.hook_pattern": prev.expand(2, 1, T, T), "blocks.0.attn.hook_z": z}

    monkeypatch.setattr(heads, "run_with_cache", fake_cache)
    lb, _ = models(gpt.ModelConfig(300, 8, 1, 1, 8, 0.0, False))
    stats = heads.head_statistics(lb, [torch.randint(0, 300, (2, T))])
    assert stats["previous_token_text"][0, 0].item() == pytest.approx(1.0)
    assert stats["current_token"][0, 0].item() == pytest.approx(1 / T)  # only query 0 looks at itself
    assert stats["first_token"][0, 0].item() == pytest.approx(1 / (T - 1))  # only query 1 looks at token 0
    assert stats["mean_distance"][0, 0].item() == pytest.approx((T - 1) / T)
    assert stats["entropy"][0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["output_norm"][0, 0].item() == pytest.approx(3.0)


# --- the standard probe, against a plain implementation from the raw weights -------------------


def plain_probe_scores(cache, cfg, logits, tokens, L):
    """The three scores and the in-context-learning score, position by position."""
    T = tokens.shape[1]
    scores = {name: torch.zeros(cfg.n_layer, cfg.n_head) for name in probes.PROBES}
    for layer in range(cfg.n_layer):
        for head in range(cfg.n_head):
            w = cache[f"blocks.{layer}.attn.hook_pattern"][:, head]
            scores["previous_token"][layer, head] = sum(w[:, t, t - 1].mean() for t in range(1, T)) / (T - 1)
            second = range(L + 1, 2 * L + 1)
            scores["duplicate_token"][layer, head] = sum(w[:, t, t - L].mean() for t in second) / L
            scores["induction"][layer, head] = sum(w[:, t, t - L + 1].mean() for t in second) / L
    logp = logits.log_softmax(-1)
    nll = [[-logp[b, p - 1, tokens[b, p]].item() for p in range(T)] for b in range(len(tokens))]
    first = [row[p] for row in nll for p in range(2, L + 1)]  # each copy's first token left out
    second = [row[p] for row in nll for p in range(L + 2, 2 * L + 1)]
    return scores, sum(first) / len(first) - sum(second) / len(second)


def shipped_state(script: str):
    ckpt = torch.load(f"model_dict/shipped/{script}.pt", weights_only=True)
    cfg = gpt.ModelConfig(**ckpt["model_config"])
    return cfg, layouts.convert_state_dict(ckpt["best_model"], checkpoint.layout_of(ckpt), "LB-GPT",
                                              cfg.n_head)


@pytest.mark.parametrize("weights", ["random", "shipped gpt", "shipped gpt_"])
def test_probe_scores_equal_a_plain_implementation_in_both_layouts(weights, monkeypatch):
    monkeypatch.chdir(heads.repo_path())
    if weights == "random":
        cfg = gpt.ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=32, bias=True)
        torch.manual_seed(0)
        state = gpt.LBGPT(cfg).state_dict()
        for tensor in state.values():  # sharper attention than at init, so the scores differ by head
            tensor.mul_(3)
    else:
        cfg, state = shipped_state(weights.split()[1])
    L = probes.probe_length(0, cfg.block_size)
    tokens = probes.repeated_tokens(6, L, cfg.vocab_size, seed=3)
    assert tokens.shape == (6, 1 + 2 * L) and torch.equal(tokens[:, 1:L + 1], tokens[:, L + 1:])
    logits, cache = plain_forward(state, cfg, tokens)
    expected, expected_icl = plain_probe_scores(cache, cfg, logits, tokens, L)
    lb = gpt.LBGPT(cfg).eval()
    lb.load_state_dict(state)
    sm = gpt_.SMGPT(cfg).eval()
    sm.load_state_dict(layouts.convert_state_dict(state, "LB-GPT", "SM-GPT", cfg.n_head))
    for model in (lb, sm):
        scores, icl = probes.probe_scores(model, tokens, L)
        for name in probes.PROBES:
            assert torch.allclose(scores[name], expected[name], atol=1e-5), name
        assert icl == pytest.approx(expected_icl, abs=1e-4)


def test_probe_defaults_fit_the_window_and_a_longer_probe_is_refused():
    assert probes.probe_length(0, 64) == 24  # 49 tokens
    assert probes.probe_length(0, 32) == 15  # shorter where the window is smaller
    assert probes.probe_length(10, 32) == 10
    with pytest.raises(probes.UserError, match="probe_length 16 does not fit the model's block_size 32"):
        probes.probe_length(16, 32)


def test_a_head_is_labelled_by_its_highest_probe_score_at_the_threshold():
    row = {"previous_token": 0.1, "duplicate_token": 0.3, "induction": heads.LABEL_THRESHOLD}
    assert heads.head_label(row) == "induction"
    assert heads.head_label(dict(row, induction=0.39)) == ""


def test_probe_scores_are_measured_without_dropout_and_leave_the_mode_as_it_was():
    cfg = gpt.ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.5)
    torch.manual_seed(0)
    model = gpt.LBGPT(cfg)
    tokens = probes.repeated_tokens(4, 15, 300, seed=0)
    scores, icl = probes.probe_scores(model.train(), tokens, 15)
    assert model.training
    eval_scores, eval_icl = probes.probe_scores(model.eval(), tokens, 15)
    assert not model.training
    assert icl == eval_icl and all(torch.equal(scores[k], eval_scores[k]) for k in scores)
