"""The labeling page in headless Chromium: rank, score, correct, reload and resume, survive a killed
server, export; then the reward stage trains on the export.

Needs Debian's chromium (`apt-get install -y chromium`, as .ci/run does) and Playwright for Python;
never `playwright install`. LABELING_SCREENSHOT=docs/img/labeling.png also writes the docs screenshot.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from test_labeling import start_server

from pipeline.labeling.store import LabelStore

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = "<script>alert(1)</script>"
BOLD = "<b>x</b>"
LABELER = "bo"  # its display order of prompt 1 does not start with the best response
PROMPTS = [
    {"prompt": "Repeat: alpha bravo", "responses": ["alpha bravo", "alpha", XSS, BOLD]},
    {"prompt": "Repeat: kilo lima\n(keep the words)", "responses": ["kilo", "KILO LIMA NO", "lima kilo"]},
    {"prompt": "Repeat: echo", "responses": ["echo", "ECHO NO", "echo echo"]},
    {"prompt": "Repeat: zulu", "responses": ["zulu", "ZULU"]},
]

if os.environ.get("CI"):  # .ci/run installs both: a missing one there is a failure, not a skip
    import playwright.sync_api as playwright_api

    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}; .ci/run installs Debian's chromium"
else:
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium", allow_module_level=True)


def order(page) -> list[int]:
    """Responses as the page ranks them, best first."""
    return [int(r) for r in page.locator("#responses > li").evaluate_all("els => els.map(e => e.dataset.response)")]


def test_label_reload_resume_export_and_train_reward(base_model, tmp_path):
    given = tmp_path / "given.jsonl"
    given.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    session = tmp_path / "session"
    proc, url = start_server(session, "--prompts", str(given), "--labeler", LABELER)
    expect = playwright_api.expect
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            dialogs, errors = [], []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]")
            expect(page.locator("#progress-text")).to_have_text("0 / 4 done")
            expect(page.locator("#prompt")).to_have_text(PROMPTS[0]["prompt"])

            # model text is text: shown literally, never parsed
            assert page.locator('li[data-response="2"] .response-text').text_content() == XSS
            assert page.locator('li[data-response="3"] .response-text').text_content() == BOLD
            assert page.evaluate("document.querySelectorAll('b').length") == 0
            assert page.evaluate("document.querySelectorAll('script').length") == 1  # only /static/app.js

            # prompt 1: drag the best to the top, order the rest with the buttons, tie the last two
            assert order(page)[0] != 0  # the page shuffles the display order (fixed per labeler and prompt)
            page.locator('li[data-response="0"]').drag_to(page.locator("#responses > li").first)
            assert order(page)[0] == 0
            for pos, r in enumerate([0, 1, 2, 3]):
                while order(page).index(r) > pos:
                    page.locator(f'li[data-response="{r}"] button.up').click()
            assert order(page) == [0, 1, 2, 3]
            page.locator('li[data-response="3"] .response-text').click()
            page.keyboard.press("t")
            expect(page.locator('li[data-response="3"] .rank')).to_have_text("#3 (tie)")
            page.locator('li[data-response="0"] .response-text').click()
            for key in "5422":  # scores, selection moving down after each
                page.keyboard.press(key)
            page.keyboard.press("e")  # a correction starting from the selected response's text
            page.keyboard.press("Control+a")
            page.keyboard.type("alpha bravo.")
            page.keyboard.press("Escape")
            page.keyboard.press("Enter")
            expect(page.locator("#progress-text")).to_have_text("1 / 4 done")
            expect(page.locator("#position")).to_have_text("prompt 2 of 4")

            # prompt 2: all bad, with a correction (Ctrl+Enter saves from the text box)
            page.keyboard.press("b")
            page.keyboard.press("c")
            page.keyboard.type("kilo lima")
            page.keyboard.press("Control+Enter")
            expect(page.locator("#progress-text")).to_have_text("2 / 4 done")
            expect(page.locator("#position")).to_have_text("prompt 3 of 4")

            # prompt 3: scores only, then "order by scores" (equal scores tie)
            shown = order(page)
            for key in "313":
                page.keyboard.press(key)
            page.keyboard.press("o")
            page.keyboard.press("Enter")
            expect(page.locator("#progress-text")).to_have_text("3 / 4 done")
            expect(page.locator("#position")).to_have_text("prompt 4 of 4")

            scores3 = [None] * 3
            for r, s in zip(shown, (3.0, 1.0, 3.0)):
                scores3[r] = s
            ranks3 = [0 if s == 3.0 else 1 for s in scores3]
            expected = {
                "s00000": {"ranks": [0, 1, 2, 2], "scores": [5.0, 4.0, 2.0, 2.0], "all_bad": False,
                           "correction": "alpha bravo."},
                "s00001": {"ranks": None, "scores": None, "all_bad": True, "correction": "kilo lima"},
                "s00002": {"ranks": ranks3, "scores": scores3, "all_bad": False, "correction": None},
            }

            def saved_on_disk() -> dict:
                keys = ("ranks", "scores", "all_bad", "correction")
                return {i: {k: j[k] for k in keys} for (i, who), j in LabelStore(session).latest().items() if who == LABELER}

            assert saved_on_disk() == expected

            # reload: the page comes back where it was, and earlier prompts show what was saved
            page.reload()
            page.wait_for_selector("body[data-ready=true]")
            expect(page.locator("#position")).to_have_text("prompt 4 of 4")
            expect(page.locator("#progress-text")).to_have_text("3 / 4 done")
            page.keyboard.press("p")
            expect(page.locator("#position")).to_have_text("prompt 3 of 4")
            expect(page.locator("#ranking-state")).to_have_text("(ranking set)")
            expect(page.locator(f'li[data-response="{shown[1]}"] button[data-score="1"]')).to_have_attribute("aria-pressed", "true")
            assert order(page)[-1] == shown[1]
            page.keyboard.press("p")
            expect(page.locator("#all-bad")).to_be_checked()
            expect(page.locator("#correction")).to_have_value("kilo lima")
            page.keyboard.press("p")
            expect(page.locator("#position")).to_have_text("prompt 1 of 4")  # prompt 2 is saved too: wait for 1
            expect(page.locator("#saved-badge")).to_be_visible()
            assert order(page) == [0, 1, 2, 3]
            expect(page.locator('li[data-response="3"] .rank')).to_have_text("#3 (tie)")
            expect(page.locator('li[data-response="0"] button[data-score="5"]')).to_have_attribute("aria-pressed", "true")
            expect(page.locator("#correction")).to_have_value("alpha bravo.")
            page.locator('li[data-response="1"] .response-text').click()
            shot = Path(os.environ.get("LABELING_SCREENSHOT") or tmp_path / "labeling.png")
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

            # kill -9 the server: nothing acknowledged is lost; a new server resumes at the first open prompt
            proc.kill()
            proc.wait(timeout=10)
            assert saved_on_disk() == expected
            proc, url = start_server(session, "--labeler", LABELER)
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]")
            expect(page.locator("#position")).to_have_text("prompt 4 of 4")
            expect(page.locator("#progress-text")).to_have_text("3 / 4 done")

            page.locator("#export").click()
            expect(page.locator("#status")).to_contain_text("Exported to", timeout=60_000)
            assert dialogs == [] and errors == []
            browser.close()
    finally:
        proc.kill()
        proc.wait(timeout=10)

    export = session / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["stage"] == "label" and manifest["outputs"] == ["pairs", "rankings", "ratings", "sft"]
    assert manifest["metrics"]["rows"]["rankings"] == {"train": 2, "validation": 1}

    # the reward stage trains on the exported rankings, and its model loads
    recipe = tmp_path / "reward.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "seed": 1, "model": {"attention": "sdpa"},
                                      "stages": {"reward": {
                                          "inputs": {"model": str(base_model), "data": str(export / "rankings")},
                                          "max_steps": 3, "max_length": 64, "micro_batch_size": 2, "warmup_steps": 1,
                                          "learning_rate": 1e-3, "eval_every": 1000, "save_every": 1000,
                                          "log_every": 1, "eval_batches": 1}}}))
    out = run_cli("stages.reward", str(recipe), env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    reward = json.loads((tmp_path / "run" / "reward" / "manifest.json").read_text())
    assert reward["metrics"]["format"] == "rankings" and reward["metrics"]["steps"] == 3
    assert reward["inputs"]["data"]["fingerprint"] == f"{manifest['fingerprint']}:rankings"  # lineage
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "reward" / "model")
    assert model.config.num_labels == 1
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
