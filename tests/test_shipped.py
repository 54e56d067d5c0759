"""What the clone ships (the dataset, the trained tokenizer, one trained model per script, samples, loss
curves, attention maps), that they still work, and that running the main job never modifies a tracked file."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_MODEL

import config
import gpt
import gpt_
from dualgpt.checkpoint import load_checkpoint, model_from_checkpoint
from dualgpt.evaluation import checkpoint_with_data, full_loss
from dualgpt.runconfig import script_config

SHIPPED = {"gpt": gpt.LBGPT, "gpt_": gpt_.SMGPT}


def test_the_dataset_is_tiny_shakespeare():
    data = open(os.path.join(ROOT, config.data), "rb").read()
    assert len(data) == 1_115_394
    # of karpathy/char-rnn's data/tinyshakespeare/input.txt
    assert hashlib.sha256(data).hexdigest() == ("86c4e6aa9db7c042ec79f339dcb96d42"
                                                "b0075e16b8fc2e86bf0ca57e2dc565ed")


@pytest.mark.parametrize("script", SHIPPED)
def test_the_shipped_files_are_there(script):
    ckpt = os.path.join(ROOT, "model_dict", "shipped", f"{script}.pt")
    assert os.path.getsize(ckpt) < 8_000_000
    state = torch.load(ckpt, weights_only=True)
    assert "optimizer" not in state  # weights only
    assert state["model"] is state["best_model"] or all(torch.equal(state["model"][k], v)
                                                        for k, v in state["best_model"].items())
    for name in (f"{script}.txt", f"{script}.loss.png", f"{script}.heads.png"):
        assert os.path.getsize(os.path.join(ROOT, "generate_text", "shipped", name)) > 100, name
    assert os.path.exists(os.path.join(ROOT, "tokenizers", "shipped", "input_v8192_86c4e6aa.model"))


@pytest.mark.parametrize("script", SHIPPED)
def test_each_shipped_checkpoint_still_has_its_recorded_val_loss(home, script):
    """A change to the model or the checkpoint format that breaks the shipped models fails here."""
    ckpt = os.path.join(ROOT, "model_dict", "shipped", f"{script}.pt")
    recorded = torch.load(ckpt, weights_only=True)["eval"]
    cfg = script_config([f"--ckpt={ckpt}", f"--data={os.path.join(ROOT, config.data)}", "--device=cpu", "--mode=eval"],
                      script)
    _, model, data = checkpoint_with_data(SHIPPED[script], cfg)
    loss = full_loss(model, data, "val", "cpu", "float32")
    assert loss == pytest.approx(recorded["val_loss"], rel=1e-5)
    assert data.bpb(loss, "val") == pytest.approx(recorded["val_bpb"], rel=1e-5)


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")),
                    reason="needs git and a git checkout")
def test_running_the_main_job_on_a_fresh_clone_modifies_no_tracked_file(tmp_path):
    """`python gpt.py` (small, to keep the test short) and the README's command that samples from the
    shipped model, on a fresh clone: git status stays clean (every output is in an ignored place). Neither
    imports an optional library (sys.modules at exit lists every module loaded, also those loaded by
    importlib, which -X importtime leaves out; the corpus encoded by minbpe)."""
    clone = tmp_path / "clone"
    git("clone", "-q", ROOT, str(clone), cwd=tmp_path)
    small = TINY_MODEL + ["--max_iters=5", "--eval_interval=5", "--max_new_tokens=10", "--num_samples=1", "--device=cpu", "--dtype=float32"]
    optional = {"transformers", "safetensors", "tokenizers", "huggingface_hub", "tiktoken"}
    # what a mode does not use is not loaded: neither the Hugging Face code nor head research (nor, without
    # --log_probe, the probe) nor --mode=eval's module nor the LB <-> SM conversion nor, in one process,
    # torchrun's, nor without --compile torch.compile's, nor GPT-4's tokenizer; nor (to sample) matplotlib;
    # nor ever the RLHF layer
    unused = {"dualgpt.hf_gpt2", "dualgpt.tokenizer_files", "dualgpt.heads", "dualgpt.probes", "dualgpt.evaluation",
              "dualgpt.patching", "dualgpt.layouts", "dualgpt.distributed", "dualgpt.compiling", "minbpe.gpt4",
              "rlhf"}
    listing = tmp_path / "modules.txt"
    # `python gpt.py ARGS`, run by runpy as the interpreter runs a script, writing sys.modules at exit
    as_script = ("import atexit, runpy, sys; sys.argv = sys.argv[1:]; out = sys.argv.pop(1); "
                 "atexit.register(lambda: open(out, 'w').write(' '.join(sys.modules))); "
                 "runpy.run_path(sys.argv[0], run_name='__main__')")
    for args, not_loaded, loaded in (
            (small, unused, {"dualgpt.run", "dualgpt.sampling", "matplotlib"}),
            (["--mode=sample", "--ckpt=model_dict/shipped/gpt.pt", "--max_new_tokens=20", "--num_samples=1"],
             unused | {"dualgpt.plots", "matplotlib"}, {"dualgpt.sampling"})):
        result = subprocess.run([sys.executable, "-c", as_script, "gpt.py", str(listing), *args], cwd=clone,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        modules = set(listing.read_text().split())
        imported = modules | {module.split(".")[0] for module in modules}
        assert "torch" in imported and not imported & optional, imported & optional
        assert loaded <= imported and not imported & not_loaded, (loaded - imported, imported & not_loaded)
    assert os.path.exists(clone / "model_dict" / "gpt.pt")  # the run did write its outputs
    assert git("status", "--porcelain", cwd=clone) == ""


def doc(name: str) -> str:
    with open(os.path.join(ROOT, "docs", name), encoding="utf-8") as f:
        return f.read()


def test_the_rlhf_docs_tables_and_times_are_the_shipped_reports():
    """Every row of the shipped RLHF report's tables stands in docs/rlhf.md as it is, and so do the run's seeds,
    machine and minutes (from report.json, which the same command wrote)."""
    shipped = os.path.join(ROOT, "generate_text", "shipped")
    with open(os.path.join(shipped, "rlhf_sentiment_report.md"), encoding="utf-8") as f:
        rows = [line for line in f.read().splitlines() if line.startswith("|")]
    with open(os.path.join(shipped, "rlhf_sentiment_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    readme = doc("rlhf.md")
    assert len(rows) > 30
    missing = [row for row in rows if row not in readme.splitlines()]
    assert not missing, missing[:3]
    minutes = sum(report["seconds"].values()) / 60
    assert f"seeds {', '.join(map(str, report['seeds']))}" in readme
    assert f"{report['machine']}: {minutes:.0f} min" in readme


def with_holm(value) -> list:
    """Every difference in a report's JSON that carries Holm's adjusted p-value."""
    if not isinstance(value, dict):
        return []
    return ([value] if "p_holm" in value else []) + [d for v in value.values() for d in with_holm(v)]


def test_the_rlhf_configs_settings_are_the_shipped_tunings_picks_and_the_report_ran_with_them():
    """rlhf/config.py's learning rates, betas and tau are what `python -m rlhf --rlhf_stage=tune` picked on the dev
    split (the shipped tuning file), the shipped report's runs used them, and docs/rlhf.md gives every setting
    tried with its dev readings."""
    from rlhf import config as rlhf_config
    shipped = os.path.join(ROOT, "generate_text", "shipped")
    with open(os.path.join(shipped, "rlhf_sentiment_seed1337_tuning.json"), encoding="utf-8") as f:
        tuning = json.load(f)
    with open(os.path.join(shipped, "rlhf_sentiment_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    page = doc("rlhf.md")
    for method, setting in tuning["picks"].items():
        for key, value in setting.items():
            assert getattr(rlhf_config, key) == value == report["config"][key], key
        for tried in tuning["tried"][method]:
            settings = ", ".join(f"{k.split('_')[-1]} {v:g}" for k, v in tried["setting"].items())
            readings = " / ".join(f"{tried['at_kl'][k]:+.3f}" if k in tried["at_kl"] else "—"
                                  for k in tuning["kl_targets"].split(","))
            picked = " (picked)" if tried["setting"] == setting else ""
            assert f"| {method} | {settings}{picked} | {tried['end_kl']:.2f} | {readings} |" in page
    assert f"{report['comparisons']} differences" in page
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:  # its headline: none stands
        readme = " ".join(f.read().split())
    assert f"correction over the report's {report['comparisons']} differences none stands" in readme
    tested = with_holm({part: report[part] for part in ("methods", "matched_kl", "pairwise")})
    assert len(tested) == report["comparisons"] and min(c["p_holm"] for c in tested) >= 0.05
    assert len(report["seeds"]) == 3 and "over 3 seeds" in readme


def test_the_own_preferences_run_is_the_shipped_report_and_labels():
    """The how-to's figures (docs/own-preferences.md): its report's reward-model line and end-point rows stand in the README as they are,
    with the run's machine and minutes; the counts of the shipped labels and their agreement with the dialogue
    oracle are computed here from the labels files."""
    from rlhf.oracles import dialogue
    shipped = os.path.join(ROOT, "generate_text", "shipped")
    with open(os.path.join(shipped, "rlhf_pairs-dialogue_labels_report.md"), encoding="utf-8") as f:
        markdown = f.read().splitlines()
    with open(os.path.join(shipped, "rlhf_pairs-dialogue_labels_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    how_to = doc("own-preferences.md")
    end_points = markdown[markdown.index("**End points** (mean ± 95% interval over seeds):") + 2:]
    rows = end_points[:end_points.index("")]
    assert len(rows) > 5 and all(row in how_to.splitlines() for row in rows)
    assert next(line for line in markdown if line.startswith("**Reward model**")) in how_to
    assert f"{report['machine']}: {sum(report['seconds'].values()) / 60:.0f} min" in how_to
    labels = [json.loads(line) for line in open(os.path.join(ROOT, "data", "shipped", "dialogue_labels.jsonl"))]
    skipped = open(os.path.join(ROOT, "data", "shipped", "dialogue_labels_skipped.jsonl")).read().splitlines()
    agree = sum(dialogue(p["chosen"]) > dialogue(p["rejected"]) for p in labels)
    ties = sum(dialogue(p["chosen"]) == dialogue(p["rejected"]) for p in labels)
    assert (f"{len(labels) + len(skipped)} pairs read, {len(labels)} preferences, {len(skipped)} ties" in how_to)
    assert f"agrees with {agree} of my {len(labels)} labels, sees a tie in {ties}" in how_to


@pytest.mark.parametrize("name", ["bench_tokenizer.md", "bench_train_sample.md", "bench_compile.md",
                                  "bench_scaling.md", "bench_muon.md", "bench_muon_avx2.md",
                                  "bench_quality.md"])
def test_the_benchmark_tables_in_the_docs_are_the_shipped_bench_outputs(name):
    """Each section of a shipped `python bench.py` output (its title, which names the CPU, every row of its
    tables and every line between them) stands in docs/benchmarks.md as it is, with the file's name and the
    command that wrote it."""
    with open(os.path.join(ROOT, "generate_text", "shipped", name), encoding="utf-8") as f:
        shipped = f.read()
    page = doc("benchmarks.md")
    lines = page.splitlines()
    command = re.search(r"command: (`[^`]+`)", shipped.splitlines()[2]).group(1)
    assert name in page and command in page
    titles = [line for line in shipped.splitlines() if line.startswith("### ")]
    rows = [line for line in shipped.splitlines() if line.startswith("| ")]
    assert titles and len(rows) >= 3
    body = [line for line in shipped.splitlines()[3:] if line.strip()]  # after the machine and command
    missing = [line for line in body if line not in lines]
    assert not missing, missing[:3]


def test_the_readmes_figures_are_the_shipped_files():
    """The README's val bits per byte is the shipped LB-GPT checkpoint's recorded figure, its sample excerpt
    stands in the shipped sample, its picture exists, its KV-cache ratio is the shipped benchmark's, and
    every page it links to exists; it fits on one screen's worth of bytes (10 KB)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert len(readme.encode("utf-8")) <= 10_000
    recorded = torch.load(os.path.join(ROOT, "model_dict", "shipped", "gpt.pt"), weights_only=True)["eval"]
    assert f"val {recorded['val_bpb']:.3f} bits per byte" in readme
    excerpt = re.search(r"```\n(ROMEO:\n.*?)\n```", readme, flags=re.S).group(1)
    with open(os.path.join(ROOT, "generate_text", "shipped", "gpt.txt"), encoding="utf-8") as f:
        assert excerpt in f.read()
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        assert os.path.exists(os.path.join(ROOT, link)), link
    with open(os.path.join(ROOT, "generate_text", "shipped", "bench_train_sample.md"), encoding="utf-8") as f:
        kv = next(line for line in f if "inside the window) | SM-GPT sdpa, KV cache" in line)
    ratio = kv.split("|")[4].strip()
    assert f"KV cache samples {ratio} LB-GPT's" in readme


