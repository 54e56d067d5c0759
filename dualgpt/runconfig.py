"""The run config: config.py's values, then a config file and --key=value overrides, checked once."""
from __future__ import annotations

import dataclasses
import difflib

import config as default_config
from dualgpt import UserError, repo_path
from dualgpt.runtime import resolve_device, resolve_dtype

MODES = ("auto", "train", "sample", "eval", "heads", "export", "import")
LIMITS = {"max_iters", "max_minutes"}
# the choices config.py's comments list (a | b | c), as validation accepts them (tests check both)
CHOICES = {"device": ("auto", "cpu", "cuda", "cuda:N", "mps"),
           "dtype": ("auto", "float32", "bfloat16", "float16"), "attn_impl": ("sdpa", "matmul"),
           "mode": MODES, "export_format": ("pt", "hf")}


def defaults(module=default_config) -> dict:
    """A config module's settings: its lower-case names of plain values."""
    return {k: v for k, v in vars(module).items()
            if k.islower() and not k.startswith("_") and isinstance(v, (bool, int, float, str))}


def read_config_file(path: str, keys: dict) -> dict:
    """The assignments of a config file, nanoGPT's convention: plain Python that the user names and
    runs (python gpt.py config/gpu.py), each name a key of the program with a value of its type."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        values: dict = {}
        exec(compile(source, path, "exec"), {}, values)  # the user's own file, as nanoGPT runs it
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path} ({e.__class__.__name__})") from None
    except Exception as e:  # a mistake in the file is the user's: one line, never a traceback
        raise UserError(f"config file {path}: {e.__class__.__name__}: {e}") from None
    for key, value in values.items():
        if key not in keys:
            raise UserError(f"config file {path}: unknown config key {key!r}")
        default = keys[key]
        numeric = isinstance(default, float) and type(value) is int
        if type(value) is not type(default) and not numeric:
            raise UserError(f"config file {path}: {key} = {value!r}, expected "
                            f"{type(default).__name__} like {default!r}")
        values[key] = float(value) if numeric else value
    return values


def foreign_key(key: str, program: str, keys: dict, hints: dict, owners: dict) -> str:
    """The message for a key that `program` does not read: who reads it, and what to type instead."""
    hint = f"; {hints[key]}" if key in hints else ""
    if key in owners:
        return f"--{key} is read by {owners[key]}, not by {program}{hint}"
    close = difflib.get_close_matches(key, keys, n=1)
    return f"unknown config key {key!r}" + (f"; did you mean --{close[0]}?" if close else hint)


def load_config(argv: list[str], program: str, keys: dict, usage: str = "",
                presets: dict[str, dict] | None = None, hints: dict | None = None,
                owners: dict | None = None) -> dict:
    """The run config of `python <program> argv...` over `keys` (key -> default). A *.py argument is
    a config file; --help prints usage and the keys. presets: {flag key: values} that replace the
    defaults where the flag is set (rlhf.py's --quick). A key of another program is a one-line error
    naming its owner (owners: key -> programs; hints: key -> what to type instead)."""
    overrides = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage.strip() + f"\n\nconfig keys of {program}:\n"
                  + "\n".join(f"  --{k}={v!r}" for k, v in keys.items()))
            raise SystemExit(0)
        if arg.endswith(".py") and not arg.startswith("--"):
            overrides.update(read_config_file(arg, keys))
            continue
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; use --key=value (or name a config file)")
        key, eq, value = arg[2:].partition("=")
        if key not in keys:
            raise UserError(foreign_key(key, program, keys, hints or {}, owners or {}))
        overrides[key] = parse_value(key, value if eq else "true", keys[key])
    cfg = dict(keys)
    for flag, values in (presets or {}).items():
        if overrides.get(flag, cfg[flag]):
            cfg.update({k: v for k, v in values.items() if k in cfg})
    cfg.update(overrides)
    if LIMITS & overrides.keys():  # a limit the user set is obeyed: the ones not set are off
        cfg.update({key: 0 for key in LIMITS - overrides.keys()})
    cfg["device"] = resolve_device(cfg["device"])
    cfg["dtype"] = resolve_dtype(cfg["dtype"], cfg["device"])
    return cfg


def script_config(argv: list[str], script: str, usage: str = "") -> dict:
    """The checked run config of `python <script>.py argv...` (gpt or gpt_), with its default paths."""
    cfg = load_config(argv, f"{script}.py", defaults(), usage)
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
    """The checks of gpt.py's and gpt_.py's keys (the RLHF layer checks its own)."""
    for key in ("mode", "export_format", "attn_impl"):
        check_choice(cfg, key)
    training = cfg["mode"] in ("auto", "train")
    require([
        (cfg["n_head"] > 0 and cfg["n_embd"] % cfg["n_head"] == 0,
         f"n_embd ({cfg['n_embd']}) must be divisible by n_head ({cfg['n_head']})"),
        (cfg["n_layer"] >= 1, "n_layer must be at least 1"),
        (cfg["block_size"] >= 1, "block_size must be at least 1"),
        (0 <= cfg["dropout"] < 1, f"dropout must be in [0, 1), got {cfg['dropout']}"),
        (cfg["vocab_size"] >= 256,
         f"vocab_size must be at least 256 (the byte alphabet), got {cfg['vocab_size']}"),
        (cfg["batch_size"] >= 1 and cfg["grad_accum_steps"] >= 1,
         "batch_size and grad_accum_steps must be >= 1"),
        (cfg["max_iters"] >= 0 and cfg["max_minutes"] >= 0, "max_iters and max_minutes must be >= 0"),
        (cfg["max_iters"] or cfg["max_minutes"] or not training,
         "no training limit: set --max_iters=STEPS or --max_minutes=MINUTES (0 means no limit of "
         "that kind)"),
        (min(cfg["eval_interval"], cfg["eval_points"], cfg["eval_iters"], cfg["log_interval"]) >= 1,
         "eval_interval, eval_points, eval_iters and log_interval must be >= 1"),
        (cfg["learning_rate"] > 0 and 0 <= cfg["min_lr"] <= cfg["learning_rate"],
         "learning_rate must be > 0 and min_lr in [0, learning_rate]"),
        (cfg["warmup_iters"] >= 0
         and (cfg["lr_decay_iters"] == 0 or cfg["lr_decay_iters"] >= cfg["warmup_iters"]),
         "warmup_iters must be >= 0 and lr_decay_iters 0 (the end of the run) or >= warmup_iters"),
        (cfg["temperature"] >= 0, "temperature must be >= 0 (0 = greedy)"),
        (cfg["top_k"] >= 0, "top_k must be >= 0 (0 = off)"),
        (0 < cfg["top_p"] <= 1, "top_p must be in (0, 1]"),
        (cfg["num_samples"] >= 1 and cfg["max_new_tokens"] >= 0,
         "num_samples must be >= 1, max_new_tokens >= 0"),
        (not (cfg["resume"] and cfg["overwrite"]), "--resume and --overwrite contradict each other"),
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
            raise UserError(f"head_mask: {item!r} is not layer.head (example: --head_mask=0.3,2.1)")
        mask.add((int(layer), int(head)))
    return mask


def model_config(cfg: dict, config_class: type):
    """The model's own config (the script's ModelConfig) from the run config's keys of its names;
    fields config.py lacks (GPT-2's GELU, LayerNorm epsilon, untied head) keep their defaults."""
    names = [f.name for f in dataclasses.fields(config_class)]
    return config_class(**{name: cfg[name] for name in names if name in cfg})


def model_options(cfg: dict, model_class: type) -> dict:
    """The run-time options a model class takes besides its config (gpt_.py: attn_impl, kv_cache)."""
    return {key: cfg[key] for key in model_class.run_options}
