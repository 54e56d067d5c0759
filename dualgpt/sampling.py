"""Sampling (--mode=sample): next-token logits (with gpt_.py's KV cache where the model has
one), top-k and top-p, stop strings."""
from __future__ import annotations

import codecs
import json
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from dualgpt import UserError
from dualgpt.checkpoint import checkpoint_model, load_tokenizer_text
from dualgpt.files import write_text
from dualgpt.runtime import autocast


class NextTokenLogits:
    """Called with the ids so far (B, T), returns the logits of the next token (B, vocab).

    With the model's KV cache (gpt_.py) the first call reads the prompt and each later call only
    the newest token. Positions are learned and absolute, so once the sequence outgrows block_size
    the window slides and every cached key and value (computed at its old position) is stale: each
    such step re-reads the last block_size tokens, as sampling without a cache does."""

    def __init__(self, model: nn.Module):
        self.model, self.cache = model, None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        T, block_size = ids.shape[1], self.model.config.block_size
        if T > block_size:
            self.cache = None
            logits, _ = self.model(ids[:, -block_size:])
        elif self.cache is not None and self.cache.length == T - 1:
            logits, _ = self.model(ids[:, -1:], cache=self.cache)
        else:
            self.cache = self.model.new_kv_cache()  # None for LB-GPT: a plain forward pass
            logits, _ = self.model(ids, **({} if self.cache is None else {"cache": self.cache}))
        return logits[:, -1, :]


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the top-p nucleus."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop the tokens whose more likely ones already reach top_p: the one that crosses it stays
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None):
    """Yield max_new_tokens next-token tensors (B,) continuing ids (B, T)."""
    model.eval()
    next_token_logits = NextTokenLogits(model)
    for _ in range(max_new_tokens):
        logits = next_token_logits(ids).float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        yield nxt


def stop_strings(spec: str) -> list[str]:
    """--stop: strings separated by |, where \\n is a newline, \\t a tab, \\| a | and \\\\ a
    backslash."""
    escapes = {"n": "\n", "t": "\t", "|": "\x00", "\\": "\\"}  # an escaped | is no separator
    text = re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), m.group(0)), spec)
    return [part.replace("\x00", "|") for part in text.split("|") if part]


class StopAt:
    """Streamed text cut before the first occurrence of any stop string. What could still turn out
    to be the start of one is held back, so that nothing of a stop string is ever printed."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.shown, self.done = stops, "", 0, False

    def feed(self, piece: str) -> str:
        """The text that is now safe to show; sets done once a stop string has appeared."""
        self.text += piece
        found = [i for i in (self.text.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.text, self.done = self.text[:min(found)], True
            end = len(self.text)
        else:  # the last len(longest) - 1 characters may be the start of a stop string
            end = max(self.shown, len(self.text) - max(map(len, self.stops), default=1) + 1)
        shown, self.shown = self.text[self.shown:end], end
        return shown

    def rest(self) -> str:
        """What was held back when the sample ended without a stop string."""
        shown, self.shown = self.text[self.shown:], len(self.text)
        return shown


def read_prompt(prompt: str) -> str:
    """The prompt: as given, or a file's contents for FILE:path; empty starts from a newline."""
    if prompt.startswith("FILE:"):
        try:
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {prompt[5:]} "
                            f"({e.__class__.__name__})") from None
    return prompt or "\n"


def sample(model_class: type[nn.Module], cfg: dict) -> list[str]:
    """--mode=sample: stream num_samples continuations of the prompt (each ended before the first
    of the --stop strings, if one comes) and write them to sample_file."""
    ckpt, model = checkpoint_model(model_class, cfg)
    tok = load_tokenizer_text(ckpt["tokenizer"])
    prompt = read_prompt(cfg["prompt"])
    prompt_ids = tok.encode(prompt, allowed_special="none")
    if len(prompt_ids) > model.config.block_size:  # the model reads a window of block_size tokens
        print(f"note: the prompt is {len(prompt_ids)} tokens; the model reads its last "
              f"{model.config.block_size}")
        prompt_ids = prompt_ids[-model.config.block_size:]
    gen = torch.Generator(device=cfg["device"]).manual_seed(cfg["seed"])
    settings = {k: cfg[k] for k in ("temperature", "top_k", "top_p", "max_new_tokens", "seed",
                                    "stop", "dtype")}
    header = (f"# {cfg['script']}.py samples from {cfg['ckpt']} (iteration {ckpt['iter_num']}, "
              f"val loss {ckpt.get('best_val_loss', float('nan')):.4f}); {json.dumps(settings)}\n")
    samples, stops = [], stop_strings(cfg["stop"])
    for i in range(cfg["num_samples"]):
        print(f"--- sample {i + 1}/{cfg['num_samples']} ---")
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a token may split a char
        print(prompt, end="", flush=True)
        continuation = StopAt(stops)  # the generated text: the prompt never ends a sample
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=cfg["device"])
        with autocast(cfg["device"], cfg["dtype"]):
            for nxt in generate(model, ids, cfg["max_new_tokens"], cfg["temperature"],
                                cfg["top_k"], cfg["top_p"], gen):
                print(continuation.feed(utf8.decode(tok.vocab[int(nxt[0])])), end="", flush=True)
                if continuation.done:
                    break
        if not continuation.done:
            print(continuation.feed(utf8.decode(b"", final=True)) + continuation.rest(), end="")
        print()
        samples.append(prompt + continuation.text)
    write_text(cfg["sample_file"], header + "".join(f"\n--- sample {i + 1} ---\n{s}\n"
                                                    for i, s in enumerate(samples)))
    print(f"samples written to {cfg['sample_file']}")
    return samples
