"""gpt_.py (SM-GPT) computes the same function as gpt.py (LB-GPT); its KV cache changes nothing."""
import dataclasses

import pytest
import torch
from conftest import run_main, tiny_args

import gpt
import gpt_
from dualgpt import evaluation, layouts, sampling
from dualgpt.runconfig import script_config

CONFIGS = [
    gpt.ModelConfig(vocab_size=300, block_size=16, n_layer=2, n_head=4, n_embd=32, bias=True),
    gpt.ModelConfig(vocab_size=300, block_size=16, n_layer=2, n_head=4, n_embd=32, bias=False),
    gpt.ModelConfig(vocab_size=280, block_size=8, n_layer=1, n_head=1, n_embd=24, bias=True),  # one head
    gpt.ModelConfig(vocab_size=260, block_size=12, n_layer=2, n_head=16, n_embd=16, bias=False),  # n_head = n_embd
    gpt.ModelConfig(vocab_size=400, block_size=20, n_layer=3, n_head=3, n_embd=48, bias=True),
]


def pair(cfg, impl, seed=0):
    torch.manual_seed(seed)
    lb = gpt.LBGPT(cfg)
    sm = gpt_.SMGPT(cfg, attn_impl=impl, kv_cache=True)
    sm.load_state_dict(layouts.convert_state_dict(lb.state_dict(), "LB-GPT", "SM-GPT", cfg.n_head))
    return lb, sm


@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_same_logits_and_loss(cfg, impl):
    lb, sm = pair(cfg, impl)
    x, y = torch.randint(0, cfg.vocab_size, (2, 3, cfg.block_size))
    for mode in ("eval", "train"):  # dropout is 0, so train mode must agree too
        getattr(lb, mode)()
        getattr(sm, mode)()
        (la, lossa), (lb_, lossb) = lb(x, y), sm(x, y)
        assert (la - lb_).abs().max().item() <= 1e-5
        assert abs(lossa.item() - lossb.item()) <= 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
@pytest.mark.parametrize("cfg", CONFIGS[:4])
def test_one_adamw_step_gives_same_weights(cfg, impl):
    lb, sm = pair(cfg, impl)
    x, y = torch.randint(0, cfg.vocab_size, (2, 3, cfg.block_size))
    for model in (lb, sm):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        model(x, y)[1].backward()
        opt.step()
    lb_grads = layouts.lb_to_sm({n: p.grad for n, p in lb.named_parameters()}, cfg.n_head)
    for name, p in sm.named_parameters():
        assert (p.grad - lb_grads[name]).abs().max().item() <= 1e-6, name
    mapped = layouts.lb_to_sm(lb.state_dict(), cfg.n_head)
    for name, tensor in sm.state_dict().items():
        assert (tensor - mapped[name]).abs().max().item() <= 1e-5, name


def test_one_muon_step_differs_between_the_layouts_only_in_attention():
    """Muon orthogonalises each 2-D parameter's update, so LB-GPT's per-head key, query and value matrices and
    SM-GPT's one c_attn take different steps from the same gradient (docs/training.md says the two do not train
    the same way under Muon); every other parameter steps the same in both."""
    from dualgpt.run import make_optimizers
    cfg = CONFIGS[0]
    lb, sm = pair(cfg, "matmul")
    x, y = torch.randint(0, cfg.vocab_size, (2, 3, cfg.block_size))
    for model in (lb, sm):
        optimizers = make_optimizers(model, "muon", 1e-3, 0.02, 0.1, (0.9, 0.99), "cpu").values()
        model(x, y)[1].backward()
        for optimizer in optimizers:
            optimizer.step()
    # a step moves a matrix's entries by about 0.01; Muon's Newton-Schulz runs in bfloat16, whose rounding of
    # gradients equal to 1e-6 leaves gaps up to about 3e-4 elsewhere
    mapped = layouts.lb_to_sm(lb.state_dict(), cfg.n_head)
    for name, tensor in sm.state_dict().items():
        gap = (tensor - mapped[name]).abs().max().item()
        assert gap > 5e-3 if "c_attn.weight" in name else gap <= 1e-3, name


