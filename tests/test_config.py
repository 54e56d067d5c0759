"""The run config: typed --key=value overrides, each program's own keys, true comments, one-line errors."""
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, copy_code, run_main

import config
import rlhf
import rlhf_heads
from dualgpt import UserError, runtime
from dualgpt.runconfig import CHOICES, defaults, load_config, readers, script_config


def test_config_overrides_are_typed():
    cfg = script_config(["--n_layer=3", "--dropout=0.25", "--resume", "--prompt=O Romeo", "--bias=true",
                         "--device=cpu"], "gpt")
    assert cfg["n_layer"] == 3
    assert cfg["dropout"] == 0.25
    assert cfg["resume"] is True
    assert cfg["prompt"] == "O Romeo"
    assert cfg["bias"] is True
    assert cfg["ckpt"].endswith(os.path.join("model_dict", "gpt.pt"))
    assert script_config(["--device=cpu"], "gpt_")["sample_file"].endswith(os.path.join("generate_text", "gpt_.txt"))


def test_a_flag_preset_applies_only_when_set_and_never_over_a_typed_key():
    preset = config.RLHF_QUICK
    assert {"rl_steps", "n_pairs"} <= preset.keys()
    plain = load_config(["--device=cpu", "--rl_steps=7"], "rlhf.py", presets={"quick": preset})
    assert plain["n_pairs"] == config.n_pairs
    assert plain["rl_steps"] == 7
    quick = load_config(["--device=cpu", "--quick", "--rl_steps=7"], "rlhf.py", presets={"quick": preset})
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
    (["--compile=maybe"], "compile must be true, false or auto, got 'maybe'"),
    (["--preset=gpu"], "preset must be auto or none, got 'gpu'"),
    (["--rl_lr=1e-4"], "--rl_lr is read by rlhf.py and rlhf_heads.py, not by gpt.py"),
    (["--attn_impl=matmul"], "--attn_impl is read by gpt_.py, rlhf.py and rlhf_heads.py, not by gpt.py"),
    (["--head_tuning_steps=4"], "--head_tuning_steps is read by rlhf_heads.py, not by gpt.py"),
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


PROGRAMS = ("gpt.py", "gpt_.py", "rlhf.py", "rlhf_heads.py")


def test_every_key_of_config_py_is_read_by_a_named_program_that_exists():
    read_by = readers()
    assert read_by.keys() == defaults().keys()
    for key, programs in read_by.items():
        assert programs, f"{key} has no heading naming its programs"
        assert set(programs) <= set(PROGRAMS), key
    for program in PROGRAMS:
        assert os.path.exists(os.path.join(ROOT, program))
    # what the programs read: the model scripts never an RLHF key, rlhf.py never a training or head-study key
    assert {"n_layer", "max_minutes", "mode", "head_mask"} <= {k for k, p in read_by.items() if "gpt.py" in p}
    assert not {k for k, p in read_by.items() if "gpt.py" in p} & {"rl_lr", "rlhf_stage", "oracle", "head_prompts"}
    rlhf_keys = {k for k, p in read_by.items() if "rlhf.py" in p}
    assert {"rl_lr", "rlhf_stage", "oracle", "device", "seed"} <= rlhf_keys
    assert not rlhf_keys & {"max_minutes", "max_iters", "mode", "n_layer", "head_prompts", "learning_rate"}


def help_keys(output: str) -> set[str]:
    return set(re.findall(r"^  --(\w+)=", output, flags=re.M))


