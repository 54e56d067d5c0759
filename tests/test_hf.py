"""GPT-2's Hugging Face format both ways, proven against the real libraries without downloads: randomly
initialised transformers GPT-2 models of a few shapes imported into both scripts give transformers' own logits;
models exported from here load in transformers and tokenizers with the same logits and token ids; tokenizer
files of a byte-level BPE trained by the tokenizers library encode and decode as that library does."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, copy_code, run_main, tiny_args

import gpt
import gpt_
from dualgpt import UserError
from dualgpt.checkpoint import load_checkpoint, load_tokenizer_text, model_from_checkpoint
from dualgpt.tokenizer_files import tokenizer_from_files, tokenizer_json
from rlhf.study import complete, load_policy, rlhf_run_config, sample_prompts, setup
from minbpe import RegexTokenizer

# transformers takes seconds to import: its tests import it themselves and share one xdist worker, so
# the other workers never load it
pytestmark = pytest.mark.xdist_group("huggingface")

TEXTS = ["ROMEO:\nBut soft, what light through yonder window breaks?", "  Café  naïve, 1234567 and 89\t\tx\n\n\nend",
         "Oh!!! 'TIS the <|endoftext|> of it... ünïcödé 東京 🙂", "   \n \n\t  trailing spaces   "]
SCRIPTS = [("gpt", gpt.LBGPT), ("gpt_", gpt_.SMGPT)]


@pytest.fixture(scope="session")
def bpe_folder(tmp_path_factory):
    """A byte-level BPE (GPT-2's pre-tokenizer, all 256 bytes, 400 tokens, <|endoftext|> first) trained by the
    tokenizers library on Tiny Shakespeare's first 200 kB: tokenizer.json, vocab.json and merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    folder = tmp_path_factory.mktemp("bpe")
    with open(os.path.join(ROOT, "data", "input.txt"), encoding="utf-8") as f:
        text = f.read()[:200_000]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer.model.save(str(folder))
    return folder


def their_ids(tok, reference) -> list[int]:
    """For each of our token ids, the reference's id of the same token (its bytes in GPT-2's byte-to-unicode
    text, or the special token's text): an independent map, from transformers' own table."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    table = bytes_to_unicode()
    return [reference.token_to_id(tok.inverse_special_tokens[i] if i in tok.inverse_special_tokens
                                  else "".join(table[b] for b in tok.vocab[i])) for i in range(len(tok.vocab))]


@pytest.mark.parametrize("files", ["vocab.json + merges.txt", "tokenizer.json"])
def test_our_reader_of_their_tokenizer_files_encodes_and_decodes_as_they_do(bpe_folder, tmp_path, files):
    from tokenizers import Tokenizer
    keep = ["vocab.json", "merges.txt"] if files.startswith("vocab") else ["tokenizer.json"]
    for name in keep:
        shutil.copy(bpe_folder / name, tmp_path / name)
    ours, theirs = tokenizer_from_files(str(tmp_path))
    reference = Tokenizer.from_file(str(bpe_folder / "tokenizer.json"))
    assert [theirs[i] for i in range(len(ours.vocab))] == their_ids(ours, reference)
    for text in TEXTS:
        ids = ours.encode(text, allowed_special="all")
        assert [theirs[i] for i in ids] == reference.encode(text).ids, text
        assert ours.decode(ids) == reference.decode(reference.encode(text).ids, skip_special_tokens=False) == text


def test_the_tokenizer_json_we_write_encodes_as_minbpe():
    """The shipped 8192-token tokenizer (GPT-4's split pattern) as tokenizer.json, read by the tokenizers library."""
    from tokenizers import Tokenizer
    shipped = os.path.join(ROOT, "tokenizers", "shipped")
    model = next(name for name in sorted(os.listdir(shipped)) if name.endswith(".model"))
    with open(os.path.join(shipped, model), encoding="utf-8") as f:
        ours = load_tokenizer_text(f.read())
    ours.register_special_tokens({"<|endoftext|>": len(ours.vocab)})
    theirs = Tokenizer.from_str(json.dumps(tokenizer_json(ours)))
    with open(os.path.join(ROOT, "data", "input.txt"), encoding="utf-8") as f:
        shakespeare = f.read()  # the whole of Tiny Shakespeare
    for text in TEXTS + [shakespeare]:
        ids = ours.encode(text, allowed_special="all")
        assert theirs.encode(text).ids == ids
        assert theirs.decode(ids, skip_special_tokens=False) == text


SHAPES = {  # (layers, heads, width, positions, activation, tied, weights file): head sizes 8, 7 and 4
    "3 heads of 8, tanh GELU": (2, 3, 24, 16, "gelu_new", True, "safetensors"),
    "5 heads of 7, exact GELU": (1, 5, 35, 12, "gelu", True, "safetensors"),
    "4 heads of 4, untied, .bin": (2, 4, 16, 16, "gelu_new", False, "bin"),
}


def hf_model(folder, bpe_folder, shape):
    """A random transformers GPT-2 of `shape` (LayerNorms random too), saved with save_pretrained beside the
    tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel
    n_layer, n_head, n_embd, n_positions, activation, tied, weights = shape
    config = GPT2Config(vocab_size=400, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        activation_function=activation, tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(n_embd)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    model.save_pretrained(folder, safe_serialization=weights == "safetensors")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bpe_folder / name, folder / name)
    return model


@pytest.mark.parametrize("shape", list(SHAPES))
def test_an_imported_gpt2_is_the_same_function_in_both_scripts(bpe_folder, home, tmp_path, shape):
    from tokenizers import Tokenizer
    folder = tmp_path / "hf"
    reference = hf_model(folder, bpe_folder, SHAPES[shape])
    hf_tokenizer = Tokenizer.from_file(str(bpe_folder / "tokenizer.json"))
    for script, cls in SCRIPTS:
        ckpt_path = home / f"{script}.pt"
        assert run_main([f"--import_from={folder}", "--mode=import", f"--ckpt={ckpt_path}", "--device=cpu"], cls,
                        script) == 0
        ckpt = load_checkpoint(str(ckpt_path))
        model = model_from_checkpoint(cls, ckpt, str(ckpt_path), "cpu").eval()
        tok = load_tokenizer_text(ckpt["tokenizer"])
        order = their_ids(tok, hf_tokenizer)
        for text in TEXTS:
            ids = tok.encode(text, allowed_special="all")[:model.config.block_size]
            with torch.no_grad():
                ours = model(torch.tensor([ids]))[0][0]
                theirs = reference(torch.tensor([[order[i] for i in ids]])).logits[0][:, order]
            assert (ours - theirs).abs().max().item() < 1e-4, (script, text)


def test_a_model_name_is_read_through_huggingface_hub_here_from_its_cache(bpe_folder, home, tmp_path):
    """The hub path as far as it goes with no network: `--import_from=someone/tiny-gpt2` through the real command
    line, with huggingface_hub offline (HF_HUB_OFFLINE=1, as on a machine without network) and the model in the
    hub's own cache layout, gives the checkpoint that its folder gives; a name the cache lacks is one line. The
    download itself stays untested: nothing here reaches the hub."""
    hub = tmp_path / "hub" / "models--someone--tiny-gpt2"
    hf_model(hub / "snapshots" / ("a" * 40), bpe_folder, SHAPES["3 heads of 8, tanh GELU"])
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("a" * 40)
    copy_code(home)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "gpt.py", "--mode=import", "--import_from=someone/tiny-gpt2",
                             f"--ckpt={home / 'named.pt'}"], cwd=home, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert run_main(["--mode=import", f"--import_from={hub / 'snapshots' / ('a' * 40)}", f"--ckpt={home / 'folder.pt'}"]) == 0
    named, folder = (load_checkpoint(str(home / name)) for name in ("named.pt", "folder.pt"))
    assert named["tokenizer"] == folder["tokenizer"] and named["model"].keys() == folder["model"].keys()
    assert all(torch.equal(named["model"][key], folder["model"][key]) for key in folder["model"])
    result = subprocess.run([sys.executable, "gpt.py", "--mode=import", "--import_from=someone/missing",
                             f"--ckpt={home / 'missing.pt'}"], cwd=home, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and result.stderr == ("error: could not download someone/missing from the Hugging "
                                                        "Face hub (LocalEntryNotFoundError)\n")
    assert not (home / "missing.pt").exists()


def test_every_mode_works_on_an_imported_checkpoint(bpe_folder, home, corpus, tmp_path, capsys):
    """Through the real command line: import; then sample, eval on --data, --mode=heads with a head switched off,
    and the imported model as the base of RLHF."""
    folder = tmp_path / "hf"
    hf_model(folder, bpe_folder, SHAPES["3 heads of 8, tanh GELU"])
    copy_code(home)
    ckpt = home / "model_dict" / "imported.pt"
    common = [f"--ckpt={ckpt}", "--device=cpu", "--dtype=float32", f"--data={corpus}"]
    result = subprocess.run([sys.executable, "gpt.py", "--mode=import", f"--import_from={folder}", *common], cwd=home,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout and "(LB-GPT)" in result.stdout
    for mode in (["--mode=sample", "--max_new_tokens=8", "--prompt=ROMEO:"], ["--mode=eval"],
                 ["--mode=heads", "--head_mask=0.1", "--prompt=ROMEO: But soft"]):
        assert run_main(common + mode) == 0, mode
    out = capsys.readouterr().out
    assert "val loss" in out and "ROMEO:" in out
    # and as the base of RLHF: completions of prompts of the data, in its tokens
    s = setup(rlhf_run_config([f"--rlhf_base={ckpt}", f"--data={corpus}", "--prompt_tokens=4", "--completion_tokens=4",
                                "--rlhf_script=gpt", "--device=cpu", "--dtype=float32"], "python -m rlhf", "", {}))
    gen = torch.Generator().manual_seed(0)
    assert complete(s, load_policy(s), sample_prompts(s, "train", 3, gen), gen).shape == (3, 4)
    capsys.readouterr()
    assert run_main(["--mode=import", f"--import_from={folder}", *common]) == 2  # never over a checkpoint
    assert capsys.readouterr().err == f"error: {ckpt} exists; import into another --ckpt, or pass --overwrite to replace it\n"
    before = ckpt.read_bytes()  # unless asked, and then the old one is kept as .bak, as training keeps it
    assert run_main(["--mode=import", f"--import_from={folder}", "--overwrite", *common]) == 0
    assert (home / "model_dict" / "imported.pt.bak").read_bytes() == before


@pytest.mark.parametrize("source", ["imported GPT-2", "imported untied GPT-2", "trained here"])
def test_an_exported_model_loads_in_transformers_with_the_same_logits_and_token_ids(bpe_folder, home, corpus, tmp_path,
                                                                                    source, capsys):
    """An imported GPT-2 (biases, tanh GELU, GPT-2's split) and a model trained here (no biases, exact GELU, GPT-4's
    split), exported: GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained agree with ours."""
    from transformers import AutoTokenizer, GPT2LMHeadModel
    if source == "trained here":
        args = tiny_args(home, corpus, "--max_iters=4", "--eval_interval=4", "--mode=train", script="gpt_", n_layer=2)
        assert run_main(args, gpt_.SMGPT, "gpt_") == 0
        ckpt_path = home / "model_dict" / "gpt_.pt"
    else:
        hf_model(tmp_path / "hf", bpe_folder, SHAPES["4 heads of 4, untied, .bin" if "untied" in source
                                                     else "3 heads of 8, tanh GELU"])
        ckpt_path = home / "imported.pt"
        assert run_main(["--mode=import", f"--import_from={tmp_path / 'hf'}", f"--ckpt={ckpt_path}"], gpt_.SMGPT,
                        "gpt_") == 0
    out = tmp_path / "exported"
    assert run_main([f"--ckpt={ckpt_path}", "--mode=export", "--export_format=hf", f"--export_to={out}",
                     "--device=cpu"], gpt_.SMGPT, "gpt_") == 0
    ckpt = load_checkpoint(str(ckpt_path))
    model = model_from_checkpoint(gpt_.SMGPT, ckpt, str(ckpt_path), "cpu").eval()
    tok = load_tokenizer_text(ckpt["tokenizer"])
    theirs, their_tokenizer = GPT2LMHeadModel.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    for text in TEXTS[:2] + TEXTS[3:]:  # (the tiny model's tokenizer has no <|endoftext|>)
        ids = tok.encode(text)
        assert their_tokenizer(text)["input_ids"] == ids
        ids = ids[:model.config.block_size]
        with torch.no_grad():
            assert (model(torch.tensor([ids]))[0][0] - theirs(torch.tensor([ids])).logits[0]).abs().max() < 1e-4
    assert theirs.config.tie_word_embeddings == ("untied" not in source)
    # a second export into the same folder, or one with a head switched off, is one line
    for extra, message in (([], "exists and is not an empty folder"),
                           (["--head_mask=0.0", "--overwrite"], "--head_mask switches heads off")):
        capsys.readouterr()
        assert run_main([f"--ckpt={ckpt_path}", "--mode=export", "--export_format=hf", f"--export_to={out}", *extra],
                        gpt_.SMGPT, "gpt_") == 2
        assert message in capsys.readouterr().err


def edit_config(**change):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(config, **change)))
    return edit


BAD_FOLDERS = {
    "another model": (edit_config(model_type="llama"), "model_type 'llama', not gpt2"),
    "another MLP": (edit_config(n_inner=50), "n_inner 50 (ours is 4 x n_embd)"),
    "another activation": (edit_config(activation_function="relu"), "activation 'relu'"),
    "heads that do not divide the width": (edit_config(n_head=5), "n_embd is not a multiple of n_head"),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{n_embd: 24"), "not a GPT-2 folder this can read"),
    "weights cut short": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:500]),
                          "model.safetensors is not readable"),
    "a normalizer": (lambda f: (f / "tokenizer.json").write_text(json.dumps(dict(
        json.loads((f / "tokenizer.json").read_text()), normalizer={"type": "Lowercase"}))), "a Lowercase normalizer"),
}


@pytest.mark.parametrize("bad", list(BAD_FOLDERS))
def test_a_folder_that_is_not_gpt2_is_one_line(bpe_folder, home, tmp_path, capsys, bad):
    folder = tmp_path / "hf"
    hf_model(folder, bpe_folder, SHAPES["3 heads of 8, tanh GELU"])
    shutil.copy(bpe_folder / "tokenizer.json", folder / "tokenizer.json")
    damage, message = BAD_FOLDERS[bad]
    damage(folder)
    capsys.readouterr()  # (transformers' own progress bar)
    assert run_main(["--mode=import", f"--import_from={folder}", f"--ckpt={home / 'x.pt'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (home / "x.pt").exists()


def test_without_safetensors_import_and_export_say_what_to_install_in_one_line(bpe_folder, home, tmp_path, monkeypatch,
                                                                            capsys):
    folder = tmp_path / "hf"
    hf_model(folder, bpe_folder, SHAPES["3 heads of 8, tanh GELU"])
    shipped = os.path.join(ROOT, "model_dict", "shipped", "gpt_.pt")
    for name in ("safetensors", "safetensors.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # not installed
    capsys.readouterr()
    for argv in (["--mode=import", f"--import_from={folder}", f"--ckpt={home / 'x.pt'}"],
                 ["--mode=export", "--export_format=hf", f"--ckpt={shipped}", f"--export_to={tmp_path / 'out'}"]):
        assert run_main(argv, gpt_.SMGPT, "gpt_") == 2
        assert capsys.readouterr().err == "error: this needs the safetensors package: pip install safetensors\n"
    assert not (home / "x.pt").exists() and not (tmp_path / "out").exists()


def test_a_tokenizer_with_two_tokens_of_the_same_bytes_is_not_written_as_tokenizer_files():
    tok = RegexTokenizer()
    tok.merges = {(97, 98): 256, (98, 99): 257, (256, 99): 258, (97, 257): 259}  # "abc" twice: ab+c, a+bc
    tok.vocab = tok._build_vocab()
    with pytest.raises(UserError, match="tokens 258 and 259 .* the same bytes"):
        tokenizer_json(tok)
