"""The data pipeline: finding the text, its token file split 90/10, batches, bits per byte (test_corpus.py: how the
text becomes its token file)."""
import math

import numpy as np
import pytest
import torch
from conftest import dataset, run_main, tiny_args

from dualgpt import corpus as corpus_module
from dualgpt import evaluation
from dualgpt.runconfig import script_config


def test_missing_data_file(home, capsys):
    assert run_main(["--data=no/such/file.txt", "--mode=train", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "no/such/file.txt not found" in err
    assert err.count("\n") == 1


def test_the_default_data_is_found_in_the_repository_from_any_folder(home, corpus, monkeypatch, tmp_path):
    (home / "data").mkdir()
    (home / "data" / "input.txt").write_text(corpus.read_text(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert corpus_module.resolve_data("data/input.txt") == str(home / "data" / "input.txt")
    assert corpus_module.resolve_data(str(corpus)) == str(corpus)


def test_dataset_token_file_split_and_bits_per_byte(home, corpus):
    cfg = script_config(tiny_args(home, corpus), "gpt")
    ds = dataset(cfg)
    assert len(list((home / "tokenizers").glob("*.model"))) == 1
    caches = list((home / "data").glob("*.npy"))
    assert len(caches) == 1
    ids = np.load(caches[0])
    assert ids.tolist() == ds.tok.encode_ordinary(corpus.read_text())
    n = int(0.9 * len(ids))
    assert ds.splits["train"].tolist() == ids[:n].tolist()
    assert ds.splits["val"].tolist() == ids[n:].tolist()
    val_bytes = len(ds.tok.decode(ids[n:].tolist()).encode("utf-8"))
    assert ds.bpb(2.0, "val") == pytest.approx(2.0 * (len(ids) - n) / val_bytes / math.log(2))
    x, y = ds.batch("train", torch.Generator().manual_seed(0))
    assert x.shape == (8, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    tokens = sum(y.numel() for _, y in evaluation.windows(ds, "val"))
    assert tokens == len(ids) - n - 1  # every val token predicted once
    again = dataset(cfg)  # reuses tokenizer and cache
    assert len(list((home / "data").glob("*.npy"))) == 1
    assert again.tok.merges == ds.tok.merges


def test_a_batch_with_repeats_is_x_and_y_one_token_apart_each_row_periodic(home, corpus):
    """Dataset.batch with repeat_fraction=1 (config/induction.py's training windows): x and y are still cut one
    token apart from each window, and every window repeats its start; with 0 the batch is as drawn."""
    cfg = script_config(tiny_args(home, corpus), "gpt")
    ds = dataset(cfg)
    x, y = ds.batch("train", torch.Generator().manual_seed(3), repeat_fraction=1.0)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in torch.cat([x, y[:, -1:]], dim=1):
        assert any(torch.equal(row[p:], row[:-p]) for p in range(8, 17))  # 33 tokens: periods 8 to 16
    plain = ds.batch("train", torch.Generator().manual_seed(3))
    offsets = torch.randint(len(ds.splits["train"]) - 32, (8,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain[0][:, 0], torch.from_numpy(ds.splits["train"][offsets.numpy()].astype(np.int64)))
