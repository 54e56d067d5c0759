"""Hostile input, fuzzed (hypothesis, seeded): random keys and values, pairs of them, and damaged
or random files for every reader. Every outcome is a run that works or one line and exit 2: never a
traceback, never a changed file that existed before, never a hang. The suite runs a few
hundred cases; DUALGPT_FUZZ=10 ten times as many (generate_text/shipped/fuzz_long.txt)."""

import hashlib
import json
import os
import shutil
import signal
from contextlib import contextmanager

import pytest
from conftest import ROOT, make_corpus, run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bench
import config
import dualgpt
import gpt
import gpt_
from rlhf import __main__ as rlhf
from rlhf import config as rlhf_config
from rlhf import heads as rlhf_heads
from dualgpt import UserError
from dualgpt.runconfig import defaults
from rlhf.labelling import read_answers
from rlhf.pairs import read_pairs
from rlhf.study import CORE_KEYS as STUDY_CORE_KEYS
from rlhf.study import SHARED_KEYS, rlhf_run_config, setup

SCALE = int(os.environ.get("DUALGPT_FUZZ", "1"))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
# the values a new user tries (the list), and any text hypothesis draws
HOSTILE = [
    "0",
    "-1",
    "1",
    "3",
    "1e9",
    "-1e9",
    "nan",
    "inf",
    "-inf",
    "",
    " 3 ",
    "9999999999999999999999",
    "-9999999999999999999999",
    "1e400",
    "0.5",
    "true",
    "no",
    "é✓",
    "\x00",
    "../x",
    "/",
    ".",
    "a/b.pt",
    ",",
    "|",
    ":",
    "0.3,2.1",
    "9.9",
    "cuda:0",
    "FILE:",
    "FILE:/nonexistent",
    "--mode=train",
]
VALUES = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=12))
SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SECONDS = 60  # a case that runs longer is a hang


