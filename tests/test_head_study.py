"""The head study (python -m rlhf.heads): transplants, weight changes, tuning one head, and the script end to end."""
import json

import matplotlib.image
import pytest
import torch

import gpt
import gpt_
from rlhf import config as rlhf_config
from rlhf import heads as rlhf_heads
from dualgpt.layouts import convert_state_dict
from rlhf.head_comparison import head_weight_change, part_masks, transplant
from rlhf.training import restrict_training

CFG = gpt.ModelConfig(vocab_size=300, block_size=16, n_layer=3, n_head=4, n_embd=32, dropout=0.0, bias=True)


def two_models(seed=0):
    torch.manual_seed(seed)
    return gpt.LBGPT(CFG).eval(), gpt.LBGPT(CFG).eval()


def logits(state, x):
    model = gpt.LBGPT(CFG).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)[0]


def test_transplanting_all_heads_and_mlps_gives_the_tuned_model_exactly():
    base, other = two_models()
    tuned = base.state_dict()
    for key, value in other.state_dict().items():  # a "tuned" model that differs from base in heads and MLPs only
        if ".attn.heads." in key or ".mlp." in key or key.endswith("attn.proj.weight"):
            tuned[key] = value.clone()
    grafted = transplant(base.state_dict(), tuned, heads={(l, h) for l in range(3) for h in range(4)}, mlps={0, 1, 2})
    assert all(torch.equal(grafted[k], tuned[k]) for k in tuned)
    # and with the rest as well, any model is rebuilt exactly from its parts
    everything = transplant(base.state_dict(), other.state_dict(), heads={(l, h) for l in range(3) for h in range(4)},
                            mlps={0, 1, 2}, rest=True)
    assert all(torch.equal(everything[k], other.state_dict()[k]) for k in everything)


def test_one_transplanted_head_moves_only_that_head():
    base, other = two_models()
    grafted = transplant(base.state_dict(), other.state_dict(), heads={(1, 2)})
    hs = 8
    for key, value in grafted.items():
        if key.startswith("blocks.1.attn.heads.2."):
            assert torch.equal(value, other.state_dict()[key])
        elif key == "blocks.1.attn.proj.weight":
            assert torch.equal(value[:, 2 * hs:3 * hs], other.state_dict()[key][:, 2 * hs:3 * hs])
            assert torch.equal(value[:, :2 * hs], base.state_dict()[key][:, :2 * hs])
            assert torch.equal(value[:, 3 * hs:], base.state_dict()[key][:, 3 * hs:])
        else:
            assert torch.equal(value, base.state_dict()[key]), key


def test_weight_change_is_zero_against_itself_and_matches_a_hand_computation():
    base, _ = two_models()
    state = base.state_dict()
    change = head_weight_change(state, state, 3, 4)
    assert all((v == 0).all() for v in change.values())
    tuned = {k: v.clone() for k, v in state.items()}
    tuned["blocks.2.attn.heads.1.key.weight"] *= 1.5  # relative change exactly 0.5
    tuned["blocks.0.attn.proj.weight"][:, 24:32] = 0  # head 3's output slice removed: relative change 1
    delta = torch.randn(8, 32) * 0.01
    tuned["blocks.1.attn.heads.0.value.weight"] += delta
    change = head_weight_change(state, tuned, 3, 4)
    assert change["key"][2, 1].item() == pytest.approx(0.5, rel=1e-6)
    assert change["output"][0, 3].item() == pytest.approx(1.0, rel=1e-6)
    by_hand = (delta.double().norm() / state["blocks.1.attn.heads.0.value.weight"].double().norm()).item()
    assert change["value"][1, 0].item() == pytest.approx(by_hand, rel=1e-6)
    assert change["key"].count_nonzero() == 1
    assert change["output"].count_nonzero() == 1
    assert change["value"].count_nonzero() == 1


@pytest.mark.parametrize("cls", [gpt_.SMGPT, gpt.LBGPT])
def test_tuning_only_one_head_leaves_every_other_parameter_bitwise_unchanged(cls):
    torch.manual_seed(1)
    lb = gpt.LBGPT(CFG)
    policy = cls(CFG)
    policy.load_state_dict(convert_state_dict(lb.state_dict(), "LB-GPT", policy.layout, CFG.n_head))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    params = restrict_training(policy, part_masks(lb.state_dict(), heads={(1, 3)}))
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    x = torch.randint(0, 300, (4, 16))
    for _ in range(3):
        loss = policy(x, x)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = convert_state_dict(policy.state_dict(), policy.layout, "LB-GPT", CFG.n_head)
    before = convert_state_dict(before, policy.layout, "LB-GPT", CFG.n_head)
    for key, value in after.items():
        if key.startswith("blocks.1.attn.heads.3."):
            assert not torch.equal(value, before[key]), key
        elif key == "blocks.1.attn.proj.weight":
            assert not torch.equal(value[:, 24:32], before[key][:, 24:32])
            assert torch.equal(value[:, :24], before[key][:, :24])
        else:
            assert torch.equal(value, before[key]), key


@pytest.mark.plots
def test_the_heads_stage_writes_its_heatmaps_and_table(rlhf_run):
    home = rlhf_run.home
    study = rlhf_heads.main(rlhf_run.shared_args + ["--head_prompts=16", "--head_pairs=32", "--head_batches=2",
                                                    "--head_tuning_steps=4"])
    for name in ("weight_change", "attention", "ablation", "transplant", "kl_by_position", "oracle_vs_kl"):
        image = matplotlib.image.imread(home / "generate_text" / f"rlhf_sentiment_seed1337_heads_{name}.png")
        assert image.shape[0] > 100
    table = json.loads((home / "generate_text" / "rlhf_sentiment_seed1337_heads.json").read_text())
    assert set(table["methods"]) == {"dpo", "rloo", "ppo", "grpo"}
    # each margin in its own method's units: beta x log(policy / base), the beta of the pull towards the base
    betas = {m: getattr(rlhf_config, k) for m, k in (("dpo", "dpo_beta"), ("rloo", "rl_beta"), ("ppo", "rl_beta"),
                                                     ("grpo", "grpo_beta"))}  # the defaults: the fixture sets none
    assert {m: r["beta"] for m, r in table["methods"].items()} == betas and len(set(betas.values())) == 3
    for r in table["methods"].values():
        assert torch.tensor(r["weight_change"]["query"]).shape == (2, 2)
        assert torch.tensor(r["margin_into_base"]).shape == (2, 2)
        assert len(r["kl_by_position"]) == 16
    curves = study["partial_tuning"]["curves"]
    assert len(curves) == 4  # the full run and the three partial ones, each from the base (step 0)
    full = sorted(int(p.name[4:-3]) for p in (home / "model_dict" / "rlhf_sentiment_seed1337_rloo_steps").iterdir())
    # the pipeline's RLOO run as it kept its policies (where its KL crossed), the partial runs at half and the end
    assert [[p["step"] for p in points] for points in curves.values()] == [[0] + full, [0, 2, 4], [0, 2, 4],
                                                                           [0, 2, 4]]
