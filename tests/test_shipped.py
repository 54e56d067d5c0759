"""What the clone ships (the dataset, a tokenizer, trained models, their samples and reports), that it
still works, that the main job never modifies a tracked file, and that every figure the README and
the docs quote is its shipped file's."""
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_MODEL
from scipy import stats

import config
import gpt
import gpt_
from dualgpt.checkpoint import load_checkpoint
from dualgpt.evaluation import checkpoint_with_data, full_loss
from dualgpt.runconfig import script_config

SHIPPED = {"gpt": gpt.LBGPT, "gpt_": gpt_.SMGPT}
SHIPPED_TEXT = os.path.join(ROOT, "generate_text", "shipped")


def read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def prose(*parts: str) -> str:
    """A page with its line breaks read as spaces."""
    return " ".join(read(*parts).split())


def shipped_json(name: str) -> dict:
    return json.loads(read("generate_text", "shipped", name))


def test_the_dataset_is_tiny_shakespeare():
    data = open(os.path.join(ROOT, config.data), "rb").read()
    assert len(data) == 1_115_394
    # of karpathy/char-rnn's data/tinyshakespeare/input.txt
    assert hashlib.sha256(data).hexdigest() == ("86c4e6aa9db7c042ec79f339dcb96d42"
                                                "b0075e16b8fc2e86bf0ca57e2dc565ed")


@pytest.mark.parametrize("script", SHIPPED)
def test_each_shipped_checkpoint_is_weights_only_and_keeps_its_recorded_val_loss(home, script):
    """A change to the model or the checkpoint format that breaks the shipped models fails here."""
    ckpt = os.path.join(ROOT, "model_dict", "shipped", f"{script}.pt")
    assert os.path.getsize(ckpt) < 8_000_000
    state = torch.load(ckpt, weights_only=True)
    assert "optimizer" not in state
    cfg = script_config([f"--ckpt={ckpt}", f"--data={os.path.join(ROOT, config.data)}",
                         "--device=cpu", "--mode=eval"], script)
    _, model, data = checkpoint_with_data(SHIPPED[script], cfg)
    loss = full_loss(model, data, "val", "cpu", "float32")
    assert loss == pytest.approx(state["eval"]["val_loss"], rel=1e-5)
    assert data.bpb(loss, "val") == pytest.approx(state["eval"]["val_bpb"], rel=1e-5)


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.skipif(shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")),
                    reason="needs git and a git checkout")