def test_the_rlhf_head_study_page_quotes_the_shipped_study():
    """docs/rlhf-heads.md's margins, attention divergences and partial-tuning end points are the shipped
    head study's (generate_text/shipped/rlhf_sentiment_seed1337_heads.json, written by python -m rlhf.heads)."""
    page = " ".join(doc("rlhf-heads.md").split())  # line breaks read as spaces
    with open(os.path.join(ROOT, "generate_text", "shipped", "rlhf_sentiment_seed1337_heads.json"),
              encoding="utf-8") as f:
        study = json.load(f)
    for method, result in study["methods"].items():
        margin = f"{result['margin']:+.3f}".replace("-", "−")
        assert f"{method.upper()} {margin}" in page or f"{method.upper()}'s is negative ({margin}" in page
        divergence = [x for row in result["attention_divergence"] for x in row]
        assert f"{sum(divergence) / len(divergence):.4f} " in page, method
    curves = study["partial_tuning"]["curves"]
    kls = [f"{curves[name][-1]['kl']:.2f}" for name in ("head 0.0 only", "attention only", "MLPs only")]
    assert f"KL {kls[0]}, {kls[1]} and {kls[2]} nats" in page
    for name in ("weight_change", "attention", "ablation", "transplant", "kl_by_position", "oracle_vs_kl"):
        assert f"rlhf_sentiment_seed1337_heads_{name}.png" in page


