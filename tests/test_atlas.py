"""The head atlas (--mode=heads's <ckpt>.heads.html) in a real headless browser: Chromium from the
system's packages, driven by Selenium (.ci/run installs both)."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_main, tiny_args
from test_hooks import plain_forward

import gpt
from dualgpt.atlas import TEMPLATE, matching_patch
from dualgpt.checkpoint import load_checkpoint, load_tokenizer_text

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
PROMPT = "ROMEO: O my love, my lord"
PATCH = ["--patch_clean=ROMEO: my lord", "--patch_corrupt=JULIET: my lord", "--patch_answers=a|t"]
needs_browser = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver (apt-get "
                                   "install chromium chromium-driver; .ci/run installs them)")


def browser():
    """Headless Chromium that logs the console and every network request, with the network off."""
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))


def rgb(css: str) -> tuple[int, ...]:
    return tuple(int(c) for c in css[css.index("(") + 1:css.index(")")].split(",")[:3])


def on_scale(t: float) -> tuple[int, ...]:
    """docs/heads.md's scale for shares of attention: white at 0 to rgb(8, 48, 107) at 1."""
    return tuple(round(255 - (255 - end) * t) for end in (8, 48, 107))


def drawn_pattern(driver, layer: int, head: int) -> np.ndarray:
    """The attention a small pattern shows, read back from its pixels' red channel: (T, T)."""
    red = driver.execute_script(
        "const c = document.querySelector("
        "  `#patterns canvas[data-layer='${arguments[0]}'][data-head='${arguments[1]}']`);"
        "const px = +c.dataset.px, T = c.width / px, d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "const out = [];"
        "for (let q = 0; q < T; q++) { const row = []; for (let k = 0; k < T; k++) {"
        "  row.push(d[4 * ((q * px + (px >> 1)) * c.width + k * px + (px >> 1))]); } out.push(row); }"
        "return out;", layer, head)
    return np.tril((255 - np.array(red, dtype=float)) / 247)


def choose(driver, select_id: str, value: str) -> None:
    driver.execute_script("const s = document.getElementById(arguments[0]); s.value = arguments[1];"
                          "s.dispatchEvent(new Event('change'))", select_id, value)


def logs(driver, page) -> tuple[list, set]:
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    requests = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    urls = {r["params"]["request"]["url"] for r in requests if r["method"] == "Network.requestWillBeSent"}
    return errors, urls - {page.as_uri()}