def test_running_the_main_job_on_a_fresh_clone_modifies_no_tracked_file(tmp_path):
    """`python gpt.py` (small, to keep the test short) and the README's command that samples from
    the shipped model, on a fresh clone: git status stays clean. Neither loads an optional library
    nor a module its mode does not use (sys.modules at exit lists every module loaded)."""
    clone = tmp_path / "clone"
    git("clone", "-q", ROOT, str(clone), cwd=tmp_path)
    small = TINY_MODEL + ["--max_iters=5", "--eval_interval=5", "--max_new_tokens=10",
                          "--num_samples=1", "--device=cpu", "--dtype=float32"]
    optional = {"transformers", "safetensors", "tokenizers", "huggingface_hub", "tiktoken", "scipy"}
    # never the Hugging Face code, head research (nor, without --log_probe, the probe), eval's module,
    # the LB <-> SM conversion, torchrun's (in one process), torch.compile's (without --compile),
    # GPT-4's tokenizer, the RLHF layer; and to sample, not matplotlib
    unused = {"dualgpt.hf_gpt2", "dualgpt.tokenizer_files", "dualgpt.heads", "dualgpt.probes", "dualgpt.hooks",
              "dualgpt.atlas",
              "dualgpt.evaluation", "dualgpt.patching", "dualgpt.layouts", "dualgpt.distributed",
              "dualgpt.compiling", "minbpe.gpt4", "rlhf"}
    listing = tmp_path / "modules.txt"
    # `python gpt.py ARGS`, run by runpy as the interpreter runs a script, writing sys.modules at exit
    as_script = ("import atexit, runpy, sys; sys.argv = sys.argv[1:]; out = sys.argv.pop(1); "
                 "atexit.register(lambda: open(out, 'w').write(' '.join(sys.modules))); "
                 "runpy.run_path(sys.argv[0], run_name='__main__')")
    sample = ["--mode=sample", "--ckpt=model_dict/shipped/gpt.pt", "--max_new_tokens=20",
              "--num_samples=1"]
    for args, not_loaded, loaded in (
            (small, unused, {"dualgpt.run", "dualgpt.sampling", "matplotlib"}),
            (sample, unused | {"dualgpt.plots", "matplotlib"}, {"dualgpt.sampling"})):
        result = subprocess.run([sys.executable, "-c", as_script, "gpt.py", str(listing), *args],
                                cwd=clone, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        modules = set(listing.read_text().split())
        imported = modules | {module.split(".")[0] for module in modules}
        assert "torch" in imported and not imported & optional, imported & optional
        assert loaded <= imported and not imported & not_loaded
    assert os.path.exists(clone / "model_dict" / "gpt.pt")  # the run did write its outputs
    assert git("status", "--porcelain", cwd=clone) == ""


def test_the_readmes_figures_are_the_shipped_files():
    """The README's val bits per byte is the shipped LB-GPT checkpoint's recorded figure, its sample
    excerpt stands in the shipped sample, its headlines are the shipped reports', every page and
    picture it links exists, and it fits on one screen's worth of bytes."""
    readme = read("README.md")
    assert len(readme.encode("utf-8")) <= 5_000
    recorded = torch.load(os.path.join(ROOT, "model_dict", "shipped", "gpt.pt"),
                          weights_only=True)["eval"]
    assert f"val {recorded['val_bpb']:.3f} bits per byte" in readme
    excerpt = re.search(r"```\n(ROMEO:\n.*?)\n```", readme, flags=re.S).group(1)
    assert excerpt in read("generate_text", "shipped", "gpt.txt")
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        assert os.path.exists(os.path.join(ROOT, link)), link
    text = " ".join(readme.split())
    kv = next(line for line in read("generate_text", "shipped", "bench_train_sample.md").splitlines()
              if "inside the window) | SM-GPT sdpa, KV cache" in line)
    assert f"the KV cache samples {kv.split('|')[4].strip()} LB-GPT's" in text
    heads = [row for row in shipped_json("induction.heads.json")["heads"] if row["label"]]
    assert {row["label"] for row in heads} == {"induction"}
    assert f"`config/induction.py` forms {len(heads)} in 5 minutes" in text
    assert not any(row["label"] for s in SHIPPED for row in shipped_json(f"{s}.heads.json")["heads"])
    report = shipped_json("rlhf_sentiment_report.json")
    assert all(c["p_holm"] >= 0.05 for c in with_holm(report))
    assert f"With {len(report['seeds'])} seeds, no primary comparison stands after correction" in text


def with_holm(value) -> list:
    """Every difference in a report's JSON that carries Holm's adjusted p-value."""
    if not isinstance(value, dict):
        return []
    own = [value] if "p_holm" in value else []
    return own + [d for v in value.values() for d in with_holm(v)]


# a page and where its results start (and end): there every decimal figure in its prose (code left
# out) stands, as printed, in a shipped table that the page links
RESULTS = [("benchmarks.md", "# Benchmarks", None), ("rlhf.md", "## What it found", None),
           ("own-preferences.md", "**A run of mine", None),
           ("training.md", "**What it costs**", "## More than one process")]


@pytest.mark.parametrize("page, start, end", RESULTS)
def test_every_figure_a_results_page_quotes_stands_in_a_shipped_table_it_links(page, start, end):
    text = read("docs", page)
    text = text[text.index(start):text.index(end) if end else None]
    linked = re.findall(r"\(\.\./generate_text/shipped/([\w.-]+\.md)\)", text)
    assert linked
    tables = "".join(read("generate_text", "shipped", name) for name in linked)
    words = re.sub(r"```.*?```|`[^`]*`", "", text, flags=re.S)  # commands are not figures
    figures = re.findall(r"\d+\.\d+(?: ± \d+\.\d+)?[x%]?", words)
    assert figures
    missing = [figure for figure in figures  # as a whole: 2.95x is not in 12.95 or 2.957x
               if not re.search(rf"(?<![\d.]){re.escape(figure)}(?![\d])", tables)]
    assert not missing, missing
    for name in linked:  # with the command that wrote it
        command = re.search(r"command: `([^`]+)`", read("generate_text", "shipped", name))
        assert command is None or command.group(1) in read("docs", page), name


def test_the_rlhf_settings_are_the_shipped_tunings_picks_and_the_report_ran_with_them():
    """rlhf/config.py's learning rates and betas are what `python -m rlhf --rlhf_stage=tune` picked on
    the dev split, its settings_at_kl the frontier where that is another setting, and the shipped
    report's runs used them; docs/rlhf.md gives its seeds, machine and minutes, and the report tested
    its primary comparisons alone."""
    from rlhf import config as rlhf_config
    from rlhf.__main__ import settings_at_kl
    tuning = shipped_json("rlhf_sentiment_seed1337_tuning.json")
    report = shipped_json("rlhf_sentiment_report.json")
    for setting in tuning["picks"].values():
        for key, value in setting.items():
            assert getattr(rlhf_config, key) == value == report["config"][key], key
    frontier = {(m, k): f["setting"] for m, front in tuning["frontier"].items() for k, f in front.items()
                if f["setting"] != tuning["picks"][m]}
    assert settings_at_kl(vars(rlhf_config)) == frontier == settings_at_kl(report["config"])
    page = prose("docs", "rlhf.md")
    minutes = sum(report["seconds"].values()) / 60
    seeds = ", ".join(map(str, report["seeds"]))
    assert f"seeds {seeds}, {report['machine']}: {minutes:.0f} min" in page
    assert len(report["primary"]) == len(rlhf_config.primary.split(","))
    assert len(with_holm(report["matched_kl"])) == sum("p_holm" in c["summary"] for c in report["primary"])


def test_the_own_preferences_labels_are_the_shipped_files():
    """The how-to's counts of the shipped labels and their agreement with the dialogue oracle,
    computed here from the labels files."""
    from rlhf.oracles import dialogue
    labels = [json.loads(line) for line in read("data", "shipped", "dialogue_labels.jsonl").splitlines()]
    skipped = read("data", "shipped", "dialogue_labels_skipped.jsonl").splitlines()
    agree = sum(dialogue(p["chosen"]) > dialogue(p["rejected"]) for p in labels)
    ties = sum(dialogue(p["chosen"]) == dialogue(p["rejected"]) for p in labels)
    page = prose("docs", "own-preferences.md")
    read_pairs = len(labels) + len(skipped)
    assert f"{read_pairs} pairs read, {len(labels)} preferences, {len(skipped)} ties" in page
    assert f"agrees with {agree} of my {len(labels)} labels, sees a tie in {ties}" in page
    report = shipped_json("rlhf_pairs-dialogue_labels_report.json")
    assert f"{report['machine']}: {sum(report['seconds'].values()) / 60:.0f} min" in page


def test_the_rlhf_head_study_page_quotes_the_shipped_study():
    """docs/rlhf-heads.md's margins, attention divergences and partial-tuning end points are the
    shipped head study's (written by python -m rlhf.heads)."""
    page = prose("docs", "rlhf-heads.md")
    study = shipped_json("rlhf_sentiment_seed1337_heads.json")
    for method, result in study["methods"].items():
        margin = f"{result['margin']:+.3f}".replace("-", "−")
        assert (f"{method.upper()} {margin}" in page
                or f"{method.upper()}'s is negative ({margin}" in page)
        divergence = [x for row in result["attention_divergence"] for x in row]
        assert f"{sum(divergence) / len(divergence):.4f} " in page, method
    curves, (layer, head) = study["partial_tuning"]["curves"], study["partial_tuning"]["chosen_head"]
    kls = [f"{curves[name][-1]['kl']:.2f}" for name in (f"head {layer}.{head} only", "attention only",
                                                         "MLPs only")]
    assert f"KL {kls[0]}, {kls[1]} and {kls[2]} nats" in page


def test_the_long_fuzz_run_the_docs_quote_is_the_shipped_one():
    """docs/development.md's count of fuzzed cases is the sum over the shipped long run's statistics
    (hypothesis's own count of the examples it ran), none of them failing, with its command."""
    shipped = read("generate_text", "shipped", "fuzz_long.txt")
    runs = [(int(a), int(b)) for a, b in
            re.findall(r"(\d+) passing examples?, (\d+) failing", shipped)]
    assert runs and not any(failing for _, failing in runs)
    page = read("docs", "development.md")
    command = re.search(r"^command: (.+)$", shipped, flags=re.M).group(1)
    assert f"{sum(passing for passing, _ in runs):,} cases" in page and command in page


def shipped_heads_report(name: str, cls) -> tuple[dict, torch.nn.Module, torch.Tensor]:
    """A shipped model's heads report, after checking that its probe scores and in-context-learning
    score are what the probe it records gives on model_dict/shipped/<name>.pt; returns the report,
    the model and the probe."""
    from dualgpt import probes
    report = shipped_json(f"{name}.heads.json")
    ckpt = os.path.join(ROOT, "model_dict", "shipped", f"{name}.pt")
    cfg = script_config([f"--ckpt={ckpt}", "--device=cpu", f"--data={os.path.join(ROOT, config.data)}",
                         "--mode=heads", "--dtype=float32"], "gpt_" if cls is gpt_.SMGPT else "gpt")
    _, model, data = checkpoint_with_data(cls, cfg)
    probe = report["probe"]
    pool = probes.training_tokens(data.splits["train"])
    assert probe["tokens"] == len(pool)
    tokens = probes.repeated_tokens(probe["sequences"], probe["length"], pool, probe["seed"])
    scores, icl = probes.probe_scores(model, tokens, probe["length"])
    assert icl == pytest.approx(report["icl_score"], abs=1e-5)
    for row in report["heads"]:
        for score in probes.PROBES:
            got = scores[score][row["layer"], row["head"]].item()
            assert got == pytest.approx(row[score], abs=1e-5)
    return report, model, tokens


@pytest.mark.parametrize("script", SHIPPED)
def test_the_shipped_probe_scores_are_the_shipped_models_and_the_docs_quote_them(home, script):
    """The shipped heads.json's scores are its model's, and docs/heads.md quotes its largest
    induction score, its labels (none) and its in-context-learning score."""
    report, _, _ = shipped_heads_report(script, SHIPPED[script])
    page = prose("docs", "heads.md")
    name = {"gpt": "LB-GPT", "gpt_": "SM-GPT"}[script]
    largest = max(row["induction"] for row in report["heads"])
    assert f"{largest:.3f} in {name}" in page
    assert not any(row["label"] for row in report["heads"]) and "no head reaches a label" in page
    assert f"{report['icl_score']:.3f}" in page


@pytest.mark.parametrize("name", [*SHIPPED, "induction"])
def test_the_shipped_atlas_page_is_of_the_shipped_heads_and_patch_reports(name):
    """generate_text/shipped/<name>.heads.html carries the rows of the shipped heads.json and the shipped
    patch.json's effects and prompts (the same regeneration wrote them), every head's pattern on each input, and
    no mask."""
    report, patch = shipped_json(f"{name}.heads.json"), shipped_json(f"{name}.patch.json")
    page = read("generate_text", "shipped", f"{name}.heads.html")
    data = json.loads(re.search(r"^const data = (.*);$", page, flags=re.M).group(1))
    assert [{k: v for k, v in row.items() if k not in ("patch_effect", "dla")} for row in data["heads"]] \
        == report["heads"]
    effects = {(p["layer"], p["head"]): (p["effect"], p["dla"]) for p in patch["heads"]}
    assert all((row["patch_effect"], row["dla"]) == effects[row["layer"], row["head"]] for row in data["heads"])
    assert (patch["checkpoint"], patch["iter_num"]) == (report["checkpoint"], report["iter_num"])
    assert data["title"].endswith(f"(iteration {report['iter_num']})") and data["mask"] == []
    assert [i["name"] for i in data["inputs"]] == ["val text", "probe", "patch clean", "patch corrupt"]
    assert data["inputs"][2]["tokens"] == patch["clean_tokens"] and data["patch"]["residual"] == patch["residual"]
    for shown in data["inputs"]:
        assert len(shown["attention"]) == report["n_layer"]
        assert all(len(head) == len(shown["tokens"]) for layer in shown["attention"] for head in layer)


def test_the_composition_and_patching_figures_of_the_heads_page_are_the_shipped_reports():
    """docs/heads.md's composition scores of the induction model, and each shipped model's default patching
    task, gap, head effects and residual effects, are the shipped heads.json and patch.json files'."""
    text = prose("docs", "heads.md")
    composition = shipped_json("induction.heads.json")["composition"]
    pairs = sorted(composition["pairs"], key=lambda p: -p["k"])
    first, second = (f"{p['from'][0]}.{p['from'][1]} → {p['to'][0]}.{p['to'][1]} ({p['k']:.3f})" for p in pairs[:2])
    assert (f"the two largest K-composition scores of the {len(pairs)} pairs are {first} and {second}, against a "
            f"random baseline of {composition['baseline']:.3f}") in text
    from_0_0 = {tuple(p["to"]): p["k"] for p in composition["pairs"] if p["from"] == [0, 0]}
    assert f"at the baseline ({from_0_0[1, 0]:.3f} and {from_0_0[1, 1]:.3f})" in text
    patch = shipped_json("induction.patch.json")
    effect = {(h["layer"], h["head"]): h["effect"] for h in patch["heads"]}
    differ = next(i for i, (a, b) in enumerate(zip(patch["clean_ids"], patch["corrupt_ids"])) if a != b)
    assert patch["task"] == "induction"
    assert (f"(clean {patch['clean_logit_diff']:.2f}, corrupted {patch['corrupt_logit_diff']:.2f}: a gap of "
            f"{patch['clean_logit_diff'] - patch['corrupt_logit_diff']:.2f} nats); head 1.1's output restores "
            f"{effect[1, 1]:.2f} of it, 1.0's {effect[1, 0]:.2f}").replace("-", "−") in text
    assert (f"({patch['residual'][0][differ]:.2f} entering layer 0, {patch['residual'][1][differ]:.2f} entering "
            "layer 1)") in text
    default = {name: shipped_json(f"{name}.patch.json") for name in SHIPPED}
    assert all(p["task"] == "agreement" for p in default.values())
    gaps = {name: p["clean_logit_diff"] - p["corrupt_logit_diff"] for name, p in default.items()}
    assert f"(gaps {gaps['gpt']:.2f} nats in LB-GPT, {gaps['gpt_']:.2f} in SM-GPT)" in text
    assert all(row[-1] == pytest.approx(1.0, abs=5e-3) for p in default.values() for row in p["residual"])
    assert max(h["effect"] for p in default.values() for h in p["heads"]) < 0.06
    assert "no head's output restores more than 0.06 of it" in text


INDUCTION_SEEDS = (1337, 1, 2)


def induction_logs() -> dict[int, list[dict]]:
    """Each seed's evaluations from its shipped log."""
    return {seed: [r for r in map(json.loads, read("generate_text", "shipped",
                                                   f"induction_seed{seed}.jsonl").splitlines())
                   if "icl_score" in r] for seed in INDUCTION_SEEDS}


def formed(evals: list[dict]) -> dict:
    """The first evaluation at which a head's induction score reached the 0.4 label."""
    return next(r for r in evals if largest_induction(r) >= 0.4)


def largest_induction(record: dict) -> float:
    return max(max(row) for row in record["probe_scores"]["induction"])


def test_the_induction_recipe_docs_are_its_shipped_logs_checkpoint_and_heads_report():
    """docs/heads.md's table of config/induction.py's three seeds is their shipped logs, its interval
    the logs' final scores; the shipped checkpoint was trained by that recipe, its heads report is of
    that checkpoint, and the docs quote its induction heads."""
    from dualgpt.runconfig import defaults, read_config_file
    page = read("docs", "heads.md")
    finals = []
    for seed, evals in induction_logs().items():
        first, last = formed(evals), evals[-1]
        row = (f"| {seed} | {first['train_s'] / 60:.1f} min (step {first['iter']}) | "
               f"{first['icl_score']:.2f} | {largest_induction(last):.3f} | "
               f"{last['icl_score']:.2f} | {last['val_bpb']:.3f} |")
        assert row in page.splitlines()
        finals.append(last["icl_score"])
    half = stats.t.ppf(0.975, len(finals) - 1) * stats.sem(finals)
    assert f"{statistics.mean(finals):.2f} ± {half:.2f} nats" in " ".join(page.split())
    ckpt = load_checkpoint(os.path.join(ROOT, "model_dict", "shipped", "induction.pt"))
    recipe = read_config_file(os.path.join(ROOT, "config", "induction.py"), defaults())
    assert all(ckpt["config"][key] == value for key, value in recipe.items())
    assert ckpt["config"]["seed"] == 1337
    report = shipped_json("induction.heads.json")
    assert report["checkpoint"].endswith(os.path.join("model_dict", "shipped", "induction.pt"))
    assert report["iter_num"] == ckpt["iter_num"]
    heads = sorted((r for r in report["heads"] if r["label"] == "induction"),
                   key=lambda r: -r["induction"])
    named = " and ".join(f"{r['layer']}.{r['head']} ({r['induction']:.2f})" for r in heads)
    assert f"induction heads {named}" in " ".join(page.split())


def test_the_recipe_pages_other_figures_are_its_logs_and_its_shipped_model(home):
    """The rest of the recipe's figures in docs/heads.md: the flat start from the logs, the default
    models' in-context learning, and, recomputed on the shipped model, the circuit (heads 0.0 and
    0.2 off) and what a probe over every id scores."""
    from dualgpt import probes
    text = prose("docs", "heads.md")
    logs = induction_logs()
    early = [r for evals in logs.values() for r in evals if r["train_s"] / 60 <= 1.3]
    assert (f"flat up to 1.3 minutes (ICL at most {max(r['icl_score'] for r in early):.2f}, "
            f"induction score at most {max(map(largest_induction, early)):.2f})") in text
    assert all(formed(evals)["train_s"] / 60 < 3.5 for evals in logs.values())
    finals = [sorted(v for row in evals[-1]["probe_scores"]["induction"] for v in row) for evals in logs.values()]
    tops = [v for scores in finals for v in scores[-2:]]
    assert all(scores[-3] < 0.20 for scores in finals)
    assert f"({min(tops):.2f} to {max(tops):.2f} at 5 minutes; which two differs by seed)" in text
    icl = {script: shipped_json(f"{script}.heads.json")["icl_score"] for script in SHIPPED}
    assert f"the default models' are {icl['gpt']:.2f} (LB-GPT) and {icl['gpt_']:.2f} (SM-GPT)" in text
    report, model, tokens = shipped_heads_report("induction", gpt_.SMGPT)
    probe = report["probe"]
    assert model.config.vocab_size - probe["tokens"] == 192
    assert "a 512-token vocabulary of Tiny Shakespeare has 192 of them" in text
    model.set_head_mask({(0, 0), (0, 2)})
    scores, icl_score = probes.probe_scores(model, tokens, probe["length"])
    assert (f"heads 1.0 and 1.1 score {scores['induction'][1, 0]:.2f} and "
            f"{scores['induction'][1, 1]:.2f} and in-context learning falls to "
            f"{icl_score:.2f} nats") in text
    model.set_head_mask(set())
    every_id = probes.repeated_tokens(probe["sequences"], probe["length"],
                                      model.config.vocab_size, probe["seed"])
    scores, _ = probes.probe_scores(model, every_id, probe["length"])
    head_1_0 = next(r for r in report["heads"] if (r["layer"], r["head"]) == (1, 0))
    assert (f"scores the recipe's induction heads {scores['induction'][1, 0]:.2f} where they score "
            f"{head_1_0['induction']:.2f}") in text
