"""What happens when things go wrong, through the real command line where a user meets it: one run per output,
a failed write keeps the last good file and stops the run, killed runs leave no debris, and a corrupt file is
rebuilt (a cache) or one line naming it (anything else)."""
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import copy_code, run_main, run_script, tiny_args

import dualgpt
from rlhf import __main__ as rlhf
from dualgpt.files import OutputLock, atomic_open

DAMAGE = {"cut short": lambda b: b[:len(b) // 2], "emptied": lambda b: b"",
          "garbage": lambda b: random.Random(0).randbytes(max(len(b), 64))}


def damage(path, how: str) -> None:
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(DAMAGE[how](content))


def temp_files(*folders):
    return sorted(name for folder in folders if os.path.isdir(folder) for name in os.listdir(folder)
                  if name.endswith(".tmp"))


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def one_line_error(stderr: str, *parts: str) -> None:
    assert stderr.startswith("error: "), stderr[-2000:]
    assert stderr.count("\n") == 1, stderr[-2000:]
    for part in parts:
        assert part in stderr, stderr


def checkpoint_iteration(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["iter_num"]


# --- one run per output -------------------------------------------------------------------------------


def test_a_second_run_on_a_checkpoint_in_use_is_one_line_and_a_killed_runs_lock_never_blocks(home, corpus, capsys):
    ckpt = home / "model_dict" / "gpt.pt"
    first = run_script(home, tiny_args(home, corpus, "--mode=train", "--max_iters=100000", "--eval_interval=5"))
    try:
        wait_for(ckpt.exists)
        assert run_main(tiny_args(home, corpus, "--mode=train", "--resume")) == 2
        one_line_error(capsys.readouterr().err, f"{ckpt} is in use by another run (pid {first.pid}: ",
                       "wait for it to finish")
    finally:
        first.send_signal(signal.SIGKILL)  # the kernel drops a dead process's lock
        first.wait()
    target = checkpoint_iteration(ckpt) + 3
    assert run_main(tiny_args(home, corpus, "--mode=train", "--resume", f"--max_iters={target}")) == 0
    assert checkpoint_iteration(ckpt) == target


def test_an_rlhf_run_of_an_oracle_in_use_is_one_line(rlhf_run, monkeypatch, capsys):
    monkeypatch.setattr(dualgpt, "ROOT", str(rlhf_run.home))
    with OutputLock(str(rlhf_run.home / "model_dict" / "rlhf_sentiment")):
        with pytest.raises(SystemExit) as exit_info:
            rlhf.main(rlhf_run.args + ["--rlhf_stage=report"])
    assert exit_info.value.code == 2
    one_line_error(capsys.readouterr().err, "rlhf_sentiment is in use by another run (pid ")


# --- a failed write keeps the last good file ---------------------------------------------------------


def test_a_save_past_a_file_size_limit_keeps_the_last_checkpoint_and_stops_with_one_line(home, corpus):
    """RLIMIT_FSIZE lets the first save of the run through (no optimizer state yet) and stops the next one."""
    ckpt = home / "model_dict" / "gpt.pt"
    assert run_main(tiny_args(home, corpus, "--mode=train", "--max_iters=2", "--eval_interval=2")) == 0
    limit = int(0.75 * ckpt.stat().st_size)  # the first save of a run is about half a later one
    copy_code(home)
    result = subprocess.run([sys.executable, "gpt.py", *tiny_args(home, corpus, "--mode=train", "--overwrite",
                                                                  "--max_iters=8", "--eval_interval=4")],
                            cwd=home, capture_output=True, text=True, timeout=120,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == 1
    one_line_error(result.stderr, f"could not write {ckpt}", "File too large", "the previous file is kept")
    assert checkpoint_iteration(ckpt) == 0  # this run's first save, whole and loadable
    assert temp_files(ckpt.parent) == []


def read_only_between_saves(folder, process) -> None:
    """Make folder read-only for the running process: a read-only bind mount in its own mount namespace when
    running as root (root writes through permission bits), else the permission bits."""
    if os.geteuid() == 0:
        for _ in range(200):  # the remount is refused ("busy") while the run has a file there open for writing
            remount = subprocess.run(["nsenter", "-t", str(process.pid), "-m", "mount", "-o", "remount,bind,ro",
                                      str(folder)], capture_output=True, text=True)
            if remount.returncode == 0 or "busy" not in remount.stderr:
                break
            time.sleep(0.01)
        remount.check_returncode()
    else:
        folder.chmod(0o555)


def test_a_folder_made_read_only_between_saves_keeps_the_last_checkpoint(home, corpus):
    folder = home / "ro"
    folder.mkdir()
    ckpt = folder / "gpt.pt"
    copy_code(home)
    args = [sys.executable, "gpt.py", *tiny_args(home, corpus, "--mode=train", "--max_iters=100000", "--eval_interval=3",
                                                 f"--ckpt={ckpt}")]
    if os.geteuid() == 0:
        if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
            pytest.skip("as root, a read-only folder needs a mount namespace (unshare -m), which this machine refuses")
        args = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                f'mount --bind "{folder}" "{folder}" && exec "$0" "$@"', *args]
    process = subprocess.Popen(args, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ckpt.exists)
        read_only_between_saves(folder, process)
        _, stderr = process.communicate(timeout=120)
    finally:
        folder.chmod(0o755)
        process.kill()
    assert process.returncode == 1
    # the first write after the remount fails: the log's append or the checkpoint's save, whichever comes first
    one_line_error(stderr, "Read-only file system" if os.geteuid() == 0 else "Permission denied", "the run stopped")
    assert f"could not write {ckpt}" in stderr or f"could not append to {folder / 'gpt.jsonl'}" in stderr
    assert checkpoint_iteration(ckpt) >= 0
    assert temp_files(folder) == []


# --- no debris ------------------------------------------------------------------------------------------


def test_runs_killed_at_random_moments_leave_nothing_after_the_next_run(home, corpus):
    """Saving every step, killed twice at random moments; the next run removes what the dead left, never a
    live process's temp file, and the checkpoint is whole."""
    folder = home / "model_dict"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / f".gpt.pt.{dead.pid}.tmp").write_bytes(b"half a checkpoint")  # a dead writer's
    writer = subprocess.Popen(["sleep", "3600"])  # a live writer, for as long as the test runs
    live = folder / f".gpt.pt.{writer.pid}.tmp"
    live.write_bytes(b"being written")
    rng = random.Random(1)
    for kill in range(2):  # a fresh run, then one resuming it
        run = run_script(home, tiny_args(home, corpus, "--mode=train", "--max_iters=100000", "--eval_interval=1",
                                         "--eval_iters=1", *(["--resume"] if kill else [])))
        wait_for(lambda: (folder / "gpt.pt").exists())
        time.sleep(rng.uniform(0.0, 1.0))
        run.send_signal(signal.SIGKILL)
        run.wait()
    try:
        assert run_main(tiny_args(home, corpus, "--mode=sample")) == 0
    finally:
        writer.kill()
        writer.wait()
    assert temp_files(folder, home / "data", home / "tokenizers", home / "generate_text") == [live.name]
    assert checkpoint_iteration(folder / "gpt.pt") >= 0


# --- corrupt files ----------------------------------------------------------------------------------------


@pytest.fixture
def trained(home, corpus):
    assert run_main(tiny_args(home, corpus, "--mode=train", "--max_iters=2", "--eval_interval=2")) == 0
    return home / "model_dict" / "gpt.pt"


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_corrupt_checkpoint_is_one_line_and_left_as_it_is(trained, home, corpus, capsys, how):
    damage(trained, how)
    before = trained.read_bytes()
    capsys.readouterr()
    assert run_main(tiny_args(home, corpus, "--mode=sample")) == 2
    one_line_error(capsys.readouterr().err, f"{trained} is not readable", "train it again")
    assert trained.read_bytes() == before  # nothing destroyed


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_corrupt_token_file_is_encoded_again_with_a_notice(trained, home, corpus, capsys, how):
    (cache,) = (home / "data").glob("corpus_*.npy")
    damage(cache, how)
    capsys.readouterr()
    assert run_main(tiny_args(home, corpus, "--mode=eval")) == 0
    assert f"note: the token file {cache} is unreadable" in capsys.readouterr().out
    assert run_main(tiny_args(home, corpus, "--mode=eval")) == 0
    assert "token file" not in capsys.readouterr().out  # rebuilt: read as it is the next time


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_corrupt_tokenizer_is_trained_again_with_a_notice(trained, home, corpus, capsys, how):
    (model,) = (home / "tokenizers").glob("corpus_*.model")
    damage(model, how)
    capsys.readouterr()
    assert run_main(tiny_args(home, corpus, "--mode=train", f"--ckpt={home / 'model_dict' / 'other.pt'}")) == 0
    out = capsys.readouterr().out
    assert f"note: not using {model}" in out and "training anew" in out
    assert "training a 300-token BPE tokenizer" in out


@pytest.fixture
def rlhf_copy(rlhf_run, tmp_path, monkeypatch):
    """The RLHF pipeline's folder copied, so its files can be damaged without touching the shared one."""
    home = tmp_path / "run"
    shutil.copytree(rlhf_run.home, home)
    monkeypatch.setattr(dualgpt, "ROOT", str(home))
    return home, [a.replace(str(rlhf_run.home), str(home)) for a in rlhf_run.args]


P = "rlhf_sentiment_seed1337"
RLHF_FILES = [  # (file, the stage that reads it, what the one line says)
    (f"data/{P}_pairs.pt", "rm", "run python -m rlhf --rlhf_stage=pairs again"),
    (f"model_dict/{P}_rm.pt", "bon", "is not readable"),
    (f"data/{P}_bon.pt", "eval", "run python -m rlhf --rlhf_stage=bon again"),
    (f"model_dict/{P}_dpo_steps/step*.pt", "eval", "is not readable"),  # the last kept: the end
    (f"generate_text/{P}_eval.json", "report", "run python -m rlhf --rlhf_stage=eval --seed=1337 again"),
]


@pytest.mark.parametrize("how", list(DAMAGE))
@pytest.mark.parametrize("name, stage, message", RLHF_FILES)
def test_a_corrupt_rlhf_file_is_one_line_naming_it(rlhf_copy, capsys, name, stage, message, how):
    home, args = rlhf_copy
    path = max(home.glob(name))  # the last, where the name is a pattern
    damage(path, how)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        rlhf.main(args + [f"--rlhf_stage={stage}"])
    assert exit_info.value.code == 2
    one_line_error(capsys.readouterr().err, str(path), message)


def test_an_atomic_write_that_fails_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.model"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(str(path)) as f:
            f.write("partial")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.model"]
