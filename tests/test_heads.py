"""Head-level research: recorded attention, head masks, --mode=heads."""
import json

import matplotlib.image
import pytest
import torch
from conftest import run_main, tiny_args

import gpt
import gpt_
from dualgpt import checkpoint, heads
from dualgpt.runconfig import script_config, model_config, parse_head_mask

CFG = gpt.ModelConfig(vocab_size=300, block_size=16, n_layer=3, n_head=4, n_embd=32, dropout=0.0, bias=False)


def models(cfg=CFG, impl="sdpa"):
    torch.manual_seed(0)
    lb = gpt.LBGPT(cfg).eval()
    sm = gpt_.SMGPT(cfg, attn_impl=impl).eval()
    sm.load_state_dict(checkpoint.convert_state_dict(lb.state_dict(), "LB-GPT", "SM-GPT", cfg.n_head))
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


def test_recording_is_off_by_default():
    lb, sm = models()
    lb(torch.randint(0, 300, (1, 8)))
    assert all(head.recorded is None for block in lb.blocks for head in block.attn.heads)
    assert all(block.attn.recorded() is None for block in sm.blocks)


def test_empty_mask_changes_nothing():
    lb, sm = models()
    x = torch.randint(0, 300, (2, 16))
    before = lb(x)[0], sm(x)[0]
    for model in (lb, sm):
        model.set_head_mask(parse_head_mask(""))
    assert torch.equal(lb(x)[0], before[0])
    assert torch.equal(sm(x)[0], before[1])


@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
def test_masking_changes_logits_the_same_way_in_both_layouts(impl):
    lb, sm = models(impl=impl)
    x = torch.randint(0, 300, (2, 16))
    base = lb(x)[0]
    for model in (lb, sm):
        model.set_head_mask({(1, 2), (0, 0)})
    masked_lb, masked_sm = lb(x)[0], sm(x)[0]
    assert (masked_lb - base).abs().max().item() > 1e-4
    assert (masked_lb - masked_sm).abs().max().item() <= 1e-5
    lb.set_head_mask(set())
    assert torch.equal(lb(x)[0], base)


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
    args = tiny_args(home, corpus, "--max_iters=2", "--eval_interval=2")
    assert run_main(args + ["--mode=train"]) == 0
    capsys.readouterr()
    assert run_main(args + ["--mode=sample", f"--head_mask={spec}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: head_mask")
    assert message in err
    assert err.count("\n") == 1


def test_head_mask_applies_in_training(home, corpus):
    """A masked head gets no gradient, so AdamW leaves its weights at their initial values."""
    args = tiny_args(home, corpus, "--max_iters=6", "--eval_interval=6", "--mode=train", "--head_mask=1.0")
    assert run_main(args) == 0
    trained = torch.load(home / "model_dict" / "gpt.pt", weights_only=True)["model"]
    cfg = script_config(args, "gpt")
    torch.manual_seed(cfg["seed"])
    initial = gpt.LBGPT(model_config(cfg, gpt.ModelConfig)).state_dict()
    for name in ("blocks.1.attn.heads.0.key.weight", "blocks.1.attn.heads.0.value.weight"):
        assert torch.equal(trained[name], initial[name])
    assert not torch.equal(trained["blocks.1.attn.heads.1.key.weight"], initial["blocks.1.attn.heads.1.key.weight"])


def test_mode_heads_writes_maps_stats_and_ablation(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=10", "--eval_interval=10")
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
    for r in rows:
        assert 0 <= r["previous_token"] <= 1
        assert 0 <= r["first_token"] <= 1
        assert r["entropy"] >= 0
    # deterministic, and the same from gpt_.py on the same checkpoint
    assert run_main(args + ["--mode=heads"]) == 0
    first = json.loads((out_dir / "gpt.heads.json").read_text())["heads"]
    assert run_main(args + ["--mode=heads"]) == 0
    assert json.loads((out_dir / "gpt.heads.json").read_text())["heads"] == first
    assert run_main(args + ["--mode=heads"], gpt_.SMGPT, "gpt_") == 0
    sm = json.loads((out_dir / "gpt.heads.json").read_text())["heads"]
    assert [(r["layer"], r["head"]) for r in sm] == [(r["layer"], r["head"]) for r in first]
    for a, b in zip(first, sm):
        assert a["loss_increase"] == pytest.approx(b["loss_increase"], abs=1e-4)
        assert a["entropy"] == pytest.approx(b["entropy"], abs=1e-4)


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
