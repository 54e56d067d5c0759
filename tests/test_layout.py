"""The layout: gpt.py and gpt_.py are the models, dualgpt/ the core engine that never imports them nor the
RLHF layer (rlhf/: python -m rlhf, python -m rlhf.heads)."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
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


SCRIPTS = {"gpt", "gpt_", "bench"}


def modules(package: str) -> list[str]:
    folder = os.path.join(ROOT, package)
    return sorted(name for name in os.listdir(folder) if name.endswith(".py") and name != "__init__.py")


def import_roots(path: str) -> set[str]:
    return {module.split(".")[0] for module in imported_modules(path)}


def test_the_core_never_imports_a_script_nor_the_rlhf_layer():
    for path in [os.path.join(ROOT, "dualgpt", name) for name in modules("dualgpt")]:
        roots = import_roots(path)
        assert not roots & (SCRIPTS | {"rlhf"}), f"{path} imports {roots}"


def test_the_rlhf_layer_imports_no_script_but_the_model_files():
    """bench.py runs the RLHF pipeline as a user does, in a process of its own."""
    for path in [os.path.join(ROOT, "rlhf", name) for name in modules("rlhf")]:
        roots = import_roots(path)
        assert not roots & (SCRIPTS - {"gpt", "gpt_"}), f"{path} imports {roots & SCRIPTS}"


@pytest.mark.parametrize("package", ["dualgpt", "rlhf"])
def test_each_package_map_lists_every_module_once(package):
    """The core's map is in docs/development.md, the RLHF layer's in its __init__.py."""
    doc = open(os.path.join(ROOT, "docs", "development.md"), encoding="utf-8").read() \
        if package == "dualgpt" else __import__(package).__doc__
    listed = re.findall(r"^    (\w+\.py) ", doc, flags=re.M)
    assert sorted(listed) == modules(package)


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
    """Evaluated and sampled by both scripts, and resumed by the script that wrote it (its AdamW
    state has none of the keys later code adds to a param group)."""
    fixture = json.load(open(os.path.join(FIXTURES, "before_refactor.json")))
    corpus = home / "corpus.txt"
    corpus.write_text(make_corpus(1500), encoding="utf-8")
    ckpt = os.path.join(FIXTURES, f"before_refactor_{written_by}.pt")
    before = open(ckpt, "rb").read()
    for script, cls in (("gpt", gpt.LBGPT), ("gpt_", gpt_.SMGPT)):
        args = fixture["args"] + [f"--data={corpus}", f"--ckpt={ckpt}", f"--sample_file={home / 'sample.txt'}"]
        capsys.readouterr()
        assert run_main(args + ["--mode=eval"], cls, script) == 0
        val = [line for line in capsys.readouterr().out.splitlines() if line.startswith("val:")][0]
        assert float(val.split("loss ")[1].split(",")[0]) == pytest.approx(fixture["val_loss"][written_by], abs=1e-4)
        assert run_main(args + ["--mode=sample", "--max_new_tokens=10"], cls, script) == 0
        assert (home / "sample.txt").read_text().startswith(f"# {script}.py samples from")
    assert open(ckpt, "rb").read() == before  # reading never changes a checkpoint
    copy = home / "old.pt"
    shutil.copy(ckpt, copy)
    steps = torch.load(copy, weights_only=True)["iter_num"]
    args = fixture["args"] + [f"--data={corpus}", f"--ckpt={copy}", "--mode=train", "--resume",
                              f"--max_iters={steps + 2}"]
    cls = {"gpt": gpt.LBGPT, "gpt_": gpt_.SMGPT}[written_by]
    assert run_main(args, cls, written_by) == 0
    assert torch.load(copy, weights_only=True)["iter_num"] == steps + 2