def test_the_long_fuzz_run_the_docs_quote_is_the_shipped_one():
    """docs/development.md's count of fuzzed cases is the sum over the shipped long run's statistics
    (hypothesis's own count of the examples it ran), none of them failing, with its command."""
    with open(os.path.join(ROOT, "generate_text", "shipped", "fuzz_long.txt"), encoding="utf-8") as f:
        shipped = f.read()
    runs = [(int(a), int(b)) for a, b in re.findall(r"(\d+) passing examples?, (\d+) failing", shipped)]
    assert runs and not any(failing for _, failing in runs)
    page = doc("development.md")
    command = re.search(r"^command: (.+)$", shipped, flags=re.M).group(1)
    assert f"{sum(passing for passing, _ in runs):,} cases" in page and command in page


def shipped_heads_report(name: str, cls) -> tuple[dict, torch.nn.Module, torch.Tensor]:
    """A shipped model's heads report (generate_text/shipped/<name>.heads.json), after checking that its probe
    scores and in-context-learning score are what the probe it records (drawn from the tokens of the shipped
    text's train split) gives on model_dict/shipped/<name>.pt; returns the report, the model and the probe."""
    from dualgpt import probes
    with open(os.path.join(ROOT, "generate_text", "shipped", f"{name}.heads.json")) as f:
        report = json.load(f)
    cfg = script_config([f"--ckpt={os.path.join(ROOT, 'model_dict', 'shipped', f'{name}.pt')}", "--device=cpu",
                         f"--data={os.path.join(ROOT, config.data)}", "--mode=heads", "--dtype=float32"],
                        "gpt_" if cls is gpt_.SMGPT else "gpt")
    _, model, data = checkpoint_with_data(cls, cfg)
    probe = report["probe"]
    pool = probes.training_tokens(data.splits["train"])
    assert probe["tokens"] == len(pool)
    tokens = probes.repeated_tokens(probe["sequences"], probe["length"], pool, probe["seed"])
    scores, icl = probes.probe_scores(model, tokens, probe["length"])
    assert icl == pytest.approx(report["icl_score"], abs=1e-5)
    for row in report["heads"]:
        for score in probes.PROBES:
            assert scores[score][row["layer"], row["head"]].item() == pytest.approx(row[score], abs=1e-5)
    return report, model, tokens


