"""The layout: gpt.py and gpt_.py are the models, dualgpt/ the shared engine that never imports them."""
import ast
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, copy_code, make_corpus, run_main

import gpt
import gpt_

FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def imported_modules(path: str) -> set[str]:
    """Every module an `import` or `from ... import` statement in the file names (top level or nested)."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), filename=path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_the_engine_never_imports_the_scripts():
    package = os.path.join(ROOT, "dualgpt")
    files = [os.path.join(package, name) for name in os.listdir(package) if name.endswith(".py")]
    assert len(files) >= 8
    for path in files:
        roots = {name.split(".")[0] for name in imported_modules(path)}
        assert not roots & {"gpt", "gpt_"}, f"{path} imports {roots & {'gpt', 'gpt_'}}"


def test_the_import_check_sees_nested_imports(tmp_path):
    """The check above would catch the old lazy `from gpt_ import ...` inside a method."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from gpt_ import fused_to_looped\n    import gpt\n")
    assert imported_modules(str(sample)) == {"gpt_", "gpt"}


def test_gpt_py_is_loaded_once_when_it_reads_an_sm_gpt_checkpoint(tmp_path):
    """`python gpt.py --mode=eval --ckpt=<gpt_.py's checkpoint>`: gpt.py runs as __main__ and is never
    imported a second time as `gpt` (which would make two GPT classes in one process)."""
    copy_code(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(1500), encoding="utf-8")
    args = json.load(open(os.path.join(FIXTURES, "before_refactor.json")))["args"]
    ckpt = os.path.join(FIXTURES, "before_refactor_gpt_.pt")
    result = subprocess.run([sys.executable, "-X", "importtime", "gpt.py", "--mode=eval", f"--ckpt={ckpt}",
                             f"--data={corpus}", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val: loss" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "dualgpt.checkpoint" in imported  # importtime saw the imports
    assert "gpt" not in imported
    assert "gpt_" not in imported


@pytest.mark.parametrize("written_by", ["gpt", "gpt_"])
def test_checkpoints_written_before_the_refactor_load_in_both_scripts(home, written_by, capsys):
    fixture = json.load(open(os.path.join(FIXTURES, "before_refactor.json")))
    corpus = home / "corpus.txt"
    corpus.write_text(make_corpus(1500), encoding="utf-8")
    ckpt = os.path.join(FIXTURES, f"before_refactor_{written_by}.pt")
    before = open(ckpt, "rb").read()
    for script, cls in (("gpt", gpt.GPT), ("gpt_", gpt_.FusedGPT)):
        args = fixture["args"] + [f"--data={corpus}", f"--ckpt={ckpt}", f"--sample_file={home / 'sample.txt'}"]
        capsys.readouterr()
        assert run_main(args + ["--mode=eval"], cls, script) == 0
        val = [line for line in capsys.readouterr().out.splitlines() if line.startswith("val:")][0]
        assert float(val.split("loss ")[1].split(",")[0]) == pytest.approx(fixture["val_loss"][written_by], abs=1e-4)
        assert run_main(args + ["--mode=sample", "--max_new_tokens=10"], cls, script) == 0
        assert (home / "sample.txt").read_text().startswith(f"# {script}.py samples from")
    assert open(ckpt, "rb").read() == before  # reading never changes a checkpoint
