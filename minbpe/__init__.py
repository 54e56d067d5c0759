"""minbpe: byte-level BPE tokenizers (Basic, Regex, GPT-4) with the public minbpe interface."""
from .base import Tokenizer
from .basic import BasicTokenizer
from .regex import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, RegexTokenizer

__all__ = ["Tokenizer", "BasicTokenizer", "RegexTokenizer", "GPT4Tokenizer",
           "GPT2_SPLIT_PATTERN", "GPT4_SPLIT_PATTERN"]


def __getattr__(name: str):
    """GPT4Tokenizer loads on first use: training and sampling never need it."""
    if name == "GPT4Tokenizer":
        from .gpt4 import GPT4Tokenizer
        return GPT4Tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