def test_help_lists_each_programs_own_keys(capsys):
    """`python gpt.py --help` in-process, and `python rlhf.py --help` through the real command line."""
    assert run_main(["--help"]) == 0
    gpt_help = help_keys(capsys.readouterr().out)
    assert gpt_help == {k for k, p in readers().items() if "gpt.py" in p}
    assert "rl_lr" not in gpt_help
    result = subprocess.run([sys.executable, os.path.join(ROOT, "rlhf.py"), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    assert help_keys(result.stdout) == {k for k, p in readers().items() if "rlhf.py" in p}


def test_a_key_of_another_program_is_one_line_through_the_real_command_line(tmp_path):
    """`python rlhf.py --mode=heads` (the key a gpt.py user knows) says where the head study is, exit 2; the
    pipeline never starts."""
    copy_code(tmp_path)
    result = subprocess.run([sys.executable, "rlhf.py", "--mode=heads"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == ("error: --mode is read by gpt.py and gpt_.py, not by rlhf.py; rlhf.py runs its stages in "
                             "order (--rlhf_stage=NAME runs one); the head study is python rlhf_heads.py\n")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("program, argv, message", [
    ("rlhf.py", ["--max_minutes=0"], "--max_minutes is read by gpt.py and gpt_.py, not by rlhf.py; rlhf.py's stages"),
    ("rlhf.py", ["--head_batches=2"], "--head_batches is read by rlhf_heads.py, not by rlhf.py"),
    ("rlhf_heads.py", ["--rlhf_stage=heads"], "--rlhf_stage is read by rlhf.py, not by rlhf_heads.py"),
    ("rlhf_heads.py", ["--n_pairs=64"], "--n_pairs is read by rlhf.py, not by rlhf_heads.py"),
    ("rlhf_heads.py", ["--rl_steps=4"], "--rl_steps is read by rlhf.py, not by rlhf_heads.py"),
])
def test_the_rlhf_programs_refuse_keys_they_do_not_read(program, argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(argv, program, hints={"rlhf.py": rlhf.HINTS, "rlhf_heads.py": rlhf_heads.HINTS}[program])


def listed_choices() -> dict[str, tuple[str, ...]]:
    """Every `a | b | c` list in config.py's comments, by key."""
    out = {}
    with open(config.__file__, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^(\w+) = .*?#\s*(?:[^:|]*: )?([\w:]+(?: \| [\w:]+)+)", line)
            if m:
                out[m.group(1)] = tuple(m.group(2).split(" | "))
    return out


def test_the_choices_config_py_lists_are_exactly_the_ones_validation_accepts():
    listed = listed_choices()
    accepted = {**CHOICES, **rlhf.CHOICES}
    assert listed == {k: accepted[k] for k in listed}
    assert set(listed) == set(accepted)  # every validated choice is listed, and every list is validated


@pytest.mark.parametrize("key", sorted(set(CHOICES) - {"device"}))
def test_validation_accepts_each_listed_choice_of_the_model_scripts_and_nothing_else(key, tmp_path):
    """Each value config.py lists for the key passes validation; a value it does not list fails it."""
    for value in CHOICES[key]:
        script_config([f"--{key}={value}", "--device=cpu"], "gpt_")
    with pytest.raises(UserError, match=f"{key} must be"):
        script_config([f"--{key}=unlisted", "--device=cpu"], "gpt_")


def test_validation_accepts_each_listed_device_and_nothing_else():
    for device in CHOICES["device"]:
        device = device.replace("N", "0")
        try:
            assert load_config([f"--device={device}"], "gpt.py")["device"].startswith(device.split(":")[0] if device != "auto" else "")
        except UserError as e:  # a listed device this machine lacks: refused as missing, not as unknown
            assert "not available" in str(e), e
    with pytest.raises(UserError, match="device must be auto, cpu, cuda, cuda:N or mps"):
        load_config(["--device=tpu"], "gpt.py")


def test_validation_accepts_each_listed_rlhf_choice_and_nothing_else(rlhf_run):
    """rlhf.py's listed stages, scripts and oracles (module:function as a real module) against its validation."""
    for stage in rlhf.CHOICES["rlhf_stage"]:
        rlhf.check_pipeline_keys(load_config(rlhf_run.args + [f"--rlhf_stage={stage}"], "rlhf.py"))
    with pytest.raises(UserError, match="rlhf_stage must be"):
        rlhf.check_pipeline_keys(load_config(rlhf_run.args + ["--rlhf_stage=heads"], "rlhf.py"))
    for script in rlhf.CHOICES["rlhf_script"]:
        rlhf.setup(load_config(rlhf_run.args + [f"--rlhf_script={script}"], "rlhf.py"), rlhf.MODEL_CLASSES)
    with pytest.raises(UserError, match="rlhf_script must be"):
        rlhf.setup(load_config(rlhf_run.args + ["--rlhf_script=gpt2"], "rlhf.py"), rlhf.MODEL_CLASSES)
    pairs = f"--pairs={rlhf_run.home / 'data' / 'rlhf_sentiment_seed1337_pairs.jsonl'}"  # none needs a pairs file
    for oracle in rlhf.CHOICES["oracle"]:
        oracle = oracle.replace("module:function", "dualgpt.oracles:verse")
        rlhf.setup(load_config(rlhf_run.args + [f"--oracle={oracle}"] + [pairs] * (oracle == "none"), "rlhf.py"),
                   rlhf.MODEL_CLASSES)
    with pytest.raises(UserError, match="unknown oracle"):
        rlhf.setup(load_config(rlhf_run.args + ["--oracle=happiness"], "rlhf.py"), rlhf.MODEL_CLASSES)
