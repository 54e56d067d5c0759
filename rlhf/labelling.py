"""Labelling pairs by hand: `python -m rlhf --rlhf_stage=label` shows a prompt and two completions
of the base model and reads one key: a or b (which is better), t (tie), s (skip), u (undo the last
answer), q (quit).

Every answer is appended to a file at once (flushed to disk), so Ctrl-C, a closed terminal or a
crash loses at most the pair on screen, and the next start resumes after the last answer. A or b
goes to the labels file as a pair (prompt, chosen, rejected: what --pairs reads); a tie or a skip
goes to the file beside it, <labels>_skipped.jsonl, so the labels file stays in the standard
format. Each line also records the pair's number and what sampled it (the base model, the data, the
script, the lengths, the dtype, the device and the seed): with those the same, pair k is always the
same prompt and completions (drawn by name from the seed), which is what lets a run resume and an
undo show the pair again; a file of other settings is refused. Keys come one at a time from a
terminal, or one per line from a pipe (`printf 'a\\nb\\nq\\n' | python -m rlhf
--rlhf_stage=label`).
"""
from __future__ import annotations

import json
import os
import select
import sys
from typing import TextIO

import torch

from dualgpt import UserError
from dualgpt.files import write_text
from dualgpt.runconfig import require_file_path
from rlhf.study import Setup, complete, in_repo, load_policy, sample_prompts, texts

KEYS = "a: A is better   b: B is better   t: tie   s: skip   u: undo the last   q: quit"


def read_answers(path: str, out: TextIO) -> list[dict]:
    """The answers in one of the two files, in the order given; none if it does not exist yet. A
    last line cut short (the machine stopped in the middle of writing it) is dropped with a note:
    that answer is asked again."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); label into another file with "
                        f"--labels=FILE") from None
    answers = []
    for number, line in enumerate(lines, start=1):
        try:
            answer = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: a write that did not finish
                out.write(f"note: the last line of {path} was cut short; that answer is asked "
                          "again\n")
                write_text(path, "".join(kept + "\n" for kept in lines[:-1] if kept.strip()))
                break
            answer = {}
        if answer is not None and not (isinstance(answer, dict)
                                       and isinstance(answer.get("pair_index"), int)):
            raise UserError(f"{path}, line {number}: not an answer of --rlhf_stage=label (a JSON "
                            "object with the pair's number); mend or remove that line, or label "
                            "into another file with --labels=FILE")
        if answer:
            answers.append(answer)
    return answers


def answer_line(answer: dict) -> str:
    """One answer as a line of its file (a preference: the standard fields first, as
    preference_data writes them; non-ASCII text as it is)."""
    return json.dumps(answer, ensure_ascii=False) + "\n"


def append_line(path: str, line: str) -> None:
    """One answer, on disk before the next pair is shown (on a line of its own, also after a hand
    edit that left no newline at the end)."""
    data = line.encode("utf-8")
    with open(path, "ab+") as f:  # every write goes to the end, wherever reading left the position
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            data = (b"" if f.read(1) == b"\n" else b"\n") + data
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Keys:
    """One key at a time: from a terminal without waiting for Enter (the terminal put back on exit,
    also after Ctrl-C), or the first letter of each line from a pipe. None at the end of the
    input."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.saved = None

    def __enter__(self) -> Keys:
        if self.stream.isatty():
            try:
                import termios
                import tty
            except ImportError:  # no termios (Windows): one answer per line, then Enter
                return self
            self.saved = termios.tcgetattr(self.stream.fileno())
            tty.setcbreak(self.stream.fileno())  # Ctrl-C still interrupts
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            import termios
            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self.saved)

    def forget_typed_ahead(self) -> None:
        """Drop keys pressed before the pair they would answer was on screen (a double tap, or a
        key pressed while the next pair was being sampled): every answer is to a pair that was
        read."""
        if self.saved is not None:
            import termios
            termios.tcflush(self.stream.fileno(), termios.TCIFLUSH)

    def read(self) -> str | None:
        if self.saved is not None:
            fd = self.stream.fileno()
            key = os.read(fd, 1).decode("utf-8", errors="replace")
            # an arrow or function key: ESC and more bytes, none of them an answer (ESC [ A is up)
            if key == "\x1b":
                while select.select([fd], [], [], 0.05)[0]:
                    os.read(fd, 16)
                return ""
            # Ctrl-D ends, as at the end of a pipe
            return None if key in ("", "\x04") else key.lower()
        line = self.stream.readline()
        return line.strip().lower()[:1] if line else None


def candidate(s: Setup, base: torch.nn.Module, k: int) -> tuple[str, str, str]:
    """Pair k: a prompt of the train split and two completions of it by the base, drawn from the
    seed by name."""
    prompt = sample_prompts(s, "train", 1, s.generator("label.prompts", k))
    a, b = texts(s, complete(s, base, prompt.repeat(2, 1),
                             s.generator("label.completions", k, on_device=True)))
    return texts(s, prompt)[0], a, b


