"""Sequences of commands on one checkpoint, fuzzed (hypothesis's stateful testing, seeded, no
example database): what a user does to model_dict/gpt.pt with both scripts, in any order. Train
with a step or a time limit, resume with a lower, equal or higher limit, --overwrite, a real
SIGKILL at a random moment, Ctrl-C, eval, sample with and without the KV cache, heads, export, a
Hugging Face export imported back, the other script on the same checkpoint, a damaged file, another
--data or --vocab_size. After every step: no traceback; exit 0, or 2 with one line, or 130 after
Ctrl-C; the checkpoint loads and its step never goes back unless asked; no temp file; the log holds
each step once. At the end, a checkpoint that only resumed, was stopped or was killed equals a
straight run to its step. DUALGPT_FUZZ=10 runs ten times as many sequences."""
import contextlib
import io
import os
import signal
import subprocess
import sys
import time

import torch
from conftest import ROOT, TINY, copy_code, make_corpus, run_main, stop_after
from hypothesis import Phase, event, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

import dualgpt
import gpt
import gpt_
from dualgpt import run

SCALE = int(os.environ.get("DUALGPT_FUZZ", "1"))
SCRIPTS = {"gpt": gpt.LBGPT, "gpt_": gpt_.SMGPT}
LAYOUTS = {"gpt": "LB-GPT", "gpt_": "SM-GPT"}
# fixed across every run of a sequence, so that one checkpoint's runs can continue each other
# exactly: the learning rate decays over lr_decay_iters, not over each run's own limit
SETTINGS = ["--eval_interval=4", "--log_interval=1", "--dropout=0.1", "--lr_decay_iters=64",
            "--eval_iters=1", "--max_new_tokens=4"]
scripts = st.sampled_from(sorted(SCRIPTS))
# a command that continues a checkpoint: mostly by the script that wrote it
continuing = st.sampled_from(["same", "same", "same", "other"])


