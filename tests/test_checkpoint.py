"""Checkpoints: bad files are one-line errors, and loading never runs pickled code."""
import os

import torch
from conftest import run_main, tiny_args


def test_bad_checkpoints_are_one_line_errors(home, corpus, capsys, tmp_path):
    args = tiny_args(home, corpus)
    assert run_main(args + ["--mode=sample", f"--ckpt={tmp_path / 'none.pt'}"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    assert run_main(args + ["--mode=eval", f"--ckpt={tmp_path / 'junk.pt'}"]) == 2
    assert "is not readable" in capsys.readouterr().err
    torch.save({"model": {}}, tmp_path / "other.pt")
    assert run_main(args + ["--mode=sample", f"--ckpt={tmp_path / 'other.pt'}"]) == 2
    assert "not a Dual-GPT checkpoint" in capsys.readouterr().err


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_loading_never_runs_pickled_code(home, corpus, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": Boom()}, tmp_path / "evil.pt")
    assert run_main(tiny_args(home, corpus) + ["--mode=sample", f"--ckpt={tmp_path / 'evil.pt'}"]) == 2
    assert "is not readable" in capsys.readouterr().err
    assert not (tmp_path / "pwned.txt").exists()