@pytest.mark.parametrize("script", SHIPPED)
def test_the_shipped_probe_scores_are_the_shipped_models_and_the_docs_quote_them(home, script):
    """The shipped heads.json's scores are its model's (shipped_heads_report), and docs/heads.md quotes its
    largest induction score, its labels (none) and its in-context-learning score."""
    report, _, _ = shipped_heads_report(script, SHIPPED[script])
    page = " ".join(doc("heads.md").split())
    name = {"gpt": "LB-GPT", "gpt_": "SM-GPT"}[script]
    largest = max(row["induction"] for row in report["heads"])
    assert f"{largest:.3f} in {name}" in page
    assert not any(row["label"] for row in report["heads"]) and "no head reaches a label" in page
    assert f"{report['icl_score']:.3f}" in page


@pytest.mark.parametrize("script", SHIPPED)
def test_the_shipped_atlas_page_is_of_the_shipped_heads_report(script):
    """generate_text/shipped/<script>.heads.html carries the rows of the shipped heads.json (the same
    run wrote both), no patching (docs/heads.md says why), and every head's pattern on its tokens."""
    shipped = os.path.join(ROOT, "generate_text", "shipped")
    with open(os.path.join(shipped, f"{script}.heads.json")) as f:
        report = json.load(f)
    with open(os.path.join(shipped, f"{script}.heads.html"), encoding="utf-8") as f:
        page = f.read()
    data = json.loads(re.search(r'<script id="atlas-data" type="application/json">(.*?)</script>',
                                page, flags=re.S).group(1))
    assert data["heads"] == report["heads"]
    assert f"(iteration {report['iter_num']})" in data["title"]
    assert "patch_effect" not in data["heads"][0]
    assert len(data["attention"]) * len(data["attention"][0]) == len(report["heads"])
    assert all(len(rows) == len(data["tokens"]) for layer in data["attention"] for rows in layer)