@needs_browser
def test_the_atlas_page_works_offline_and_draws_the_models_attention_on_fixed_scales(home, corpus):
    """From file://, with no console error and no network request: n_layer x n_head cells whose colour follows
    each score on its stated scale (shares of attention on the fixed 0-1 one, signed effects symmetric around 0);
    every head's pattern drawn on the input chosen, redrawn when the choice changes, equal to the attention of a
    plain forward on that input; tokens on hover; the residual-patching table with the clean prompt's tokens."""
    args = tiny_args(home, corpus, "--max_iters=10", "--eval_interval=10", "--eval_iters=1",
                     "--probe_sequences=4", n_layer=2)
    assert run_main(args + ["--mode=train"]) == 0
    assert run_main(args + ["--mode=patch", *PATCH]) == 0
    assert run_main(args + ["--mode=heads", f"--prompt={PROMPT}"]) == 0
    out = home / "generate_text"
    report = json.loads((out / "gpt.heads.json").read_text())
    patch = json.loads((out / "gpt.patch.json").read_text())
    page = out / "gpt.heads.html"
    # the attention on each input, by a plain forward from the checkpoint's weights (not the page's data)
    ckpt = load_checkpoint(str(home / "model_dict" / "gpt.pt"))
    cfg = gpt.ModelConfig(**ckpt["model_config"])
    tok = load_tokenizer_text(ckpt["tokenizer"])

    def attention(ids):
        _, cache = plain_forward(ckpt["best_model"], cfg, torch.tensor([ids]))
        return [cache[f"blocks.{layer}.attn.hook_pattern"][0].double().numpy() for layer in range(2)]

    driver = browser()
    try:
        driver.get(page.as_uri())
        cells = driver.find_elements("css selector", "#grid td.cell")
        assert sorted((int(c.get_attribute("data-layer")), int(c.get_attribute("data-head"))) for c in cells) \
            == [(layer, head) for layer in range(2) for head in range(2)]
        assert driver.find_element("id", "mask-note").text == "No head is switched off in this run."
        options = {o.get_attribute("value") for o in driver.find_elements("css selector", "#score option")}
        assert {"induction", "previous_token_text", "loss_increase", "icl_change", "patch_effect", "dla"} <= options
        # a share of attention: the fixed scale, whatever the model's largest
        for key in ("induction", "previous_token_text"):
            choose(driver, "score", key)
            assert "0 to 1, fixed" in driver.find_element("id", "legend-text").text
            for cell in driver.find_elements("css selector", "#grid td.cell"):
                row = next(r for r in report["heads"] if (r["layer"], r["head"]) == (
                    int(cell.get_attribute("data-layer")), int(cell.get_attribute("data-head"))))
                assert cell.get_attribute("title") == f"{row['layer']}.{row['head']} {key} = {row[key]}"
                assert rgb(cell.value_of_css_property("background-color")) == on_scale(row[key])
        # a signed effect: white at 0, the largest size saturated, red above 0 and blue below
        choose(driver, "score", "patch_effect")
        assert "symmetric around 0" in driver.find_element("id", "legend-text").text
        effects = {(p["layer"], p["head"]): p["effect"] for p in patch["heads"]}
        largest = max(abs(v) for v in effects.values())
        for cell in driver.find_elements("css selector", "#grid td.cell"):
            v = effects[int(cell.get_attribute("data-layer")), int(cell.get_attribute("data-head"))]
            fade = round(255 * (1 - abs(v) / largest))
            assert rgb(cell.value_of_css_property("background-color")) == (
                (255, fade, fade) if v >= 0 else (fade, fade, 255))
        # the patterns on each input, redrawn on a switch
        inputs = [o.text for o in driver.find_elements("css selector", "#input option")]
        assert [name.split(" (")[0] for name in inputs] == ["val text", "prompt", "probe", "patch clean",
                                                           "patch corrupt"]
        ids = {"prompt": tok.encode(PROMPT, allowed_special="none"), "patch clean": patch["clean_ids"],
               "patch corrupt": patch["corrupt_ids"]}
        drawn = {}
        for index, name in ((1, "prompt"), (3, "patch clean"), (4, "patch corrupt")):
            choose(driver, "input", str(index))
            expected = attention(ids[name])
            for layer, head in ((0, 0), (1, 1)):
                shown = drawn_pattern(driver, layer, head)
                assert shown.shape == expected[layer][head].shape
                assert np.abs(shown - expected[layer][head]).max() < 0.006  # a pixel's 1/247
            drawn[name] = drawn_pattern(driver, 1, 1)
        assert not np.allclose(drawn["prompt"][:7, :7], drawn["patch clean"][:7, :7])
        # hovering a pattern names its tokens
        choose(driver, "input", "1")
        driver.execute_script(
            "const c = document.querySelector(\"#patterns canvas[data-layer='1'][data-head='1']\");"
            "const r = c.getBoundingClientRect(), px = +c.dataset.px;"
            "c.dispatchEvent(new MouseEvent('mousemove', {clientX: r.left + px * 1.5, clientY: r.top + px * 3.5}))")
        labels = json.loads(driver.execute_script("return JSON.stringify(data.inputs[1].tokens)"))
        assert driver.find_element("id", "hover").text.startswith(
            f"head 1.1: query 3 {json.dumps(labels[3])} -> key 1 {json.dumps(labels[1])}: ")
        # a head's details, on the chosen input
        driver.find_element("css selector", '#grid td.cell[data-layer="1"][data-head="0"]').click()
        assert driver.find_element("id", "head-title").text.startswith("head 1.0")
        cells = driver.execute_script("return [...document.querySelectorAll('#pattern td')].map("
                                      "td => [+td.dataset.q, +td.dataset.k, +td.dataset.weight])")
        shown = np.zeros((len(ids["prompt"]),) * 2)
        for q, k, w in cells:
            shown[q, k] = w
        assert np.abs(shown - attention(ids["prompt"])[1][0]).max() < 1e-4
        # patching the residual stream, with the clean prompt's tokens
        header = driver.execute_script(
            "return [...document.querySelectorAll('#residual thead th')].slice(1).map(th => th.textContent)")
        assert header == patch["clean_tokens"]
        values = driver.execute_script("return [...document.querySelectorAll('#residual td')].map("
                                       "td => [+td.dataset.layer, +td.dataset.position, +td.dataset.value])")
        assert {(l, p): v for l, p, v in values} == {(l, p): v for l, row in enumerate(patch["residual"])
                                                     for p, v in enumerate(row)}
        errors, requests = logs(driver, page)
    finally:
        driver.quit()
    assert errors == [] and requests == set()