class Commands(RuleBasedStateMachine):
    """One user's commands on one checkpoint path. The model of what they did: the checkpoint's
    step (None: no checkpoint), what it holds, and whether its lineage is straight (only runs
    that continue each other exactly)."""

    def __init__(self):
        super().__init__()
        self.home = self.make_home()
        self.previous_root, dualgpt.ROOT = dualgpt.ROOT, str(self.home)
        self.previous_cwd = os.getcwd()
        os.chdir(self.home)  # a path written relative to the working folder lands here too
        self.tracked = self.tracked_changes()
        self.path = self.home / "model_dict" / "gpt.pt"
        self.step = None  # the checkpoint's iteration, in the model
        self.holds = None  # "gpt" or "gpt_" (trained by that script), "weights", "damaged"
        self.straight = True  # every run since the last fresh one continued it exactly
        self.killed = False
        self.debris = False  # a killed writer's temp file may be left, until the next command

    @staticmethod
    def make_home():
        """A private repository root with two corpora and the code (for the killed runs)."""
        import tempfile
        from pathlib import Path
        home = Path(tempfile.mkdtemp(prefix="sequence"))
        (home / "a.txt").write_text(make_corpus(600), encoding="utf-8")
        (home / "b.txt").write_text(make_corpus(600, seed=1), encoding="utf-8")
        copy_code(home)
        return home

    def teardown(self):
        try:
            if self.straight and self.step and self.holds in SCRIPTS:
                self.equals_a_straight_run()
            assert self.tracked_changes() == self.tracked, "a tracked file changed"
        finally:
            dualgpt.ROOT = self.previous_root
            os.chdir(self.previous_cwd)
            subprocess.run(["rm", "-rf", str(self.home)])

    @staticmethod
    def tracked_changes() -> str:
        """git's list of the repository's changed tracked files (empty on a clean clone)."""
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                              cwd=ROOT, capture_output=True, text=True).stdout

    # --- running a command -----------------------------------------------------------------------

    def args(self, *extra: str, data: str = "a.txt") -> list[str]:
        """The tiny model's settings, this checkpoint, then what the command adds."""
        return [*TINY, "--n_layer=1", f"--data={self.home / data}", f"--ckpt={self.path}",
                f"--sample_file={self.home / 'generate_text' / 'sample.txt'}", *SETTINGS, *extra]

    def command(self, script: str, *extra: str, data: str = "a.txt") -> tuple[int, str]:
        """`python <script>.py ARGS` in-process: its exit code and what it printed to stderr,
        which must be one line `error: ...` where the code says a mistake or a failure."""
        self.debris = False  # every command removes what killed runs left behind
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = run_main(self.args(*extra, data=data), SCRIPTS[script], script)
        text = err.getvalue()
        event(f"{extra[0]} {script}.py: exit {code}")  # what ran: --hypothesis-show-statistics
        assert "Traceback" not in text, text[-3000:]
        assert code in (0, 1, 2, 130), (code, text[-2000:])
        if code in (1, 2):
            last = text.strip().split("\n")[-1].split("\r")[-1]  # after tqdm's bars
            assert last.startswith("error: "), text[-2000:]
        return code, text

    def refused(self, code: int, text: str, message: str) -> None:
        assert code == 2, (code, text[-2000:])
        assert message in text, (message, text[-2000:])

    def expect_readable(self, code: int, text: str) -> None:
        """A mode that reads the checkpoint: it works where there is one it can read."""
        if self.holds is None:
            self.refused(code, text, "no checkpoint at")
        elif self.holds == "damaged":
            self.refused(code, text, "is not readable")
        else:
            assert code == 0, text[-2000:]

    def script(self, which: str) -> str:
        """The script that wrote the checkpoint ("same") or the other one."""
        same = self.holds if self.holds in SCRIPTS else "gpt"
        return same if which == "same" else {"gpt": "gpt_", "gpt_": "gpt"}[same]

    def saved_step(self) -> int:
        return torch.load(self.path, weights_only=True)["iter_num"]

    # --- the rules: what a user does -------------------------------------------------------------

    @rule(script=scripts, steps=st.integers(1, 12), overwrite=st.booleans())
    def train(self, script, steps, overwrite):
        code, text = self.command(script, "--mode=train", f"--max_iters={steps}",
                                  *(["--overwrite"] if overwrite else []))
        if self.holds is not None and not overwrite:
            self.refused(code, text, "already exists; pass --resume")
            return
        assert code == 0, text[-2000:]
        self.step, self.holds, self.straight = steps, script, True

    @rule(script=scripts, overwrite=st.booleans())
    def train_for_a_time(self, script, overwrite):
        code, text = self.command(script, "--mode=train", "--max_minutes=0.003", "--max_iters=0",
                                  *(["--overwrite"] if overwrite else []))
        if self.holds is not None and not overwrite:
            self.refused(code, text, "already exists; pass --resume")
            return
        assert code == 0, text[-2000:]
        # the schedule follows the clock too: no straight run repeats it
        self.step, self.holds, self.straight = self.saved_step(), script, False

    @initialize(script=scripts, steps=st.integers(0, 12))
    def start(self, script, steps):
        """Most users' commands meet a trained checkpoint (0: none yet)."""
        if steps:
            self.train(script, steps, overwrite=False)

    @rule(which=continuing, change=st.integers(-6, 6),
          data=st.sampled_from(["as trained"] * 3 + ["another text", "another vocabulary"]))
    def resume(self, which, change, data):
        """--resume with a limit below, at or above the checkpoint's step; or on another text,
        which it may; or with another vocabulary, which it may not."""
        script = self.script(which)
        limit = max(1, (self.step or 0) + change)
        extra = {"as trained": [], "another text": [], "another vocabulary": ["--vocab_size=320"]}
        text_file = "b.txt" if data == "another text" else "a.txt"
        code, text = self.command(script, "--mode=train", "--resume", f"--max_iters={limit}",
                                  *extra[data], data=text_file)
        if self.resume_is_refused(script, code, text):
            return
        if data == "another vocabulary":
            self.refused(code, text, "was trained with vocab_size=300")
            return
        assert code == 0, text[-2000:]
        if data == "another text" and limit > self.step:
            self.straight = False  # it trained on other text
        self.step = max(self.step, limit)

    def resume_is_refused(self, script: str, code: int, text: str) -> bool:
        """Whether this checkpoint cannot be resumed by the script, and refused as it should be."""
        reasons = {None: "no checkpoint at", "damaged": "is not readable",
                   "weights": "holds weights only"}
        if self.holds in reasons:
            self.refused(code, text, reasons[self.holds])
            return True
        if self.holds != script:
            self.refused(code, text, f"was written with {LAYOUTS[self.holds]} attention")
            return True
        return False

    @rule(which=continuing, checks=st.integers(0, 4))
    def ctrl_c(self, which, checks):
        """Ctrl-C during a resumed run (or a fresh one where there is no checkpoint)."""
        script = self.script(which)
        resume = self.holds is not None
        old = run.StopRequest
        run.StopRequest = stop_after(checks)
        try:
            code, text = self.command(script, "--mode=train",
                                      f"--max_iters={(self.step or 0) + 20}",
                                      *(["--resume"] if resume else []))
        finally:
            run.StopRequest = old
        if resume and self.resume_is_refused(script, code, text):
            return
        assert code == 130, text[-2000:]
        # each check before the Ctrl-C let one step run: it saved where it stopped
        self.step = (self.step or 0) + checks
        self.holds = script
        assert self.saved_step() == self.step

    @precondition(lambda self: not self.killed)
    @rule(which=continuing, after=st.floats(0.0, 1.5))
    def kill(self, which, after):
        """A real SIGKILL of a real process, at a random moment after its first save."""
        script = self.script(which)
        if self.holds not in (None, script):
            return
        self.killed = True
        before = os.path.getmtime(self.path) if self.path.exists() else None
        resume = ["--resume"] if self.holds else []
        # as many threads as this process: the same sums in the same order, for exact resumes
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        process = subprocess.Popen(
            [sys.executable, str(self.home / f"{script}.py"), *self.args(), "--mode=train",
             "--max_iters=100000", *resume], cwd=self.home, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            if self.path.exists() and os.path.getmtime(self.path) != before:
                break
            time.sleep(0.02)
        time.sleep(after)
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate(timeout=60)
        self.debris = True
        event(f"killed {script}.py")
        assert "Traceback" not in err, err[-2000:]
        step = self.saved_step()
        assert self.step is None or step >= self.step
        self.step, self.holds = step, script

    @rule(script=scripts)
    def evaluate(self, script):
        self.expect_readable(*self.command(script, "--mode=eval"))

    @rule(script=scripts, cache=st.booleans())
    def sample(self, script, cache):
        self.expect_readable(*self.command(script, "--mode=sample", "--num_samples=1",
                                           f"--kv_cache={cache}"))

    @rule(script=scripts)
    def heads(self, script):
        self.expect_readable(*self.command(script, "--mode=heads"))

    @rule(script=scripts)
    def export(self, script):
        out = self.home / "exported.pt"
        self.expect_readable(*self.command(script, "--mode=export", f"--export_to={out}"))

    @rule(script=scripts, other=scripts)
    def export_to_hugging_face_and_import_back(self, script, other):
        """The import replaces the checkpoint (--overwrite): weights only, at step 0, as asked."""
        folder = self.home / "hf"
        code, text = self.command(script, "--mode=export", "--export_format=hf",
                                  f"--export_to={folder}", "--overwrite")
        self.expect_readable(code, text)
        if code:
            return
        code, text = self.command(other, "--mode=import", f"--import_from={folder}",
                                  "--overwrite")
        assert code == 0, text[-2000:]
        self.step, self.holds, self.straight = 0, "weights", False

    @rule(how=st.sampled_from(["cut short", "emptied", "garbage"]))
    def damage(self, how):
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        self.path.write_bytes({"cut short": data[:len(data) // 2], "emptied": b"",
                               "garbage": b"\x00garbage" * 64}[how])
        self.holds, self.straight = "damaged", False

    # --- what holds after every step -------------------------------------------------------------

    @invariant()
    def the_checkpoint_is_where_the_model_says(self):
        if self.holds in (*SCRIPTS, "weights"):
            ckpt = torch.load(self.path, weights_only=True)
            assert ckpt["iter_num"] == self.step
            if self.holds in SCRIPTS:
                assert ckpt["layout"] == LAYOUTS[self.holds]

    @invariant()
    def no_temp_file_is_left(self):
        """None but a killed writer's, and that only until the next command."""
        left = [p for folder in ("model_dict", "data", "tokenizers", "generate_text")
                for p in (self.home / folder).glob(".*.tmp")]
        assert self.debris or not left, left

    @invariant()
    def the_log_holds_each_step_once(self):
        log = self.home / "model_dict" / "gpt.jsonl"
        if not log.exists():
            return
        import json
        records = [json.loads(line) for line in log.read_text().splitlines()]
        for kind in ("loss", "val_loss"):
            steps = [r["iter"] for r in records if kind in r]
            assert steps == sorted(set(steps)), (kind, steps)

    def equals_a_straight_run(self):
        """The checkpoint's weights, reached by runs that continued each other, equal one run from
        scratch to the same step."""
        script = self.holds
        straight = self.home / "straight.pt"
        code, text = self.command(script, "--mode=train", f"--max_iters={self.step}",
                                  f"--ckpt={straight}")
        assert code == 0, text[-2000:]
        a = torch.load(self.path, weights_only=True)["model"]
        b = torch.load(straight, weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), "not the straight run's weights"


# the same sequences in every run (a fixed seed); no shrinking: a failing sequence is at most 8
# commands, and shrinking one takes minutes
Commands = seed(44)(Commands)
Commands.TestCase.settings = settings(max_examples=4 * SCALE, stateful_step_count=8,
                                      deadline=None, database=None,
                                      phases=[Phase.explicit, Phase.generate])
test_sequences_of_commands_on_one_checkpoint = Commands.TestCase
