"""The run config: config.py's values, then a config file and --key=value overrides, checked."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re

import torch

import config as default_config
from dualgpt import UserError, repo_path
from dualgpt.runtime import resolve_device, resolve_dtype

LIMITS = {"max_iters", "max_minutes"}
INTERVAL = re.compile(r"([\[(])(.+), (.+)([\])])")  # "[0, 1)": closed at 0, open at 1
PLACEHOLDERS = {"N": r"\d+", "module": r"[\w.]+", "function": r"\w+"}  # in a choice: cuda:N


def defaults(module=default_config) -> dict:
    """A config module's settings: its lower-case names of plain values."""
    return {k: v for k, v in vars(module).items()
            if k.islower() and not k.startswith("_") and isinstance(v, (bool, int, float, str))}


def declarations(module=default_config) -> dict[str, str]:
    """Each key's declared values, the annotation beside its default: a range ("[0, 1)", ">= 1")
    or choices ("sdpa | matmul"). The one place a key's limits are written."""
    return {k: v for k, v in getattr(module, "__annotations__", {}).items() if isinstance(v, str)}


def bound(text: str) -> int | float:
    base, power, exponent = text.partition("**")
    return int(base) ** int(exponent) if power else int(text) if text.isdigit() else float(text)


def allowed(value, rule: str) -> bool:
    """Whether a value is within its declared rule (see declarations)."""
    if "|" in rule:
        placeholder = r"\b(" + "|".join(PLACEHOLDERS) + r")\b"
        return any(re.fullmatch(re.sub(placeholder, lambda m: PLACEHOLDERS[m[1]], choice),
                                str(value)) for choice in rule.split(" | "))
    if rule.startswith(">"):
        limit = bound(rule.lstrip(">= "))
        return value >= limit if rule.startswith(">=") else value > limit
    opening, low, high, closing = INTERVAL.fullmatch(rule).groups()
    above = value >= bound(low) if opening == "[" else value > bound(low)
    return above and (value <= bound(high) if closing == "]" else value < bound(high))


def check_declared(cfg: dict, rules: dict[str, str]) -> None:
    """Refuse, in one line and before any work, a value outside its key's declaration, a number
    that is not finite, and an integer beyond 64 bits (torch would refuse it mid-run)."""
    for key, value in cfg.items():
        rule = rules.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value}")
        if isinstance(value, int) and not -2**63 <= value < 2**63:
            raise UserError(f"{key} must fit in 64 bits, got {value}")
        if rule and not allowed(value, rule):
            choices = rule.split(" | ")
            wanted = (f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1
                      else rule if rule.startswith(">") else f"in {rule}")
            raise UserError(f"{key} must be {wanted}, got {value!r}")


def read_config_file(path: str, keys: dict) -> dict:
    """The assignments of a config file, nanoGPT's convention: plain Python that the user names and
    runs (python gpt.py config/gpu.py), each name a key of the program with a value of its type."""
    values: dict = {}
    try:
        with open(path, encoding="utf-8") as f:
            exec(compile(f.read(), path, "exec"), {}, values)  # the user's own file, as nanoGPT
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path} ({e.__class__.__name__})") from None
    except (Exception, SystemExit) as e:  # a mistake in the file is the user's: one line
        raise UserError(f"config file {path}: {e.__class__.__name__}: {e}") from None
    for key, value in values.items():
        if key not in keys:
            raise UserError(f"config file {path}: unknown config key {key!r}")
        if isinstance(keys[key], float) and type(value) is int:
            values[key] = value = float(value)
        if type(value) is not type(keys[key]):
            raise UserError(f"config file {path}: {key} = {value!r}, expected "
                            f"{type(keys[key]).__name__} like {keys[key]!r}")
    return values


def did_you_mean(key: str, keys: dict) -> str:
    """The message for a key the program does not read: the closest one it does, if any."""
    close = difflib.get_close_matches(key.lower(), keys, n=1)
    return f"unknown config key {key!r}" + (f"; did you mean --{close[0]}?" if close else "")


def parse_args(argv: list[str], program: str, keys: dict, rules: dict[str, str], usage: str = "",
               unknown=did_you_mean) -> dict:
    """The values `python <program> argv...` sets over `keys` (key -> default): a *.py argument
    is a config file, --key=value one key, --help prints the usage and keys; unknown(key, keys)
    words the error for a key the program does not read."""
    overrides = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage.strip() + f"\n\nconfig keys of {program} (default, allowed values):\n"
                  + "\n".join(f"  --{k}={v!r}  {rules.get(k, '')}" for k, v in keys.items()))
            raise SystemExit(0)
        if arg.endswith(".py") and not arg.startswith("--"):
            overrides.update(read_config_file(arg, keys))
            continue
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; use --key=value (or name a "
                            "config file)")
        key, eq, value = arg[2:].partition("=")
        if key not in keys:
            raise UserError(unknown(key, keys))
        if not eq and not isinstance(keys[key], bool):  # "--n_layer 3": the value is not its own
            raise UserError(f"--{key} needs a value: --{key}=VALUE (with =, no space)")
        overrides[key] = parse_value(key, value if eq else "true", keys[key])
    return overrides


