"""Head-level research: recorded attention, head masks, --mode=heads."""
import json

import matplotlib.image
from matplotlib.figure import Figure
import pytest
import torch
from conftest import dataset, run_main, tiny_args

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


def recorded(model, x):
    model.record_attention(True)
    logits, _ = model(x)
    weights = [block.attn.recorded()[0] for block in model.blocks]
    model.record_attention(False)
    return logits, weights


@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
def test_recorded_weights_are_causal_distributions_equal_in_both_layouts(impl):
    lb, sm = models(impl=impl)
    x = torch.randint(0, 300, (2, 16))
    plain, _ = lb(x)
    lb_logits, lb_w = recorded(lb, x)
    sm_logits, sm_w = recorded(sm, x)
    assert torch.equal(plain, lb_logits)  # recording changes nothing
    for a, b in zip(lb_w, sm_w):
        assert a.shape == (2, 4, 16, 16)
        assert torch.allclose(a.sum(-1), torch.ones(2, 4, 16), atol=1e-6)
        assert torch.all(a.triu(diagonal=1) == 0)  # exactly zero above the diagonal
        assert (a - b).abs().max().item() <= 1e-6
    assert all(head.recorded is None for block in lb.blocks for head in block.attn.heads)  # off again


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


@pytest.mark.plots
def test_mode_heads_writes_maps_stats_and_ablation(home, corpus, capsys, monkeypatch):
    args = tiny_args(home, corpus, "--max_iters=10", "--eval_interval=10", n_layer=2)
    assert run_main(args + ["--mode=train"]) == 0
    capsys.readouterr()
    assert run_main(args + ["--mode=heads", "--heads_per_layer", "--prompt=ROMEO: O my love"]) == 0
    out = capsys.readouterr().out
    assert "heads by importance" in out
    out_dir = home / "generate_text"
    for png in ["gpt.heads.png", "gpt.ablation.png", "gpt.heads.layer0.png", "gpt.heads.layer1.png"]:
        path = out_dir / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100
        assert image.shape[1] > 100
    report = json.loads((out_dir / "gpt.heads.json").read_text())
    rows = report["heads"]
    assert sorted((r["layer"], r["head"]) for r in rows) == [(layer, h) for layer in range(2) for h in range(2)]
    assert [r["loss_increase"] for r in rows] == sorted((r["loss_increase"] for r in rows), reverse=True)
    assert "label" in out and "ICL off" in out
    # the probe's record, its scores and labels (block 32: 15 tokens per copy), and the ICL score
    pool = probes.training_tokens(dataset(script_config(args, "gpt")).splits["train"])
    assert 0 < len(pool) < 300  # a small corpus: most of the 300 ids never occur, and are never drawn
    assert report["probe"] == {"sequences": 64, "length": 15, "seed": 1337, "tokens": len(pool),
                               "drawn_from": "ids in the train split", "label_threshold": 0.4}
    assert isinstance(report["icl_score"], float)
    for r in rows:
        assert all(0 <= r[name] <= 1 for name in ("previous_token", "duplicate_token", "induction",
                                                  "first_token"))
        assert r["label"] == heads.head_label(r)
        assert r["entropy"] >= 0
    # icl_change: the ICL score with that head also off, minus with all on
    _, model = checkpoint.checkpoint_model(gpt.LBGPT, script_config(args + ["--mode=heads"], "gpt"))
    probe = probes.repeated_tokens(64, 15, pool, 1337)
    assert set(probe.flatten().tolist()) <= set(pool.tolist())
    row = rows[0]
    model.set_head_mask({(row["layer"], row["head"])})
    assert probes.probe_scores(model, probe, 15)[1] - report["icl_score"] == pytest.approx(
        row["icl_change"], abs=1e-5)
    # deterministic, and the same from gpt_.py on the same checkpoint (the figures, checked above, not drawn again)
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: None)
    assert run_main(args + ["--mode=heads"]) == 0
    first = json.loads((out_dir / "gpt.heads.json").read_text())["heads"]
    assert run_main(args + ["--mode=heads"]) == 0
    assert json.loads((out_dir / "gpt.heads.json").read_text())["heads"] == first
    assert run_main(args + ["--mode=heads"], gpt_.SMGPT, "gpt_") == 0
    sm = json.loads((out_dir / "gpt.heads.json").read_text())["heads"]
    assert [(r["layer"], r["head"]) for r in sm] == [(r["layer"], r["head"]) for r in first]
    for a, b in zip(first, sm):
        for key in ("loss_increase", "entropy", "previous_token", "duplicate_token", "induction",
                    "icl_change"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    # a probe longer than the window: one line, exit 2, nothing written
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    capsys.readouterr()
    assert run_main(args + ["--mode=heads", "--probe_length=16"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: probe_length 16 does not fit the model's block_size 32: a probe is "
                   "1 + 2 x probe_length tokens, so at most 15\n")
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before


def test_statistics_against_a_hand_made_attention():
    """previous_token / first_token / distance / entropy on a model whose attention is known."""
    lb, _ = models(gpt.ModelConfig(300, 8, 1, 1, 8, 0.0, False))
    head = lb.blocks[0].attn.heads[0]
    T = 8
    prev = torch.zeros(T, T)
    prev[0, 0] = 1
    for i in range(1, T):
        prev[i, i - 1] = 1

    def fake_forward(x):
        out = torch.zeros(*x.shape[:-1], 8)
        head.recorded = (prev.expand(x.shape[0], T, T), out)
        return out

    head.forward = fake_forward
    stats = heads.head_statistics(lb, [torch.randint(0, 300, (2, T))])
    assert stats["previous_token"][0, 0].item() == pytest.approx(1.0)
    assert stats["first_token"][0, 0].item() == pytest.approx(1 / (T - 1))  # only query 1 looks at token 0
    assert stats["mean_distance"][0, 0].item() == pytest.approx((T - 1) / T)
    assert stats["entropy"][0, 0].item() == pytest.approx(0.0, abs=1e-6)


# --- the standard probe, against a plain implementation from the raw weights -------------------


def plain_forward(state: dict, cfg: gpt.ModelConfig, tokens: torch.Tensor):
    """Logits (B, T, V) and every head's attention weights [layer][head] (B, T, T), computed from an
    LB-GPT state dict with nothing of the model's code."""
    B, T = tokens.shape
    C, hs = cfg.n_embd, cfg.n_embd // cfg.n_head

    def linear(x, name):
        return x @ state[name + ".weight"].T + (state[name + ".bias"] if cfg.bias else 0)

    def norm(x, name):
        return torch.nn.functional.layer_norm(x, (C,), state[name + ".weight"],
                                              state.get(name + ".bias"), cfg.layer_norm_eps)

    x = state["wte.weight"][tokens] + state["wpe.weight"][:T]
    causal = torch.ones(T, T).tril().bool()
    weights = []
    for layer in range(cfg.n_layer):
        h, outs, weights_of_layer = norm(x, f"blocks.{layer}.ln_1"), [], []
        for head in range(cfg.n_head):
            q, k, v = (linear(h, f"blocks.{layer}.attn.heads.{head}.{p}") for p in ("query", "key",
                                                                                    "value"))
            w = (q @ k.transpose(1, 2) / hs ** 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
            weights_of_layer.append(w)
            outs.append(w @ v)
        weights.append(weights_of_layer)
        x = x + linear(torch.cat(outs, -1), f"blocks.{layer}.attn.proj")
        hidden = torch.nn.functional.gelu(linear(norm(x, f"blocks.{layer}.ln_2"),
                                                 f"blocks.{layer}.mlp.fc"))
        x = x + linear(hidden, f"blocks.{layer}.mlp.proj")
    return norm(x, "ln_f") @ state["lm_head.weight"].T, weights


def plain_probe_scores(weights, logits, tokens, L):
    """The three scores and the in-context-learning score, position by position."""
    T = tokens.shape[1]
    scores = {name: torch.zeros(len(weights), len(weights[0])) for name in probes.PROBES}
    for layer, weights_of_layer in enumerate(weights):
        for head, w in enumerate(weights_of_layer):
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
    logits, weights_ = plain_forward(state, cfg, tokens)
    expected, expected_icl = plain_probe_scores(weights_, logits, tokens, L)
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
