"""What python -m rlhf and rlhf/heads.py share: their config, the run's setup, its files and the
record of what produced each, seeds drawn by name, policies and the reward model, prompts,
completions and scores.

Shapes: P prompts of prompt_tokens (those of a pairs file: of any length, right-padded with PAD),
completions of completion_tokens (those of a pairs file: of any length, padded the same way).
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import shutil
import uuid

import torch
import torch.nn as nn

import config as core_config
import gpt
import gpt_
from rlhf import config as rlhf_config
from dualgpt import UserError, repo_path
from dualgpt.checkpoint import (cpu_copy, load_checkpoint, load_tensors, make_checkpoint,
                                model_from_checkpoint, save_checkpoint)
from dualgpt.corpus import resolve_data
from dualgpt.data import Dataset
from dualgpt.files import sha256_file
from dualgpt.runconfig import (declarations, defaults, did_you_mean, model_options, parse_args,
                               require, resolve)
from dualgpt.runtime import autocast
from rlhf.oracles import Oracle, get_oracle
from rlhf.preference import (PAD, RewardModel, completion_logits, sample_completions,
                             token_logprobs, trimmed)


def in_repo(path: str) -> str:
    """A path from a config file or the command line: as it is if absolute, else under the
    repository."""
    return path if os.path.isabs(path) else repo_path(path)


MODEL_CLASSES = {"gpt_": gpt_.SMGPT, "gpt": gpt.LBGPT}  # rlhf_script -> the model that tunes
# the keys of config.py the RLHF programs read; the rest of config.py is gpt.py's and gpt_.py's
CORE_KEYS = ("data", "device", "dtype", "seed", "attn_impl", "kv_cache")
# the keys of rlhf/config.py that both programs read (its first section); the pipeline reads every
# other key but the head study's head_*, and the head study reads these and its own head_*
SHARED_KEYS = ("rlhf_base", "rlhf_script", "oracle", "prompt_tokens", "completion_tokens",
               "eval_prompts", "eval_split", "dpo_beta", "rl_beta", "grpo_beta", "rloo_lr",
               "rl_prompts", "rl_group", "rl_normalize", "max_grad_norm", "quick")


def rlhf_run_config(argv: list[str], program: str, usage: str, hints: dict) -> dict:
    """The run config of python -m rlhf or rlhf/heads.py: CORE_KEYS of config.py and the keys of
    rlhf/config.py the program reads, --quick applying rlhf_config.QUICK."""
    core, own = defaults(core_config), defaults(rlhf_config)
    study = {k for k in own if k.startswith("head_")}
    reads = (set(SHARED_KEYS) | study) if program == "python -m rlhf.heads" else own.keys() - study
    keys = {k: core[k] for k in CORE_KEYS} | {k: v for k, v in own.items() if k in reads}
    owners = {k: "gpt.py and gpt_.py" for k in core.keys() - set(CORE_KEYS)}
    owners |= {k: "python -m rlhf.heads" if k in study else "python -m rlhf"
               for k in own.keys() - keys.keys()}
    rules = declarations(core_config) | declarations(rlhf_config)

    def unknown(key: str, keys: dict) -> str:  # who reads the key, and what to type instead
        hint = f"; {hints[key]}" if key in hints else ""
        if key in owners:
            return f"--{key} is read by {owners[key]}, not by {program}{hint}"
        message = did_you_mean(key, keys)
        return message + (hint if message.endswith(repr(key)) else "")

    overrides = parse_args(argv, program, keys, rules, usage, unknown)
    if overrides.get("quick", keys["quick"]):  # --quick: rlhf_config.QUICK replaces the defaults
        keys = keys | {k: v for k, v in rlhf_config.QUICK.items() if k in keys}
    return resolve(keys, overrides, rules)


def read_json(path: str, remedy: str):
    """A JSON file's content, or None when the file does not exist; a file that is not JSON (cut
    short, emptied, overwritten) is a one-line error naming it and the remedy."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e.__class__.__name__}); "
                        f"{remedy}") from None


TEMPERATURE = 1.0  # completions are sampled, and every log-probability taken, at this temperature
CHUNK = 256  # sequences per forward pass when sampling or scoring many at once