@contextmanager
def no_hang(seconds: int = SECONDS):
    def stop(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(folder) -> dict:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def exit_code(main, argv: list[str]):
    """A program's main() in-process: its exit code (0 when it returns)."""
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


def outcome_is_sound(code, err: str) -> None:
    """A run that works, or one line and exit 2 (1: the loss diverged, as documented)."""
    assert code in (0, 1, 2), (code, err[-2000:])
    if code:
        assert err.startswith("error: ") and err.count("\n") == 1, err[-2000:]
        assert code == 2 or "diverged" in err or "not finite" in err, err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Both scripts' tiny checkpoints (tests/fixtures) and the corpus they were trained on, with
    the token file and tokenizer a first eval builds: what every case starts from, copied."""
    base = tmp_path_factory.mktemp("fuzz_base")
    (base / "corpus.txt").write_text(make_corpus(500), encoding="utf-8")  # eval reads all of it: kept short
    (base / "model_dict").mkdir()
    for script in ("gpt", "gpt_"):
        shutil.copy(
            os.path.join(FIXTURES, f"before_refactor_{script}.pt"),
            base / "model_dict" / f"{script}.pt",
        )
    previous, dualgpt.ROOT = dualgpt.ROOT, str(base)
    try:
        data = f"--data={base / 'corpus.txt'}"
        assert run_main(["--mode=eval", "--device=cpu", "--eval_iters=1", data]) == 0
        assert run_main(MODES["train"] + ["--device=cpu", data, f"--ckpt={base / 'warm.pt'}"]) == 0
    finally:
        dualgpt.ROOT = previous
    return base


@contextmanager
def case_folder(workspace, tmp_path_factory):
    """A fresh copy of the workspace as the repository root and working directory of one case."""
    home = tmp_path_factory.mktemp("case")
    shutil.copytree(workspace, home, dirs_exist_ok=True)
    previous_root, previous_cwd = dualgpt.ROOT, os.getcwd()
    dualgpt.ROOT = str(home)
    os.chdir(home)
    try:
        yield home
    finally:
        dualgpt.ROOT = previous_root
        os.chdir(previous_cwd)
        shutil.rmtree(home, ignore_errors=True)


MODES = {  # the run of each mode the keys are fuzzed on: tiny, bounded by both training limits
    "sample": ["--mode=sample", "--max_new_tokens=8", "--num_samples=1"],
    "eval": ["--mode=eval", "--eval_iters=1"],
    "heads": ["--mode=heads", "--eval_iters=1"],
    "train": [
        "--mode=train",
        "--overwrite",
        "--max_iters=2",
        "--max_minutes=0.05",
        "--eval_iters=1",
        "--vocab_size=260",
        "--n_layer=1",
        "--n_head=2",
        "--n_embd=16",
        "--block_size=16",
        "--batch_size=4",
    ],
}
CORE_KEYS = sorted(defaults(config))


def rlhf_heads_keys() -> set[str]:
    return (
        set(STUDY_CORE_KEYS)
        | set(SHARED_KEYS)
        | {k for k in defaults(rlhf_config) if k.startswith("head_")}
    )


@settings(max_examples=160 * SCALE, **SETTINGS)
@given(
    script=st.sampled_from(["gpt", "gpt_"]),
    mode=st.sampled_from(sorted(MODES)),
    overrides=st.lists(st.tuples(st.sampled_from(CORE_KEYS), VALUES), min_size=1, max_size=2),
)
def test_random_keys_and_values_of_the_model_scripts(
    workspace, tmp_path_factory, capsys, script, mode, overrides
):
    """--key=value and pairs of them on sample, eval, heads and a tiny training run of both
    scripts."""
    cls = {"gpt": gpt.LBGPT, "gpt_": gpt_.SMGPT}[script]
    with case_folder(workspace, tmp_path_factory) as home:
        argv = MODES[mode] + ["--device=cpu", f"--data={home / 'corpus.txt'}"]
        argv += [f"--{key}={value}" for key, value in overrides]
        before = snapshot(home)
        capsys.readouterr()
        with no_hang():
            code = run_main(argv, cls, script)
        outcome_is_sound(code, capsys.readouterr().err)
        after = snapshot(home)
        # what a run may replace: the sample file, and the checkpoint it trains (the old one: .bak)
        changed = {path for path in before if after.get(path) != before[path]}
        ckpt = str(home / "model_dict" / f"{script}.pt")
        allowed = {str(home / "generate_text" / f"{script}.txt")}
        if code == 0 and mode == "train":
            allowed.add(ckpt)
            assert after.get(ckpt + ".bak", before[ckpt]) == before[ckpt]
        assert changed <= allowed, (argv, changed)


@settings(max_examples=40 * SCALE, **SETTINGS)
@given(
    overrides=st.lists(
        st.tuples(st.sampled_from(sorted(defaults(rlhf_config))), VALUES), min_size=1, max_size=2
    )
)
def test_random_keys_and_values_of_rlhf_py(rlhf_run, tmp_path_factory, capsys, overrides):
    """python -m rlhf's report stage (what it prints from the pipeline's outputs) under random keys."""
    with case_folder(rlhf_run.home, tmp_path_factory) as home:
        args = [a.replace(str(rlhf_run.home), str(home)) for a in rlhf_run.args]
        argv = args + ["--rlhf_stage=report"] + [f"--{key}={value}" for key, value in overrides]
        before = snapshot(home / "model_dict")
        capsys.readouterr()
        with no_hang():
            code = exit_code(rlhf.main, argv)
        outcome_is_sound(code, capsys.readouterr().err)
        assert (
            snapshot(home / "model_dict") == before
        )  # the report reads the models, never writes them


@settings(max_examples=30 * SCALE, **SETTINGS)
@given(
    overrides=st.lists(
        st.tuples(st.sampled_from(sorted(defaults(bench.Keys))), VALUES), min_size=1, max_size=2
    )
)
def test_random_keys_and_values_of_bench_py(overrides, capsys, monkeypatch):
    """bench.py's keys are refused or accepted before any section runs (no section is run here)."""
    monkeypatch.setattr(bench, "SECTIONS", {name: lambda args: "" for name in bench.SECTIONS})
    monkeypatch.setattr(bench, "write_text", lambda path, text: None)
    capsys.readouterr()
    code = exit_code(bench.main, [f"--{key}={value}" for key, value in overrides])
    outcome_is_sound(code, capsys.readouterr().err)


@settings(max_examples=30 * SCALE, **SETTINGS)
@given(
    overrides=st.lists(
        st.tuples(st.sampled_from(sorted(rlhf_heads_keys())), VALUES), min_size=1, max_size=2
    )
)
def test_random_keys_and_values_of_rlhf_heads_py(rlhf_run, capsys, overrides):
    """python -m rlhf.heads's config and the setup every stage starts with (not the study itself)."""
    argv = rlhf_run.shared_args + [f"--{key}={value}" for key, value in overrides]
    with no_hang():
        try:
            setup(rlhf_run_config(argv, "python -m rlhf.heads", "", rlhf_heads.HINTS))
        except (
            UserError
        ):  # what exit_codes prints as one line, exit 2: anything else fails the case
            pass


# --- damaged and random files, for every reader ------------------------------------------


def damaged(content: bytes, edits: list[tuple[int, int, bytes]], cut: float | None) -> bytes:
    """content with each (offset, length, bytes) span replaced, then cut to a share of it."""
    for offset, length, replacement in edits:
        at = offset % (len(content) + 1)
        content = content[:at] + replacement + content[at + length :]
    return content if cut is None else content[: int(len(content) * cut)]


