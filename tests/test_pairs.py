"""Your own preferences: pairs of any length padded with masks (proven equal to unpadded), the prompt/chosen/
rejected JSON-lines format in and out, the pipeline tuned on a file's pairs with and without an oracle, bad files,
and labelling by hand through a real pseudo-terminal and through a pipe."""
import io
import json
import os
import pty
import fcntl
import select
import signal
import subprocess
import sys
import termios
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_code

import gpt
import gpt_
from rlhf import __main__ as rlhf
from rlhf.preference import PAD, RewardModel, completion_logits, dpo_loss, reward_model_loss, token_logprobs
from rlhf.pairs import encode_pairs, read_pairs
from rlhf.study import rlhf_run_config, sample_prompts, setup

CFG = gpt.ModelConfig(vocab_size=300, block_size=24, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
ORACLE_PAIRS = "data/rlhf_sentiment_seed1337_pairs.jsonl"  # the pipeline fixture's pairs, as text


def ragged_batch(seed: int, n: int = 6):
    """Prompts of 1-9 tokens and two completions of 1-12 tokens per pair: each as its own list, and padded."""
    g = torch.Generator().manual_seed(seed)
    lengths = lambda low, high: torch.randint(low, high + 1, (n,), generator=g).tolist()  # noqa: E731
    rows = {name: [torch.randint(0, 300, (k,), generator=g) for k in lengths(*span)]
            for name, span in (("prompts", (1, 9)), ("chosen", (1, 12)), ("rejected", (1, 12)))}
    pad = lambda rs: torch.stack([F.pad(r, (0, max(map(len, rs)) - len(r)), value=PAD) for r in rs])  # noqa: E731
    return rows, {name: pad(rs) for name, rs in rows.items()}


def alone(function, rows, i, side):
    """function(prompt, completion) on pair i alone, unpadded, as a batch of one."""
    return function(rows["prompts"][i][None], rows[side][i][None])[0]


@pytest.mark.parametrize("cls", [gpt.LBGPT, gpt_.SMGPT])
def test_a_padded_batch_gives_every_completion_its_own_log_probability_and_reward(cls):
    torch.manual_seed(0)
    model = cls(CFG).eval()
    rm = RewardModel(cls(CFG)).eval()
    torch.nn.init.normal_(rm.head.weight)
    rows, batch = ragged_batch(1)
    logprob = lambda p, c: token_logprobs(completion_logits(model, p, c), c, 1.0).sum(1)  # noqa: E731
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            padded_logprob, padded_reward = logprob(batch["prompts"], batch[side]), rm(batch["prompts"], batch[side])
            for i in range(len(rows["prompts"])):
                assert abs(padded_logprob[i] - alone(logprob, rows, i, side)) < 1e-5
                assert abs(padded_reward[i] - alone(rm, rows, i, side)) < 1e-5
                # and the plain reference: one forward pass over prompt + completion, read by hand
                prompt, completion = rows["prompts"][i], rows[side][i]
                ids = torch.cat([prompt, completion])[None]
                logits = model.lm_head(model.hidden_states(ids))[0, len(prompt) - 1:-1]
                by_hand = F.log_softmax(logits, -1)[torch.arange(len(completion)), completion].sum()
                assert abs(padded_logprob[i] - by_hand) < 1e-5
                assert abs(padded_reward[i] - rm.head(rm.body.hidden_states(ids)[0, -1])) < 1e-5


def test_a_padded_dpo_or_reward_model_step_is_the_mean_of_the_unpadded_ones():
    """The loss of a padded batch, and its gradient (the step), equal the mean over the pairs computed one by
    one, unpadded."""
    torch.manual_seed(1)
    policy, reference, rm = gpt.LBGPT(CFG), gpt.LBGPT(CFG).eval(), RewardModel(gpt.LBGPT(CFG))
    torch.nn.init.normal_(rm.head.weight, std=0.1)
    rows, batch = ragged_batch(2)
    n = len(rows["prompts"])
    logprob = lambda m: lambda p, c: token_logprobs(completion_logits(m, p, c), c, 1.0).sum(1)  # noqa: E731
    losses = {
        "dpo": (policy, lambda pick: dpo_loss(*(pick(logprob(m), side) for m in (policy, reference)
                                                for side in ("chosen", "rejected")), beta=0.1)),
        "rm": (rm, lambda pick: reward_model_loss(pick(rm, "chosen"), pick(rm, "rejected"))),
    }
    for name, (model, loss_of) in losses.items():
        def gradient(loss):
            model.zero_grad()
            loss.backward()
            return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

        padded = loss_of(lambda f, side: f(batch["prompts"], batch[side]))
        padded_grad = gradient(padded)
        one_by_one = [loss_of(lambda f, side, i=i: alone(f, rows, i, side)[None]) for i in range(n)]
        mean = torch.stack(one_by_one).mean()
        mean_grad = gradient(mean)
        assert abs(padded.item() - mean.item()) < 1e-5, name
        for k in mean_grad:
            assert torch.allclose(padded_grad[k], mean_grad[k], atol=1e-5), (name, k)


class Words:
    """A tokenizer stand-in: one token per character."""
    def encode_ordinary(self, text):
        return [ord(ch) % 300 for ch in text]


def test_a_long_prompt_keeps_its_last_tokens_and_a_completion_that_cannot_fit_is_refused(tmp_path):
    pairs = [{"line": 3, "prompt": "abcdefghij", "chosen": "xyz", "rejected": "uvwxy"}]
    encoded = encode_pairs(pairs, Words(), block_size=8, path="p.jsonl")
    assert encoded["prompts"].tolist() == [[ord(c) for c in "hij"]]  # 8 - 5 (the longer completion) = 3 tokens
    assert encoded["chosen"].tolist() == [[ord(c) for c in "xyz"] + [PAD, PAD]]
    assert encoded["prompts_cut"] == 1
    whole = encode_pairs([dict(pairs[0], prompt="abc")], Words(), block_size=8, path="p.jsonl")  # 3 + 5: the window
    assert whole["prompts"].tolist() == [[ord(c) for c in "abc"]] and whole["prompts_cut"] == 0
    with pytest.raises(rlhf.UserError, match="p.jsonl, line 3: the longer completion is 8 tokens, the model's window 8"):
        encode_pairs([dict(pairs[0], rejected="12345678")], Words(), block_size=8, path="p.jsonl")


def test_the_oracles_pairs_are_written_in_the_standard_format_too(rlhf_run):
    """Every pair of the tensor file, as text: prompt, chosen and rejected strings, train then held out."""
    pairs = torch.load(rlhf_run.home / "data" / "rlhf_sentiment_seed1337_pairs.pt", weights_only=True)
    lines = [json.loads(line) for line in open(rlhf_run.home / ORACLE_PAIRS, encoding="utf-8")]
    assert len(lines) == len(pairs["train"]["prompts"]) + len(pairs["val"]["prompts"])
    assert all(isinstance(line[f], str) for line in lines for f in ("prompt", "chosen", "rejected"))
    s = setup(rlhf_run_config(rlhf_run.args, "python -m rlhf", "", {}))
    first = pairs["train"]
    chosen = torch.where(first["a_preferred"][0], first["a"][0], first["b"][0])
    assert lines[0]["chosen"] == s.data.tok.decode(chosen.tolist())
    assert lines[0]["prompt"] == s.data.tok.decode(first["prompts"][0].tolist())
    assert [len(read_pairs(str(rlhf_run.home / ORACLE_PAIRS)))] == [len(lines)]  # our reader takes our writer's file


def subset(rlhf_run, path, n):
    """The first n of the fixture's pairs whose completions, as text, fit the tiny model's window after a prompt
    (the tiny model samples bytes that decode to U+FFFD, three bytes again: a few come back 2x as long), written
    with a byte-order mark as Windows' Notepad does."""
    tok = setup(rlhf_run_config(rlhf_run.args, "python -m rlhf", "", {})).data.tok
    lines = [line for line in open(rlhf_run.home / ORACLE_PAIRS, encoding="utf-8")
             if all(len(tok.encode_ordinary(json.loads(line)[side])) <= 24 for side in ("chosen", "rejected"))]
    path.write_text("".join(lines[:n]), encoding="utf-8-sig")
    return path


FILE_RUN = ["--rm_epochs=2", "--rm_batch=32", "--dpo_methods=dpo", "--dpo_batch=32", "--rl_steps=4", "--rl_prompts=4",
            "--rl_group=4", "--ppo_epochs=1", "--ppo_minibatches=1", "--eval_prompts=8",
            "--eval_samples=2", "--bon_max_n=4", "--kl_targets=0.5", "--primary=dpo@0.5",
            "--settings_at_kl="]


@pytest.mark.plots  # the no-oracle figures are drawn nowhere else
def test_every_stage_tunes_on_a_files_pairs_and_with_no_oracle_the_report_says_so(rlhf_run, tmp_path, capsys):
    pairs = subset(rlhf_run, tmp_path / "mine.jsonl", 320)
    args = rlhf_run.shared_args + FILE_RUN + [f"--pairs={pairs}"]
    result = rlhf.main(args)
    family = "rlhf_pairs-mine"
    assert result["results"]["pairs"][0]["val"]["pairs"] == 32  # pairs_held_out = 0.1 of 320
    assert "accuracy_on_oracle" not in result["results"]["rm"][0]
    assert result["results"]["rm"][0]["held_out_pairs"] == 32
    report = result["results"]["report"]
    assert report["oracle"] is None and report["measure"] == "rm"
    at_kl = report["matched_kl"]["0.5"]
    assert list(at_kl) == ["best-of-n", "dpo", "rloo", "ppo", "grpo"] and all("rm" in row for row in at_kl.values())
    markdown = (rlhf_run.home / "generate_text" / f"{family}_report.md").read_text()
    assert markdown.startswith(f"# RLHF report: pairs from {pairs}, no oracle, gpt_.py")
    assert "No oracle: every score below is the reward model's" in markdown
    assert "accuracy on the held-out labels" in markdown and "oracle score" not in markdown
    assert (rlhf_run.home / "generate_text" / f"{family}_scores_vs_kl.png").exists()
    samples = (rlhf_run.home / "generate_text" / f"{family}_seed1337_samples.txt").read_text()
    assert "-------- rloo" in samples and "-------- base" in samples
    capsys.readouterr()  # tuning would pick settings on the file's evaluation prompts: refused
    with pytest.raises(SystemExit) as refused:
        rlhf.main(args + ["--rlhf_stage=tune"])
    assert refused.value.code == 2 and "a pairs file has none apart from" in capsys.readouterr().err
    # the RL stages' prompts are the file's train prompts (cut to leave room for the completion)
    s = setup(rlhf_run_config(args, "python -m rlhf", "", {}))
    file_prompts = {tuple(p) for p in (s.data.tok.encode_ordinary(r["prompt"]) for r in read_pairs(str(pairs)))}
    drawn = sample_prompts(s, "train", 16, torch.Generator().manual_seed(0))
    room = 32 - s.cfg["completion_tokens"]
    assert all(any(row[-room:] == list(p)[-room:] for p in file_prompts)
               for row in ([t for t in r if t != PAD] for r in drawn.tolist()))
    assert len({tuple(r) for r in drawn.tolist()}) > 1


def test_imported_pairs_measured_by_the_oracle_teach_the_reward_model_as_the_originals_do(rlhf_run, tmp_path):
    """The oracle's own pairs, written as text and read back as a user's file: the reward model learns the
    oracle's preferences from them (its accuracy on them, held out, is above chance)."""
    pairs = subset(rlhf_run, tmp_path / "oracle_text.jsonl", 1024)
    args = rlhf_run.shared_args + FILE_RUN + [f"--pairs={pairs}", "--oracle=sentiment", "--rm_epochs=4"]
    for stage in ("pairs", "rm"):
        result = rlhf.main(args + [f"--rlhf_stage={stage}"])
    assert result["results"]["rm"][0]["accuracy_on_oracle"] > 0.55


def test_the_held_out_pairs_share_no_prompt_with_the_trained_ones(rlhf_run, tmp_path):
    """Pairs that share a prompt go to the same side: a held-out prompt is never trained on."""
    path = tmp_path / "shared.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"ROMEO:\nline {i // 3}", "chosen": f" love {i}", "rejected": f" hate {i}"})
                            + "\n" for i in range(120)), encoding="utf-8")
    rlhf.main(rlhf_run.shared_args + FILE_RUN + [f"--pairs={path}", "--rlhf_stage=pairs", "--pairs_held_out=0.25"])
    pairs = torch.load(rlhf_run.home / "data" / "rlhf_pairs-shared_seed1337_pairs.pt", weights_only=True)
    train, val = ({tuple(p) for p in pairs[split]["prompts"].tolist()} for split in ("train", "val"))
    assert len(val) == 10 and len(train) == 30 and not train & val  # 40 prompts, a quarter held out
    assert len(pairs["val"]["prompts"]) == 30