@pytest.mark.parametrize("cfg", CONFIGS)
def test_round_trip_is_exact(cfg):
    torch.manual_seed(1)
    state = gpt.LBGPT(cfg).state_dict()
    sm_state = layouts.lb_to_sm(state, cfg.n_head)
    assert gpt_.SMGPT(cfg).load_state_dict(sm_state) is not None  # loads with no missing/unexpected keys
    back = layouts.sm_to_lb(sm_state, cfg.n_head)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_sdpa_trains_with_dropout():
    cfg = dataclasses.replace(CONFIGS[0], dropout=0.2)
    _, sm = pair(cfg, "sdpa")
    x, y = torch.randint(0, 300, (2, 3, 16))
    a, b = sm(x, y)[1], sm(x, y)[1]
    assert a.item() != b.item()  # dropout is active in training
    a.backward()
    sm.eval()
    assert sm(x, y)[1].item() == sm(x, y)[1].item()


SAMPLING = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=10),
            dict(temperature=1.2, top_p=0.9), dict(temperature=0.7, top_k=50, top_p=0.8)]


@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
@pytest.mark.parametrize("settings", SAMPLING)
def test_kv_cache_gives_identical_tokens(settings, impl):
    cfg = CONFIGS[0]
    _, sm = pair(cfg, impl)
    prompt = torch.randint(0, cfg.vocab_size, (1, 5))
    runs = []
    for cached in (True, False):
        sm.use_kv_cache = cached
        gen = torch.Generator().manual_seed(7)
        runs.append(torch.cat(list(sampling.generate(sm, prompt, 3 * cfg.block_size, generator=gen, **settings))))
    assert torch.equal(runs[0], runs[1])
    assert len(runs[0]) == 3 * cfg.block_size


def test_cached_logits_equal_full_forward():
    cfg = CONFIGS[4]
    _, sm = pair(cfg, "sdpa")
    sm.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    full, _ = sm(ids)
    decoder = sampling.NextTokenLogits(sm)
    for t in range(3, cfg.block_size + 1):
        assert (decoder(ids[:, :t]) - full[:, t - 1]).abs().max().item() <= 1e-5
    assert decoder.cache.length == cfg.block_size


def test_checkpoints_load_in_both_scripts(home, corpus, capsys):
    """Train with each script; eval with both: the same val loss either way."""
    for script, cls in (("gpt", gpt.LBGPT), ("gpt_", gpt_.SMGPT)):
        args = tiny_args(home, corpus, "--max_iters=8", "--eval_interval=8", "--mode=train", script=script, n_layer=2)
        assert run_main(args, cls, script) == 0
    results = {}
    for ckpt in ("gpt", "gpt_"):
        for script, cls in (("gpt", gpt.LBGPT), ("gpt_", gpt_.SMGPT)):
            cfg = script_config(tiny_args(home, corpus, script=ckpt, n_layer=2) + ["--mode=eval"], script)
            results[ckpt, script] = evaluation.evaluate_checkpoint(cls, cfg)["val"]["loss"]
        assert results[ckpt, "gpt"] == pytest.approx(results[ckpt, "gpt_"], abs=1e-5)
    # and sampling from the other script's checkpoint works, greedily identical
    samples = []
    for script, cls in (("gpt", gpt.LBGPT), ("gpt_", gpt_.SMGPT)):
        args = tiny_args(home, corpus, "--mode=sample", "--temperature=0", script="gpt_", n_layer=2)
        assert run_main(args + [f"--sample_file={home / script}.sample"], cls, script) == 0
        samples.append((home / f"{script}.sample").read_text().split("\n", 1)[1])
    assert samples[0] == samples[1]


def test_resume_needs_the_same_layout(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=2", "--eval_interval=2", "--mode=train", script="gpt", n_layer=2)
    assert run_main(args) == 0
    assert run_main(args + ["--resume", "--max_iters=4"], gpt_.SMGPT, "gpt_") == 2
    assert "resume it with that script" in capsys.readouterr().err