def test_the_readme_quotes_the_largest_induction_score_of_the_shipped_models():
    largest = 0.0
    for script in SHIPPED:
        with open(os.path.join(ROOT, "generate_text", "shipped", f"{script}.heads.json")) as f:
            largest = max([largest] + [row["induction"] for row in json.load(f)["heads"]])
    with open(os.path.join(ROOT, "generate_text", "shipped", "induction.heads.json")) as f:
        recipe = [row for row in json.load(f)["heads"] if row["label"] == "induction"]
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    assert f"form no induction head (largest induction score {largest:.3f})" in readme
    assert f"forms {len(recipe)} in 5 minutes" in readme


INDUCTION_SEEDS = (1337, 1, 2)
T_975_DF2 = 4.303  # Student's t, 97.5% quantile, 2 degrees of freedom (3 seeds)


def formed(evals: list[dict]) -> dict:
    """The first evaluation at which a head's induction score reached the 0.4 label."""
    return next(r for r in evals if r["induction_max"] >= 0.4)


def test_the_induction_recipe_docs_are_its_shipped_logs_checkpoint_and_heads_report():
    """docs/heads.md's table of config/induction.py's three seeds is their shipped logs (when a head first
    reached the induction label, and the scores at the end), its interval the logs' final scores; the shipped
    checkpoint was trained by that recipe (its recorded config), its heads report is of that checkpoint, and
    the docs quote its induction heads and what switching them off does."""
    import statistics

    from dualgpt.runconfig import defaults, read_config_file
    shipped = os.path.join(ROOT, "generate_text", "shipped")
    page = doc("heads.md")
    finals = []
    for seed in INDUCTION_SEEDS:
        with open(os.path.join(shipped, f"induction_seed{seed}.jsonl")) as f:
            evals = [r for r in map(json.loads, f) if "icl_score" in r]
        first, last = formed(evals), evals[-1]
        row = (f"| {seed} | {first['train_s'] / 60:.1f} min (step {first['iter']}) | {first['icl_score']:.2f} | "
               f"{last['induction_max']:.3f} | {last['icl_score']:.2f} | {last['val_bpb']:.3f} |")
        assert row in page.splitlines()
        finals.append(last["icl_score"])
    half = T_975_DF2 * statistics.stdev(finals) / len(finals) ** 0.5
    text = " ".join(page.split())
    assert f"{statistics.mean(finals):.2f} ± {half:.2f} nats" in text
    ckpt = load_checkpoint(os.path.join(ROOT, "model_dict", "shipped", "induction.pt"))
    recipe = read_config_file(os.path.join(ROOT, "config", "induction.py"), defaults())
    logged_always = {"log_probe"}  # a key of later code: every evaluation logged the probe then
    assert all(ckpt["config"][key] == value for key, value in recipe.items() if key not in logged_always)
    assert ckpt["config"]["seed"] == 1337
    with open(os.path.join(shipped, "induction.heads.json")) as f:
        report = json.load(f)
    assert report["checkpoint"].endswith(os.path.join("model_dict", "shipped", "induction.pt"))
    assert report["iter_num"] == ckpt["iter_num"]
    heads = sorted((r for r in report["heads"] if r["label"] == "induction"), key=lambda r: -r["induction"])
    assert heads and all(r["icl_change"] < 0 for r in heads)  # the causal check of each label
    named = " and ".join(f"{r['layer']}.{r['head']} ({r['induction']:.2f})" for r in heads)
    assert f"induction heads {named}" in text
    assert "ICL at 5 min" in page and ckpt["config"]["max_minutes"] == 5.0
    with open(os.path.join(shipped, "induction_seed1337.jsonl")) as f:
        assert [r["iter"] for r in map(json.loads, f) if "icl_score" in r][-1] == ckpt["iter_num"]


