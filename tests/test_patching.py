"""--mode=patch: activation patching and direct logit attribution, against closed forms and an
independent implementation, equal in LB-GPT and SM-GPT."""
import json
import os

import pytest
import torch
from conftest import ROOT, run_main, tiny_args

import gpt
import gpt_
from dualgpt import layouts, patching
from dualgpt.checkpoint import load_model

CFG = gpt.ModelConfig(vocab_size=50, block_size=16, n_layer=3, n_head=4, n_embd=32, bias=True)
ANSWERS = (7, 11)


def models():
    torch.manual_seed(0)
    lb = gpt.LBGPT(CFG).eval()
    for p in lb.parameters():  # larger weights than at init: effects far from zero
        p.data.mul_(4)
    sm = gpt_.SMGPT(CFG).eval()
    sm.load_state_dict(layouts.convert_state_dict(lb.state_dict(), "LB-GPT", "SM-GPT", CFG.n_head))
    return lb, sm


def prompts(differ_at=(3,)):
    clean = torch.randint(50, (1, 10), generator=torch.Generator().manual_seed(1))
    corrupt = clean.clone()
    for p in differ_at:
        corrupt[0, p] = (clean[0, p] + 1) % 50
    return clean, corrupt


@pytest.mark.parametrize("bias", [True, False])
def test_direct_logit_attribution_and_the_other_parts_sum_to_the_logit_difference(bias):
    lb, sm = models()
    if not bias:
        cfg = gpt.ModelConfig(**dict(CFG.__dict__, bias=False))
        torch.manual_seed(0)
        lb = gpt.LBGPT(cfg).eval()
        sm = gpt_.SMGPT(cfg).eval()
        sm.load_state_dict(layouts.convert_state_dict(lb.state_dict(), "LB-GPT", "SM-GPT", 4))
    clean, _ = prompts()
    total = patching.logit_difference(lb, clean, ANSWERS)
    dla, parts = patching.direct_logit_attribution(lb, clean, ANSWERS)
    assert dla.sum().item() + sum(parts.values()) == pytest.approx(total, abs=1e-4)
    dla_sm, parts_sm = patching.direct_logit_attribution(sm, clean, ANSWERS)
    assert torch.allclose(dla, dla_sm, atol=1e-5)
    assert parts == pytest.approx(parts_sm, abs=1e-5)


def test_patching_the_residual_stream_entering_layer_0_restores_only_where_the_prompts_differ():
    """At layer 0 the residual stream is the embeddings: patching the one position where the prompts
    differ turns the corrupted run into the clean one (effect 1); anywhere else changes nothing (0)."""
    lb, sm = models()
    clean, corrupt = prompts(differ_at=(3,))
    for model in (lb, sm):
        effects = patching.patch_effects(model, clean, corrupt, ANSWERS)
        expected = torch.zeros(10)
        expected[3] = 1
        assert torch.allclose(effects["residual"][0], expected, atol=1e-4)


def test_head_patching_equals_swapping_the_head_module_output():
    """The effect of patching head h of layer l equals an independent patch: LB-GPT's Head module
    made to return what it returned on the clean prompt; SM-GPT gives the same numbers."""
    lb, sm = models()
    clean, corrupt = prompts(differ_at=(2, 6))
    effects = patching.patch_effects(lb, clean, corrupt, ANSWERS)
    clean_diff = patching.logit_difference(lb, clean, ANSWERS)
    corrupt_diff = patching.logit_difference(lb, corrupt, ANSWERS)
    for layer in range(CFG.n_layer):
        for h in range(CFG.n_head):
            module = lb.blocks[layer].attn.heads[h]
            seen = []  # the head's output on the clean prompt, by a plain PyTorch hook
            handle = module.register_forward_hook(lambda m, args, out: seen.append(out))
            with torch.no_grad():
                lb(clean)
            handle.remove()
            original = module.forward
            module.forward = lambda x, out=seen[0]: out
            try:
                patched = patching.logit_difference(lb, corrupt, ANSWERS)
            finally:
                module.forward = original
            expected = (patched - corrupt_diff) / (clean_diff - corrupt_diff)
            assert effects["heads"][layer, h].item() == pytest.approx(expected, abs=1e-4)
    sm_effects = patching.patch_effects(sm, clean, corrupt, ANSWERS)
    assert torch.allclose(effects["heads"], sm_effects["heads"], atol=1e-4)
    assert torch.allclose(effects["residual"], sm_effects["residual"], atol=1e-4)


