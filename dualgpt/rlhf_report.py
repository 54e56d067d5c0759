"""Measuring tuned policies and writing what rlhf.py reports: each policy's scores and KL on held-out prompts,
the curves of kept checkpoints, intervals, win rates, diversity, the markdown table and the sample file."""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

from dualgpt.checkpoint import load_checkpoint
from dualgpt.files import write_text
from dualgpt.oracles import WORD
from dualgpt.preference import RewardModel, completion_logits, exact_kl, kl_estimators, token_logprobs
from dualgpt.runtime import autocast
from dualgpt.tuning import (CHUNK, TEMPERATURE, Setup, complete, kept_folder, load_policy, reward_scores, scores,
                            texts)

SCORES = ("oracle", "judge", "rm")  # what each completion is scored by: the oracle score, the held-out judge, the reward model


def distinct_2(completion_texts: list[str]) -> float:
    """Unique word bigrams over all bigrams, across all completions: low when completions repeat each other."""
    bigrams = [pair for t in completion_texts for pair in zip(t.split(), t.split()[1:])]
    return len(set(bigrams)) / max(1, len(bigrams))


def repetition(text: str) -> float:
    """The fraction of a completion's words that repeat an earlier word of it (any case): a policy that pads
    its text with the oracle score's favourite word shows here."""
    words = WORD.findall(text.lower())
    return (len(words) - len(set(words))) / max(1, len(words))


def interval(per_prompt: torch.Tensor) -> tuple[float, float]:
    """Mean over prompts and the half-width of its 95% confidence interval (normal approximation)."""
    return per_prompt.mean().item(), 1.96 * per_prompt.std().item() / math.sqrt(len(per_prompt))


def win_rates(oracle: torch.Tensor, base_oracle: torch.Tensor) -> torch.Tensor:
    """Per prompt: how often the method's sample beats the base's sample of the same index (a tie counts half)."""
    return ((oracle > base_oracle).double() + 0.5 * (oracle == base_oracle).double()).mean(1)


@torch.no_grad()
def evaluate_policy(s: Setup, policy: nn.Module, reference: nn.Module, rm: RewardModel, prompts: torch.Tensor,
                    samples: int, gen: torch.Generator) -> dict:
    """Sample `samples` completions of each prompt and score them: oracle, judge and reward model per prompt
    (P, samples), and the exact sequence KL to the base, with the k1 and k3 estimators beside it."""
    repeated = prompts.repeat_interleave(samples, dim=0)
    completions = complete(s, policy, repeated, gen)
    completion_texts = texts(s, completions)
    kl = {"exact": [], "k1": [], "k3": []}
    for i in range(0, len(repeated), CHUNK):
        p, c = repeated[i:i + CHUNK], completions[i:i + CHUNK]
        with autocast(s.cfg["device"], s.cfg["dtype"]):
            logits, ref_logits = completion_logits(policy, p, c), completion_logits(reference, p, c)
        kl["exact"].append(exact_kl(logits, ref_logits, TEMPERATURE).sum(1))
        estimators = kl_estimators(token_logprobs(logits, c, TEMPERATURE), token_logprobs(ref_logits, c, TEMPERATURE))
        kl["k1"].append(estimators["k1"].sum(1))
        kl["k3"].append(estimators["k3"].sum(1))
    result = {"completions": completion_texts, "oracle": scores(s.oracle.score, completion_texts).view(-1, samples),
              "rm": reward_scores(s, rm, repeated, completions).view(-1, samples),
              **{f"kl_{k}": torch.cat(v).double().mean().item() for k, v in kl.items()}}
    if s.oracle.judge:
        result["judge"] = scores(s.oracle.judge, completion_texts).view(-1, samples)
    return result


def curve_point(step: int, r: dict) -> dict:
    """One point of a training curve: evaluate_policy's result r, averaged."""
    return {"step": step, "kl": r["kl_exact"], **{k: r[k].mean().item() for k in SCORES if k in r}}


