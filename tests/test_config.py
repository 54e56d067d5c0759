"""The run config: typed --key=value overrides, each program's own keys, true comments, one-line errors."""
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, copy_code, run_main

import bench
import config
from rlhf import __main__ as rlhf
from rlhf import config as rlhf_config
from rlhf import heads as rlhf_heads
from dualgpt import UserError, runtime
from dualgpt.runconfig import allowed, check_declared, declarations, defaults, script_config
from rlhf.study import CORE_KEYS, MODEL_CLASSES, SHARED_KEYS, rlhf_run_config, setup


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
    plain = rlhf_run_config(["--device=cpu", "--rl_steps=7"], "python -m rlhf", "", {})
    assert plain["n_pairs"] == rlhf_config.n_pairs
    assert plain["rl_steps"] == 7
    quick = rlhf_run_config(["--device=cpu", "--quick", "--rl_steps=7"], "python -m rlhf", "", {})
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
    (["--block_size=0"], "block_size must be in [1, 2**20], got 0"),
    (["--dropout=1.0"], "dropout must be in [0, 1)"),
    (["--vocab_size=100"], "vocab_size must be in [256, 2**20]"),
    (["--mode=dance"], "mode must be"),
    (["--dtype=float8"], "dtype must be"),
    (["--top_p=0"], "top_p must be in (0, 1]"),
    (["--temperature=-1"], "temperature must be >= 0"),
    (["--device=cuda:7"] if not torch.cuda.is_available() else ["--device=tpu"], "device"),
    (["n_layer=3"], "unexpected argument"),
    (["--resume", "--overwrite"], "contradict"),
    (["--rl_lr=1e-4"], "unknown config key 'rl_lr'"),  # the core knows nothing of the RLHF layer
    (["--N_LAYER=3"], "did you mean --n_layer?"),
    (["--n_layer", "3"], "--n_layer needs a value: --n_layer=VALUE"),
    (["--sample_file=."], "--sample_file=. is a folder; name a file"),
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


@pytest.mark.parametrize("onednn, flags, native", [(True, "avx512f avx512_bf16", True), (True, "avx512f", False),
                                                    (False, "avx512f avx512_bf16", False), (True, "amx_bf16", True)])
def test_native_bf16_needs_onednn_and_the_cpu_flag(monkeypatch, tmp_path, onednn, flags, native):
    """oneDNN reports bf16 on AVX-512 cores that only emulate it: the CPU's own flag must agree."""
    import builtins
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"model name : test\nflags : sse {flags}\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path,
                                                                          *a, **k))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn, raising=False)
    assert runtime.cpu_has_bf16() is native


def test_each_config_file_owns_its_keys_and_every_key_is_read():
    """config.py's keys are gpt.py's and gpt_.py's (the RLHF programs read CORE_KEYS of them); rlhf/config.py's
    are the RLHF layer's, head_* the head study's alone. Every key is read somewhere in its programs' code."""
    core, own = defaults(config), defaults(rlhf_config)
    assert not core.keys() & own.keys()
    assert set(CORE_KEYS) <= core.keys()
    assert list(own)[:len(SHARED_KEYS)] == list(SHARED_KEYS)  # rlhf/config.py's first section, as it says
    code = {path: open(os.path.join(ROOT, path), encoding="utf-8").read() for path in
            [os.path.join(folder, name) for folder in ("dualgpt", "rlhf") for name in
             os.listdir(os.path.join(ROOT, folder)) if name.endswith(".py")]}
    for key in core.keys() | own.keys():
        assert any(f'"{key}"' in text for text in code.values()), f"no program reads {key}"


def help_keys(output: str) -> set[str]:
    return set(re.findall(r"^  --(\w+)=", output, flags=re.M))


def test_help_lists_each_programs_own_keys(capsys):
    """`python gpt.py --help` and `python -m rlhf --help`, in-process (the next test runs `python -m rlhf`
    through the real command line)."""
    assert run_main(["--help"]) == 0
    assert help_keys(capsys.readouterr().out) == defaults(config).keys()
    with pytest.raises(SystemExit) as done:
        rlhf.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert help_keys(out) == set(CORE_KEYS) | {k for k in defaults(rlhf_config) if not k.startswith("head_")}
    usage = out[:out.index("config keys of")]
    examples = [line for line in usage.splitlines() if line.startswith("    ")]
    assert len(examples) > 10 and all(line.startswith("    python ") for line in examples)  # one command a line


