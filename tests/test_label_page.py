"""`anyid-rt label`: the two-track labelling page in a real headless browser (Chromium from the OS packages,
driven by Selenium): load, both tracks, synced playback, labelling with keys, undo, reload and resume, the
labels JSONL as the trainer then reads it, and the error page of a malformed folder. Also the server's file
serving (no path traversal, byte ranges) and its refusal of cross-origin or non-JSON posts, without a browser.

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: `apt-get install -y chromium chromium-driver`) and
the selenium package (the `test` extra); skips, saying which is missing, without them."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from anyid_rt.trainer.candidates import CandidatesFolder, run_candidates
from anyid_rt.trainer.label import make_server, read_labels
from anyid_rt.trainer.pairs import read_pairs
from test_candidates import ClipEngine, options

CHROMIUM = os.environ.get("ANYID_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ANYID_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"


def _missing() -> str | None:
    for path, what in ((CHROMIUM, "Chromium"), (CHROMEDRIVER, "chromedriver")):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{what} not found at {path} (install with: {INSTALL})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return 'the selenium package is not installed (pip install -e ".[test]")'
    return None


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A candidates folder of 2 sets x 2 candidates (synthetic clips of 9 frames, no automatic scores: both
    tracks are for humans): 4 judgements to make."""
    out = tmp_path_factory.mktemp("label") / "cand"
    run_candidates(options(out, per_group=2, eval=None), engine=ClipEngine(), log=lambda s: None)
    return out


class Served:
    def __init__(self, root: Path, **kw):
        self.server = make_server(root, port=0, **kw)
        self.url = self.server.url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(folder):
    s = Served(folder)
    yield s
    s.close()


