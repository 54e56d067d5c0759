"""The layout: gpt.py and gpt_.py are the models, rlhf.py and rlhf_heads.py scripts beside them, dualgpt/ the
shared engine that never imports them."""
import ast
import json
import os
import re
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


SCRIPTS = {"gpt", "gpt_", "rlhf", "rlhf_heads", "bench"}
PACKAGE = os.path.join(ROOT, "dualgpt")
MODULES = sorted(name for name in os.listdir(PACKAGE) if name.endswith(".py") and name != "__init__.py")


def test_the_engine_never_imports_the_scripts_nor_minbpes_file_writer():
    assert len(MODULES) >= 15
    for name in MODULES:
        path = os.path.join(PACKAGE, name)
        roots = {module.split(".")[0] for module in imported_modules(path)}
        assert not roots & SCRIPTS, f"{path} imports {roots & SCRIPTS}"
        tree = ast.parse(open(path, encoding="utf-8").read())
        from_minbpe = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                       and (node.module or "").startswith("minbpe") for alias in node.names}
        assert "atomic_open" not in from_minbpe, path


def test_the_package_map_lists_every_module_once():
    import dualgpt
    listed = re.findall(r"^    (\w+\.py) ", dualgpt.__doc__, flags=re.M)
    assert sorted(listed) == MODULES


def test_the_pipeline_and_the_head_study_are_separate_scripts():
    """rlhf.py defines no head-study code and its RL stage takes no study-only parameters; the study's code is
    in rlhf_heads.py and the engine."""
    import inspect

    import rlhf
    import rlhf_heads
    pipeline = {n.name for n in ast.walk(ast.parse(open(os.path.join(ROOT, "rlhf.py"), encoding="utf-8").read()))
                if isinstance(n, ast.FunctionDef)}
    assert not pipeline & {"ablation_drops", "partial_tuning", "implicit_margin", "write_head_study", "kl_by_position"}
    assert list(inspect.signature(rlhf.stage_rl).parameters) == ["s", "method"]
    assert "heads" not in rlhf.STAGES
    assert callable(rlhf_heads.partial_tuning)


def test_the_import_check_sees_nested_imports(tmp_path):
    """The check above would catch the old lazy `from gpt_ import ...` inside a method."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from gpt_ import sm_to_lb\n    import gpt\n")
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
    for script, cls in (("gpt", gpt.LBGPT), ("gpt_", gpt_.SMGPT)):
        args = fixture["args"] + [f"--data={corpus}", f"--ckpt={ckpt}", f"--sample_file={home / 'sample.txt'}"]
        capsys.readouterr()
        assert run_main(args + ["--mode=eval"], cls, script) == 0
        val = [line for line in capsys.readouterr().out.splitlines() if line.startswith("val:")][0]
        assert float(val.split("loss ")[1].split(",")[0]) == pytest.approx(fixture["val_loss"][written_by], abs=1e-4)
        assert run_main(args + ["--mode=sample", "--max_new_tokens=10"], cls, script) == 0
        assert (home / "sample.txt").read_text().startswith(f"# {script}.py samples from")
    assert open(ckpt, "rb").read() == before  # reading never changes a checkpoint


def test_the_readme_layout_table_names_every_program_and_engine_module_with_its_line_count():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    rows = dict(re.findall(r"^\| `([\w/.]+\.py)` \| (\d+) \|", readme, flags=re.M))
    assert set(rows) >= {f"dualgpt/{name}" for name in MODULES} | {f"{name}.py" for name in SCRIPTS} | {"config.py"}
    for path, count in rows.items():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            assert sum(1 for _ in f) == int(count), f"README says {path} has {count} lines"