def test_a_key_of_another_program_is_one_line_through_the_real_command_line(tmp_path):
    """`python -m rlhf --mode=heads` (the key a gpt.py user knows) says where the head study is, exit 2; the
    pipeline never starts."""
    copy_code(tmp_path)
    result = subprocess.run([sys.executable, "-m", "rlhf", "--mode=heads"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == ("error: --mode is read by gpt.py and gpt_.py, not by python -m rlhf; python -m rlhf runs its stages in "
                             "order (--rlhf_stage=NAME runs one); the head study is python -m rlhf.heads\n")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("program, argv, message", [
    ("python -m rlhf.heads", ["--rlhf_stage=heads"], "--rlhf_stage is read by python -m rlhf, not by python -m rlhf.heads"),
    ("python -m rlhf.heads", ["--n_pairs=64"], "--n_pairs is read by python -m rlhf, not by python -m rlhf.heads"),
    ("python -m rlhf.heads", ["--rl_steps=4"], "--rl_steps is read by python -m rlhf, not by python -m rlhf.heads"),
    ("python -m rlhf.heads", ["--n_layer=2"], "--n_layer is read by gpt.py and gpt_.py, not by python -m rlhf.heads"),
])
def test_the_rlhf_programs_refuse_keys_they_do_not_read(program, argv, message):
    hints = {"python -m rlhf": rlhf.HINTS, "python -m rlhf.heads": rlhf_heads.HINTS}[program]
    with pytest.raises(UserError, match=re.escape(message)):
        rlhf_run_config(argv, program, "", hints)


PROGRAM_KEYS = [(config, defaults(config)), (rlhf_config, defaults(rlhf_config)),
                (bench.Keys, defaults(bench.Keys))]


@pytest.mark.parametrize("module, keys", PROGRAM_KEYS)
def test_every_declaration_reads_and_allows_its_own_default(module, keys):
    rules = declarations(module)
    assert rules and rules.keys() <= keys.keys()
    for key, rule in rules.items():
        assert allowed(keys[key], rule), (key, rule)


@pytest.mark.parametrize("rule, inside, outside", [
    ("[0, 1)", [0, 0.5, 0.999], [-1e-9, 1, 1.5, float("nan")]),
    ("(0, 1]", [1e-9, 1], [0, 1.0001]),
    ("[1, 2**20]", [1, 2**20], [0, 2**20 + 1, -1]),
    ("(0.5, 1)", [0.75], [0.5, 1]),
    (">= 0", [0, 10**30], [-1, -1e-300]),
    ("> 0", [1e-300], [0, -1]),
    ("sdpa | matmul", ["sdpa", "matmul"], ["SDPA", " sdpa", "", "sdpa|matmul"]),
    ("auto | cuda:N", ["auto", "cuda:0", "cuda:12"], ["cuda:", "cuda:x", "cuda:N", "cuda:-1"]),
    ("module:function | none", ["a.b:c", "none"], ["a.b", ":c", "a:b:c"]),
])
def test_a_declaration_allows_exactly_its_values(rule, inside, outside):
    """Against the closed form: a bracket includes its bound, a parenthesis excludes it."""
    assert all(allowed(v, rule) for v in inside)
    assert not any(allowed(v, rule) for v in outside)


@pytest.mark.parametrize("module, keys", PROGRAM_KEYS[:2])
def test_each_declared_choice_passes_and_an_unlisted_value_fails(module, keys):
    for key, rule in declarations(module).items():
        if "|" not in rule:
            continue
        for value in rule.split(" | "):
            value = value.replace("N", "0").replace("module:function", "rlhf.oracles:verse")
            check_declared({key: value}, declarations(module))
        with pytest.raises(UserError, match=f"{key} must be"):
            check_declared({key: "unlisted"}, declarations(module))


def test_the_declared_choices_are_the_ones_the_code_knows():
    assert set(rlhf_config.__annotations__["rlhf_script"].split(" | ")) == set(MODEL_CLASSES)
    stages = set(rlhf_config.__annotations__["rlhf_stage"].split(" | "))
    assert stages == set(rlhf.STAGES) | {"all", "report", "tune", "label"}
    assert set(config.__annotations__["export_format"].split(" | ")) == {"pt", "hf"}
    # bench.py runs every section by default but the 45-minute Muon study
    assert bench.Keys.only.split(",") == [name for name in bench.SECTIONS if name != "muon"]


def test_validation_accepts_each_listed_device_and_nothing_else():
    for device in config.__annotations__["device"].split(" | "):
        device = device.replace("N", "0")
        try:
            assert script_config([f"--device={device}"], "gpt")["device"].startswith(
                device.split(":")[0] if device != "auto" else "")
        except UserError as e:  # a listed device this machine lacks: refused as missing, not unknown
            assert "not available" in str(e), e
    with pytest.raises(UserError, match="device must be auto, cpu, cuda, cuda:N or mps"):
        script_config(["--device=tpu"], "gpt")


def test_the_declared_rlhf_choices_reach_the_stages_that_use_them(rlhf_run):
    """Every script and oracle rlhf/config.py declares (module:function as a real module) sets up."""
    for script in rlhf_config.__annotations__["rlhf_script"].split(" | "):
        setup(pipeline_config(rlhf_run.args + [f"--rlhf_script={script}"]))
    pairs = f"--pairs={rlhf_run.home / 'data' / 'rlhf_sentiment_seed1337_pairs.jsonl'}"
    for oracle in rlhf_config.__annotations__["oracle"].split(" | "):
        oracle = oracle.replace("module:function", "rlhf.oracles:verse")
        setup(pipeline_config(rlhf_run.args + [f"--oracle={oracle}"] + [pairs] * (oracle == "none")))
    with pytest.raises(UserError, match="oracle must be auto, sentiment"):
        setup(pipeline_config(rlhf_run.args + ["--oracle=happiness"]))


@pytest.mark.parametrize("argv, message", [
    # the four inputs that passed the checks and failed inside a library before keys were declared
    (["--mode=sample", "--seed=9999999999999999999999"], "seed must fit in 64 bits, got 9999999999999999999999"),
    (["--mode=train", "--beta1=1e9"], "beta1 must be in [0, 1), got 1000000000.0"),
    (["--mode=train", "--beta2=-inf"], "beta2 must be a finite number, got -inf"),
    (["--mode=train", "--beta2= 3 "], "beta2 must be in [0, 1), got 3.0"),
])
def test_values_a_library_would_refuse_are_refused_before_any_work(argv, message, home, capsys):
    assert run_main(argv + [f"--data={home / 'missing.txt'}"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not os.listdir(home)  # refused before any work: nothing read, nothing written


def pipeline_config(argv: list[str]) -> dict:
    return rlhf_run_config(argv, "python -m rlhf", "", rlhf.HINTS)