def test_the_recipe_pages_other_figures_are_its_logs_and_its_shipped_model(home):
    """The rest of the recipe's figures in docs/heads.md and the README: the flat start and the loss bumps from the
    logs; the default models' in-context learning; and, recomputed on the shipped model, its heads report's probe
    scores, the circuit (heads 0.0 and 0.2 off), and the whole-vocabulary probe's scores."""
    from dualgpt import probes
    shipped = os.path.join(ROOT, "generate_text", "shipped")
    text = " ".join(doc("heads.md").split())
    logs = {}
    for seed in INDUCTION_SEEDS:
        with open(os.path.join(shipped, f"induction_seed{seed}.jsonl")) as f:
            logs[seed] = [r for r in map(json.loads, f) if "icl_score" in r]
    early = [r for evals in logs.values() for r in evals if r["train_s"] / 60 <= 1.3]
    assert (f"flat up to 1.3 minutes (ICL at most {max(r['icl_score'] for r in early):.2f}, induction score at most "
            f"{max(r['induction_max'] for r in early):.2f})") in text
    assert all(formed(evals)["train_s"] / 60 < 3.5 for evals in logs.values())
    bumps = {seed: max(((b["val_bpb"] - a["val_bpb"], b["train_s"] / 60) for a, b in zip(evals, evals[1:])))
             for seed, evals in logs.items()}
    assert (f"(+{bumps[1337][0]:.3f} at {bumps[1337][1]:.1f} min in seed 1337, +{bumps[2][0]:.3f} at "
            f"{bumps[2][1]:.1f} min in seed 2)") in text
    icl = {}
    for script in SHIPPED:
        with open(os.path.join(shipped, f"{script}.heads.json")) as f:
            icl[script] = json.load(f)["icl_score"]
    assert f"the default models' are {icl['gpt']:.2f} (LB-GPT) and {icl['gpt_']:.2f} (SM-GPT)" in text
    report, model, tokens = shipped_heads_report("induction", gpt_.SMGPT)
    probe = report["probe"]
    assert model.config.vocab_size - probe["tokens"] == 192
    assert "192 of the recipe's 512 ids never occur" in text
    model.set_head_mask({(0, 0), (0, 2)})
    scores, icl_score = probes.probe_scores(model, tokens, probe["length"])
    assert (f"heads 1.0 and 1.1 score {scores['induction'][1, 0]:.2f} and {scores['induction'][1, 1]:.2f} and "
            f"in-context learning falls to {icl_score:.2f} nats") in text
    model.set_head_mask(set())
    every_id = probes.repeated_tokens(probe["sequences"], probe["length"], model.config.vocab_size, probe["seed"])
    scores, icl_score = probes.probe_scores(model, every_id, probe["length"])
    assert (f"scores heads 1.0 and 1.1 {scores['induction'][1, 0]:.2f} and {scores['induction'][1, 1]:.2f} (and "
            f"in-context learning {icl_score:.2f} nats)") in text