def kept_curve(s: Setup, name: str, reference: nn.Module, rm: RewardModel, prompts: torch.Tensor,
               samples: int) -> list[dict]:
    """Every kept checkpoint of the run `name`, in step order, evaluated on the prompts (the same random numbers
    for each), so that runs can be compared at equal KL."""
    folder = kept_folder(s, name)
    points = []
    for file in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, file)
        kept = load_checkpoint(path)
        r = evaluate_policy(s, load_policy(s, kept, path), reference, rm, prompts, samples,
                            s.generator("curve.sampling", on_device=True))
        points.append(curve_point(kept["rlhf"]["step"], r))
    return points


def table_row(name: str, kl: float, per_prompt: dict, base: dict | None, extra: dict) -> dict:
    """One method's line of the report: means with 95% intervals over prompts."""
    row = {"method": name, "kl": kl, **extra}
    for key in SCORES:
        if key in per_prompt:
            row[key], row[f"{key}_ci"] = interval(per_prompt[key])
    if base is not None and "judge" in per_prompt:
        row["judge_gain"], row["judge_gain_ci"] = interval(per_prompt["judge"] - base["judge"])
    return row


def at_equal_kl(bon: list[dict], kl: float, key: str) -> float | None:
    """Best-of-n's score at a given KL, interpolated linearly in sqrt(KL) between its n; None beyond its range."""
    points = [(b["kl"] ** 0.5, b[key]) for b in bon if key in b]
    x = max(kl, 0.0) ** 0.5
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def markdown_table(report: dict) -> str:
    def cell(row, key, fmt="{:+.3f}"):
        if key not in row:
            return "—"
        ci = row.get(f"{key}_ci")
        return fmt.format(row[key]) + (f" ± {ci:.3f}" if ci is not None else "")

    lines = ["| method | KL to base (nats/seq) | oracle score | best-of-n's oracle score at this KL | judge score | "
             "judge gain over base | win rate vs base (oracle score) | reward model | val bpb | distinct-2 | repetition |",
             "|" + "---|" * 11]
    for r in report["rows"]:
        win = f"{r['win_rate'][0]:.1%} ± {r['win_rate'][1]:.1%}" if "win_rate" in r else "—"
        bon_oracle = r.get("bon_oracle_at_equal_kl")
        bon_cell = ("—" if "bon_oracle_at_equal_kl" not in r else "beyond best-of-n" if bon_oracle is None
                    else f"{bon_oracle:+.3f}")
        kl = max(r["kl"], 0.0)  # exact KL is >= 0; float noise can leave -1e-8
        lines.append(f"| {r['method']} | {kl:.3f} | {cell(r, 'oracle')} | {bon_cell} | {cell(r, 'judge')} | "
                     f"{cell(r, 'judge_gain')} | {win} | {cell(r, 'rm')} | {cell(r, 'val_bpb', '{:.3f}')} | "
                     f"{cell(r, 'distinct_2', '{:.3f}')} | {cell(r, 'repetition', '{:.3f}')} |")
    return "\n".join(lines)


def write_markdown_report(s: Setup, report: dict) -> None:
    write_text(s.path("generate_text", "report.md"),
               f"# RLHF report: oracle {report['oracle']}, {report['script']}.py, base {report['base']}\n\n"
               f"{report['eval_prompts']} val-split prompts, {report['samples_per_prompt']} completions each (best-of-n: "
               f"the expectation over its samples). ± is a 95% interval over prompts. KL: exact for the tuned models "
               f"(summed over the vocabulary at each position of their own samples), log n - (n-1)/n for best-of-n.\n\n"
               + markdown_table(report) + "\n")


def write_samples(s: Setup, prompts: torch.Tensor, results: dict, samples: int, best_of_16: list[str] | None,
                  n: int = 8) -> None:
    """The first n evaluation prompts, each with the base's completion, every tuned model's and best-of-16's,
    side by side."""
    parts = [f"# {s.prefix}: completions of the same val-split prompts (temperature {TEMPERATURE})\n"]
    for i in range(min(n, len(prompts))):
        parts.append(f"\n======== prompt {i + 1}\n{s.data.tok.decode(prompts[i].tolist())}\n")
        for name, r in results.items():
            parts.append(f"-------- {name}\n{r['completions'][i * samples]}\n")
        if best_of_16:
            parts.append(f"-------- best-of-16 by the reward model\n{best_of_16[i]}\n")
    write_text(s.path("generate_text", "samples.txt"), "".join(parts))