# Every random draw of the pipeline and the head study has a name here; its seed is derived from
# the run's seed and the name (and an index, such as the RL step), so no two draws share a stream
# by accident.
SEED_NAMES = ("pairs.train_prompts", "pairs.val_prompts", "pairs.completions", "pairs.labels",
              "pairs.held_out", "rm.order", "dpo.order", "eval.prompts", "dev.prompts",
              "bon.sampling", "rl.sampling", "rl.prompts", "ppo.order", "curve.sampling",
              "rm.standardise", "dpo.kl_prompts", "dpo.kl_sampling", "heads.batches",
              "heads.sampling", "heads.kl_by_position", "label.prompts", "label.completions")

# What each stage's outputs depend on besides the base, the data, the script and the seed: a
# stage's record hashes these keys and its upstream stage's record, and every reader compares it
# with the run it reports.
KEEPING = ("kl_targets", "max_bracket", "max_grad_norm")  # where runs keep policies; clipping
STAGE_KEYS = {
    "pairs": ("oracle", "prompt_tokens", "completion_tokens", "label_agreement", "n_pairs",
              "pairs_held_out"),
    "rm": ("rm_epochs", "rm_batch", "rm_lr"),
    "bon": ("bon_max_n", "eval_prompts", "eval_split", "seed"),
    "dpo": ("dpo_methods", "dpo_epochs", "dpo_batch", "cdpo_epsilon", "dpo_lr", "dpo_beta",
            "cdpo_lr", "cdpo_beta", "ipo_lr", "ipo_tau",
            "preferred_ft_lr", *KEEPING),
    "rloo": ("rl_beta", "rloo_lr", "rl_steps", "rl_prompts", "rl_group", "rl_normalize",
             *KEEPING),
    "ppo": ("rl_beta", "ppo_lr", "rl_steps", "rl_prompts", "rl_group", "ppo_epochs",
            "ppo_minibatches", "ppo_clip", "ppo_value_clip", "ppo_value_lr", "ppo_gamma",
            "ppo_lambda", *KEEPING),
    "grpo": ("grpo_beta", "grpo_lr", "grpo_scale", "rl_steps", "rl_prompts", "rl_group",
             "ppo_epochs", "ppo_minibatches", "ppo_clip", *KEEPING),
    "eval": ("eval_samples", "eval_prompts", "eval_split", "kl_targets", "max_bracket", "seed"),
}
UPSTREAM = {"pairs": None, "rm": "pairs", "bon": "rm", "dpo": "pairs", "rloo": "rm", "ppo": "rm",
            "grpo": "rm", "eval": None}
# the file whose record stands for a stage's run, where other files are built on it
STAGE_FILES = {"pairs": ("data", "pairs.pt"), "rm": ("model_dict", "rm.pt"),
               "bon": ("data", "bon.pt")}


def seed_for(seed: int, name: str, index: int = 0) -> int:
    """The seed of the draw `name` (one of SEED_NAMES) in a run seeded with `seed`: a hash, so
    distinct names and indices give unrelated streams."""
    if name not in SEED_NAMES:
        raise KeyError(f"{name!r} is not in SEED_NAMES")
    digest = hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative 63-bit seed