def test_the_muon_reading_quotes_the_shipped_differences():
    """docs/benchmarks.md's Muon sentence gives each budget's paired difference as the shipped table has it."""
    with open(os.path.join(ROOT, "generate_text", "shipped", "bench_muon.md"), encoding="utf-8") as f:
        diffs = re.findall(r"^\| (\d+) s \| Muon - AdamW \(paired\) \| [^|]+ \| \*\*-([\d.]+ ± [\d.]+)\*\* \|$", f.read(),
                           flags=re.M)
    assert [budget for budget, _ in diffs] == ["67", "300"]
    page = " ".join(doc("benchmarks.md").split())
    assert f"by {diffs[0][1]} at 67 s and {diffs[1][1]} at 300 s" in page
    with open(os.path.join(ROOT, "generate_text", "shipped", "bench_muon_avx2.md"), encoding="utf-8") as f:
        avx2 = re.search(r"^\| 67 s \| Muon - AdamW \(paired\) \| [^|]+ \| \*\*\+([\d.]+ ± [\d.]+)\*\* \|$", f.read(),
                         flags=re.M).group(1)
    assert f"was worse by {avx2} bits per byte at 67 s" in page


def test_the_time_to_quality_reading_quotes_the_shipped_run_and_model():
    """docs/benchmarks.md's and the README's time-to-quality figures: the shipped run's ratio, its two
    nanoGPT scores, the 0.65x target in nanoGPT's time, and the shipped SM-GPT model's recorded score."""
    with open(os.path.join(ROOT, "generate_text", "shipped", "bench_quality.md"), encoding="utf-8") as f:
        shipped = f.read()
    rows = [line.split(" | ") for line in shipped.splitlines() if line.startswith("| nanoGPT")]
    (ours, own) = rows
    ratio = re.search(r"is ([\d.]+)x nanoGPT's", shipped).group(1)
    page = " ".join(doc("benchmarks.md").split())
    assert f"In nanoGPT's training time the defaults reach {ratio}x its val bits per byte" in page
    assert f"({ours[5].strip('*')} against {own[5].strip('*')} bits per byte, one seed each)" in page
    own_bpb = float(own[5].strip("*"))
    assert f"0.65x would be {0.65 * own_bpb:.2f} bits per byte in {float(own[3]):.0f} s" in page
    shipped_model = torch.load(os.path.join(ROOT, "model_dict", "shipped", "gpt_.pt"), weights_only=True)
    bpb = shipped_model["eval"]["val_bpb"]
    assert f"for {shipped_model['train_s']:.0f} s (in {shipped_model['config']['dtype']}," in page
    assert f"reaches {bpb:.3f} ({bpb / own_bpb:.2f}x)" in page
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    assert f"the defaults reach {ratio}x its bits per byte" in readme


def test_the_scaling_reading_quotes_the_shipped_table():
    """The ratios docs/benchmarks.md reads off the loop-cost table are the shipped table's cells, each in the
    sentence that names its step size, head count and dtype."""
    with open(os.path.join(ROOT, "generate_text", "shipped", "bench_scaling.md"), encoding="utf-8") as f:
        cells = {tuple(c.strip() for c in line.split("|")[1:4]): [c.strip() for c in line.split("|")[4:9]]
                 for line in f if line.startswith("| float32") or line.startswith("| bfloat16")}

    def ratio(dtype, step, heads, variant="matmul"):
        size = 256 // heads
        return cells[dtype, step, f"{heads} x {size}"][3 if variant == "matmul" else 4]

    page = " ".join(doc("benchmarks.md").split())
    one = "train 1x32"
    assert (f"ran {ratio('float32', one, 4)} LB-GPT at 4 heads of 64 and {ratio('float32', one, 32)} at 32 heads of 8 "
            f"in float32 ({ratio('bfloat16', one, 4)} and {ratio('bfloat16', one, 32)} in bfloat16)") in page
    seq = "train 1x256"
    assert (f"the gap was {ratio('float32', seq, 4)} and {ratio('float32', seq, 32)} (bfloat16: "
            f"{ratio('bfloat16', seq, 4)} and {ratio('bfloat16', seq, 32)})") in page
    big = [ratio("float32", "train 16x256", h) for h in (1, 2, 4, 8, 16, 32)]
    speed = lambda cell: float(cell.rstrip("x"))  # noqa: E731
    assert f"single matmul ran {min(big, key=speed)}-{max(big, key=speed)} LB-GPT" in page
    sample = "sample 1x256, no cache"
    assert (f"from {ratio('float32', sample, 1)} at one head to {ratio('float32', sample, 32)} at 32 (bfloat16: "
            f"{ratio('bfloat16', sample, 32)})") in page
