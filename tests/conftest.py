import dataclasses
import hashlib
import os
import random
import shutil
import subprocess
import sys

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: two workers share the cores
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # before torch loads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dualgpt  # noqa: E402
import gpt  # noqa: E402
import gpt_  # noqa: E402
from dualgpt.run import main  # noqa: E402
from dualgpt.corpus import resolve_data  # noqa: E402
from dualgpt.data import Dataset  # noqa: E402
from rlhf.oracles import JUDGE_NEGATIVE, JUDGE_POSITIVE, SCORE_NEGATIVE, SCORE_POSITIVE, words  # noqa: E402

WORDS = ["the", "king", "queen", "my", "lord", "thou", "art", "thee", "love", "death", "night", "day", "sweet",
         "good", "what", "shall", "we", "do", "not", "is", "and", "to", "of", "a", "in", "that", "with", "O"]
CODE = ["gpt.py", "gpt_.py", "config.py", "config", "dualgpt", "minbpe", "rlhf"]  # what a user's clone runs


def make_corpus(n_lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        speaker = rng.choice(["ROMEO", "JULIET", "KING", "NURSE"])
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
        lines.append(f"{speaker}:\n{words[0].upper()}{words[1:]}{rng.choice('.,!?;')}\n")
    return "\n".join(lines)


@pytest.fixture(autouse=True)
def figures(request, monkeypatch):
    """Figures are rendered (matplotlib, 0.3-1 s each) only in the tests marked `plots`, which check them:
    elsewhere an in-process training run draws no loss curve, and every other figure is built as usual but
    written as an empty file. Runs through the command line always render."""
    if request.node.get_closest_marker("plots") is None:
        from matplotlib.figure import Figure

        from dualgpt import plots
        monkeypatch.setattr(plots, "plot_losses", lambda log_file, path, title, repeat_fraction: None)
        monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: None)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private root for data/, tokenizers/, model_dict/ and generate_text/."""
    monkeypatch.setattr(dualgpt, "ROOT", str(tmp_path))
    return tmp_path


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus(1500), encoding="utf-8")
    return path


# a model small enough to train in seconds on 2 CPU cores, and a run config of it: one layer for the tests of
# a run's machinery (a third less CPU time), two where what differs between layers is tested (tiny_args' n_layer)
TINY_MODEL = ["--vocab_size=300", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32"]
TINY = TINY_MODEL + ["--batch_size=8", "--dropout=0.0", "--eval_iters=2", "--learning_rate=3e-3", "--warmup_iters=2", "--device=cpu",
        "--dtype=float32", "--max_iters=10",  # a typed step limit: no time budget
        "--max_new_tokens=20", "--num_samples=1"]


def tiny_args(home, corpus, *extra, script="gpt", n_layer=1):
    return TINY + [f"--n_layer={n_layer}", f"--data={corpus}", f"--ckpt={home / 'model_dict' / (script + '.pt')}",
                   f"--sample_file={home / 'generate_text' / (script + '.txt')}", *extra]


def run_main(argv, cls=None, script="gpt"):
    """The command line in-process; returns the exit code (0 when it returns normally)."""
    try:
        main(cls or gpt.LBGPT, script, argv)
    except SystemExit as e:
        return e.code
    return 0


def stop_after(n: int) -> type:
    """A StopRequest for run.py: Ctrl-C pressed after the run's n-th step (the run checks its flag once
    before each step)."""

    class StopAfter:
        def __enter__(self):
            self.checks = 0
            return self

        def __exit__(self, *exc):
            pass

        @property
        def requested(self):
            self.checks += 1
            return self.checks > n

    return StopAfter


def copy_code(dest) -> None:
    """The code of a clone (no data, no trained models), so that its output folders are under dest."""
    for name in CODE:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            shutil.copy(src, dest / name)


def run_script(home, args, script="gpt.py", **kwargs):
    """`python <script> args...` as a user runs it, from a copy of the code in home (its outputs stay there)."""
    if not (home / script).exists():
        copy_code(home)
    return subprocess.Popen([sys.executable, str(home / script), *args], cwd=home, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def dataset(cfg: dict) -> Dataset:
    """The training data of a run config, as --mode=train builds it."""
    path = resolve_data(cfg["data"])
    return Dataset(path, cfg["block_size"], cfg["batch_size"], cfg["device"], vocab_size=cfg["vocab_size"])


# --- python -m rlhf: a tiny base model and every stage, shared by test_python -m rlhf and test_head_study.py -------------

CHEERFUL = words(SCORE_POSITIVE)[:6] + words(JUDGE_POSITIVE)[:6]  # words of both halves of the lexicon
GLOOMY = words(SCORE_NEGATIVE)[:6] + words(JUDGE_NEGATIVE)[:6]
NEUTRAL = ["the", "king", "my", "lord", "thou", "art", "what", "shall", "we", "do", "not", "and", "to", "of", "in"]


def mood_corpus(n_lines: int, seed: int = 0) -> str:
    """Every speaker has a mood: ROMEO's and JULIET's lines use positive words of both lexicon halves, KING's
    and TYBALT's negative ones. Raising the oracle score (half A) is easiest by writing a cheerful
    speaker's line, which raises the held-out judge's (half B) score too: the latent factor the judge checks
    that tuning found."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        speaker = rng.choice(["ROMEO", "JULIET", "KING", "TYBALT"])
        mood = CHEERFUL if speaker in ("ROMEO", "JULIET") else GLOOMY
        words = [rng.choice(mood if rng.random() < 0.8 else NEUTRAL) for _ in range(rng.randint(5, 9))]
        lines.append(f"{speaker}:\n{' '.join(words).capitalize()}.\n")
    return "\n".join(lines)


