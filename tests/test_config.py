"""The run config: typed --key=value overrides, one-line errors, dtype resolution."""
import os

import pytest
import torch
from conftest import run_main

from dualgpt import runtime
from dualgpt.runconfig import load_config


def test_config_overrides_are_typed():
    cfg = load_config(["--n_layer=3", "--dropout=0.25", "--resume", "--prompt=O Romeo", "--bias=true",
                           "--device=cpu"], "gpt")
    assert cfg["n_layer"] == 3
    assert cfg["dropout"] == 0.25
    assert cfg["resume"] is True
    assert cfg["prompt"] == "O Romeo"
    assert cfg["bias"] is True
    assert cfg["ckpt"].endswith(os.path.join("model_dict", "gpt.pt"))
    assert load_config(["--device=cpu"], "gpt_")["sample_file"].endswith(os.path.join("generate_text", "gpt_.txt"))


def test_a_flag_preset_applies_only_when_set_and_never_over_a_typed_key():
    import config
    preset = config.RLHF_QUICK
    assert {"rl_steps", "n_pairs"} <= preset.keys()
    plain = load_config(["--device=cpu", "--rl_steps=7"], "rlhf", presets={"quick": preset})
    assert plain["n_pairs"] == config.n_pairs
    assert plain["rl_steps"] == 7
    quick = load_config(["--device=cpu", "--quick", "--rl_steps=7"], "rlhf", presets={"quick": preset})
    assert quick["n_pairs"] == preset["n_pairs"] != config.n_pairs
    assert quick["rl_steps"] == 7  # typed, so the preset's value does not replace it
    assert {k: quick[k] for k in preset.keys() - {"rl_steps"}} == {k: v for k, v in preset.items() if k != "rl_steps"}


@pytest.mark.parametrize("argv, message", [
    (["--n_layr=3"], "unknown config key 'n_layr'; did you mean --n_layer?"),
    (["--n_layer=three"], "--n_layer=three: expected int"),
    (["--resume=maybe"], "--resume=maybe: expected bool"),
    (["--n_embd=100", "--n_head=3"], "divisible by n_head"),
    (["--block_size=0"], "block_size must be at least 1"),
    (["--dropout=1.0"], "dropout must be in [0, 1)"),
    (["--dropout=-0.1"], "dropout must be in [0, 1)"),
    (["--vocab_size=100"], "vocab_size must be at least 256"),
    (["--mode=dance"], "mode must be"),
    (["--dtype=float8"], "dtype must be"),
    (["--top_p=0"], "top_p must be in (0, 1]"),
    (["--temperature=-1"], "temperature must be >= 0"),
    (["--device=cuda:7"] if not torch.cuda.is_available() else ["--device=tpu"], "device"),
    (["n_layer=3"], "unexpected argument"),
    (["--resume", "--overwrite"], "contradict"),
])
def test_config_errors_are_one_line(argv, message, capsys, tmp_path):
    assert run_main(["--mode=eval", f"--ckpt={tmp_path / 'none.pt'}"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err
    assert err.count("\n") == 1


def test_dtype_auto(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert runtime.resolve_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.resolve_dtype("auto", "cpu") == "bfloat16"
    assert runtime.resolve_dtype("float32", "cpu") == "float32"
