"""Measuring tuned policies and writing what python -m rlhf reports: each policy's scores and KL on
held-out prompts, the curves of kept checkpoints, scores at matched KL, intervals over prompts and
over seeds, transfer to the held-out judges, the markdown tables and the sample file."""
from __future__ import annotations

import math
import os
import re

import numpy as np
import torch
import torch.nn as nn
from scipy import stats

from dualgpt import UserError
from dualgpt.files import write_text
from dualgpt.runtime import autocast
from rlhf.preference import (RewardModel, best_of_n_expectation, best_of_n_kl, completion_logits,
                             exact_kl)
from rlhf.study import (CHUNK, TEMPERATURE, Setup, complete, kept_folder, load_policy,
                        load_policy_checkpoint, numbers, reward_scores, scores, texts)

def score_names(s: Setup) -> list[str]:
    """What each completion is scored by: the oracle score, each held-out judge (judge_<name>), the
    reward model (with no oracle: the reward model alone)."""
    return (["oracle",
             *(f"judge_{name}" for name in s.oracle.judges)] if s.oracle else []) + ["rm"]


def measure(s: Setup) -> str:
    """The score the methods are compared by at matched KL: the oracle's; with no oracle,
    the reward model's, which the RL stages optimise, so it only says how far each method went on
    its own terms."""
    return "oracle" if s.oracle else "rm"


MEASURE_NAMES = {"oracle": "oracle score", "rm": "reward-model score"}


@torch.no_grad()
def evaluate_policy(s: Setup, policy: nn.Module, reference: nn.Module, rm: RewardModel,
                    prompts: torch.Tensor, samples: int) -> dict:
    """Sample `samples` completions of each prompt and score them: the oracle, each judge and the
    reward model, (P, samples) each; the mean exact sequence KL to the base. Every policy is
    sampled with the same random numbers, so that curves compare at equal KL."""
    repeated = prompts.repeat_interleave(samples, dim=0)
    completions = complete(s, policy, repeated, s.generator("curve.sampling", on_device=True))
    completion_texts = texts(s, completions)
    kl = []
    for i in range(0, len(repeated), CHUNK):
        p, c = repeated[i:i + CHUNK], completions[i:i + CHUNK]
        with autocast(s.cfg["device"], s.cfg["dtype"]):
            logits = completion_logits(policy, p, c)
            ref_logits = completion_logits(reference, p, c)
        kl.append(exact_kl(logits, ref_logits, TEMPERATURE).sum(1))
    # >= 0; float noise leaves -1e-8
    exact = torch.cat(kl).double().cpu().clamp_min(0.0).view(-1, samples)
    result = {"completions": completion_texts,
              "rm": reward_scores(s, rm, repeated, completions).view(-1, samples),
              "kl_exact": exact.mean().item()}
    if s.oracle:
        result["oracle"] = scores(s.oracle.score, completion_texts).view(-1, samples)
        for name, judge in s.oracle.judges.items():
            result[f"judge_{name}"] = scores(judge, completion_texts).view(-1, samples)
    return result


def curve_point(s: Setup, step: int, r: dict) -> dict:
    """One point of a training curve from evaluate_policy's result r: per-prompt means of every
    score (kept for reading scores at matched KL), their means, the KL."""
    per_prompt = {k: r[k].mean(1) for k in score_names(s)}
    point = {"step": step, "kl": r["kl_exact"],
             **{k: v.mean().item() for k, v in per_prompt.items()},
             "per_prompt": {k: v.tolist() for k, v in per_prompt.items()}}
    if "oracle" in r:  # is the reward model still right about this policy's own samples?
        point["rm_accuracy"] = pair_accuracy(r["rm"], r["oracle"])
    return point


def pair_accuracy(rm: torch.Tensor, oracle: torch.Tensor) -> float:
    """How often the reward model orders two samples of one prompt as the oracle does, over every
    such pair whose oracle scores differ (a reward-model tie counts 1/2): (P, n), (P, n) -> a
    share, nan with no such pair."""
    i, j = torch.triu_indices(rm.shape[1], rm.shape[1], 1)
    by_rm, by_oracle = rm[:, i] - rm[:, j], oracle[:, i] - oracle[:, j]
    right = (by_rm.sign() == by_oracle.sign()).double() + 0.5 * (by_rm == 0).double()
    decided = by_oracle != 0
    return right[decided].mean().item() if decided.any() else float("nan")


