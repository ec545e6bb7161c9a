"""Screenshots of TensorBoard's trade-off views, as docs/tensorboard.md shows them.

    python scripts/screenshot_tensorboard.py runs/demo --out docs/img

Starts ``tensorboard --logdir FOLDER`` on a free port, waits until it lists the runs, and takes
one screenshot per view with a headless Chromium (``chromium`` or ``google-chrome`` on PATH, or
``--browser``): the comparison images, the comparison tables (Text), the HParams table and the
custom-scalar charts and the per-layer heatmaps of one method. Prints where each PNG went.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

VIEWS = {  # file name -> (what follows the server's address: the view and its state, window height)
    # Time Series, the page TensorBoard opens on, filtered to the comparison's images
    "tensorboard_comparison.png": (
        "?darkMode=false&runFilter=comparison&tagFilter=tradeoff%2F#timeseries",
        1000,
    ),
    "tensorboard_tables.png": ("?darkMode=false#text&regexInput=comparison", 1000),
    "tensorboard_hparams.png": ("?darkMode=false#hparams", 900),
    "tensorboard_custom_scalars.png": (
        "?darkMode=false#custom_scalars&regexInput=%5Esago&_smoothingWeight=0&_ignoreYOutliers=false",
        1300,
    ),
    # one method's per-layer heatmaps (Time Series, filtered to the image tag)
    "tensorboard_per_layer.png": (
        "?darkMode=false&runFilter=sago&tagFilter=geometry%2Fper_layer#timeseries",
        900,
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_runs(url: str, timeout: float = 120.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as response:
                runs = json.load(response)
            if runs:
                return list(runs)
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"TensorBoard at {url} listed no runs within {timeout:.0f} s")


def wait_for_images(url: str, timeout: float = 120.0) -> None:
    """Until the images plugin has read every run's image tags (the first page load otherwise
    races the event-file loader and shows empty cards)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/images/tags", timeout=5) as response:
                if any(tags for tags in json.load(response).values()):
                    time.sleep(3.0)  # let the loader finish its pass over the remaining runs
                    return
        except OSError:
            pass
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", help="the folder given to tensorboard --logdir (e.g. runs/demo)")
    parser.add_argument("--out", default="docs/img", help="where the PNG files go")
    parser.add_argument("--width", type=int, default=1600, help="window width in pixels")
    parser.add_argument("--browser", default=None, help="a Chromium-family browser (default: found on PATH)")
    parser.add_argument(
        "--views", nargs="+", choices=list(VIEWS), default=list(VIEWS), help="which screenshots"
    )
    args = parser.parse_args(argv)
    browser = args.browser or shutil.which("chromium") or shutil.which("google-chrome")
    if not browser:
        parser.error("no headless browser found: install chromium (apt install chromium) or pass --browser")
    tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [tensorboard, "--logdir", args.folder, "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        runs = wait_for_runs(url)
        wait_for_images(url)
        print(f"TensorBoard {url}: {len(runs)} runs")
        os.makedirs(args.out, exist_ok=True)
        for name in args.views:
            state, height = VIEWS[name]
            path = os.path.abspath(os.path.join(args.out, name))
            subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 f"--window-size={args.width},{height}", "--virtual-time-budget=30000",
                 f"--screenshot={path}", f"{url}/{state}"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180,
            )  # fmt: skip
            print(path)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
