"""The RLHF layer's stages in any order on one output folder, fuzzed (hypothesis's stateful
testing, seeded, no example database): a stage before its inputs exist, a stage rerun after an
earlier stage changed (other pairs), two seeds interleaved, a damaged file, a real SIGKILL inside a
stage. A model of the files says which stage may run: each stage's output records the run it was
built on, and a reader refuses one built on files that have since been written anew. Every command
must do what the model says: exit 2 with one line, or succeed with the result the stages give when
run in order (the same tensors, the same weights, the same evaluation). The suite runs one
sequence; DUALGPT_FUZZ=100, a hundred."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from conftest import ROOT, copy_code, make_corpus
from hypothesis import Phase, event, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import dualgpt
from rlhf import __main__ as rlhf

SCALE = int(os.environ.get("DUALGPT_FUZZ", "1"))
SEEDS = (1337, 1338)
VARIANTS = (64, 48)  # n_pairs: pairs of other settings change every stage built on them
STAGES = ("pairs", "rm", "bon", "dpo", "rloo", "ppo", "grpo", "eval")
UPSTREAM = {"rm": "pairs", "bon": "rm", "dpo": "pairs", "rloo": "rm", "ppo": "rm", "grpo": "rm"}
FILES = {"pairs": ("data", "pairs.pt"), "rm": ("model_dict", "rm.pt"), "bon": ("data", "bon.pt"),
         "dpo": ("model_dict", "dpo.pt"), "rloo": ("model_dict", "rloo.pt"),
         "ppo": ("model_dict", "ppo.pt"), "grpo": ("model_dict", "grpo.pt"),
         "eval": ("generate_text", "eval.json")}
# a tiny base (tests/fixtures) and settings small enough for a stage to take a fraction of a
# second; the verse oracle, as the base's text has no sentiment words
SETTINGS = ["--prompt_tokens=4", "--completion_tokens=8", "--eval_prompts=8", "--rl_prompts=4",
            "--rl_group=4", "--device=cpu", "--dtype=float32", "--rm_batch=16",
            "--bon_max_n=4", "--eval_samples=2", "--dpo_batch=16",
            "--dpo_methods=dpo", "--rl_steps=2", "--ppo_epochs=1", "--ppo_minibatches=1",
            "--kl_targets=0.5", "--primary=dpo@0.5", "--settings_at_kl=", "--oracle=verse"]
REFERENCES: dict = {}  # (study's first seed, seed, n_pairs, stage) -> the stages run in order's
# a study: its first seed and how many (--seed, --seeds); mostly one seed, so that its stages go
# deep. The evaluation prompts are drawn from the study's first seed: best-of-n's pool and the
# evaluation of seed 1338 differ between --seed=1338 and --seed=1337 --seeds=2
studies = st.sampled_from(((1337, 1), (1337, 1), (1338, 1), (1337, 2)))
single = st.sampled_from(((1337, 1), (1337, 1), (1338, 1)))
variants = st.sampled_from((64, 64, 48))
BY_STUDY = ("bon", "eval")


def new_home() -> Path:
    home = Path(tempfile.mkdtemp(prefix="rlhf_sequence"))
    (home / "corpus.txt").write_text(make_corpus(1500), encoding="utf-8")  # the base's text
    base = os.path.join(ROOT, "tests", "fixtures", "before_refactor_gpt_.pt")
    shutil.copy(base, home / "base.pt")
    return home


def args(home: Path, study: tuple[int, int], n_pairs: int, stage: str) -> list[str]:
    return [f"--data={home / 'corpus.txt'}", f"--rlhf_base={home / 'base.pt'}", *SETTINGS,
            f"--seed={study[0]}", f"--seeds={study[1]}", f"--n_pairs={n_pairs}",
            f"--rlhf_stage={stage}"]


def replicates(study: tuple[int, int]) -> list[int]:
    return [study[0] + k for k in range(study[1])]


def run_stage(home: Path, study: tuple[int, int], n_pairs: int, stage: str) -> tuple[int, str]:
    """`python -m rlhf ARGS` in-process, with home as the repository root: the exit code and what
    it printed to stderr."""
    previous, dualgpt.ROOT = dualgpt.ROOT, str(home)
    err = io.StringIO()
    try:
        # stdout a real file: the pipeline sets it to line buffering
        with open(os.devnull, "w") as out, contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(out):
            rlhf.main(args(home, study, n_pairs, stage))
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        dualgpt.ROOT = previous
    return code, err.getvalue()


def path(home: Path, seed_: int, stage: str) -> Path:
    folder, suffix = FILES[stage]
    return home / folder / f"rlhf_verse_seed{seed_}_{suffix}"


def record_of(file: Path) -> dict | None:
    """The record of the run that wrote a stage's file (None: unreadable, or no record)."""
    try:
        if file.suffix == ".json":
            content = json.loads(file.read_text())
            return content["run"]
        content = torch.load(file, weights_only=True)
        return content.get("run") or content["rlhf"]["run"]
    except Exception:
        return None


