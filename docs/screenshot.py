"""Takes the README's MLflow screenshot from a real smoke run: ``make screenshot``.

Starts ``mlflow server`` on 127.0.0.1 with a fresh SQLite store, trains ``configs/mini.yaml``
against it, then photographs the run's metric charts (train and val) with headless Chromium (Debian's ``chromium``
package) into ``docs/mlflow-run.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
                raise SystemExit(f"mlflow server did not start; see {folder / 'server.log'}") from None
            time.sleep(0.5)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("Chromium not found: install Debian's package (apt-get install chromium).")


def screenshot(url: str, out: Path, width: int, height: int) -> None:
    """A headless Chromium screenshot of ``url`` after 90 s of virtual time (the charts load lazily)."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        "--virtual-time-budget=90000", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=600)


def main(argv: list[str] | None = None) -> int:
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
            uri = f"http://127.0.0.1:{port}"
            run_dir = folder / "mini"
            subprocess.run([sys.executable, "-m", "pipeline.train", str(ROOT / "configs" / "mini.yaml"),
                            f"run.dir={run_dir}", "tracking.backend=mlflow", f"tracking.uri={uri}",
                            "tracking.experiment=densenet"], check=True, cwd=ROOT)
            run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
            from mlflow import MlflowClient

            experiment = MlflowClient(uri).get_run(run_id).info.experiment_id
            page = f"{uri}/#/experiments/{experiment}/runs/{run_id}" + (f"/{args.tab}" if args.tab else "")
            screenshot(page, args.out, width, height)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"wrote {args.out} ({page})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