def outputs(home):
    return {p: p.read_bytes() for folder in ("data", "model_dict", "generate_text") for p in (home / folder).glob("rlhf_*")
            if p.is_file()}


BAD_FILES = [
    (b"", "has no pairs"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', "line 2: not JSON"),
    (b'{"prompt": "a", "chosen": "b"}\n', "line 1: no 'rejected' field"),
    (b'\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n', "line 2: 'chosen' must be a string, got int"),
    (b'{"prompt": "a", "chosen": "same", "rejected": "same"}\n', "line 1: chosen and rejected are the same text"),
    (b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n', "line 1: not UTF-8 text"),
    (b'["a", "b", "c"]\n', "line 1: a JSON object with prompt, chosen and rejected is expected, got list"),
    (b'{"prompt": "a\\ud800", "chosen": "b", "rejected": "c"}\n', "line 1: 'prompt' holds an escape that is no character"),
    (b'{"prompt": "", "chosen": "b", "rejected": "c"}\n' * 64, "line 1: 'prompt' is empty"),
    (b"".join(b'{"prompt": "a%d", "chosen": "b", "rejected": "c"}\n' % i for i in range(20)),
     "has 20 pairs, 18 to train on after holding 2 out: fewer than one batch (32"),
]


@pytest.mark.parametrize("content, message", BAD_FILES)
def test_a_bad_pairs_file_is_one_line_with_its_line_number_and_nothing_is_written(rlhf_run, tmp_path, content, message,
                                                                                 capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    before = outputs(rlhf_run.home)
    with pytest.raises(SystemExit) as exit_info:
        rlhf.main(rlhf_run.shared_args + FILE_RUN + [f"--pairs={path}", "--rlhf_stage=pairs"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert outputs(rlhf_run.home) == before


# --- labelling by hand ----------------------------------------------------------------------------------


class Terminal:
    """`python -m rlhf --rlhf_stage=label ...` in a pseudo-terminal, as a user at a keyboard runs it."""

    def __init__(self, home, args):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen([sys.executable, "-m", "rlhf", "--rlhf_stage=label", *args], cwd=home,
                                        stdin=slave, stdout=slave, stderr=slave, preexec_fn=self.controlling)
        os.close(slave)
        self.screen = ""

    @staticmethod
    def controlling() -> None:
        """In the child: a session of its own, with the pseudo-terminal as its controlling terminal (so that
        Ctrl-C on it is SIGINT to the program, as at a real terminal), and SIGINT's default action, which a
        shell's background job (CI) would otherwise pass on as ignored."""
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def read_until(self, text: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while self.screen.count(text) < count:
            assert time.time() < deadline, self.screen[-3000:]
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.screen += os.read(self.master, 65536).decode("utf-8", errors="replace")
                except OSError:  # the program ended
                    assert self.screen.count(text) >= count, self.screen[-3000:]

    def press(self, key: str, then_prompts: int) -> None:
        """One key, no Enter, then wait until the program has asked then_prompts times in all."""
        os.write(self.master, key.encode())
        self.read_until("\n> ", then_prompts)

    def finish(self, timeout: float = 60) -> int:
        """The exit code, reading the screen while waiting (a full terminal would block the program's last lines)."""
        deadline = time.time() + timeout
        while self.process.poll() is None or select.select([self.master], [], [], 0)[0]:
            if time.time() > deadline:
                self.process.kill()
                raise AssertionError(f"still running after {timeout} s; the screen ends:\n{self.screen[-3000:]}")
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.screen += os.read(self.master, 65536).decode("utf-8", errors="replace")
                except OSError:  # the program ended and its side of the terminal closed
                    break
        os.close(self.master)
        return self.process.wait()


def shown(screen: str, n: int) -> dict:
    """The n-th pair shown on the screen (from 1): its prompt and completions A and B."""
    block = screen.replace("\r\n", "\n").split("--- prompt ---\n")[n].split("\n" + "-" * 72)[0]
    prompt, rest = block.split("\n--- A ---\n")
    a, b = rest.split("\n--- B ---\n")
    return {"prompt": prompt, "a": a, "b": b}


def test_labelling_in_a_terminal_one_key_each_with_undo_quit_resume_and_ctrl_c(rlhf_run, capsys, monkeypatch):
    copy_code(rlhf_run.home)
    labels = rlhf_run.home / "data" / "my_labels.jsonl"
    args = rlhf_run.shared_args + ["--label_target=4", f"--labels={labels}"]
    term = Terminal(rlhf_run.home, args)
    term.read_until("\n> ")
    assert "pair 1 · 0 of 4 labelled" in term.screen
    term.press("a", 2)  # pair 1: A
    term.press("x", 3)  # not an answer: asked again, nothing written
    assert "press one of a, b, t, s, u, q" in term.screen
    term.press("\x1b[A", 4)  # the up arrow (ESC [ A): not an answer either, though it ends in an "A"
    assert "A\r\n" not in term.screen.split("press one of")[-1]
    term.press("t", 5)  # pair 2: a tie
    term.press("u", 6)  # undo the tie: pair 2 again
    assert "undone: pair 2 (tie)" in term.screen
    term.press("b", 7)  # pair 2: B
    os.write(term.master, b"q")
    assert term.finish() == 0
    rows = [json.loads(line) for line in open(labels, encoding="utf-8")]
    assert [r["pair_index"] for r in rows] == [0, 1]
    first, second = shown(term.screen, 1), shown(term.screen, 2)
    # shown: pair 1, pair 2, pair 3 (after the tie), pair 2 again (after the undo), pair 3 again: each the same
    assert shown(term.screen, 4) == second and shown(term.screen, 5) == shown(term.screen, 3) != second
    assert (rows[0]["prompt"], rows[0]["chosen"], rows[0]["rejected"]) == (first["prompt"], first["a"], first["b"])
    assert (rows[1]["chosen"], rows[1]["rejected"]) == (second["b"], second["a"])
    assert (labels.parent / "my_labels_skipped.jsonl").read_text() == ""  # the tie, undone
    assert "2 pairs labelled" in term.screen and "python -m rlhf --pairs=data/my_labels.jsonl" in term.screen

    # the next start resumes at pair 3, and can undo the last answer of the run before; Ctrl-C then loses
    # nothing that was answered
    term = Terminal(rlhf_run.home, args)
    term.read_until("\n> ")
    assert "pair 3 · 2 of 4 labelled" in term.screen
    term.press("u", 2)
    assert "undone: pair 2 (labelled)" in term.screen and "pair 2 · 1 of 4 labelled" in term.screen
    assert shown(term.screen, 2) == second
    term.press("b", 3)  # pair 2: B again
    term.press("s", 4)  # pair 3: skipped
    os.write(term.master, b"\x03")
    assert term.finish() == 130
    assert [json.loads(line)["pair_index"] for line in open(labels, encoding="utf-8")] == [0, 1]
    assert json.loads((labels.parent / "my_labels_skipped.jsonl").read_text())["answer"] == "skip"

    # answers piped in, one per line: pairs 4 and 5 reach the target of 4, and the labels are a pairs file; a last
    # line cut short by a crash is dropped with a note
    with open(labels, "a", encoding="utf-8") as f:
        f.write('{"prompt": "cut sh')
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\nb\n"))  # in-process: the terminal runs above are the CLI's
    capsys.readouterr()
    rlhf.main(["--rlhf_stage=label", *args])
    piped = capsys.readouterr().out
    assert "4 pairs labelled" in piped and "the target of 4 is reached" in piped
    assert f"note: the last line of {labels} was cut short" in piped
    assert [r["line"] for r in read_pairs(str(labels))] == [1, 2, 3, 4]
    # labels of pairs sampled otherwise are never mixed into this file
    with pytest.raises(SystemExit) as exit_info:
        rlhf.main(["--rlhf_stage=label", *args, "--seed=7"])
    assert exit_info.value.code == 2
    assert "holds answers about pairs sampled with other settings (seed 1337 there, 7 here)" in capsys.readouterr().err
    assert [r["line"] for r in read_pairs(str(labels))] == [1, 2, 3, 4]