def content(file: Path):
    """What a stage computed, without the record of its run (which no two runs share)."""
    if file.suffix == ".json":
        result = json.loads(file.read_text())
        return {name: [{k: v for k, v in point.items() if isinstance(v, (int, float))} for point in curve]
                for name, curve in result["curves"].items()}
    loaded = torch.load(file, weights_only=True)
    if "rlhf" in loaded:  # a checkpoint: its weights
        return loaded["model"]
    return {k: v for k, v in loaded.items() if k != "run"}


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def reference(first: int, seed_: int, n_pairs: int, stage: str):
    """A stage's result for a seed when the stages run in order from scratch (computed once),
    in the study that starts at first (best-of-n and the evaluation depend on it)."""
    first = first if stage in BY_STUDY else seed_
    key = (first, seed_, n_pairs, stage)
    if key not in REFERENCES:
        home = new_home()
        try:
            for earlier in STAGES[:STAGES.index(stage) + 1]:
                code, err = run_stage(home, (first, seed_ - first + 1), n_pairs, earlier)
                assert code == 0, err[-2000:]
                REFERENCES[first, seed_, n_pairs, earlier] = content(path(home, seed_, earlier))
        finally:
            shutil.rmtree(home, ignore_errors=True)
    return REFERENCES[key]


class Stages(RuleBasedStateMachine):
    """One output folder. The model: for each seed and stage, the record id of the run whose file
    is there, the pairs' n_pairs, the id of the file it was built on, and for best-of-n and the
    evaluation the study's first seed (None: no file; "damaged")."""

    def __init__(self):
        super().__init__()
        self.home = new_home()
        self.files = {s: {stage: None for stage in STAGES} for s in SEEDS}
        self.killed = False

    def teardown(self):
        shutil.rmtree(self.home, ignore_errors=True)

    # --- the model ------------------------------------------------------------------------------

    def current(self, s: int, stage: str, n_pairs: int, first: int) -> dict | None:
        """The model's file of a stage, if a reader with these settings may take it: readable,
        built on the files there now, its pairs of this n_pairs, of this study where it counts."""
        entry = self.files[s][stage]
        if entry in (None, "damaged") or entry["n_pairs"] != n_pairs:
            return None
        if stage in BY_STUDY and entry["first"] != first:
            return None
        if stage in UPSTREAM:
            up = self.current(s, UPSTREAM[stage], n_pairs, first)
            if up is None or up["id"] != entry["up"]:
                return None
        return entry

    def allowed(self, s: int, stage: str, n_pairs: int, first: int) -> bool:
        """Whether the model says the stage may run: its inputs are there and current."""
        if stage == "pairs":
            return True
        if stage == "eval":  # best-of-n's pool is needed; the policies are optional, but never stale
            if self.current(s, "bon", n_pairs, first) is None:
                return False
            return all(self.files[s][o] is None or self.current(s, o, n_pairs, first) is not None
                       for o in ("dpo", "rloo", "ppo", "grpo"))
        return self.current(s, UPSTREAM[stage], n_pairs, first) is not None

    def record(self, s: int, stage: str, n_pairs: int, first: int) -> None:
        """The stage ran: its file is the new run's, built on the current upstream."""
        found = record_of(path(self.home, s, stage))
        assert found is not None, f"{stage} succeeded but left no readable file"
        up = (self.current(s, UPSTREAM[stage], n_pairs, first)["id"] if stage in UPSTREAM
              else None)
        assert found.get("upstream") == up, (stage, found.get("upstream"), up)
        entry = {"id": found["id"], "n_pairs": n_pairs, "up": up, "first": first}
        if stage == "eval":  # what it measured, as the report compares it with the files now
            entry["inputs"] = {o: self.files[s][o] and self.files[s][o]["id"]
                               for o in ("pairs", "rm", "bon", "dpo", "rloo", "ppo", "grpo")}
        self.files[s][stage] = entry

    def evaluated(self, s: int, n_pairs: int, first: int) -> bool:
        """Whether seed s's evaluation stands in the study from first: there, of that study, and
        every file it measured unchanged."""
        entry = self.files[s]["eval"]
        if (entry in (None, "damaged") or entry["first"] != first
                or self.current(s, "rm", n_pairs, first) is None):
            return False
        for name, measured in entry["inputs"].items():
            if measured is None and name != "bon":
                continue  # a policy that was not there: not one of the evaluation's inputs
            now = self.files[s][name]
            if (now if now in (None, "damaged") else now["id"]) != measured:
                return False
        return True

    def stale(self, s: int, n_pairs: int, first: int) -> str | None:
        """The first stage, in the pipeline's order, whose file is missing or stale."""
        missing = [x for x in STAGES[:-1] if self.current(s, x, n_pairs, first) is None]
        return missing[0] if missing else None if self.evaluated(s, n_pairs, first) else "eval"

    # --- the rules ------------------------------------------------------------------------------

    @rule(stage=st.sampled_from(STAGES), study=studies, n_pairs=variants)
    def run(self, stage, study, n_pairs):
        """One stage for each seed of the study: each seed's in turn, until one is refused."""
        code, err = run_stage(self.home, study, n_pairs, stage)
        event(f"{stage}, {study[1]} seed(s): exit {code}")
        assert "Traceback" not in err, err[-3000:]
        for s in replicates(study):
            if not self.allowed(s, stage, n_pairs, study[0]):
                assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, \
                    err[-2000:]
                return
            self.record(s, stage, n_pairs, study[0])
            # the result of the stages run in order, whatever order they ran in here (of the
            # evaluation: each method it found)
            got = content(path(self.home, s, stage))
            expected = reference(study[0], s, n_pairs, stage)
            if stage == "eval":
                expected = {name: expected[name] for name in got}
            assert same(got, expected), (stage, s)
        assert code == 0, err[-2000:]

    @rule(study=single, n_pairs=variants, count=st.integers(1, 8))
    def next_stages(self, study, n_pairs, count):
        """The first stages, in the pipeline's order, whose files are missing or stale: how a user
        goes on after a change (they always may run)."""
        for _ in range(count):
            stage = self.stale(study[0], n_pairs, study[0])
            if stage is None:
                return
            self.run(stage, study, n_pairs)

    @rule(study=studies, n_pairs=variants)
    def report(self, study, n_pairs):
        """The report over the study's seeds: only from evaluations of the files there now."""
        ok = all(self.evaluated(s, n_pairs, study[0]) for s in replicates(study))
        code, err = run_stage(self.home, study, n_pairs, "report")
        event(f"report of {study[1]} seed(s): exit {code}")
        assert "Traceback" not in err, err[-3000:]
        if ok:
            assert code == 0, err[-2000:]
        else:
            assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err[-2000:]

    @rule(s=st.sampled_from(SEEDS), stage=st.sampled_from(STAGES))
    def damage(self, s, stage):
        file = path(self.home, s, stage)
        if file.exists():
            file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])
            self.files[s][stage] = "damaged"

    @precondition(lambda self: not self.killed)
    @rule(stage=st.sampled_from(STAGES), study=single, n_pairs=variants,
          after=st.floats(0.5, 4.0))
    def kill(self, stage, study, n_pairs, after):
        """A real SIGKILL of `python -m rlhf --rlhf_stage=STAGE` at a random moment: what it had
        written is whole, and the model follows what is on disk."""
        self.killed = True
        if not (self.home / "rlhf").exists():
            copy_code(self.home)
        process = subprocess.Popen([sys.executable, "-m", "rlhf",
                                    *args(self.home, study, n_pairs, stage)],
                                   cwd=self.home, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(after)
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate(timeout=60)
        assert "Traceback" not in err, err[-2000:]
        event(f"killed {stage}")
        s, file = study[0], path(self.home, study[0], stage)
        entry = self.files[s][stage]
        if not file.exists():
            self.files[s][stage] = None  # the DPO and RL stages clear their outputs first
        elif entry in (None, "damaged") or record_of(file) is None or \
                record_of(file)["id"] != entry["id"]:
            assert self.allowed(s, stage, n_pairs, s), f"a killed {stage} wrote a refused file"
            self.record(s, stage, n_pairs, s)

    # --- after every step -----------------------------------------------------------------------

    @invariant()
    def every_file_the_model_knows_is_whole(self):
        for s, stages in self.files.items():
            for stage, entry in stages.items():
                if entry not in (None, "damaged"):
                    assert record_of(path(self.home, s, stage)) is not None, (s, stage)


# the same sequences in every run (a fixed seed); no shrinking: it takes minutes
Stages = seed(47)(Stages)
Stages.TestCase.settings = settings(max_examples=SCALE, stateful_step_count=10,
                                    deadline=None, database=None,
                                    phases=[Phase.explicit, Phase.generate])
test_rlhf_stages_in_any_order_on_one_folder = Stages.TestCase