BASE = TINY_MODEL + ["--n_layer=2", "--batch_size=16", "--dropout=0.0", "--eval_iters=2", "--learning_rate=3e-3",
                     "--warmup_iters=5", "--device=cpu", "--dtype=float32", "--max_iters=300", "--eval_interval=300"]
# Sized to prove each stage's point in seconds, not to tune well: RLOO at 2e-3 passes 2 nats in its first kept
# step, so the tests read its judge gain at its last point (test_rlhf.py).
SHARED = ["--prompt_tokens=8", "--completion_tokens=16", "--eval_prompts=64", "--rl_prompts=8", "--rl_group=8",
          "--rloo_lr=2e-3", "--device=cpu", "--dtype=float32"]  # keys python -m rlhf and python -m rlhf.heads both read
PIPELINE = ["--n_pairs=1024", "--rm_epochs=4", "--rm_batch=32", "--rm_lr=1e-3", "--bon_max_n=16",
            "--eval_samples=4", "--dpo_batch=32", "--dpo_lr=1e-3", "--rl_steps=30", "--ppo_epochs=1",
            "--ppo_minibatches=2", "--ppo_lr=2e-3", "--grpo_lr=2e-3", "--kl_targets=0.5,1", "--settings_at_kl=",
            "--primary=dpo@0.5,rloo@1,grpo@1",
            "--dpo_methods=dpo,cdpo,ipo,preferred_ft"]  # keys of python -m rlhf alone


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """`python -m rlhf` on a tiny base model: where it ran, its arguments, what main() returned, and the base
    checkpoint's hash before and after every stage ran."""
    home: object  # a pathlib.Path: the repository root of the run
    shared_args: list  # the data, the base and SHARED: what python -m rlhf.heads takes
    args: list  # shared_args and PIPELINE: python -m rlhf's
    result: dict
    base_hash_before: str
    base_hash_after: str


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    """A tiny base model trained on the mood corpus, then `python -m rlhf` with small settings, every stage."""
    from rlhf import __main__ as rlhf
    home = tmp_path_factory.mktemp("rlhf")
    previous, dualgpt.ROOT = dualgpt.ROOT, str(home)
    try:
        (home / "corpus.txt").write_text(mood_corpus(3000), encoding="utf-8")
        data = f"--data={home / 'corpus.txt'}"
        assert run_main(BASE + [data, "--mode=train", f"--ckpt={home / 'base.pt'}"], gpt_.SMGPT, "gpt_") == 0
        shared = SHARED + [data, f"--rlhf_base={home / 'base.pt'}"]
        before = sha256(home / "base.pt")
        result = rlhf.main(shared + PIPELINE)
    finally:
        dualgpt.ROOT = previous
    return Pipeline(home, shared, shared + PIPELINE, result, before, sha256(home / "base.pt"))


@pytest.fixture
def rlhf_run(pipeline, monkeypatch) -> Pipeline:
    """The pipeline, with its folder as the repository root for the test."""
    monkeypatch.setattr(dualgpt, "ROOT", str(pipeline.home))
    return pipeline


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """Under pytest-xdist, every test of the RLHF pipeline runs in one worker, so the session's
    pipeline (the suite's slowest fixture) is built once."""
    for item in items:
        if "pipeline" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("rlhf_pipeline"))