def parse_value(key: str, value: str, default):
    """--key=value as the type of the key's default."""
    booleans = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    try:
        return booleans[value.lower()] if isinstance(default, bool) else type(default)(value)
    except (KeyError, ValueError):
        raise UserError(f"--{key}={value}: expected {type(default).__name__} like "
                        f"{default!r}") from None


def resolve(keys: dict, overrides: dict, rules: dict[str, str]) -> dict:
    """The run config: the defaults in `keys`, then the overrides, each value checked against its
    declaration in `rules`; "auto" device and dtype resolved."""
    cfg = dict(keys, **overrides)
    if LIMITS & overrides.keys():  # a limit the user set is obeyed: the ones not set are off
        cfg.update({key: 0 for key in LIMITS - overrides.keys()})
    check_declared(cfg, rules)
    if "device" in cfg:
        cfg["device"] = resolve_device(cfg["device"])
        cfg["dtype"] = resolve_dtype(cfg["dtype"], cfg["device"])
    return cfg


def script_config(argv: list[str], script: str, usage: str = "") -> dict:
    """The checked run config of `python <script>.py argv...`, with the script's default paths."""
    keys, rules = defaults(), declarations()
    cfg = resolve(keys, parse_args(argv, f"{script}.py", keys, rules, usage), rules)
    cfg["script"] = script
    cfg["ckpt"] = cfg["ckpt"] or repo_path("model_dict", f"{script}.pt")
    cfg["sample_file"] = cfg["sample_file"] or repo_path("generate_text", f"{script}.txt")
    validate_model_run(cfg)
    outputs = ["ckpt", "sample_file"] + (["export_to"] if cfg["export_format"] == "pt" else [])
    for key in outputs:  # found now, not after the run that would write there
        require_file_path(key, cfg[key])
    return cfg


def require_file_path(key: str, path: str) -> None:
    """A path a run writes a file to must not be an existing folder."""
    if path and os.path.isdir(path):
        raise UserError(f"--{key}={path} is a folder; name a file")


def validate_model_run(cfg: dict) -> None:
    """The checks that relate gpt.py's keys to each other (each key's own range is declared)."""
    training = cfg["mode"] in ("auto", "train")
    accum, world = cfg["grad_accum_steps"], int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
    require([
        (cfg["n_embd"] % cfg["n_head"] == 0,
         f"n_embd ({cfg['n_embd']}) must be divisible by n_head ({cfg['n_head']})"),
        (cfg["max_iters"] or cfg["max_minutes"] or not training,
         "no training limit: set --max_iters=STEPS or --max_minutes=MINUTES (0 means no limit of "
         "that kind)"),
        (cfg["min_lr"] <= cfg["learning_rate"], "min_lr must be at most learning_rate"),
        (cfg["lr_decay_iters"] == 0 or cfg["lr_decay_iters"] >= cfg["warmup_iters"],
         "lr_decay_iters must be 0 (the end of the run) or >= warmup_iters"),
        (not (cfg["resume"] and cfg["overwrite"]),
         "--resume and --overwrite contradict each other"),
        (not training or accum < world or accum % world == 0,
         f"grad_accum_steps={accum} cannot be split across {world} processes; use a multiple of "
         f"{world} (each process runs grad_accum_steps / {world} micro-steps)"),
        (cfg["optimizer"] != "muon" or hasattr(torch.optim, "Muon"), "optimizer=muon needs "
         f"torch.optim.Muon, which torch {torch.__version__} lacks; upgrade torch, or use adamw"),
    ])
    parse_head_mask(cfg["head_mask"])


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise the message of the first check that fails, as a one-line UserError."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def parse_head_mask(spec: str) -> set[tuple[int, int]]:
    """"0.3,2.1" -> {(0, 3), (2, 1)}: layer.head pairs, numbered from 0."""
    mask = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        layer, dot, head = item.partition(".")
        if not (dot and layer.isdigit() and head.isdigit()):
            raise UserError(f"head_mask: {item!r} is not layer.head (example: "
                            "--head_mask=0.3,2.1)")
        mask.add((int(layer), int(head)))
    return mask


def model_config(cfg: dict, config_class: type):
    """The script's ModelConfig from the run config's keys of its names; fields config.py lacks
    (GPT-2's GELU, LayerNorm epsilon, untied head) keep their defaults."""
    names = [f.name for f in dataclasses.fields(config_class)]
    return config_class(**{name: cfg[name] for name in names if name in cfg})


def model_options(cfg: dict, model_class: type) -> dict:
    """The options a model class takes besides its config (gpt_.py: attn_impl, kv_cache)."""
    return {key: cfg[key] for key in model_class.run_options}