DAMAGE = st.tuples(
    st.lists(
        st.tuples(st.integers(0, 2**20), st.integers(0, 64), st.binary(max_size=8)), max_size=4
    ),
    st.one_of(st.none(), st.floats(0, 1)),
)
RANDOM_FILE = st.one_of(st.binary(max_size=256), st.text(max_size=256).map(str.encode))


def read_file_case(
    workspace,
    tmp_path_factory,
    capsys,
    name: str,
    content: bytes,
    argv: list[str],
    script: str = "gpt",
    rebuilt: bool = False,
) -> None:
    """Write content to the workspace's file name, then run argv: a sound outcome, and the damaged
    file left as it was unless it is a cache (rebuilt)."""
    cls = {"gpt": gpt.LBGPT, "gpt_": gpt_.SMGPT}[script]
    with case_folder(workspace, tmp_path_factory) as home:
        path = home / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        capsys.readouterr()
        with no_hang():
            code = run_main([*argv, "--device=cpu", f"--data={home / 'corpus.txt'}"], cls, script)
        outcome_is_sound(code, capsys.readouterr().err)
        assert rebuilt or path.read_bytes() == content
        return code


@settings(max_examples=30 * SCALE, **SETTINGS)
@given(
    script=st.sampled_from(["gpt", "gpt_"]),
    damage=DAMAGE,
    mode=st.sampled_from(["sample", "eval"]),
)
def test_damaged_checkpoints(workspace, tmp_path_factory, capsys, script, damage, mode):
    original = open(os.path.join(FIXTURES, f"before_refactor_{script}.pt"), "rb").read()
    content = damaged(original, *damage)
    code = read_file_case(
        workspace,
        tmp_path_factory,
        capsys,
        f"model_dict/{script}.pt",
        content,
        MODES[mode],
        script,
    )
    if content[: len(original) // 2] != original[: len(original) // 2]:
        assert code == 2  # a checkpoint damaged in its first half never loads


@settings(max_examples=20 * SCALE, **SETTINGS)
@given(damage=DAMAGE, which=st.sampled_from(["data", "tokenizers"]))
def test_damaged_token_files_and_tokenizers(workspace, tmp_path_factory, capsys, damage, which):
    """The token file (eval reads it) and the cached tokenizer (training reads it): rebuilt with a
    notice."""
    path = sorted(p for p in (workspace / which).iterdir() if p.suffix in (".npy", ".model"))[0]
    argv = MODES["eval"] if which == "data" else MODES["train"]
    read_file_case(
        workspace,
        tmp_path_factory,
        capsys,
        f"{which}/{path.name}",
        damaged(path.read_bytes(), *damage),
        argv,
        rebuilt=True,
    )


@settings(max_examples=30 * SCALE, **SETTINGS)
@given(
    text=st.one_of(
        st.text(max_size=80),
        st.sampled_from(
            [
                "n_layer = 2\n",
                "n_layer = 1e9\n",
                "seed = 2**70\n",
                "import os\n",
                "beta1 = float('nan')\n",
                "dropout = -1\n",
                "raise SystemExit(3)\n",
                "x = 1 / 0\n",
                "mode = 'sample'\n",
                "n_head = True\n",
            ]
        ),
    )
)
def test_random_config_files(workspace, tmp_path_factory, capsys, text):
    """A config file named on the command line: plain Python the user wrote, whatever it holds."""
    read_file_case(
        workspace,
        tmp_path_factory,
        capsys,
        "my_config.py",
        text.encode("utf-8", "replace"),
        ["my_config.py", *MODES["sample"]],
    )


@settings(max_examples=30 * SCALE, **SETTINGS)
@given(
    file=st.sampled_from(
        ["config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"]
    ),
    content=RANDOM_FILE,
    damage=DAMAGE,
)
def test_damaged_hugging_face_folders(
    hf_folder, workspace, tmp_path_factory, capsys, file, content, damage
):
    """--mode=import of a Hugging Face GPT-2 folder with one file damaged or replaced by random
    bytes."""
    original = (hf_folder / file).read_bytes() if (hf_folder / file).exists() else content
    with case_folder(workspace, tmp_path_factory) as home:
        folder = home / "hf"
        shutil.copytree(hf_folder, folder)
        (folder / file).write_bytes(
            damaged(original, *damage) if damage[0] or damage[1] else content
        )
        capsys.readouterr()
        with no_hang():
            code = run_main(
                [
                    "--mode=import",
                    f"--import_from={folder}",
                    f"--ckpt={home / 'imported.pt'}",
                    "--device=cpu",
                ],
                gpt_.SMGPT,
                "gpt_",
            )
        outcome_is_sound(code, capsys.readouterr().err)


@pytest.fixture(scope="module")
def hf_folder(workspace, tmp_path_factory):
    """A Hugging Face GPT-2 folder exported from the tiny SM-GPT checkpoint."""
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    with case_folder(workspace, tmp_path_factory) as home:
        assert (
            run_main(
                ["--mode=export", "--export_format=hf", f"--export_to={folder}", "--device=cpu"],
                gpt_.SMGPT,
                "gpt_",
            )
            == 0
        )
        assert home
    return folder


LINE = st.one_of(
    st.text(max_size=40),
    st.dictionaries(
        st.sampled_from(["prompt", "chosen", "rejected", "pair_index", "x"]),
        st.one_of(st.text(max_size=8), st.integers(), st.none(), st.booleans()),
        max_size=4,
    ).map(json.dumps),
    st.builds(
        lambda p, c, r: json.dumps({"prompt": p, "chosen": c, "rejected": r}),
        st.text(max_size=8),
        st.text(max_size=8),
        st.text(max_size=8),
    ),
)
LINES_FILE = st.one_of(
    st.lists(LINE, max_size=6).map(lambda lines: "\n".join(lines).encode()), RANDOM_FILE
)


@settings(max_examples=80 * SCALE, **SETTINGS)
@given(content=LINES_FILE)
def test_random_preference_and_label_files(tmp_path_factory, content):
    """The pairs file (--pairs) and the labels file (--rlhf_stage=label resumes from it): their
    readers return pairs or raise one UserError; the labels reader rewrites a file only to drop a
    last line cut short, as documented, and never loses a whole line."""
    folder = tmp_path_factory.mktemp("lines")
    path = folder / "file.jsonl"
    path.write_bytes(content)
    for reader in (read_pairs, lambda p: read_answers(p, open(os.devnull, "w"))):
        with no_hang():
            try:
                reader(str(path))
            except UserError:  # printed as one line, exit 2
                pass
        if path.read_bytes() != content:
            kept = content.decode().split("\n")[:-1]
            assert path.read_bytes().decode() == "".join(k + "\n" for k in kept if k.strip())
            path.write_bytes(content)


# --- what the fuzzing found, kept as plain regression tests ------------------------------


def test_an_overwrite_that_fails_before_its_first_save_leaves_the_checkpoint_in_place(
    workspace, tmp_path_factory, capsys
):
    """--overwrite moved the old checkpoint to .bak before the data was read: a bad --data left
    none."""
    with case_folder(workspace, tmp_path_factory) as home:
        ckpt = home / "model_dict" / "gpt.pt"
        before = ckpt.read_bytes()
        assert run_main(MODES["train"] + ["--device=cpu", "--data=0"]) == 2
        assert "data 0 not found" in capsys.readouterr().err
        assert ckpt.read_bytes() == before and not (home / "model_dict" / "gpt.pt.bak").exists()


def test_a_value_with_a_line_break_is_still_one_line(capsys):
    assert run_main(["--n_layer=\n"]) == 2
    outcome_is_sound(2, capsys.readouterr().err)
    with pytest.raises(SystemExit):
        bench.main(["--steps=\n"])
    outcome_is_sound(2, capsys.readouterr().err)


def test_a_token_cache_whose_header_is_damaged_is_encoded_again(
    workspace, tmp_path_factory, capsys
):
    """np.load read a damaged header with ast.literal_eval: SyntaxError, which the cache did not
    catch."""
    cache = sorted((workspace / "data").glob("*.npy"))[0]
    content = cache.read_bytes()
    assert (
        read_file_case(
            workspace,
            tmp_path_factory,
            capsys,
            f"data/{cache.name}",
            content[:8] + content[58:],
            MODES["eval"],
            rebuilt=True,
        )
        == 0
    )


def test_a_config_file_that_exits_is_one_line(workspace, tmp_path_factory, capsys):
    assert (
        read_file_case(
            workspace,
            tmp_path_factory,
            capsys,
            "my_config.py",
            b"raise SystemExit(3)\n",
            ["my_config.py", *MODES["sample"]],
        )
        == 2
    )


def test_a_labels_file_that_is_not_text_is_one_line(tmp_path):
    (tmp_path / "labels.jsonl").write_bytes(b"\x80")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        read_answers(str(tmp_path / "labels.jsonl"), open(os.devnull, "w"))


@pytest.mark.parametrize("damage", [[(107, 2, b"")], [(54, 1, b"")]])
def test_a_tokenizer_whose_split_pattern_is_damaged_is_trained_again(workspace, tmp_path_factory,
                                                                     capsys, damage):
    """The long run's find: a pattern that no longer compiles raised regex's own error."""
    model = sorted((workspace / "tokenizers").glob("*.model"))[0]
    assert read_file_case(workspace, tmp_path_factory, capsys, f"tokenizers/{model.name}",
                          damaged(model.read_bytes(), damage, None), MODES["train"],
                          rebuilt=True) == 0
