"""The run config: config.py's values, the GPU preset, then --key=value overrides, validated once."""
from __future__ import annotations

import dataclasses
import difflib
import re

import config as default_config
from dualgpt import UserError, repo_path
from dualgpt.runtime import resolve_device, resolve_dtype

MODES = ("auto", "train", "sample", "eval", "heads", "export", "import")
LIMITS = {"max_iters", "max_minutes"}
# the choices config.py's comments list (a | b | c), as validation accepts them (tests/test_config.py checks both)
CHOICES = {"device": ("auto", "cpu", "cuda", "cuda:N", "mps"), "dtype": ("auto", "float32", "bfloat16", "float16"),
           "compile": ("true", "false", "auto"), "preset": ("auto", "none"), "attn_impl": ("sdpa", "matmul"),
           "mode": MODES, "export_format": ("pt", "hf")}
HEADING = re.compile(r"^# --- .+ \(read by (?P<programs>[\w.]+(?:, [\w.]+)*)\) -*$")
ASSIGNMENT = re.compile(r"^(?P<key>[a-z][a-z0-9_]*) = ")


def defaults() -> dict:
    """Every lower-case setting of config.py (GPU_PRESET is not one)."""
    return {k: v for k, v in vars(default_config).items()
            if not k.startswith("_") and k.islower() and isinstance(v, (bool, int, float, str))}


def readers() -> dict[str, tuple[str, ...]]:
    """The programs that read each key of config.py: those its section's heading names ("# --- title (read by
    gpt.py, gpt_.py) ---")."""
    with open(default_config.__file__, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out, programs = {}, ()
    for line in lines:
        if heading := HEADING.match(line):
            programs = tuple(heading["programs"].split(", "))
        elif assignment := ASSIGNMENT.match(line):
            out[assignment["key"]] = programs
    return out


def program_defaults(program: str) -> dict:
    """config.py's values of the keys `program` reads."""
    read_by = readers()
    return {k: v for k, v in defaults().items() if program in read_by.get(k, ())}


def foreign_key(key: str, program: str, keys: dict, hints: dict[str, str]) -> str:
    """The message for a key that `program` does not read: who reads it, and what to type instead."""
    hint = f"; {hints[key]}" if key in hints else ""
    owners = readers().get(key)
    if owners:
        return f"--{key} is read by {', '.join(owners[:-1]) + ' and ' if owners[1:] else ''}{owners[-1]}, not by {program}{hint}"
    close = difflib.get_close_matches(key, keys, n=1)
    return f"unknown config key {key!r}" + (f"; did you mean --{close[0]}?" if close else hint)


def load_config(argv: list[str], program: str, usage: str = "", presets: dict[str, dict] | None = None,
                hints: dict[str, str] | None = None) -> dict:
    """The run config of `python <program> argv...`: config.py's values of the keys the program reads, the
    GPU preset, then the typed overrides; --help prints usage and those keys. A key of another program is a
    one-line error naming who reads it (hints: key -> what to type instead). presets: {flag key: values}; where
    the flag is set, its values replace config.py's (rlhf.py's --quick), like GPU_PRESET on CUDA, except for
    keys typed on the command line."""
    base = program_defaults(program)
    overrides = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage.strip() + f"\n\nconfig keys of {program} (config.py):\n"
                  + "\n".join(f"  --{k}={v!r}" for k, v in base.items()))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; use --key=value")
        key, eq, value = arg[2:].partition("=")
        if key not in base:
            raise UserError(foreign_key(key, program, base, hints or {}))
        overrides[key] = parse_value(key, value if eq else "true", base[key])
    cfg = dict(base, **overrides)
    cfg["device"] = resolve_device(cfg["device"])
    applied = [values for flag, values in (presets or {}).items() if cfg[flag]]
    if "preset" in cfg:
        check_choice(cfg, "preset")
        if cfg["preset"] == "auto" and cfg["device"].startswith("cuda"):
            applied.insert(0, default_config.GPU_PRESET)
    for preset in applied:
        cfg.update({k: v for k, v in preset.items() if k in cfg and k not in overrides})
    if LIMITS & overrides.keys():  # a typed limit is obeyed: limits the user did not type are off
        cfg.update({key: 0 for key in LIMITS - overrides.keys()})
    cfg["dtype"] = resolve_dtype(cfg["dtype"], cfg["device"])
    return cfg


