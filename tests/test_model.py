"""gpt.py's model (LB-GPT): causal, starts at the uniform loss, can overfit, heads are modules."""
import math

import pytest
import torch

import gpt

CFG = gpt.ModelConfig(vocab_size=300, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)


def test_causality():
    torch.manual_seed(0)
    model = gpt.LBGPT(CFG).eval()
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
    model = gpt.LBGPT(gpt.ModelConfig(vocab_size, 32, 2, 2, 32))
    x, y = torch.randint(0, vocab_size, (2, 8, 32))
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(vocab_size)) < 0.05


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = gpt.LBGPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.randint(0, 300, (2, 4, 16))
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
