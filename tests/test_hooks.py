"""Hook points in TransformerLens's names (dualgpt/hooks.py): every cached value against a plain forward
written here from the raw weights, with nothing of the models' code; the same cache from LB-GPT and SM-GPT;
replacements that take effect where TransformerLens's would; hooks gone afterwards; and docs/heads.md's
notebook example, run as written."""
import os
import re

import pytest
import torch
import torch.nn.functional as F

import gpt
import gpt_
from dualgpt import layouts, repo_path
from dualgpt.hooks import hook_names, run_with_cache, run_with_hooks

CFG = gpt.ModelConfig(vocab_size=300, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)


def plain_forward(state: dict, cfg: gpt.ModelConfig, tokens: torch.Tensor, replace: dict | None = None):
    """Logits and the value at every hook point, from an LB-GPT state dict; replace: name -> fn(tensor)
    giving what flows on from that point (as a TransformerLens hook would)."""
    B, T = tokens.shape
    C, H = cfg.n_embd, cfg.n_head
    cache, replace = {}, replace or {}

    def at(name, tensor):
        cache[name] = replace[name](tensor) if name in replace else tensor
        return cache[name]

    def linear(x, name):
        return x @ state[name + ".weight"].T + (state[name + ".bias"] if name + ".bias" in state else 0)

    def norm(x, name):
        return F.layer_norm(x, (C,), state[name + ".weight"], state.get(name + ".bias"), cfg.layer_norm_eps)

    x = at("hook_embed", state["wte.weight"][tokens]) + at("hook_pos_embed", state["wpe.weight"][:T].expand(B, T, C))
    causal = torch.ones(T, T).tril().bool()
    for layer in range(cfg.n_layer):
        p = f"blocks.{layer}."
        x = at(p + "hook_resid_pre", x)
        h = norm(x, p + "ln_1")
        q, k, v = (at(f"{p}attn.hook_{kind}",  # (B, T, H, hs)
                      torch.stack([linear(h, f"{p}attn.heads.{i}.{proj}") for i in range(H)], 2))
                   for kind, proj in (("q", "query"), ("k", "key"), ("v", "value")))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / (C // H) ** 0.5
        pattern = at(p + "attn.hook_pattern", scores.masked_fill(~causal, float("-inf")).softmax(-1))
        z = at(p + "attn.hook_z", torch.einsum("bhqk,bkhd->bqhd", pattern, v))
        x = at(p + "hook_resid_mid", x + at(p + "hook_attn_out", linear(z.reshape(B, T, C), p + "attn.proj")))
        mlp = linear(F.gelu(linear(norm(x, p + "ln_2"), p + "mlp.fc"), approximate=cfg.gelu), p + "mlp.proj")
        x = at(p + "hook_resid_post", x + at(p + "hook_mlp_out", mlp))
    normalized = at("ln_final.hook_normalized", F.layer_norm(x, (C,), eps=cfg.layer_norm_eps))  # before w, b
    final = normalized * state["ln_f.weight"] + (state["ln_f.bias"] if "ln_f.bias" in state else 0)
    return final @ state["lm_head.weight"].T, cache


def models(impl="sdpa", cfg=CFG):
    torch.manual_seed(0)
    lb = gpt.LBGPT(cfg).eval()
    for p in lb.parameters():  # larger than at init: sharp attention, heads that differ
        p.data.mul_(3)
    sm = gpt_.SMGPT(cfg, attn_impl=impl).eval()
    sm.load_state_dict(layouts.convert_state_dict(lb.state_dict(), "LB-GPT", "SM-GPT", cfg.n_head))
    return lb, sm


TOKENS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
def test_every_cached_value_is_the_plain_forwards_in_both_scripts(impl):
    lb, sm = models(impl)
    expected_logits, expected = plain_forward(lb.state_dict(), CFG, TOKENS)
    shapes = {"hook_q": (2, 16, 4, 8), "hook_z": (2, 16, 4, 8), "hook_pattern": (2, 4, 16, 16),
              "hook_pos_embed": (2, 16, 32)}
    for model in (lb, sm):
        logits, cache = run_with_cache(model, TOKENS)
        assert list(cache) == hook_names(model) == list(expected)  # every point, in the order of the pass
        torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(logits, model(TOKENS)[0], atol=1e-5, rtol=0)  # the hooks change nothing
        for name, value in cache.items():
            torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=0, msg=name)
            assert value.shape == shapes.get(name.split(".")[-1], value.shape)
            assert not value.requires_grad
    # a chosen few names only
    _, few = run_with_cache(sm, TOKENS, ["blocks.1.attn.hook_pattern"])
    assert list(few) == ["blocks.1.attn.hook_pattern"]


@pytest.mark.parametrize("name", hook_names(gpt.LBGPT(CFG)))
def test_a_replacement_at_any_point_is_what_flows_on_in_both_scripts(name):
    """A hook that adds noise: both models give the plain forward's logits with the same replacement,
    and those differ from the unhooked logits (the replacement took effect)."""
    lb, sm = models()

    def noisy(tensor, hook_name=None):
        gen = torch.Generator().manual_seed(0)
        return tensor + 0.5 * torch.randn(tensor.shape, generator=gen)

    expected, _ = plain_forward(lb.state_dict(), CFG, TOKENS, {name: noisy})
    for model in (lb, sm):
        logits = run_with_hooks(model, TOKENS, fwd_hooks=[(name, noisy)])
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        assert (logits - model(TOKENS)[0]).abs().max() > 1e-3


def test_zeroing_a_heads_output_is_switching_it_off():
    lb, sm = models()

    def zero_head_2(z, name):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    for model in (lb, sm):
        ablated = run_with_hooks(model, TOKENS, [("blocks.1.attn.hook_z", zero_head_2)])
        model.set_head_mask({(1, 2)})
        torch.testing.assert_close(ablated, model(TOKENS)[0], atol=1e-5, rtol=0)
        _, cache = run_with_cache(model, TOKENS, ["blocks.1.attn.hook_z"])  # a masked head's z is zeros
        assert cache["blocks.1.attn.hook_z"][:, :, 2].abs().max() == 0
        model.set_head_mask(set())


def test_hooks_are_gone_afterwards_even_when_one_fails_and_unknown_names_are_refused():
    lb, sm = models()

    def fail(tensor, name):
        raise RuntimeError("in the hook")

    for model in (lb, sm):
        with pytest.raises(RuntimeError, match="in the hook"):
            run_with_hooks(model, TOKENS, [("blocks.0.attn.hook_pattern", fail)])
        for module in model.modules():
            assert not module._forward_hooks and not module._forward_pre_hooks
        with pytest.raises(KeyError, match="'blocks.0.hook_attn' is not a hook point of this model"):
            run_with_hooks(model, TOKENS, [("blocks.0.hook_attn", fail)])
    assert all(block.attn.impl == "sdpa" for block in sm.blocks)  # the fused kernel back


def test_the_notebook_example_of_docs_heads_md_runs_as_written(monkeypatch, capsys):
    """The example's own asserts hold on the shipped induction model, and it prints what the docs show."""
    with open(repo_path("docs", "heads.md"), encoding="utf-8") as f:
        page = f.read()
    code, shown = re.search(r"```python\n(.*?)```\n\nIt prints:\n\n```\n(.*?)```", page, flags=re.S).groups()
    monkeypatch.chdir(repo_path())
    exec(compile(code, os.path.join("docs", "heads.md"), "exec"), {})
    assert capsys.readouterr().out == shown
