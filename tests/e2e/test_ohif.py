"""OHIF in a headless browser: the OHIF v3 viewer that monailabel ships (served at /ohif/) opens a study from the
PACS through the server's DICOMweb proxy, its MONAI Label panel connects to the server and runs hf_sam, and the
segmentation is drawn over the images. Debian's chromium and chromedriver drive it through selenium; screenshots
stay in the test's tmp dir."""

from __future__ import annotations

import io
import shutil
import time

import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Headless as root, no GPU (WebGL through SwiftShader), and none of Chromium's own calls to the network.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",
    "--use-angle=swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
)
LOAD_TIMEOUT_S = 120


@pytest.fixture
def studies(dicomweb_studies) -> str:
    return dicomweb_studies


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian packages chromium and chromium-driver are not installed (scripts/setup.sh installs them as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def viewport_pixels(element) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB")).astype(np.int16)


def open_study_in_ohif(server, studies, browser):
    """The first study of the PACS in OHIF's MONAI Label mode (images through the server's DICOMweb proxy), its
    panel connected to this server (its default is port 8000); -> the viewport and a waiter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    study = DICOMwebClient(studies).search_for_studies()[0]["0020000D"]["Value"][0]
    wait = WebDriverWait(browser, LOAD_TIMEOUT_S)
    browser.get(f"{server.url}/ohif/monai-label?StudyInstanceUIDs={study}")
    wait.until(lambda d: "/125" in d.find_element(By.CSS_SELECTOR, '[data-cy="viewport-overlay-bottom-right"]').text)
    for button in browser.find_elements(By.CSS_SELECTOR, '[data-cy="confirm-and-hide-button"]'):
        button.click()
    address = browser.find_element(By.XPATH, "//input[@value='http://127.0.0.1:8000/']")
    address.send_keys(Keys.CONTROL, "a")
    address.send_keys(server.url + "/")
    address.find_element(By.XPATH, "following::button[1]").click()
    wait.until(lambda d: any(o.text.strip() == "hf_sam" for o in d.find_elements(By.CSS_SELECTOR, "select.selectBox option")))
    viewport = browser.find_elements(By.CSS_SELECTOR, '[data-cy="viewport-pane"]')[0]
    time.sleep(2)  # let the first render settle before taking the reference picture
    return viewport, wait


def click_run_in_the_segmentation_tab(browser, wait) -> None:
    """Run of the panel's automatic segmentation tab (the model selected there: the first, hf_sam)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    tab = browser.find_element(By.CSS_SELECTOR, "input.tab-switch[value='segmentation']")
    browser.execute_script("arguments[0].click()", tab)
    run = (
        "//input[@value='segmentation']/following-sibling::div[contains(@class,'tab-content')]"
        "//button[contains(@class,'actionButton') and text()='Run']"
    )
    click_when_settled(browser, wait, wait.until(ec.presence_of_element_located((By.XPATH, run))))


def click_when_settled(browser, wait, element) -> None:
    """A real click on `element` once it stands still and nothing covers its centre: the panel's sections slide open,
    and a click during the slide lands on whatever is passing under the pointer (a section label, the panel)."""
    where = (
        "const e = arguments[0]; const r = e.getBoundingClientRect();"
        "const covered = !e.contains(document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2));"
        "return covered ? null : [r.x, r.y, r.width, r.height];"
    )
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    seen = []

    def settled(driver) -> bool:
        seen.append(driver.execute_script(where, element))
        return len(seen) >= 2 and seen[-1] is not None and seen[-1] == seen[-2]

    wait.until(settled)
    element.click()


def changed_fraction(viewport, before: np.ndarray) -> float:
    diff = np.abs(viewport_pixels(viewport) - before).sum(axis=2)
    return float((diff > 60).mean())


def test_ohif_runs_hf_sam_and_shows_the_segmentation(start_server, studies, browser, tmp_path):
    server = start_server(("models", "hf_sam"))
    viewport, wait = open_study_in_ohif(server, studies, browser)
    before = viewport_pixels(viewport)
    (tmp_path / "before.png").write_bytes(viewport.screenshot_as_png)

    click_run_in_the_segmentation_tab(browser, wait)

    # the label comes back from /infer/hf_sam and is drawn over the viewport
    wait.until(lambda d: changed_fraction(viewport, before) > 0.02)
    (tmp_path / "after.png").write_bytes(viewport.screenshot_as_png)
    assert "Infer Request" in server.log() and "'model': 'hf_sam'" in server.log()


def test_ohif_point_prompt_segments_the_clicked_structure(start_server, studies, browser, tmp_path):
    """The Point Prompts tab lists hf_sam_interactive (type deepgrow); a foreground click on the image and Run draw
    the clicked structure over the viewport."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    server = start_server(("models", "hf_sam"))
    viewport, wait = open_study_in_ohif(server, studies, browser)
    tab = browser.find_element(By.CSS_SELECTOR, "input.tab-switch[value='pointprompts']")
    browser.execute_script("arguments[0].click()", tab)
    content = tab.find_element(By.XPATH, "following-sibling::div[contains(@class,'tab-content')]")
    Select(content.find_element(By.CSS_SELECTOR, "select.selectBox")).select_by_visible_text("hf_sam_interactive")
    row = content.find_element(By.XPATH, ".//tr[contains(@class,'clickable-row')][td[text()='grey matter']]")
    click_when_settled(browser, wait, row)
    before = viewport_pixels(viewport)
    (tmp_path / "before_click.png").write_bytes(viewport.screenshot_as_png)

    time.sleep(1)  # the tab activates its probe tool
    ActionChains(browser).move_to_element(viewport).click().perform()  # the probe tool places a point at the centre
    time.sleep(1)  # the point is stored by the tool before Run reads it
    run = content.find_element(By.XPATH, ".//button[contains(@class,'actionButton') and text()='Run']")
    click_when_settled(browser, wait, run)
    wait.until(lambda d: "hf_sam_interactive" in server.log() and changed_fraction(viewport, before) > 0.001)
    (tmp_path / "after_click.png").write_bytes(viewport.screenshot_as_png)
    request = next(line for line in server.log().splitlines() if "Infer Request" in line and "hf_sam_interactive" in line)
    assert "'foreground': [[" in request and "'label'" not in request, request  # OHIF sends points, no label


def test_ohif_and_the_client_before_any_training_get_an_error_not_noise(start_server, studies, browser, tmp_path):
    """The default pretrained backbone on a fresh install: OHIF's Run on the automatic task shows the plugin's error
    notification and draws nothing (0.8.5's plugin shows no server text); MONAILabelClient, which the Slicer module
    uses and whose exception text Slicer shows, carries the server's reason."""
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException
    from selenium.webdriver.common.by import By

    server = start_server(("models", "hf_sam"), ("backbone", "litemedsam"))
    viewport, wait = open_study_in_ohif(server, studies, browser)
    before = viewport_pixels(viewport)
    click_run_in_the_segmentation_tab(browser, wait)
    wait.until(lambda d: "Failed to Run Segmentation" in d.find_element(By.TAG_NAME, "body").text)
    (tmp_path / "after_run.png").write_bytes(viewport.screenshot_as_png)
    assert changed_fraction(viewport, before) < 0.001

    series = DICOMwebClient(studies).search_for_series()[0]["0020000E"]["Value"][0]
    with pytest.raises(MONAILabelClientException) as raised:
        MONAILabelClient(server.url, tmpdir=str(tmp_path)).infer("hf_sam", series, {})
    assert "409" in raised.value.msg and "hf_sam_interactive" in raised.value.msg, raised.value.msg