def kept_curve(s: Setup, name: str, final: dict, reference: nn.Module, rm: RewardModel,
               prompts: torch.Tensor,
               samples: int, base: dict) -> list[dict]:
    """The base (step 0) and every kept checkpoint of the run `name`, in step order, evaluated on
    the prompts with the same random numbers each, so that runs can be compared at equal KL. final:
    the "rlhf" entry of the run's final policy. Each kept file must be of that run (one of another
    run is an error, never a point of the curve), and the last must be the final policy's step
    (else the end point would not be the policy). The last point also holds the first completion
    of each prompt ("completions")."""
    folder = kept_folder(s, name)
    points = [curve_point(s, 0, base)]
    names = os.listdir(folder) if os.path.isdir(folder) else []
    files = [f for f in names if re.fullmatch(r"step\d+\.pt", f)]
    for file in sorted(files, key=lambda f: int(f[4:-3])):
        path = os.path.join(folder, file)
        kept = load_policy_checkpoint(path, final["run"])
        r = evaluate_policy(s, load_policy(s, kept, path), reference, rm, prompts, samples)
        points.append(curve_point(s, kept["rlhf"]["step"], r))
    if points[-1]["step"] != final["step"]:
        raise UserError(f"the kept checkpoints of {name} in {folder} end at step "
                        f"{points[-1]['step']}, its policy is at "
                        f"step {final['step']}; run python -m rlhf "
                        f"--rlhf_stage={final['run']['stage']} again")
    points[-1]["completions"] = r["completions"][::samples]
    return points


def at_kl(points: list[dict], kl: float, max_bracket: float = math.inf) -> dict | None:
    """A curve's per-prompt scores at a KL, interpolated between the two points around the first
    crossing of that KL, linearly in sqrt(KL) (scores grow about linearly in sqrt(KL): Gao et al.
    2022), with the KLs of those two points; None where the curve never reaches the KL, and no
    scores (too_wide) where the two points are more than max_bracket x the KL apart."""
    for a, b in zip(points, points[1:]):
        if a["kl"] <= kl <= b["kl"] and b["kl"] > a["kl"]:
            if b["kl"] - a["kl"] > max_bracket * kl:
                return {"bracket": [a["kl"], b["kl"]], "too_wide": True}
            w = (kl ** 0.5 - a["kl"] ** 0.5) / (b["kl"] ** 0.5 - a["kl"] ** 0.5)
            return {"bracket": [a["kl"], b["kl"]],
                    "per_prompt": {k: [(1 - w) * x + w * y for x,
                                       y in zip(a["per_prompt"][k], b["per_prompt"][k])]
                                   for k in a["per_prompt"] if k in b["per_prompt"]}}
    return None


def gains(row: dict, base: dict, scores: list[str]) -> dict:
    """A reading's gain over the base in each score, per prompt (paired: the same prompts). Their
    transfer ratios over seeds are ratio_summary's."""
    return {f"gain_{k}": [a - b for a, b in zip(row["per_prompt"][k], base["per_prompt"][k])]
            for k in scores}


def ratio_summary(per_seed: list[dict], numerator: str, denominator: str) -> dict:
    """The ratio of two mean gains (a judge's over the oracle score's), with a 95% interval by the
    delta method: over seeds where there are several (the ratio of the seeds' mean gains), else
    over the one seed's prompts. A ratio of means, not a mean of per-seed ratios, which a gain near
    zero would blow up."""
    def units(key):
        if len(per_seed) > 1:
            return torch.tensor([np.mean(r["per_prompt"][key]) for r in per_seed],
                                dtype=torch.float64)
        return torch.tensor(per_seed[0]["per_prompt"][key], dtype=torch.float64)

    top, bottom = units(numerator), units(denominator)
    if bottom.mean().abs() < 1e-12:
        return {"mean": float("nan"), "ci": None, "n": len(top)}
    ratio = (top.mean() / bottom.mean()).item()
    # the delta method: ratio's error = this mean's / mean(bottom)
    spread = mean_interval(top - ratio * bottom)
    ci = spread["ci"] / abs(bottom.mean().item()) if spread["ci"] is not None else None
    return {"mean": ratio, "ci": ci, "n": len(top)}


