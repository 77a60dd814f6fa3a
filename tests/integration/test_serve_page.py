"""The web page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by Selenium with the system driver) over the Serve application on 127.0.0.1.

It searches, compares two rows in random order, votes with a confidence and a comment (the
vote is then read back from ``GET /v1/votes``), follows "more like this", uploads and pastes an
image, replays a search from the URL and the back button, downloads the results as JSON, hides
a broken image, and fits a phone-width screen. Screenshots go to the test's tmp dir and to
``test-artifacts/serve_page_{desktop,phone}.png`` (look at them).
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="Debian's chromium + chromium-driver are not installed (.ci/run installs them)")]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
QUERY = "two red circles on grass"


@pytest.fixture(scope="module")
def browser(served, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1280,1000", "--lang=en-GB"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def wait(driver, cond, timeout: float = 60, what: str = "the page"):
    """Poll ``cond(driver)`` until it is truthy (its value) or fail naming ``what``."""
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond)
    except Exception as e:  # noqa: BLE001 - re-raised with the page's status line
        status = driver.execute_script("return document.querySelector('#status').textContent")
        raise AssertionError(f"waiting for {what}: {type(e).__name__}; status: {status!r}") from e


def tid(driver, name: str, many: bool = False):
    from selenium.webdriver.common.by import By

    sel = f"[data-testid='{name}']"
    return driver.find_elements(By.CSS_SELECTOR, sel) if many else \
        driver.find_element(By.CSS_SELECTOR, sel)


def row_ids(driver, testid: str) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' .card:not([hidden])')]"
        ".map(c => c.dataset.id)", f"[data-testid='{testid}']")


def images_loaded(driver, testid: str) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0] + ' img')];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)",
        f"[data-testid='{testid}']")


def get_json(served, path: str, key: str | None = None) -> object:
    req = urllib.request.Request(served.url + path, headers={
        "authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def screenshot(driver, tmp_path: Path, name: str, height: int | None = None) -> None:
    """Save the viewport (``height``: first make the window that tall, to show it all)."""
    ARTIFACTS.mkdir(exist_ok=True)
    size = driver.get_window_size()
    if height:
        driver.set_window_size(size["width"], height)
        driver.execute_script("window.scrollTo(0, 0)")
    try:
        for folder in (tmp_path, ARTIFACTS):
            assert driver.save_screenshot(str(folder / f"serve_page_{name}.png"))
    finally:
        if height:
            driver.set_window_size(size["width"], size["height"])


def test_search_compare_vote_in_chromium(served, browser, tmp_path):
    d = browser
    d.get(served.url + "/?" + urllib.parse.urlencode({"q": QUERY, "mode": "compare", "k": 8}))
    assert d.title.startswith("aesthetic-aligner")
    # The URL's search runs on load: two rows, A and B, of 8 images each, and a vote panel.
    wait(d, lambda d: images_loaded(d, "row-left") and images_loaded(d, "row-right"),
         what="both rows' images")
    left, right = row_ids(d, "row-left"), row_ids(d, "row-right")
    assert len(left) == 8 and len(right) == 8 and left != right
    assert tid(d, "vote-panel").is_displayed()
    assert tid(d, "query").get_attribute("value") == QUERY

    # Without the key the vote is refused, says why, and opens the key box.
    tid(d, "vote-left").click()
    wait(d, lambda d: "API key" in tid(d, "status").text, what="the 401 message")
    assert d.execute_script("return document.querySelector('#key-box').open")
    assert not tid(d, "vote-ack").is_displayed()

    # With the key: confidence 5, a comment, A is better -> acknowledged, models revealed.
    tid(d, "api-key").send_keys(served.api_key + "\t")
    d.find_element("css selector", "input[name=confidence][value='5']").click()
    tid(d, "comment").send_keys("the left row is sharper")
    tid(d, "vote-left").click()
    ack = wait(d, lambda d: tid(d, "vote-ack").is_displayed() and tid(d, "vote-ack"),
               what="the vote acknowledgement")
    text = ack.text
    assert "recorded" in text and "confidence 5" in text
    assert d.execute_script("return localStorage.getItem('aligner.apiKey')") == served.api_key
    assert all(b.get_attribute("disabled") for b in (tid(d, "vote-left"), tid(d, "vote-right")))
    screenshot(d, tmp_path, "desktop", height=1500)

    # The vote is in the database with what the page showed.
    votes = get_json(served, "/v1/votes?limit=5", served.api_key)["votes"]
    v = votes[0]
    assert v["preferred"] == "left" and v["confidence"] == 5
    assert v["comment"] == "the left row is sharper" and v["query"] == QUERY
    assert {v["left_model"], v["right_model"]} == {"base", "aligned"}
    assert f"A was {v['left_model']}, B was {v['right_model']}" in text
    shown = {r.text.split()[-1] for r in d.find_elements("css selector", ".row h2 .model")}
    assert shown == {"base", "aligned"}

    # Download JSON saves what is on screen.
    tid(d, "download").click()
    path = d.downloads / "aligner-results.json"
    wait(d, lambda d: path.is_file() and path.stat().st_size > 0, what="the download")
    saved = json.loads(path.read_text())
    assert saved["query"] == QUERY and saved["comparison_id"] == v["comparison_id"]
    assert [r["id"] for r in saved["left"]] == left and saved["vote"]["preferred"] == "left"

    # A new search in aligned mode goes into the URL; the back button replays the old one.
    box = tid(d, "query")
    box.clear()
    box.send_keys("a yellow star on sand")
    d.execute_script("document.querySelector('#mode').value = 'aligned'")
    tid(d, "search").click()
    wait(d, lambda d: images_loaded(d, "row-single"), what="the aligned row")
    params = urllib.parse.parse_qs(urllib.parse.urlsplit(d.current_url).query)
    assert params["q"] == ["a yellow star on sand"] and params["mode"] == ["aligned"]
    assert params["k"] == ["8"]
    aligned = get_json_post(served, {"text": "a yellow star on sand", "k": 8,
                                     "model": "aligned"})
    assert row_ids(d, "row-single") == aligned["ids"]  # the page shows the API's answer
    d.back()
    wait(d, lambda d: images_loaded(d, "row-left") and tid(d, "query").get_attribute("value")
         == QUERY, what="the previous search from history")
    assert tid(d, "mode").get_attribute("value") == "compare"
    assert len(row_ids(d, "row-left")) == 8

    # "More like this" on a result searches by that image (it finds itself first).
    d.forward()
    wait(d, lambda d: images_loaded(d, "row-single"), what="forward")
    target = row_ids(d, "row-single")[3]
    d.find_elements("css selector",
                    "[data-testid='row-single'] [data-testid='more-like-this']")[3].click()
    wait(d, lambda d: "like=" in d.current_url and images_loaded(d, "row-single")
         and row_ids(d, "row-single")[0] == target, what="more like this")
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(d.current_url).query)["like"] == [target]


def get_json_post(served, body: dict) -> dict:
    req = urllib.request.Request(served.url + "/v1/search", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_upload_paste_broken_images_and_phone_width(served, browser, tmp_path):
    d = browser
    first = get_json_post(served, {"text": QUERY, "k": 3, "model": "aligned"})["ids"][2]
    with urllib.request.urlopen(served.url + "/v1/images/" + first, timeout=30) as r:
        png = r.read()
    upload = tmp_path / "query.png"
    upload.write_bytes(png)

    d.get(served.url + "/?mode=aligned&k=4")
    tid(d, "upload").send_keys(str(upload))
    wait(d, lambda d: images_loaded(d, "row-single") and row_ids(d, "row-single")[0] == first,
         what="the upload's results")
    assert tid(d, "query-image").is_displayed()

    # Paste: a clipboard event carrying an image file searches by it.
    d.execute_script("document.querySelector('#clear-image').click();"
                     "document.querySelector('#results').replaceChildren()")
    d.execute_async_script("""
        const [id, done] = arguments;
        fetch('/v1/images/' + id).then(r => r.blob()).then(b => {
          const dt = new DataTransfer();
          dt.items.add(new File([b], 'pasted.png', {type: 'image/png'}));
          document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt}));
          done();
        });""", first)
    wait(d, lambda d: images_loaded(d, "row-single") and row_ids(d, "row-single")[0] == first,
         what="the pasted image's results")

    # An image the server cannot give (404) is hidden, and the status says so.
    d.execute_script("""
        const r = row('test', '', [{rank: 1, id: 'no-such-image.png', caption: 'gone',
          aesthetic: 0.5, image_url: '/v1/images/no-such-image.png'}], 'row-broken');
        document.querySelector('#results').append(r.el);""")
    wait(d, lambda d: d.execute_script(
        "return document.querySelector(\"[data-testid='row-broken'] .card\").hidden"),
        what="the broken image to be hidden")
    assert "could not be shown" in tid(d, "status").text

    # Phone width: nothing overflows sideways; the rows stack.
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        d.get(served.url + "/?" + urllib.parse.urlencode({"q": QUERY, "mode": "compare",
                                                          "k": 4}))
        wait(d, lambda d: images_loaded(d, "row-left") and images_loaded(d, "row-right"),
             what="the rows on a phone")
        time.sleep(0.3)
        width = d.execute_script("return [document.documentElement.scrollWidth, "
                                 "document.documentElement.clientWidth]")
        assert width[0] <= width[1] <= 400, width
        boxes = d.execute_script(
            "return ['row-left', 'row-right', 'vote-panel'].map(t => "
            "document.querySelector(`[data-testid='${t}']`).getBoundingClientRect())"
            ".map(r => [r.left, r.right, r.top])")
        assert all(0 <= b[0] and b[1] <= width[1] + 0.5 for b in boxes), boxes
        assert boxes[0][2] < boxes[1][2] < boxes[2][2]  # stacked: A, then B, then the vote
        screenshot(d, tmp_path, "phone")
    finally:
        d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    errors = [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"
              and "no-such-image" not in e["message"] and "401" not in e["message"]]
    assert not errors, errors
