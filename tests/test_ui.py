"""What a user sees of a finished run in MLflow's UI: a real ``mlflow server``, a real mini training run, and
Debian's chromium driven by playwright (the helpers of ``docs/screenshot.py``, which takes the README's picture)."""

import importlib.util
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("screenshot", ROOT / "docs" / "screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shot = _screenshot_module()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The link of a finished mini run (2 epochs of 5 steps, pictures at each epoch end) on a server of its own."""
    if not any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")):
        missing = "needs Chromium to look at the UI: apt-get install chromium (Debian's package)"
        if os.environ.get("CI"):  # .ci/run installs it: there its absence is a failure
            pytest.fail(missing)
        pytest.skip(missing)
    folder, port = tmp_path_factory.mktemp("ui"), shot.free_port()
    server = shot.start_server(folder, port)
    try:
        yield shot.train_mini(folder / "run", f"http://127.0.0.1:{port}", f"data.root={folder / 'data'}",
                              "data.generate.train_per_class=8", "data.generate.val_per_class=4",
                              "train.batch_size=16", "train.epochs=2", "train.log_every_steps=1",
                              "insights.every_steps=2", "data.workers=1")
    finally:
        shot.stop_server(server)


@pytest.fixture
def browser(finished_run):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = shot.launch(playwright)
        yield browser
        browser.close()


def run_dir(link: str) -> Path:
    """The run directory of the fixture's run ``link``."""
    return Path(MlflowClient(link.split("/#/")[0]).get_run(re.search(r"/runs/(\w+)", link)[1]).data.params["run.dir"])


def loaded_image(page, src_part: str, timeout_s: float = 60) -> dict:
    """The first <img> whose src holds ``src_part`` once the browser has decoded it (naturalWidth > 0)."""
    deadline = time.monotonic() + timeout_s
    while True:
        images = page.eval_on_selector_all("img", "els => els.map(e => ({src: decodeURIComponent(e.src), "
                                                  "width: e.naturalWidth, complete: e.complete}))")
        found = [i for i in images if src_part in i["src"] and i["complete"] and i["width"] > 0]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no loaded image with {src_part!r} in its address: {images}"
        page.wait_for_timeout(1000)


def test_the_run_link_opens_the_training_view_with_train_and_val_charts_before_the_pictures(finished_run, browser):
    page = shot.open_page(browser, shot.tab_link(finished_run, "model-metrics"), 1600, 1200)
    page.wait_for_selector(f"{shot.CARD} {shot.PLOT}", timeout=120_000)
    # the training view's side bar (GenAI's lists Traces, Sessions, Evaluation runs)
    assert page.get_by_text("Evaluation runs").count() == 0
    assert page.get_by_role("link", name="Runs", exact=True).count() >= 1
    assert "workflowType=machine_learning" in page.url
    headers = page.eval_on_selector_all("[data-testid=experiment-view-compare-runs-section-header]",
                                        "els => els.map(e => e.innerText.split('\\n')[0])")
    assert headers[:4] == ["train", "val", "visual", "visual/grad_norm"], headers
    cards = page.locator(shot.CARD)  # in page order: the train section's first
    titles = [card.split("\n")[0] for card in cards.all_inner_texts()[:6]]  # the first two rows
    assert {"loss", "lr", "images_per_s"} <= set(titles), titles
    loss = cards.nth(titles.index("loss"))  # train/loss, drawn
    assert loss.locator(shot.PLOT).count() == 1 and loss.locator(".scatterlayer .trace").count() >= 1


def test_the_heatmap_shows_in_its_chart_at_the_last_epoch_and_as_a_named_artifact(finished_run, browser):
    page = shot.open_page(browser, shot.tab_link(finished_run, "model-metrics"), 1600, 1200)
    page.wait_for_selector("[data-testid=experiment-view-compare-runs-section-header]", timeout=120_000)
    page.get_by_text("visual", exact=True).first.scroll_into_view_if_needed()
    card = page.locator(shot.CARD, has_text="visual/feature_reuse")
    card.wait_for(timeout=60_000)
    image = loaded_image(page, "images/visual~feature_reuse+step+0+")  # where the card's slider opens
    assert card.locator("input").first.input_value() == "0"
    shown = int(re.search(r"\+timestamp\+(\d+)\+", image["src"])[1])
    client = MlflowClient(finished_run.split("/#/")[0])
    run_id = re.search(r"/runs/(\w+)", finished_run)[1]
    logged = [int(m[1]) for a in client.list_artifacts(run_id, "images")
              if (m := re.match(r"images/visual~feature_reuse\+step\+0\+timestamp\+(\d+)\+.*\.png$", a.path))]
    assert len(logged) == 2 and shown == max(logged)  # one per epoch at step 0: the card shows the last

    # the card lists the run's 100-odd params above the picture; the README's way to see it: switch that off
    card.locator("[data-testid=experiment-view-compare-runs-card-menu]").click()
    page.get_by_role("menuitem", name="Configure").click()
    page.get_by_text("Show run parameters").click()
    page.get_by_role("button", name="Save changes").click()
    page.wait_for_timeout(2000)
    card.scroll_into_view_if_needed()
    picture, frame = card.locator("img").first.bounding_box(), card.bounding_box()
    assert frame["y"] <= picture["y"] and picture["y"] + picture["height"] <= frame["y"] + frame["height"], \
        (picture, frame)

    page = shot.open_page(browser, shot.tab_link(finished_run, "artifacts"), 1600, 1200)
    page.get_by_text("insights", exact=True).first.click(timeout=120_000)
    page.get_by_text("feature_reuse.png", exact=True).first.click()
    with Image.open(run_dir(finished_run) / "insights" / "feature_reuse.png") as png:
        assert loaded_image(page, "blob:")["width"] == png.width  # the previewer shows the file it fetched
