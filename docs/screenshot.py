"""Takes the README's MLflow screenshot from a real smoke run: ``make screenshot``.

Starts ``mlflow server`` on 127.0.0.1 with a fresh SQLite store, trains ``configs/mini.yaml``
against it, then photographs the run's "Model metrics" tab (train and val charts first) with headless
Chromium (Debian's ``chromium`` package, driven by playwright) into ``docs/mlflow-run.png``.
tests/test_ui.py drives the same server, run and browser.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.tracking import run_link  # noqa: E402  (the repository root joins the path first)

CARD = "[data-testid=experiment-view-compare-runs-card]"  # a chart of the "Model metrics" tab
PLOT = ".js-plotly-plot"  # a drawn line chart
# the MLflow assistant panel opens by itself on a browser's first visit and covers a third of the page
QUIET_UI = "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` with an SQLite store in ``folder``, once it answers /health."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
         str(folder / "artifacts"), "--workers", "1"],
        stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"mlflow server did not start; see {folder / 'server.log'}") from None
            time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=60)


def train_mini(run_dir: Path, uri: str, *words: str) -> str:
    """Train ``configs/mini.yaml`` (with override ``words``) into ``run_dir`` against the server at ``uri``;
    returns the run's link, as the run itself reports it."""
    subprocess.run([sys.executable, "-m", "pipeline.train", str(ROOT / "configs" / "mini.yaml"),
                    f"run.dir={run_dir}", "tracking.backend=mlflow", f"tracking.uri={uri}",
                    "tracking.experiment=densenet", *words], check=True, cwd=ROOT)
    return run_link(uri, run_dir)


def tab_link(link: str, tab: str) -> str:
    """The run link ``link`` opened on the run page's ``tab`` (model-metrics, artifacts; '' for the overview)."""
    page, _, query = link.partition("?")
    return f"{page}/{tab}?{query}" if tab else link


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("Chromium not found: install Debian's package (apt-get install chromium).")


def launch(playwright):
    """Headless Chromium from the system's package (playwright downloads no browser of its own)."""
    return playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])


def open_page(browser, url: str, width: int, height: int):
    """A page of ``browser`` at ``url``, without the assistant panel."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.add_init_script(QUIET_UI)
    page.goto(url)
    return page


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "mlflow-run.png")
    parser.add_argument("--tab", default="model-metrics", help="the run page's tab: model-metrics, or '' for overview")
    parser.add_argument("--size", default="1600x1500")
    args = parser.parse_args(argv)
    width, height = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        folder, port = Path(tmp), free_port()
        server = start_server(folder, port)
        try:
            url = tab_link(train_mini(folder / "mini", f"http://127.0.0.1:{port}"), args.tab)
            with sync_playwright() as playwright:
                browser = launch(playwright)
                page = open_page(browser, url, width, height)
                if args.tab == "model-metrics":
                    page.wait_for_selector(f"{CARD} {PLOT}", timeout=120_000)
                page.wait_for_timeout(5000)  # the other charts draw
                page.screenshot(path=args.out)
                browser.close()
        finally:
            stop_server(server)
    print(f"wrote {args.out} ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