@dataclasses.dataclass
class Setup:
    """What every stage shares, resolved once from the run config. One replicate of the study:
    `seed` (the run config's seed, or seed + k for replicate k of --seeds) names its outputs and
    seeds its random draws."""
    cfg: dict
    model_class: type[nn.Module]
    base_path: str
    base: dict  # the base checkpoint
    base_hash: str  # of the base checkpoint's file
    data: Dataset  # its training text, in its own tokens
    oracle: Oracle | None  # None: no oracle (pairs from a file)
    # names the outputs of this oracle (or pairs file) and preset: rlhf_<oracle>[_quick]
    family: str
    seed: int
    # of the pairs file (--pairs), None when the oracle labels the pairs
    pairs_hash: str | None = None
    # what prompt_pool read from disk
    loaded: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def prefix(self) -> str:
        """Names one replicate's outputs: rlhf_<oracle>[_quick]_seed<seed>."""
        return f"{self.family}_seed{self.seed}"

    def path(self, folder: str, suffix: str) -> str:
        return repo_path(folder, f"{self.prefix}_{suffix}")

    def for_seed(self, seed: int) -> Setup:
        """The same setup for another replicate."""
        return dataclasses.replace(self, seed=seed, loaded={})

    def with_keys(self, **keys) -> Setup:
        """The same setup with these config keys set (a setting tried, or trained at one KL)."""
        return dataclasses.replace(self, cfg=dict(self.cfg, **keys))

    def prompt_pool(self, split: str) -> torch.Tensor:
        """The prompts of a pairs file's train or held-out ("val") pairs, as this replicate's pairs
        stage split them: (n, longest), right-padded with PAD."""
        if not self.loaded:  # one read of the file for both splits
            pairs = load_pairs(self, self.expected("pairs"))
            self.loaded.update({name: pairs[name]["prompts"] for name in ("train", "val")})
        return self.loaded[split]

    def generator(self, name: str, index: int = 0, on_device: bool = False) -> torch.Generator:
        """A generator for the draw `name` (see SEED_NAMES), on the run's device where sampling
        needs it."""
        return torch.Generator(device=self.cfg["device"] if on_device else "cpu").manual_seed(
            seed_for(self.seed, name, index))

    def expected(self, stage: str, upstream: str | None | bool = True) -> dict:
        """What a file of `stage` written for this run must record: this replicate's base, data,
        script, dtype and seed, the stage's keys, and the id of the upstream file it was built on,
        as that file is on disk now (upstream=True: read it; or give the id). A file that matches
        has its own "id" besides."""
        if upstream is True:
            upstream = self.found_record(UPSTREAM[stage])["id"] if UPSTREAM[stage] else None
        return {"stage": stage, "seed": self.seed, "base": self.base_hash[:16],
                "data": self.data.data_hash[:16],
                "pairs": self.pairs_hash and self.pairs_hash[:16],
                "script": self.cfg["rlhf_script"], "dtype": self.cfg["dtype"],
                "keys": {k: self.cfg[k] for k in STAGE_KEYS[stage] if k in self.cfg},
                "upstream": upstream}

    def new_record(self, stage: str, upstream: str | None, keys: dict | None = None) -> dict:
        """The record of a run of `stage` that starts now, on the upstream file of that id: what
        expected() asks of it, and an id of its own that no other run shares (so a rerun with the
        same settings is still another run, and what was built on the earlier one is refused)."""
        record = self.expected(stage, upstream)
        record["keys"].update(keys or {})
        unique = f"{json.dumps(record, sort_keys=True)}{uuid.uuid4()}"
        record["id"] = hashlib.sha256(unique.encode()).hexdigest()[:16]
        return record

    def found_record(self, stage: str) -> dict:
        """The record in the file a stage wrote last (its pairs, reward model or pool), checked to
        be this run's (whose upstream is, in turn, the file on disk now)."""
        return record_in(load_output(self, stage, self.expected(stage)))


def load_output(s: Setup, stage: str, expected: dict, device: str = "cpu") -> dict:
    """The file a stage wrote (STAGE_FILES: the pairs, the reward model, the best-of-n pool),
    refused unless its record is what `expected` asks."""
    path = s.path(*STAGE_FILES[stage])
    if not os.path.exists(path):
        raise UserError(f"no {path}; run python -m rlhf --rlhf_stage={stage} first")
    content = load_tensors(path, f"run python -m rlhf --rlhf_stage={stage} again", device)
    check_record(record_in(content), expected, path)
    return content


def record_in(content) -> dict | None:
    """The record a file of the pipeline carries: pairs and pools at the top, checkpoints in their
    "rlhf" entry."""
    if not isinstance(content, dict):
        return None
    record = content.get("run",
                         content.get("rlhf",
                                     {}).get("run") if isinstance(content.get("rlhf"),
                                                                  dict) else None)
    return record if isinstance(record, dict) else None


def check_record(found: dict | None, expected: dict, path: str) -> None:
    """A one-line error unless a file's record `found` is what `expected` asks (every entry equal):
    else the file was written by another run, with other settings, or on an upstream file that has
    since been written anew."""
    found = found if isinstance(found, dict) else {}
    if all(found.get(k) == v for k, v in expected.items()):
        return
    if found.get("stage") != expected["stage"]:
        why = (f"by the {found.get('stage', 'unknown')} stage" if found else "with no record of "
               "its run")
    else:
        differing = [f"{k}={v!r} there, {expected['keys'][k]!r} here" for k,
                     v in found.get("keys", {}).items()
                     if k in expected["keys"] and expected["keys"][k] != v]
        differing += [f"{k} {found.get(k)!r} there, {expected[k]!r} here"
                      for k in ("seed", "script", "dtype", "base", "data", "pairs")
                      if found.get(k) != expected[k]]
        if found.get("upstream") != expected["upstream"]:
            differing.append(f"built on an earlier {UPSTREAM[expected['stage']]} file")
        why = "; ".join(differing[:3]) or "its record lacks what this run records"
    raise UserError(f"{path} was written by another run ({why}); run python -m rlhf "
                    f"--rlhf_stage={expected['stage']} "
                    f"with these settings")