@pytest.mark.plots
def test_mode_patch_through_the_command_line_and_its_bad_input(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=10", "--eval_interval=10", n_layer=2)
    assert run_main(args + ["--mode=train"]) == 0
    patch = ["--mode=patch", "--patch_clean=ROMEO: my lord", "--patch_corrupt=JULIET: my lord",
             "--patch_answers=a|t"]
    out_dir = home / "generate_text"
    bad = [(["--patch_corrupt=JULIET: my good lord"], "must be of the same token length"),
           (["--patch_answers=a lord|t"], "the correct answer 'a lord' is"),
           (["--patch_answers=a"], 'patch_answers must be two answers, "correct|wrong"'),
           (["--patch_answers="], "give --patch_clean, --patch_corrupt and --patch_answers together")]
    for extra, message in bad:
        capsys.readouterr()
        assert run_main(args + patch + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("error: ")
        assert not (out_dir / "gpt.patch.json").exists()
    from dualgpt.checkpoint import load_tokenizer_text
    tok = load_tokenizer_text(torch.load(home / "model_dict" / "gpt.pt", weights_only=True)["tokenizer"])
    clean, corrupt = (tok.encode(p.split("=", 1)[1]) for p in patch[1:3])
    assert len(clean) == len(corrupt)  # the corpus and its tokenizer are fixed: the names split alike
    results = []
    for cls, script in ((gpt.LBGPT, "gpt"), (gpt_.SMGPT, "gpt_")):
        capsys.readouterr()
        assert run_main(args + patch, cls, script) == 0
        report = json.loads((out_dir / "gpt.patch.json").read_text())
        # effects divide by the runs' gap: a small one is called noise
        gap = abs(report["clean_logit_diff"] - report["corrupt_logit_diff"])
        assert ("the model barely tells the prompts apart" in capsys.readouterr().out) == (gap < 1.0)
        assert (out_dir / "gpt.patch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert [(r["layer"], r["head"]) for r in report["heads"]] == [(l, h) for l in range(2) for h in range(2)]
        assert len(report["residual"]) == 2 and len(report["residual"][0]) == len(clean)
        assert report["task"] == "given" and report["clean_ids"] == clean and report["corrupt_ids"] == corrupt
        assert "".join(report["clean_tokens"]).replace("␣", " ") == "ROMEO: my lord"
        results.append(report)
    for a, b in zip(results[0]["heads"], results[1]["heads"]):
        assert a["effect"] == pytest.approx(b["effect"], abs=1e-4)
        assert a["dla"] == pytest.approx(b["dla"], abs=1e-4)
    # a masked run's own file; no prompts on a tokenizer that can write neither default task: one line
    assert run_main(args + patch + ["--head_mask=0.1"]) == 0
    assert json.loads((out_dir / "gpt.masked-0.1.patch.json").read_text())["head_mask"] == "0.1"
    assert json.loads((out_dir / "gpt.patch.json").read_text()) == results[1]  # the unmasked run's, untouched
    capsys.readouterr()
    assert run_main(args + ["--mode=patch"]) == 2
    assert capsys.readouterr().err == ("error: no default patching task fits this tokenizer and window; give "
                                       "--patch_clean, --patch_corrupt and --patch_answers\n")


@pytest.mark.parametrize("name, task", [("gpt", "agreement"), ("gpt_", "agreement"), ("induction", "induction")])
def test_the_default_prompts_are_a_task_each_shipped_model_tells_apart(name, task):
    """Every shipped checkpoint gets default prompts of equal token length that its tokenizer writes back as
    the same tokens, one-token answers, and a clean-corrupted gap of at least NOISY_GAP nats."""
    path = os.path.join(ROOT, "model_dict", "shipped", f"{name}.pt")
    model, tok = load_model(path, gpt_.SMGPT)
    chosen, gap = patching.default_task(model, tok, "cpu")
    assert chosen.name == task and gap >= patching.NOISY_GAP
    assert len(chosen.clean) == len(chosen.corrupt) <= model.config.block_size
    for ids in (chosen.clean, chosen.corrupt):
        assert tok.encode(tok.decode(ids), allowed_special="none") == ids
    assert all(len(tok.encode(tok.decode([a]), allowed_special="none")) == 1 for a in chosen.answers)
    clean = patching.logit_difference(model, torch.tensor([chosen.clean]), chosen.answers)
    corrupt = patching.logit_difference(model, torch.tensor([chosen.corrupt]), chosen.answers)
    assert clean - corrupt == pytest.approx(gap, abs=1e-5)  # the clean prompt favours the correct answer more
