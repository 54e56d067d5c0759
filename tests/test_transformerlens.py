"""The probe scores, activation patching and direct logit attribution of the shipped LB-GPT model against
TransformerLens on the same weights: version 4's TransformerBridge boots the model's Hugging Face export
(--export_format=hf) offline, and runs it through transformers' GPT-2, not our code. TransformerLens is no
dependency of the project (`pip install transformer-lens`; 4.3.0 here), so where it is not installed, as in
CI, this file is skipped."""
import json
import os

import pytest
import torch
from conftest import ROOT, run_main

pytest.importorskip("transformer_lens.model_bridge")
from transformer_lens import head_detector, patching  # noqa: E402
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402

import gpt  # noqa: E402
import gpt_  # noqa: E402
from dualgpt.checkpoint import load_checkpoint, load_tokenizer_text, model_from_checkpoint  # noqa: E402
from dualgpt.heads import composition_scores  # noqa: E402
from dualgpt.hooks import hook_names, run_with_cache  # noqa: E402
from dualgpt.probes import probe_scores  # noqa: E402

SHIPPED = os.path.join(ROOT, "model_dict", "shipped", "gpt.pt")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The shipped model's Hugging Face export."""
    folder = tmp_path_factory.mktemp("hf") / "gpt"
    argv = ["--mode=export", "--export_format=hf", f"--ckpt={SHIPPED}", f"--export_to={folder}", "--device=cpu"]
    assert run_main(argv) == 0
    return folder