def output_folders(family: str) -> list[str]:
    """Where the runs of an oracle and preset write: data/, model_dict/ (and its folders of kept
    checkpoints), generate_text/."""
    model_dict = repo_path("model_dict")
    kept = [os.path.join(model_dict,
                         d) for d in (os.listdir(model_dict) if os.path.isdir(model_dict) else [])
            if d.startswith(family + "_") and os.path.isdir(os.path.join(model_dict, d))]
    return [repo_path("data"), model_dict, repo_path("generate_text"), *kept]


def setup(cfg: dict, data_batch_size: int = 1) -> Setup:
    """Check everything a stage will need before any work (and before anything is written)."""
    base_path = in_repo(cfg["rlhf_base"])
    base = load_checkpoint(base_path)
    block_size = base["model_config"]["block_size"]
    sequence = cfg["prompt_tokens"] + cfg["completion_tokens"]
    require([(sequence <= block_size, f"prompt_tokens + completion_tokens = {sequence} does "
              f"not fit the model's block_size {block_size}")])
    pairs = cfg.get("pairs", "")  # the pipeline's key: the head study measures the oracle's runs
    if pairs and not os.path.isfile(pairs):
        raise UserError(f"no pairs file {pairs}")
    if cfg["oracle"] == "none" and not pairs:
        raise UserError("--oracle=none: with no oracle the pairs come from a file; run python -m "
                        "rlhf --pairs=FILE.jsonl (or label some: python -m rlhf "
                        "--rlhf_stage=label)")
    cfg = dict(cfg, oracle=("none" if pairs else "sentiment") if cfg["oracle"] == "auto"
               else cfg["oracle"])
    oracle = None if cfg["oracle"] == "none" else get_oracle(cfg["oracle"])
    data = Dataset(resolve_data(cfg["data"]), block_size, data_batch_size,
                   cfg["device"], tokenizer_text=base["tokenizer"])
    name = "pairs-" + os.path.splitext(os.path.basename(pairs))[0] if pairs else oracle.name
    family = "rlhf_" + re.sub(r"[^A-Za-z0-9_.-]+", ".", name) + ("_quick" if cfg["quick"] else "")
    return Setup(cfg, MODEL_CLASSES[cfg["rlhf_script"]], base_path, base, sha256_file(base_path),
                 data, oracle, family, cfg["seed"], sha256_file(pairs) if pairs else None)


# -----------------------------------------------------------------------------------------
# Models and the files of a run


def load_policy(s: Setup, ckpt: dict | None = None, path: str = "") -> nn.Module:
    """A policy (the base, or a tuned checkpoint) with dropout off: sampling and every
    log-probability must come from one deterministic function."""
    ckpt = ckpt or s.base
    ckpt = dict(ckpt, model_config=dict(ckpt["model_config"], dropout=0.0))
    return model_from_checkpoint(s.model_class, ckpt, path or s.base_path, s.cfg["device"],
                                 options=model_options(s.cfg, s.model_class)).eval()