def _request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_files_stay_inside_the_folder_and_posts_must_be_same_origin_json(served, folder):
    video = "videos/person_00.t000.k0.mp4"
    size = (folder / video).stat().st_size
    status, body, headers = _request(served.url + "files/" + video, headers={"Range": "bytes=10-19"})
    assert status == 206 and body == (folder / video).read_bytes()[10:20]
    assert headers["Content-Range"] == f"bytes 10-19/{size}" and headers["Content-Type"] == "video/mp4"
    assert _request(served.url + "files/" + video)[1] == (folder / video).read_bytes()
    outside = folder.parent / "secret.png"
    outside.write_bytes(b"x")
    for path in ("files/../secret.png", "files/%2e%2e/secret.png", "files/%2Fetc%2Fpasswd", "files/labels.jsonl",
                 "files/candidates.json", "files/videos/none.mp4"):
        assert _request(served.url + path)[0] == 404, path
    label = json.dumps({"matchup": "person_00.t000.k0-k1", "axis": "identity", "choice": "a"}).encode()
    assert _request(served.url + "api/label", label, {"Content-Type": "text/plain"})[0] == 415
    assert _request(served.url + "api/label", label, {"Content-Type": "application/json",
                                                       "Origin": "http://evil.example"})[0] == 403
    assert _request(served.url + "api/label", b'{"matchup": "nope", "axis": "identity", "choice": "a"}',
                    {"Content-Type": "application/json"})[0] == 400
    host = served.url.split("//")[1].rstrip("/")
    req = urllib.request.Request(served.url + "api/state", headers={"Host": f"attacker.example:{host.split(':')[1]}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 403  # DNS rebinding: a loopback server answers only loopback names
    assert not (folder / "labels.jsonl").exists()  # nothing refused was recorded


# ---------------------------------------------------------------------------------------------------------------
# The browser
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _missing()
    if reason is not None:
        pytest.skip(f"browser test skipped: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, predicate, what: str, timeout: float = 15.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d), message=what)


def _progress(driver) -> str:
    return driver.find_element("id", "progress").text


def _press(driver, key: str, expect_progress: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()
    _wait(driver, lambda d: _progress(d) == expect_progress, f"progress {expect_progress!r} after key {key!r}")


JS_VIDEOS = """return ['left', 'right'].map(id => { const v = document.getElementById(id);
  return {ready: v.readyState, width: v.videoWidth, t: v.currentTime, paused: v.paused, key: v.dataset.key}; });"""


def test_label_page_in_a_headless_browser(browser, served, folder):
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.get(served.url)
    _wait(driver, lambda d: _progress(d) == "0 of 4 judged", "the page loads its tasks")
    assert driver.title == "AnyID preference labelling"

    # identity track first: every clip of the ID group as references, no prompt; both candidates decode and
    # play in sync
    assert driver.find_element("id", "track").text == "Identity fidelity track"
    assert len(driver.find_elements("css selector", "#ref-list video")) == 3
    assert not driver.find_element("id", "prompt").is_displayed()
    _wait(driver, lambda d: all(v["ready"] >= 2 and v["width"] == 128 and not v["paused"]
                                for v in d.execute_script(JS_VIDEOS)), "both candidates decode and play")
    time.sleep(0.5)
    left, right = driver.execute_script(JS_VIDEOS)
    assert abs(left["t"] - right["t"]) < 0.3, (left, right)
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(Keys.SPACE).perform()  # space pauses both
    _wait(driver, lambda d: all(v["paused"] for v in d.execute_script(JS_VIDEOS)), "space pauses both videos")
    ActionChains(driver).send_keys(Keys.SPACE).perform()  # and plays both again
    _wait(driver, lambda d: not any(v["paused"] for v in d.execute_script(JS_VIDEOS)), "space plays both videos")

    chosen = {}  # task -> the candidate key behind the side pressed

    def press(key: str, progress: str):
        task = driver.find_element("tag name", "body").get_attribute("data-task")
        sides = {v: s["key"] for v, s in zip(("1", "2"), driver.execute_script(JS_VIDEOS))}
        _press(driver, key, progress)
        chosen[task] = sides.get(key, "tie")

    press("1", "1 of 4 judged")
    # the same matchup's prompt track: the primary reference and the prompt
    assert driver.find_element("id", "track").text == "Prompt controllability track"
    assert len(driver.find_elements("css selector", "#ref-list video")) == 1
    prompt = driver.find_element("id", "prompt")
    sets = CandidatesFolder.load(folder).sets
    assert prompt.is_displayed() and prompt.text == sets["person_00.t000"].prompt
    press("2", "2 of 4 judged")
    press("0", "3 of 4 judged")
    _press(driver, "u", "2 of 4 judged")  # undo: back to the task just judged
    task = driver.find_element("tag name", "body").get_attribute("data-task")
    assert task == "person_00.t001.k0-k1/identity"
    chosen.pop(task)

    # a reload resumes at the first task without a judgement; so does a new server on the same folder
    driver.refresh()
    _wait(driver, lambda d: _progress(d) == "2 of 4 judged", "the reloaded page resumes")
    assert driver.find_element("tag name", "body").get_attribute("data-task") == task
    served.close()
    again = Served(folder)
    try:
        driver.get(again.url)
        _wait(driver, lambda d: _progress(d) == "2 of 4 judged", "a restarted server resumes")
        press("1", "3 of 4 judged")
        _press(driver, Keys.BACKSPACE, "2 of 4 judged")  # Backspace undoes too
        chosen.pop(task)
        press("2", "3 of 4 judged")
        press("1", "4 of 4 judged")
        done = driver.find_element("id", "done")
        assert done.is_displayed() and "4 of 4 judged" in done.text
        assert str(folder / "pairs.jsonl") in done.text
    finally:
        again.close()

    # the labels as the trainer reads them, and the pairs file Flow-DPO reads
    f = CandidatesFolder.load(folder)
    value = {"a": 1, "b": -1, "tie": 0}
    assert read_labels(f) == {tuple(t.split("/")): value[c] for t, c in chosen.items()}
    lines = [json.loads(x) for x in (folder / "labels.jsonl").read_text().splitlines()]
    assert [x["op"] for x in lines] == ["label"] * 3 + ["undo"] + ["label", "undo", "label", "label"]
    pairs = read_pairs(folder / "pairs.jsonl")
    expected = []
    for m in f.matchups:
        i, p = value[chosen[f"{m.id}/identity"]], value[chosen[f"{m.id}/prompt"]]
        if i == p != 0:
            expected.append(Path(folder / (m.a if i > 0 else m.b)["video"]).name)
    assert [Path(p.winner).name for p in pairs] == expected


def test_a_malformed_folder_gets_an_error_page(browser, folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "matchups.jsonl").write_text('{"id": "x", "set": "nope", "a": {}, "b": {}, "auto": {}}\n')
    s = Served(bad)
    try:
        browser.get(s.url)
        _wait(browser, lambda d: d.find_elements("id", "error-title"), "the error page")
        text = browser.find_element("id", "error").text
        assert "matchups.jsonl:1: set 'nope' is not in sets.jsonl" in text
        status, body, _ = _request(s.url + "api/state")
        assert status == 500 and "set 'nope'" in json.loads(body)["error"]
        # fixed on disk: the next load serves the page
        shutil.copy(folder / "matchups.jsonl", bad / "matchups.jsonl")
        browser.refresh()
        _wait(browser, lambda d: d.find_elements("id", "progress") and _progress(d).endswith("judged"), "the page")
    finally:
        s.close()
    (bad / "candidates.json").write_text("{not json")
    s = Served(bad)
    try:
        browser.get(s.url)
        _wait(browser, lambda d: d.find_elements("id", "error-title"), "the error page")
        assert "candidates.json: not valid JSON" in browser.find_element("id", "error").text
    finally:
        s.close()