def script_config(argv: list[str], script: str, usage: str = "") -> dict:
    """The validated run config of `python <script>.py argv...` (gpt or gpt_), with its default paths."""
    cfg = load_config(argv, f"{script}.py", usage)
    cfg["script"] = script
    cfg["ckpt"] = cfg["ckpt"] or repo_path("model_dict", f"{script}.pt")
    cfg["sample_file"] = cfg["sample_file"] or repo_path("generate_text", f"{script}.txt")
    validate_model_run(cfg)
    return cfg


def check_choice(cfg: dict, key: str, choices: tuple[str, ...] | None = None) -> None:
    """A one-line error unless cfg[key] is one of the choices (CHOICES[key] by default)."""
    choices = choices or CHOICES[key]
    if cfg[key] not in choices:
        raise UserError(f"{key} must be {', '.join(choices[:-1])} or {choices[-1]}, got {cfg[key]!r}")


def parse_value(key: str, value: str, default):
    try:
        if isinstance(default, bool):
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise UserError(f"--{key}={value}: expected {type(default).__name__} like {default!r}") from None
    return value


def validate_model_run(cfg: dict) -> None:
    """The checks of gpt.py's and gpt_.py's keys (rlhf.py and rlhf_heads.py check theirs in their setup)."""
    cfg["compile"] = cfg["compile"].lower()
    for key in ("mode", "compile", "export_format") + (("attn_impl",) if "attn_impl" in cfg else ()):
        check_choice(cfg, key)
    checks = [
        (cfg["n_embd"] % cfg["n_head"] == 0 if cfg["n_head"] > 0 else False,
         f"n_embd ({cfg['n_embd']}) must be divisible by n_head ({cfg['n_head']})"),
        (cfg["n_layer"] >= 1, "n_layer must be at least 1"),
        (cfg["block_size"] >= 1, "block_size must be at least 1"),
        (0 <= cfg["dropout"] < 1, f"dropout must be in [0, 1), got {cfg['dropout']}"),
        (cfg["vocab_size"] >= 256, f"vocab_size must be at least 256 (the byte alphabet), got {cfg['vocab_size']}"),
        (cfg["batch_size"] >= 1 and cfg["grad_accum_steps"] >= 1, "batch_size and grad_accum_steps must be >= 1"),
        (cfg["max_iters"] >= 0 and cfg["max_minutes"] >= 0, "max_iters and max_minutes must be >= 0"),
        (cfg["max_iters"] or cfg["max_minutes"] or cfg["mode"] not in ("auto", "train"),
         "no training limit: set --max_iters=STEPS or --max_minutes=MINUTES (0 means no limit of that kind)"),
        (min(cfg["eval_interval"], cfg["eval_points"], cfg["eval_iters"], cfg["log_interval"]) >= 1,
         "eval_interval, eval_points, eval_iters and log_interval must be >= 1"),
        (cfg["learning_rate"] > 0 and 0 <= cfg["min_lr"] <= cfg["learning_rate"],
         "learning_rate must be > 0 and min_lr in [0, learning_rate]"),
        (cfg["warmup_iters"] >= 0 and (cfg["lr_decay_iters"] == 0 or cfg["lr_decay_iters"] >= cfg["warmup_iters"]),
         "warmup_iters must be >= 0 and lr_decay_iters 0 (the end of the run) or >= warmup_iters"),
        (cfg["temperature"] >= 0, "temperature must be >= 0 (0 = greedy)"),
        (cfg["top_k"] >= 0, "top_k must be >= 0 (0 = off)"),
        (0 < cfg["top_p"] <= 1, "top_p must be in (0, 1]"),
        (cfg["num_samples"] >= 1 and cfg["max_new_tokens"] >= 0, "num_samples must be >= 1, max_new_tokens >= 0"),
        (not (cfg["resume"] and cfg["overwrite"]), "--resume and --overwrite contradict each other"),
    ]
    require(checks)
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
            raise UserError(f"head_mask: {item!r} is not layer.head (example: --head_mask=0.3,2.1)")
        mask.add((int(layer), int(head)))
    return mask


def model_config(cfg: dict, config_class: type):
    """The model's own config (the script's ModelConfig) from the run config's keys of the same names."""
    # fields config.py does not set (GPT-2's GELU, LayerNorm epsilon, untied head: imported models) keep their defaults
    return config_class(**{f.name: cfg[f.name] for f in dataclasses.fields(config_class) if f.name in cfg})


def model_options(cfg: dict, model_class: type) -> dict:
    """The run-time options a model class takes besides its config (gpt_.py: attn_impl, kv_cache)."""
    return {key: cfg[key] for key in model_class.run_options}

