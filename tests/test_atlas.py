"""The head atlas (--mode=heads's <ckpt>.heads.html) in a real headless browser: Chromium from the
system's packages, driven by Selenium (.ci/run installs both)."""
import json
import shutil

import pytest
import torch
from conftest import run_main, tiny_args

import gpt
from dualgpt.checkpoint import load_checkpoint, load_tokenizer_text, model_from_checkpoint
from dualgpt.probes import recording

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
PROMPT = "ROMEO: O my love, my lord"
PATCH = ["--patch_clean=ROMEO: my lord", "--patch_corrupt=JULIET: my lord", "--patch_answers=a|t"]


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


def shown_pattern(driver) -> torch.Tensor:
    """The attention pattern the page shows, read from its cells: (T, T), row = query."""
    cells = driver.execute_script(
        "return [...document.querySelectorAll('#pattern td')].map("
        "td => [+td.dataset.q, +td.dataset.k, +td.dataset.weight])")
    n = max(q for q, _, _ in cells) + 1
    pattern = torch.zeros(n, n, dtype=torch.float64)
    for q, k, w in cells:
        pattern[q, k] = w
    return pattern


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver (apt-get install "
                                                      "chromium chromium-driver; .ci/run installs them)")
def test_the_atlas_page_works_offline_in_a_real_browser_and_shows_the_models_attention(home, corpus):
    """The page loads from file:// with no console error and no network request, has n_layer x n_head cells
    coloured by each score (patching's too, from the patch file of the same checkpoint), clicking two cells
    shows two different patterns, and the weights shown are the model's to 1e-6."""
    args = tiny_args(home, corpus, "--max_iters=10", "--eval_interval=10", "--eval_iters=1",
                     "--probe_sequences=4", n_layer=2)
    assert run_main(args + ["--mode=train"]) == 0
    assert run_main(args + ["--mode=patch", *PATCH]) == 0
    assert run_main(args + ["--mode=heads", f"--prompt={PROMPT}"]) == 0
    out = home / "generate_text"
    report = json.loads((out / "gpt.heads.json").read_text())
    patch = json.loads((out / "gpt.patch.json").read_text())
    page = out / "gpt.heads.html"
    # the model's own attention on the prompt, from the checkpoint (independently of the page's data)
    ckpt_path = str(home / "model_dict" / "gpt.pt")
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(gpt.LBGPT, ckpt, ckpt_path, "cpu").eval()
    ids = load_tokenizer_text(ckpt["tokenizer"]).encode(PROMPT, allowed_special="none")
    with recording(model), torch.no_grad():
        model(torch.tensor([ids]))
        attention = [block.attn.recorded()[0][0].double() for block in model.blocks]

    driver = browser()
    try:
        driver.get(page.as_uri())
        cells = driver.find_elements("css selector", "td.cell[data-layer][data-head]")
        assert sorted((int(c.get_attribute("data-layer")), int(c.get_attribute("data-head"))) for c in cells) \
            == [(layer, head) for layer in range(2) for head in range(2)]
        # every score colours the grid, patching's effect and DLA among them, with the files' values
        options = {o.get_attribute("value") for o in driver.find_elements("css selector", "#score option")}
        assert {"induction", "duplicate_token", "previous_token", "loss_increase", "icl_change",
                "patch_effect", "dla"} <= options
        for key, rows in (("induction", report["heads"]), ("patch_effect", patch["heads"])):
            driver.execute_script("const s = document.getElementById('score'); s.value = arguments[0];"
                                  "s.dispatchEvent(new Event('change'))", key)
            titles = {c.get_attribute("title") for c in driver.find_elements("css selector", "td.cell")}
            value = "effect" if key == "patch_effect" else key
            assert titles == {f"{r['layer']}.{r['head']} {key} = {r[value]}" for r in rows}
        patterns = []
        for layer, head in ((0, 0), (1, 1)):
            driver.find_element("css selector", f'td.cell[data-layer="{layer}"][data-head="{head}"]').click()
            assert driver.find_element("id", "head-title").text.startswith(f"head {layer}.{head}")
            shown = shown_pattern(driver)
            assert shown.shape == (len(ids), len(ids))
            assert (shown - attention[layer][head]).abs().max().item() < 1e-6
            patterns.append(shown)
        assert not torch.allclose(patterns[0], patterns[1])
        # hovering a token colours the others by where it attends
        span = driver.find_elements("css selector", "#tokens span")[3]
        from selenium.webdriver import ActionChains
        ActionChains(driver).move_to_element(span).perform()
        assert "focus" in span.get_attribute("class")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        requests = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
        urls = {r["params"]["request"]["url"] for r in requests if r["method"] == "Network.requestWillBeSent"}
    finally:
        driver.quit()
    assert errors == []
    assert urls <= {page.as_uri()}


def test_the_page_leaves_out_a_patch_file_of_another_run(tmp_path, capsys):
    """A patch file of another checkpoint, iteration, head mask or shape, or an unreadable one, never mixes
    into the page: the page leaves patching out and says so."""
    from dualgpt.atlas import matching_patch
    run = {"checkpoint": "/m/gpt.pt", "iter_num": 10, "head_mask": ""}
    report = dict(run, heads=[{"layer": 0, "head": 0}])
    patch = dict(run, heads=[{"layer": 0, "head": 0, "effect": 0.5, "dla": 0.1}])
    path = tmp_path / "gpt.patch.json"
    assert matching_patch(str(path), report) is None  # none written
    for other in ({"iter_num": 20}, {"checkpoint": "/m/gpt_.pt"}, {"head_mask": "0.1"},
                  {"heads": [{"layer": 1, "head": 3, "effect": 0.5, "dla": 0.1}]},  # another shape
                  {"heads": [{"layer": 0, "head": 0}]}, {"heads": 7}):  # not ours
        path.write_text(json.dumps(dict(patch, **other)))
        assert matching_patch(str(path), report) is None
        assert "leaves patching out" in capsys.readouterr().out
    path.write_text('{"checkpoint": "/m/gp')
    assert matching_patch(str(path), report) is None
    path.write_text(json.dumps(patch))
    assert matching_patch(str(path), report) == patch