def boot(folder):
    """TransformerLens on the export, loaded from the folder (no network)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return TransformerBridge.boot_transformers(str(folder), device="cpu")


@pytest.fixture(scope="module")
def bridge(folder):
    return boot(folder)


def test_every_hook_point_is_transformerlens_cache(folder):
    """run_with_cache of both scripts against the bridge's, with TransformerLens's names registered and
    Hugging Face's numerics kept (enable_compatibility_mode(no_processing=True)): every name, same shape."""
    bridge = boot(folder)
    bridge.enable_compatibility_mode(no_processing=True)
    tokens = torch.randint(bridge.cfg.d_vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    _, theirs = bridge.run_with_cache(tokens)
    for model in models():
        _, ours = run_with_cache(model, tokens)
        for name in hook_names(model):
            torch.testing.assert_close(ours[name], theirs[name], atol=1e-4, rtol=0, msg=name)


def test_composition_scores_are_transformerlens(folder):
    """heads.composition_scores against the bridge's all_composition_scores after its default processing
    (enable_compatibility_mode(): LayerNorm folded, weights centred), for Q, K and V."""
    bridge = boot(folder)
    bridge.enable_compatibility_mode()
    for model in models():
        ours = composition_scores(model)
        for kind in "QKV":
            theirs = bridge.all_composition_scores(kind).detach()
            torch.testing.assert_close(ours[kind.lower()], theirs, atol=1e-5, rtol=0)
    later = ours["k"][:-1, :, 1:]  # pairs where the second head is in a later layer, and some not
    assert later.max() - later[later > 0].min() > 1e-2  # scores that differ: not a comparison of constants


def models():
    """The shipped checkpoint in each script's model, in eval mode."""
    ckpt = load_checkpoint(SHIPPED)
    return [model_from_checkpoint(cls, ckpt, SHIPPED, "cpu").eval() for cls in (gpt.LBGPT, gpt_.SMGPT)]


def test_probe_scores_are_transformerlens_head_detector_scores(bridge):
    """TransformerLens's head detector ("mul") scores a head by its attention on the detection pattern over
    all T query rows of a sequence; ours averages over the rows that have a target. On repeated random tokens
    with no accidental repeat, theirs is ours times (rows with a target) / T, for every head."""
    n, length = 8, 24
    gen = torch.Generator().manual_seed(0)
    first = torch.stack([torch.randperm(bridge.cfg.d_vocab, generator=gen)[:1 + length] for _ in range(n)])
    tokens = torch.cat([first, first[:, 1:]], dim=1)  # (n, 49): one token, then 24 twice
    T = tokens.shape[1]
    rows = {"previous_token": T - 1, "duplicate_token": length, "induction": length}
    theirs = {name: torch.zeros(bridge.cfg.n_layers, bridge.cfg.n_heads) for name in rows}
    for seq in tokens:
        _, cache = bridge.run_with_cache(seq[None])
        for name in rows:
            detection = getattr(head_detector, f"get_{name}_head_detection_pattern")(seq[None])
            for layer in range(bridge.cfg.n_layers):
                pattern = cache["pattern", layer, "attn"][0]  # (n_head, T, T)
                for head in range(bridge.cfg.n_heads):
                    theirs[name][layer, head] += head_detector.compute_head_attention_similarity_score(
                        pattern[head], detection, exclude_bos=False, exclude_current_token=False,
                        error_measure="mul") / n
    for model in models():
        ours, _ = probe_scores(model, tokens, length)
        for name, count in rows.items():
            torch.testing.assert_close(ours[name] * count / T, theirs[name], atol=1e-4, rtol=0)
    assert min(score.std() for score in theirs.values()) > 1e-3  # the heads differ: not a comparison of constants


def test_patching_and_direct_logit_attribution_are_transformerlens(bridge, home):
    """--mode=patch on its default prompts for the model against TransformerLens's
    get_act_patch_attn_head_out_all_pos (each
    head's z at every position), get_act_patch_resid_pre (each layer's residual input at each position) and
    the clean cache's stack_head_results with apply_ln (centred, divided by ln_final's scale), through ln_final's
    weight (which the bridge, unlike a HookedTransformer, does not fold into W_U) and the answers' unembedding
    directions."""
    assert run_main(["--mode=patch", f"--ckpt={SHIPPED}", "--device=cpu", "--dtype=float32"]) == 0
    report = json.loads((home / "generate_text" / "gpt.patch.json").read_text())
    tok = load_tokenizer_text(load_checkpoint(SHIPPED)["tokenizer"])
    clean, corrupt = torch.tensor([report["clean_ids"]]), torch.tensor([report["corrupt_ids"]])
    correct, wrong = (tok.encode(text, allowed_special="none")[0] for text in report["answers"])

    def logit_diff(logits):
        return logits[0, -1, correct] - logits[0, -1, wrong]

    clean_logits, clean_cache = bridge.run_with_cache(clean)
    clean_diff, corrupt_diff = logit_diff(clean_logits), logit_diff(bridge(corrupt))
    assert report["clean_logit_diff"] == pytest.approx(clean_diff.item(), abs=1e-4)

    def metric(logits):
        return (logit_diff(logits) - corrupt_diff) / (clean_diff - corrupt_diff)

    heads = patching.get_act_patch_attn_head_out_all_pos(bridge, corrupt, clean_cache, metric)
    residual = patching.get_act_patch_resid_pre(bridge, corrupt, clean_cache, metric)
    ours = torch.tensor([[h["effect"], h["dla"]] for h in report["heads"]])  # layer-major, as TL's labels
    torch.testing.assert_close(ours[:, 0], heads.flatten(), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(report["residual"]), residual, atol=1e-4, rtol=0)
    stack = clean_cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # (n_layer * n_head, 1, C)
    direction = bridge.tokens_to_residual_directions(torch.tensor([correct, wrong]))
    ln_weight = dict(bridge.named_parameters())["transformer.ln_f._original_component.weight"]
    dla = stack[:, 0] @ (ln_weight * (direction[0] - direction[1]))
    torch.testing.assert_close(ours[:, 1], dla, atol=1e-4, rtol=0)
    # not a comparison of zeros: on this task the residual stream carries the answer, a few heads a little
    assert residual.abs().max() > 0.5 and heads.abs().max() > 0.02 and dla.abs().max() > 0.1
