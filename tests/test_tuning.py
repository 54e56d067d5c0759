"""What python -m rlhf and python -m rlhf.heads share: seeds by name, minibatches, keeping checkpoints, one checkpoint builder."""
import pytest
import torch

from dualgpt.checkpoint import REQUIRED, load_checkpoint
from rlhf.study import SEED_NAMES, seed_for
from rlhf.training import minibatches


def test_every_named_draw_has_its_own_seed():
    seeds = [seed_for(1337, name, index) for name in SEED_NAMES for index in range(200)]
    assert len(set(seeds)) == len(seeds)  # no two draws (nor steps of one) share a stream
    assert all(0 <= seed < 2 ** 63 for seed in seeds)
    assert seed_for(1337, "rl.prompts", 3) == seed_for(1337, "rl.prompts", 3)  # a run repeats exactly
    assert seed_for(1337, "rl.prompts", 3) != seed_for(1338, "rl.prompts", 3)
    with pytest.raises(KeyError):
        seed_for(1337, "no such draw")


def test_minibatches_cover_every_item_once_per_pass_in_a_new_order_each_pass():
    """PPO's passes over one rollout each see a fresh order (they once re-seeded the same order every pass)."""
    batches = list(minibatches(10, 4, 3, torch.Generator().manual_seed(0), "cpu"))
    assert [step for step, _ in batches] == list(range(1, 10))
    passes = [torch.cat([idx for _, idx in batches[i:i + 3]]) for i in (0, 3, 6)]
    assert all(sorted(p.tolist()) == list(range(10)) for p in passes)
    assert [len(idx) for _, idx in batches[:3]] == [4, 4, 2]
    assert not torch.equal(passes[0], passes[1])


def test_training_export_and_rlhf_build_the_same_checkpoint(rlhf_run):
    """The base (training), a tuned policy and the reward model (RLHF) share make_checkpoint's entries."""
    common = REQUIRED | {"best_val_loss", "config"}
    kept = max((rlhf_run.home / "model_dict/rlhf_sentiment_seed1337_dpo_steps").glob("step*.pt"))
    for path in ("base.pt", "model_dict/rlhf_sentiment_seed1337_rloo.pt", "model_dict/rlhf_sentiment_seed1337_rm.pt", kept):
        ckpt = load_checkpoint(str(rlhf_run.home / path))
        assert common <= ckpt.keys(), path
    assert "optimizer" in load_checkpoint(str(rlhf_run.home / "base.pt"))
    assert load_checkpoint(str(rlhf_run.home / "model_dict/rlhf_sentiment_seed1337_rloo.pt"))["rlhf"]["step"] == 30
