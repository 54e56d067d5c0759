"""minbpe: byte-level BPE tokenizers (Basic, Regex, GPT-4) with the public minbpe interface."""
from .base import Tokenizer
from .basic import BasicTokenizer
from .gpt4 import GPT4Tokenizer
from .regex import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, RegexTokenizer

__all__ = ["Tokenizer", "BasicTokenizer", "RegexTokenizer", "GPT4Tokenizer",
           "GPT2_SPLIT_PATTERN", "GPT4_SPLIT_PATTERN"]