def show(out: TextIO, k: int, labelled: int, target: int, prompt: str, a: str, b: str) -> None:
    rule = "=" * 72
    out.write(f"\n{rule}\npair {k + 1} · {labelled} of {target} labelled\n{rule}\n"
              f"--- prompt ---\n{prompt}\n--- A ---\n{a}\n--- B ---\n{b}\n{'-' * 72}\n{KEYS}\n> ")
    out.flush()


def label_pairs(s: Setup, stdin: TextIO | None = None, out: TextIO | None = None) -> dict:
    """Label pairs of the base's completions until label_target are labelled, the input ends or q;
    returns the counts. A file of answers to another base or seed is refused (its pair numbers name
    other pairs). stdin and out: sys.stdin and sys.stdout as they are at the call."""
    stdin, out, cfg = stdin or sys.stdin, out or sys.stdout, s.cfg
    if s.pairs_hash:
        raise UserError("--rlhf_stage=label samples its pairs from the base model; leave out "
                        "--pairs (tune on the labels afterwards with --pairs=FILE)")
    labels = in_repo(cfg["labels"])
    require_file_path("labels", labels)
    files = {"labelled": labels, "skipped": os.path.splitext(labels)[0] + "_skipped.jsonl"}
    answers = {kind: read_answers(path, out) for kind, path in files.items()}
    source = {"base": s.base_hash[:16], "data": s.data.data_hash[:16],
              "script": cfg["rlhf_script"],
              "prompt_tokens": cfg["prompt_tokens"],
              "completion_tokens": cfg["completion_tokens"], "dtype": cfg["dtype"],
              "device": cfg["device"], "seed": s.seed}
    for kind, path in files.items():
        for answer in answers[kind]:
            differ = [f"{k} {answer.get(k)!r} there, {v!r} here" for k,
                      v in source.items() if answer.get(k) != v]
            if differ:
                raise UserError(f"{path} holds answers about pairs sampled with other settings "
                                f"({'; '.join(differ[:2])}): "
                                "its pair numbers name other pairs; label into another file with "
                                "--labels=FILE")
    os.makedirs(os.path.dirname(labels) or ".", exist_ok=True)
    base = load_policy(s)
    k = 1 + max((a["pair_index"] for kind in answers for a in answers[kind]), default=-1)
    out.write(f"labelling pairs of {cfg['rlhf_base']} into {labels}: which completion of the "
              f"prompt is better, by whatever you want the model to do more of\n")
    with Keys(stdin) as keys:
        while len(answers["labelled"]) < cfg["label_target"]:
            prompt, a, b = candidate(s, base, k)
            # nothing to choose between (and nothing to record: a resumed run skips it again)
            if a == b:
                k += 1
                continue
            keys.forget_typed_ahead()
            show(out, k, len(answers["labelled"]), cfg["label_target"], prompt, a, b)
            key = keys.read()
            while key is not None and key not in "abtsuq" or key == "":
                out.write("press one of a, b, t, s, u, q\n> ")
                out.flush()
                key = keys.read()
            out.write(f"{key or 'end of input'}\n")
            if key in (None, "q"):
                break
            if key == "u":
                if any(answers.values()):
                    k = undo(files, answers, out)
                else:
                    out.write("nothing to undo\n")
                continue
            if key in "ab":  # a pair in the standard fields, then what sampled it
                kind, answer = "labelled", dict(prompt=prompt, chosen=a if key == "a" else b,
                                                rejected=b if key == "a" else a, **source,
                                                pair_index=k)
            else:
                kind, answer = "skipped", dict(source, pair_index=k,
                                               answer={"t": "tie", "s": "skip"}[key])
            answers[kind].append(answer)
            append_line(files[kind], answer_line(answer))
            k += 1
    done = len(answers["labelled"])
    out.write(f"\n{done} pairs labelled in {labels} ({len(answers['skipped'])} ties or skips in "
              f"{files['skipped']}); " + (f"the target of {cfg['label_target']} is "
                                          "reached; " if done >= cfg["label_target"]
                                         else "run the same command to go on; ")
              + f"tune on them: python -m rlhf --pairs={os.path.relpath(labels)}\n")
    return {"labelled": done, "skipped": len(answers["skipped"]), "file": labels}


def undo(files: dict[str, str], answers: dict[str, list[dict]], out: TextIO) -> int:
    """Take back the last answer (the highest pair number, in whichever file holds it): that file
    is rewritten without it. Returns its pair number, to show that pair again."""
    kind = max((kind for kind in answers if answers[kind]),
               key=lambda kind: answers[kind][-1]["pair_index"])
    last = answers[kind].pop()
    write_text(files[kind], "".join(map(answer_line, answers[kind])))
    out.write(f"undone: pair {last['pair_index'] + 1} "
              f"({'labelled' if kind == 'labelled' else last['answer']})\n")
    return last["pair_index"]