def mean_interval(values) -> dict:
    """Mean and the half-width of its 95% interval, Student's t on n - 1 degrees of freedom (seeds,
    or prompts); "ci" is None for a single value."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if len(x) < 2:
        return {"mean": float(x.mean()), "ci": None, "n": len(x)}
    return {"mean": float(x.mean()), "ci": float(stats.t.ppf(0.975, len(x) - 1) * stats.sem(x)),
            "n": len(x)}


def p_value(summary: dict) -> float | None:
    """The two-sided p-value of a mean over seeds against 0 (Student's t on its per-seed values);
    None over one seed's prompts, which are not replicates of the training."""
    values = summary.get("per_seed") or []
    if len(values) < 2:
        return None
    if min(values) == max(values):  # no spread: the t statistic is undefined
        return 1.0 if np.mean(values) == 0 else 0.0
    return float(stats.ttest_1samp(values, 0.0).pvalue)


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values (the family-wise error over all of them): the
    i-th smallest times (m - i), kept monotone, at most 1; in the order given."""
    order = sorted(range(len(p)), key=p.__getitem__)
    adjusted, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def primary_comparisons(cfg: dict) -> list[tuple[str, str]]:
    """config's primary as (method, KL as the report's keys write it), each entry of the form
    method@number (__main__.py refuses a primary with any other)."""
    pairs = []
    for entry in filter(None, map(str.strip, cfg["primary"].split(","))):
        method, _, kl = entry.partition("@")
        if len(kls := numbers(kl) or []) == 1:
            pairs.append((method, f"{kls[0]:g}"))
    return pairs


def primary_score(report: dict) -> str:
    """What the primary comparisons compare: the first held-out judge, else the measure."""
    return f"judge_{report['judges'][0]}" if report["judges"] else report["measure"]


def primary_results(report: dict) -> list[dict]:
    """The primary comparisons (config's primary, named in advance), each with its summary: its
    p-value, Holm's adjusted p-value over these alone and the seeds that would give it 80% power
    at the spread seen. No other difference of the report is tested."""
    score, primary = primary_score(report), []
    for method, kl in primary_comparisons(report["config"]):
        row = report["matched_kl"].get(kl, {}).get(method, {})
        summary = row.get(f"{score} - best-of-n") or {"mean": None, "reason": "no reading"}
        summary["p"] = p_value(summary) if summary["mean"] is not None else None
        primary.append({"method": method, "kl": kl, "score": score, "summary": summary})
    tested = [c["summary"] for c in primary if c["summary"]["p"] is not None]
    for summary, adjusted in zip(tested, holm([c["p"] for c in tested])):
        summary.update(p_holm=adjusted,
                       seeds_for_power=seeds_for_power(summary["per_seed"], 0.05 / len(tested)))
    return primary


def seeds_for_power(per_seed: list[float], alpha: float, power: float = 0.8) -> int | None:
    """The fewest seeds for which a two-sided one-sample t-test at level alpha finds a difference
    of the mean and spread of per_seed with the given power (the noncentral t); None where the
    mean is 0 or there is no spread, or beyond 1,000 seeds."""
    x = np.asarray(per_seed, dtype=np.float64)
    if len(x) < 2 or x.std(ddof=1) == 0 or x.mean() == 0:
        return None
    effect = abs(x.mean()) / x.std(ddof=1)
    for n in range(2, 1001):
        critical = stats.t.ppf(1 - alpha / 2, n - 1)
        shift = effect * math.sqrt(n)
        if stats.nct.sf(critical, n - 1, shift) + stats.nct.cdf(-critical, n - 1, shift) >= power:
            return n
    return None


def summarise(per_seed: list[dict], key: str, paired_with: list[dict] | None = None) -> dict:
    """A value of every seed's result (a number, or a list under "per_prompt"), as mean and 95%
    interval: over seeds where there are several, else over the one seed's prompts. paired_with:
    subtract the other result's value, prompt by prompt (a difference)."""
    def values(result):
        return result["per_prompt"][key] if key in result.get("per_prompt", {}) else result[key]

    found = [values(r) for r in per_seed]
    if paired_with:
        found = [[a - b for a, b in zip(v, values(o))] for v, o in zip(found, paired_with)]
    if len(found) > 1 or not isinstance(found[0], list):
        means = [float(np.mean(v)) for v in found]
        return dict(mean_interval(means), per_seed=means)
    return dict(mean_interval(found[0]), per_seed=[float(np.mean(found[0]))])


def cell(summary: dict | None, fmt: str = "{:+.3f}") -> str:
    """Mean ± 95% interval; * where Holm's correction leaves the difference standing."""
    if summary is None:
        return "—"
    if summary.get("mean") is None or math.isnan(summary["mean"]):
        return summary.get("reason", "—")
    ci = summary.get("ci")
    return (fmt.format(summary["mean"]) + (f" ± {fmt.format(ci).lstrip('+')}" if ci is not None
                                           else "")
            + (" *" if summary.get("p_holm", 1) < 0.05 else ""))


def markdown_tables(report: dict) -> str:
    """The report's tables: the primary comparisons, then every method at matched KL against
    best-of-n (with each seed's bracket): the judges first, the score tuned for and the transfer
    beside them."""
    judges, key = report["judges"], report["measure"]
    score = MEASURE_NAMES[key]
    over = "seeds" if len(report["seeds"]) > 1 else "prompts (one seed)"
    head = (["KL", "method", "brackets (nats, by seed)"] + [f"judge {j}" for j in judges]
            + [score] + [f"transfer {j}" for j in judges] + [f"{j} − best-of-n" for j in judges]
            + [f"{score.split()[0]} − best-of-n"])
    lines = [reward_model_line(report["reward_model"], over), "", *primary_lines(report), "",
             "**At matched KL** (each method's kept policies interpolated to the KL, from two at "
             f"most {report['config']['max_bracket']:g} x the KL apart; best-of-n from its curve "
             "on the same prompts; transfer: the judge's gain over the base divided by the "
             f"{score}'s; differences paired by prompt within a seed, then mean ± 95% interval "
             f"over {over}):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for target, methods in report["matched_kl"].items():
        for method, m in methods.items():
            brackets = ", ".join(f"{b[0]:.2f}-{b[1]:.2f}" if b else "—"
                                 for b in m.get("brackets", []))
            cells = [target, method, brackets, *(cell(m.get(f"judge_{j}")) for j in judges),
                     cell(m.get(key)), *(cell(m.get(f"transfer_judge_{j}"), "{:.2f}")
                                         for j in judges)]
            cells += [cell(m.get(f"{k} - best-of-n")) for k in [*(f"judge_{j}" for j in judges),
                                                                 key]]
            lines.append("| " + " | ".join(cells) + " |")
    if report.get("overoptimisation"):
        lines += ["", overoptimisation_line(report)]
    return "\n".join(lines)


def primary_lines(report: dict) -> list[str]:
    """The primary comparisons, named in advance: each difference, its p-value and Holm's over
    them alone, and the seeds for 80% power; then that every other difference is exploratory."""
    primary = report["primary"]
    if len(report["seeds"]) < 2:
        return ["With one seed no difference is tested (the intervals are over prompts)."]
    name = primary_score(report).replace("judge_", "judge ")
    lines = [f"**Primary comparisons**, named in advance (rlhf/config.py's `primary`): each "
             f"method minus best-of-n at a KL on the {name} score, mean ± 95% interval over "
             f"seeds, p from a t-test over the {len(report['seeds'])} seeds, Holm's correction "
             f"over these {len(primary)} alone (marked * where the adjusted p < 0.05), and the "
             "seeds a t-test at Holm's first level would need for 80% power at the difference "
             "and spread seen:", "",
             "| comparison | difference | p | Holm's p | seeds for 80% power |",
             "|---|---|---|---|---|"]
    for c in primary:
        s = c["summary"]
        p = " | ".join(f"{s[k]:.3g}" if s.get(k) is not None else "—" for k in ("p", "p_holm"))
        lines.append(f"| {c['method']} − best-of-n at {c['kl']} nats | {cell(s)} | {p} | "
                     f"{s.get('seeds_for_power') or '—'} |")
    return lines + ["", "Every other difference below is exploratory: an interval, untested, and "
                    "not a finding."]


def reward_model_line(rm: dict, over: str) -> str:
    """The reward model's held-out accuracy: on the oracle's own preferences and against the
    labels' ceiling where the pairs came from the oracle; on the held-out labels alone where they
    came from a file."""
    line = f"**Reward model**, held-out pairs (mean ± 95% interval over {over}): "
    if "accuracy_on_oracle" in rm:
        line += ("accuracy on the oracle score's own preferences "
                 f"{cell(rm['accuracy_on_oracle'], '{:.1%}')} (per seed: "
                 f"{', '.join(f'{v:.1%}' for v in rm['accuracy_on_oracle']['per_seed'])}); "
                 "on the ")
    else:
        line += "accuracy on the "
    line += (f"{'noisy ' if 'label_ceiling' in rm else 'held-out '}labels "
             f"{cell(rm['accuracy_on_labels'], '{:.1%}')}")
    line += (", against a ceiling of "
             f"{cell(rm['label_ceiling'], '{:.1%}')}" if "label_ceiling" in rm else "")
    return line + (". Its scores are standardised on base samples of dev prompts (the raw std by "
                   f"seed: {', '.join(f'{v:.3f}' for v in rm['raw_std']['per_seed'])})."
                   if "raw_std" in rm else ".")


def write_markdown_report(path: str, report: dict) -> None:
    if report["oracle"]:
        source = f"oracle {report['oracle']}" + (", pairs from "
                                                 f"{report['pairs']}" if report["pairs"] else "")
        note = ""
    else:
        source = f"pairs from {report['pairs']}, no oracle"
        note = ("No oracle: every score below is the reward model's. RLOO and PPO optimise it and "
                "best-of-n selects by it, on the same samples it scores, so by this score they "
                "are favoured by construction over DPO, which never sees it; it says how far each "
                "method went on the reward model's terms, not whether it "
                "went where the labels meant. The reward model's accuracy on held-out pairs and "
                "the side-by-side samples judge that; to measure by something you can write down, "
                "pass it as --oracle (it only measures: the labels stay the file's). ")
    write_text(path, f"# RLHF report: {source}, {report['script']}.py, base {report['base']}\n\n"
               f"{note}Seeds {', '.join(map(str, report['seeds']))}; {report['eval_prompts']} "
               f"{report['eval_split']} prompts, {report['samples_per_prompt']} completions each "
               f"at every point; best-of-n up to n = {report['bon_max_n']} on the same prompts "
               "(the expectation over its samples). KL: exact, summed over the vocabulary at each "
               "position of the policy's own samples; log n - (n-1)/n for best-of-n. The CPU: "
               f"{report['machine']}.\n\n" + markdown_tables(report) + "\n")


def write_samples(s: Setup, prompts: torch.Tensor, completions: dict[str, list[str]],
                  best_of_16: list[str], n: int = 8) -> None:
    """The first n evaluation prompts, each with a completion of the base, of every tuned model
    and of best-of-16, side by side."""
    parts = [f"# {s.prefix}: completions of the same prompts (temperature {TEMPERATURE})\n"]
    for i in range(min(n, len(prompts))):
        parts.append(f"\n======== prompt {i + 1}\n{texts(s, prompts[i:i + 1])[0]}\n")
        for name, texts_of in completions.items():
            parts.append(f"-------- {name}\n{texts_of[i]}\n")
        parts.append(f"-------- best-of-16 by the reward model\n{best_of_16[i]}\n")
    write_text(s.path("generate_text", "samples.txt"), "".join(parts))


def best_of_n_curve(pool: dict[str, torch.Tensor]) -> list[dict]:
    """Best-of-n at n = 1, 2, 4, ... bon_max_n from the pool: each score's expectation under the
    selection, per evaluation prompt."""
    points, n = [], 1
    while n <= pool["rm"].shape[1]:
        per_prompt = {k: best_of_n_expectation(pool["rm"], v, n) for k, v in pool.items()}
        points.append({"n": n, "step": 0, "kl": best_of_n_kl(n),
                       **{k: v.mean().item() for k, v in per_prompt.items()},
                       "per_prompt": {k: v.tolist() for k, v in per_prompt.items()}})
        n *= 2
    return points


def gao_fit(curve: list[dict], key: str) -> dict:
    """Gao et al. 2023's form for best-of-n, R(d) = d (alpha - beta d) with d = sqrt(KL) and R
    the gain in `key` over n = 1, fitted by least squares to a best-of-n curve. Returns alpha,
    beta, the KL where the fitted gain peaks ((alpha / 2 beta)^2; None where it never turns down)
    and R^2."""
    d = np.sqrt([p["kl"] for p in curve[1:]])
    gain = np.array([p[key] - curve[0][key] for p in curve[1:]])
    (alpha, minus_beta), *_ = np.linalg.lstsq(np.stack([d, d ** 2], axis=1), gain, rcond=None)
    residual = gain - alpha * d - minus_beta * d ** 2
    spread = ((gain - gain.mean()) ** 2).sum()
    return {"alpha": float(alpha), "beta": float(-minus_beta),
            "peak_kl": float((alpha / (-2 * minus_beta)) ** 2) if minus_beta < 0 < alpha else None,
            "r2": float(1 - (residual ** 2).sum() / spread) if spread > 0 else None}


def overoptimisation(bon_curves: dict, keys: list[str]) -> dict:
    """gao_fit of each score's best-of-n curve in each seed; alpha and beta over the seeds."""
    fits = {}
    for key in keys:
        per_seed = [gao_fit(curve, key) for curve in bon_curves.values() if len(curve) > 2]
        if per_seed:
            fits[key] = {"per_seed": per_seed, "alpha": summarise(per_seed, "alpha"),
                         "beta": summarise(per_seed, "beta")}
    return fits


def overoptimisation_line(report: dict) -> str:
    """What the best-of-n curves show of over-optimisation, score by score."""
    parts = []
    for key, fit in report["overoptimisation"].items():
        peaks = ", ".join("none" if f["peak_kl"] is None else f"{f['peak_kl']:.1f}"
                          for f in fit["per_seed"])
        parts.append(f"{key.replace('_', ' ')}: alpha {cell(fit['alpha'])}, beta "
                     f"{cell(fit['beta'])}, peak at KL {peaks} (by seed)")
    return ("**Over-optimisation**: best-of-n's gain over n = 1 against its KL on the evaluation "
            "prompts, fitted per seed to Gao et al.'s R = d (alpha - "
            "beta d), d = sqrt(KL) (a peak: where the fitted gain turns down; beta > 0 with an "
            "interval clear of 0 means it does). " + "; ".join(parts) + ".")


def matched_rows(at: list[dict], keys: list[str]) -> dict:
    """At one KL: each method's scores, with every seed's bracket (None where a seed's curve never
    reaches the KL or its bracket is too wide), each judge's transfer, and its differences to
    best-of-n, paired by prompt."""
    rows = {}
    for method in at[0]:
        rows[method] = {"brackets": [a[method]["bracket"] if a.get(method) else None for a in at]}
        if any(a.get(method) is None or a[method].get("too_wide") for a in at):
            reason = ("not reached" if any(a.get(method) is None for a in at)
                      else "bracket too wide")
            rows[method].update({k: {"mean": None, "reason": reason} for k in keys})
            continue
        points = [a[method] for a in at]
        rows[method].update({k: summarise(points, k) for k in keys})
        rows[method].update({f"gain_{k}": summarise(points, f"gain_{k}") for k in keys
                             if f"gain_{k}" in points[0]["per_prompt"]})
        if "gain_oracle" in points[0]["per_prompt"]:  # each judge's gain over the oracle score's
            rows[method].update({f"transfer_{k}": ratio_summary(points, f"gain_{k}",
                                                                "gain_oracle")
                                 for k in keys if k.startswith("judge_")})
        if method != "best-of-n" and all(usable(a.get("best-of-n")) for a in at):
            bon = [a["best-of-n"] for a in at]
            rows[method].update({f"{k} - best-of-n": summarise(points, k,
                                                               paired_with=bon) for k in keys})
    return rows


def usable(reading: dict | None) -> bool:
    """Whether a reading at a KL has scores: the curve reached it, within the bracket bound."""
    return bool(reading) and not reading.get("too_wide")


def strip_per_prompt(value):
    """The report without the per-prompt lists of its curves (kept in each seed's eval.json)."""
    if isinstance(value, dict):
        return {k: strip_per_prompt(v) for k, v in value.items() if k != "per_prompt"}
    if isinstance(value, list):
        return [strip_per_prompt(v) for v in value]
    return value
