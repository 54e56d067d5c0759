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
import rlhf_config
import rlhf_heads
from dualgpt import UserError, runtime
from dualgpt.runconfig import CHOICES, defaults, load_config, script_config
from rlhf_lib.study import CORE_KEYS, SHARED_KEYS, rlhf_run_config, setup


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
    preset = rlhf_config.QUICK
    assert {"rl_steps", "n_pairs"} <= preset.keys()
    plain = rlhf_run_config(["--device=cpu", "--rl_steps=7"], "rlhf.py", "", {})
    assert plain["n_pairs"] == rlhf_config.n_pairs
    assert plain["rl_steps"] == 7
    quick = rlhf_run_config(["--device=cpu", "--quick", "--rl_steps=7"], "rlhf.py", "", {})
    assert quick["n_pairs"] == preset["n_pairs"] != rlhf_config.n_pairs
    assert quick["rl_steps"] == 7  # typed, so the preset's value does not replace it
    assert {k: quick[k] for k in preset.keys() - {"rl_steps"}} == {k: v for k, v in preset.items() if k != "rl_steps"}


def test_a_config_file_sets_keys_as_nanogpt_does_and_typed_keys_still_win(tmp_path):
    """`python gpt.py config/gpu.py`: the lecture scale from the shipped file, its limits obeyed, a typed key
    over it; a file with a wrong key, type or syntax is one line naming it."""
    gpu = os.path.join(ROOT, "config", "gpu.py")
    cfg = script_config([gpu, "--device=cpu", "--n_layer=2"], "gpt")
    assert (cfg["n_embd"], cfg["block_size"], cfg["max_iters"], cfg["max_minutes"]) == (384, 256, 5000, 0)
    assert cfg["n_layer"] == 2 and cfg["learning_rate"] == 1e-3
    for text, message in [("n_layr = 3\n", "unknown config key 'n_layr'"),
                          ("n_layer = 'six'\n", "n_layer = 'six', expected int"),
                          ("n_layer = = 3\n", "SyntaxError")]:
        (tmp_path / "bad.py").write_text(text)
        with pytest.raises(UserError, match=re.escape(message)):
            script_config([str(tmp_path / "bad.py"), "--device=cpu"], "gpt")
    with pytest.raises(UserError, match="cannot read config file"):
        script_config([str(tmp_path / "missing.py"), "--device=cpu"], "gpt")


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
    (["--compile=maybe"], "--compile=maybe: expected bool"),
    (["--rl_lr=1e-4"], "unknown config key 'rl_lr'"),  # the core knows nothing of the RLHF layer
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


def test_each_config_file_owns_its_keys_and_every_key_is_read():
    """config.py's keys are gpt.py's and gpt_.py's (the RLHF programs read CORE_KEYS of them); rlhf_config.py's
    are the RLHF layer's, head_* the head study's alone. Every key is read somewhere in its programs' code."""
    core, own = defaults(config), defaults(rlhf_config)
    assert not core.keys() & own.keys()
    assert set(CORE_KEYS) <= core.keys()
    assert list(own)[:len(SHARED_KEYS)] == list(SHARED_KEYS)  # rlhf_config.py's first section, as it says
    code = {path: open(os.path.join(ROOT, path), encoding="utf-8").read() for path in
            [os.path.join(folder, name) for folder in ("dualgpt", "rlhf_lib") for name in
             os.listdir(os.path.join(ROOT, folder)) if name.endswith(".py")] + ["rlhf.py", "rlhf_heads.py"]}
    for key in core.keys() | own.keys():
        assert any(f'"{key}"' in text for text in code.values()), f"no program reads {key}"


def help_keys(output: str) -> set[str]:
    return set(re.findall(r"^  --(\w+)=", output, flags=re.M))


def test_help_lists_each_programs_own_keys(capsys):
    """`python gpt.py --help` in-process, and `python rlhf.py --help` through the real command line."""
    assert run_main(["--help"]) == 0
    assert help_keys(capsys.readouterr().out) == defaults(config).keys()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "rlhf.py"), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    assert help_keys(result.stdout) == set(CORE_KEYS) | {k for k in defaults(rlhf_config) if not k.startswith("head_")}


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
    ("rlhf_heads.py", ["--n_layer=2"], "--n_layer is read by gpt.py and gpt_.py, not by rlhf_heads.py"),
])
def test_the_rlhf_programs_refuse_keys_they_do_not_read(program, argv, message):
    hints = {"rlhf.py": rlhf.HINTS, "rlhf_heads.py": rlhf_heads.HINTS}[program]
    with pytest.raises(UserError, match=re.escape(message)):
        rlhf_run_config(argv, program, "", hints)


def listed_choices(module) -> dict[str, tuple[str, ...]]:
    """Every `a | b | c` list in a config file's comments, by key."""
    out = {}
    with open(module.__file__, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^(\w+) = .*?#\s*(?:[^:|]*: )?([\w:]+(?: \| [\w:]+)+)", line)
            if m:
                out[m.group(1)] = tuple(m.group(2).split(" | "))
    return out


@pytest.mark.parametrize("module, accepted", [(config, CHOICES), (rlhf_config, rlhf.CHOICES)])
def test_the_choices_each_config_file_lists_are_exactly_the_ones_validation_accepts(module, accepted):
    listed = listed_choices(module)
    assert listed == {k: accepted[k] for k in listed}
    assert set(listed) == set(accepted) & defaults(module).keys()  # every validated choice is listed


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
            assert load_config([f"--device={device}"], "gpt.py", defaults())["device"].startswith(device.split(":")[0] if device != "auto" else "")
        except UserError as e:  # a listed device this machine lacks: refused as missing, not as unknown
            assert "not available" in str(e), e
    with pytest.raises(UserError, match="device must be auto, cpu, cuda, cuda:N or mps"):
        load_config(["--device=tpu"], "gpt.py", defaults())


def test_validation_accepts_each_listed_rlhf_choice_and_nothing_else(rlhf_run):
    """rlhf.py's listed stages, scripts and oracles (module:function as a real module) against its validation."""
    for stage in rlhf.CHOICES["rlhf_stage"]:
        rlhf.check_pipeline_keys(pipeline_config(rlhf_run.args + [f"--rlhf_stage={stage}"]))
    with pytest.raises(UserError, match="rlhf_stage must be"):
        rlhf.check_pipeline_keys(pipeline_config(rlhf_run.args + ["--rlhf_stage=heads"]))
    for script in rlhf.CHOICES["rlhf_script"]:
        setup(pipeline_config(rlhf_run.args + [f"--rlhf_script={script}"]))
    with pytest.raises(UserError, match="rlhf_script must be"):
        setup(pipeline_config(rlhf_run.args + ["--rlhf_script=gpt2"]))
    pairs = f"--pairs={rlhf_run.home / 'data' / 'rlhf_sentiment_seed1337_pairs.jsonl'}"  # none needs a pairs file
    for oracle in rlhf.CHOICES["oracle"]:
        oracle = oracle.replace("module:function", "rlhf_lib.oracles:verse")
        setup(pipeline_config(rlhf_run.args + [f"--oracle={oracle}"] + [pairs] * (oracle == "none")))
    with pytest.raises(UserError, match="unknown oracle"):
        setup(pipeline_config(rlhf_run.args + ["--oracle=happiness"]))


def pipeline_config(argv: list[str]) -> dict:
    return rlhf_run_config(argv, "rlhf.py", "", rlhf.HINTS)