def frozen(model: nn.Module) -> nn.Module:
    """The reference: a copy in eval mode that no gradient reaches."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def save_model(s: Setup, model: nn.Module, path: str, rlhf: dict, **extra) -> None:
    """A tuned model (policy, or the reward model's body) as an ordinary weights-only checkpoint:
    gpt.py and gpt_.py sample, eval and study heads from it. rlhf: what made it; extra: more
    entries (the reward head)."""
    save_checkpoint(path, make_checkpoint(cpu_copy(model.state_dict()),
                                          dataclasses.asdict(model.config), model.layout,
                                          s.base["tokenizer"], s.base["iter_num"], s.cfg,
                                          rlhf=rlhf, **extra))


def save_policy(s: Setup, policy: nn.Module, path: str, method: str, record: dict, step: int,
                **extra) -> None:
    """A tuned policy with what made it: the method, the step, and the record of the run
    (Setup.new_record); extra: more entries (the KL at which it was kept)."""
    save_model(s, policy, path,
               {"method": method, "step": step, "base": s.base_path,
                "oracle": s.oracle and s.oracle.name, "run": record,
                **extra})


def load_policy_checkpoint(path: str, expected: dict) -> dict:
    """A tuned policy's checkpoint, refused unless its record is what `expected` asks."""
    ckpt = load_checkpoint(path)
    check_record(record_in(ckpt), expected, path)
    return ckpt


def kept_folder(s: Setup, name: str) -> str:
    """Where the run `name` keeps copies of its policy along the way."""
    return s.path("model_dict", f"{name}_steps")


def clear_outputs(s: Setup, name: str, at_kl: bool = False) -> None:
    """A run starts with none of its own files, so nothing of an earlier run enters its curve or
    the report. at_kl: also the files of the method's runs at one KL (name@KL)."""
    shutil.rmtree(kept_folder(s, name), ignore_errors=True)
    paths = [s.path("model_dict", f"{name}.pt"), s.path("generate_text", f"{name}_log.json")]
    for folder in ("model_dict", "generate_text") if at_kl else ():
        paths += glob.glob(glob.escape(s.path(folder, name)) + "@*")
    for path in filter(os.path.exists, paths):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def numbers(text: str) -> list[float] | None:
    """A comma list of positive finite numbers ("1,2,4"); None if it is empty or holds anything
    else."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        return None
    return values if values and all(0 < v < math.inf for v in values) else None


def kl_targets(cfg: dict) -> list[float]:
    return numbers(cfg["kl_targets"])


def keep_kls(cfg: dict) -> list[float]:
    """The KLs at which a tuning run keeps its policy, the first time its KL crosses each: every
    target x (1 - max_bracket / 4) and x (1 + max_bracket / 4), so that on the training prompts
    each target lies between two kept policies max_bracket / 2 x the target apart (the evaluation,
    on other prompts and samples, measures a little differently; eval refuses a reading from
    kept policies more than max_bracket x the target apart)."""
    margin = cfg["max_bracket"] / 4
    return sorted({k * f for k in kl_targets(cfg) for f in (1 - margin, 1 + margin)})


def load_reward_model(s: Setup, expected: dict) -> tuple[RewardModel, dict]:
    """The reward model (frozen; what its stage reported as its `report`) and its record, refused
    unless the record is what `expected` asks."""
    path = s.path("model_dict", "rm.pt")
    if not os.path.exists(path):
        raise UserError(f"no reward model at {path}; run python -m rlhf --rlhf_stage=rm first")
    ckpt = load_checkpoint(path)
    check_record(record_in(ckpt), expected, path)
    rm = RewardModel(load_policy(s, ckpt, path))
    rm.head.load_state_dict(ckpt["reward_head"])
    rm.report = ckpt["rlhf"]
    for p in rm.parameters():
        p.requires_grad_(False)
    return rm.eval(), record_in(ckpt)


def load_pairs(s: Setup, expected: dict) -> dict:
    """The preference pairs (their record under "run"), on the run's device."""
    return load_output(s, "pairs", expected, s.cfg["device"])


def chosen_rejected(split: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The preferred and the other completion of each labelled pair: (n, completion_tokens) each (a
    pairs file's: (n, longest), padded)."""
    prefer_a = split["a_preferred"].to(split["a"].device)[:, None]
    return torch.where(prefer_a, split["a"],
                       split["b"]), torch.where(prefer_a, split["b"], split["a"])


# -----------------------------------------------------------------------------------------
# Prompts, completions, scores


def fitting(s: Setup, prompts: torch.Tensor) -> torch.Tensor:
    """Prompts (right-padded) cut to their last tokens where completion_tokens would not fit after
    them."""
    room = s.base["model_config"]["block_size"] - s.cfg["completion_tokens"]
    lengths = (prompts != PAD).sum(1, keepdim=True)
    read = (lengths - room).clamp_min(0) + torch.arange(min(room, prompts.shape[1]),
                                                        device=prompts.device)
    kept = prompts.gather(1, read.clamp_max(prompts.shape[1] - 1))
    return kept.masked_fill(read >= lengths, PAD)


def sample_prompts(s: Setup, part: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """n windows of prompt_tokens tokens at random offsets of one part of the text: (n,
    prompt_tokens). train: the train split (pairs, RL); dev: the val split's first half (held-out
    pairs, trying settings); test: its second half (every reported evaluation). With a pairs file,
    n of its train pairs' prompts (part train) or held-out pairs' prompts (dev, test), drawn at
    random, padded."""
    if s.pairs_hash:
        pool = s.prompt_pool("train" if part == "train" else "val")
        return fitting(s, pool[torch.randint(len(pool), (n,),
                                             generator=generator)].to(s.cfg["device"]))
    val = s.data.splits["val"]
    ids = {"train": s.data.splits["train"], "dev": val[:len(val) // 2],
           "test": val[len(val) // 2:]}[part]
    length = s.cfg["prompt_tokens"]
    starts = torch.randint(len(ids) - length, (n,), generator=generator).tolist()
    return torch.tensor([ids[i:i + length].tolist() for i in starts], dtype=torch.long,
                        device=s.cfg["device"])


def eval_prompts(s: Setup) -> torch.Tensor:
    """The prompts every method and every seed is evaluated on (the head study takes its first
    head_prompts): test prompts, or dev prompts with eval_split = dev, for trying settings without
    touching the test prompts. With a pairs file, the first eval_prompts distinct prompts of this
    seed's held-out pairs, in the order of the file (each seed holds out its own share of them)."""
    if s.pairs_hash:
        distinct = list(dict.fromkeys(map(tuple,
                                          s.prompt_pool("val").tolist())))[:s.cfg["eval_prompts"]]
        return fitting(s, torch.tensor(distinct, dtype=torch.long, device=s.cfg["device"]))
    split = s.cfg["eval_split"]
    name = "eval.prompts" if split == "test" else "dev.prompts"
    # drawn from the run config's seed, not the replicate's: every seed of a study is tested on the
    # same prompts
    return sample_prompts(s, split, s.cfg["eval_prompts"],
                          torch.Generator().manual_seed(seed_for(s.cfg["seed"], name)))


def complete(s: Setup, model: nn.Module, prompts: torch.Tensor,
             gen: torch.Generator) -> torch.Tensor:
    """completion_tokens sampled after each prompt, CHUNK prompts at a time: (n,
    completion_tokens). Prompts of one length sample together (a pairs file's prompts differ in
    length; all others have prompt_tokens)."""
    lengths = (prompts != PAD).sum(1)
    out = torch.empty(len(prompts), s.cfg["completion_tokens"], dtype=torch.long,
                      device=prompts.device)
    with autocast(s.cfg["device"], s.cfg["dtype"]):
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero().squeeze(1)
            group = prompts[rows, :length]
            chunks = [sample_completions(model, group[i:i + CHUNK], s.cfg["completion_tokens"],
                                         TEMPERATURE, gen)[0] for i in range(0, len(group), CHUNK)]
            out[rows] = torch.cat(chunks)
    return out


def texts(s: Setup, completions: torch.Tensor) -> list[str]:
    """Rows of tokens (padding left out) as text."""
    return [s.data.tok.decode([t for t in row if t != PAD]) for row in completions.tolist()]


def scores(function, completion_texts: list[str]) -> torch.Tensor:
    return torch.tensor([function(t) for t in completion_texts], dtype=torch.float64)


@torch.no_grad()
def reward_scores(s: Setup, rm: RewardModel, prompts: torch.Tensor,
                  completions: torch.Tensor) -> torch.Tensor:
    rm.eval()
    with autocast(s.cfg["device"], s.cfg["dtype"]):
        return torch.cat([rm(prompts[i:i + CHUNK], completions[i:i + CHUNK]).float()
                          for i in range(0, len(prompts), CHUNK)]).double().cpu()


def completion_logprobs(s: Setup, model: nn.Module, prompts: torch.Tensor,
                        completions: torch.Tensor) -> torch.Tensor:
    """log pi(token | prompt, earlier tokens) of each completion token, at the sampling
    temperature: (B, L)."""
    with autocast(s.cfg["device"], s.cfg["dtype"]):
        return token_logprobs(completion_logits(model, prompts, completions), completions,
                              TEMPERATURE)


def sequence_logprobs(s: Setup, model: nn.Module, prompts: torch.Tensor,
                      completions: torch.Tensor) -> torch.Tensor:
    """log pi(completion | prompt) summed over its tokens (padding adds 0): (B,)."""
    return completion_logprobs(s, model, prompts, trimmed(completions)).sum(1)