@needs_browser
def test_a_masked_runs_page_states_its_mask_and_draws_its_heads_masked(home, corpus, monkeypatch):
    from matplotlib.figure import Figure
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: None)
    args = tiny_args(home, corpus, "--max_iters=4", "--eval_interval=4", "--eval_iters=1", "--probe_sequences=4",
                     n_layer=2)
    assert run_main(args + ["--mode=train"]) == 0
    assert run_main(args + ["--mode=heads", "--head_mask=0.1"]) == 0
    page = home / "generate_text" / "gpt.masked-0.1.heads.html"
    driver = browser()
    try:
        driver.get(page.as_uri())
        assert driver.find_element("id", "mask-note").text.startswith(
            "Heads switched off in this run (--head_mask): 0.1.")
        cell = driver.find_element("css selector", '#grid td.cell[data-layer="0"][data-head="1"]')
        assert "masked" in cell.get_attribute("class") and cell.text == "masked"
        masked = driver.find_elements("css selector", "#patterns canvas.masked")
        assert [(c.get_attribute("data-layer"), c.get_attribute("data-head")) for c in masked] == [("0", "1")]
        cell.click()
        assert driver.find_element("id", "head-title").text == "head 0.1 (masked)"
        errors, requests = logs(driver, page)
    finally:
        driver.quit()
    assert errors == [] and requests == set()


@needs_browser
def test_the_template_opened_directly_says_what_it_is():
    from pathlib import Path
    page = Path(TEMPLATE)
    driver = browser()
    try:
        driver.get(page.as_uri())
        assert "template of the head atlas" in driver.find_element("id", "summary").text
        assert not driver.find_element("id", "atlas").is_displayed()
        errors, _ = logs(driver, page)
    finally:
        driver.quit()
    assert errors == []


def test_the_page_leaves_out_a_patch_file_of_another_run(tmp_path, capsys):
    """A patch file of another checkpoint, iteration, head mask or shape, or an unreadable one, never mixes
    into the page: the page leaves patching out and says so."""
    run = {"checkpoint": "/m/gpt.pt", "iter_num": 10, "head_mask": ""}
    patch = dict(run, heads=[{"layer": 0, "head": 0, "effect": 0.5, "dla": 0.1}], clean_ids=[1, 2],
                 clean_tokens=["a", "b"])
    path = tmp_path / "gpt.patch.json"
    assert matching_patch(str(path), run, 1, 1) is None  # none written
    for other in ({"iter_num": 20}, {"checkpoint": "/m/gpt_.pt"}, {"head_mask": "0.1"},
                  {"heads": [{"layer": 1, "head": 3, "effect": 0.5, "dla": 0.1}]},  # another shape
                  {"heads": [{"layer": 0, "head": 0}]}, {"heads": 7}, {"clean_tokens": ["a"]}):  # not ours
        path.write_text(json.dumps(dict(patch, **other)))
        assert matching_patch(str(path), run, 1, 1) is None
        assert "leaves patching out" in capsys.readouterr().out
    path.write_text('{"checkpoint": "/m/gp')
    assert matching_patch(str(path), run, 1, 1) is None
    path.write_text(json.dumps(patch))
    assert matching_patch(str(path), run, 1, 1) == patch
