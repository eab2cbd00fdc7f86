"""Render an HTML report in headless Chromium and save a screenshot (checks that the page renders).

    python scripts/render_report.py report.html [--height 4000]
        [--out benchmarks/results/html_report/report_screenshot.png]

Needs a chromium binary (Debian: ``apt-get install -y chromium``); the test suite does not (it checks the
HTML structure instead). Exit status 1 if Chromium fails or writes no PNG.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    sys.exit(f"no Chromium found (tried {', '.join(BROWSERS)}): apt-get install -y chromium")


def render(page: Path, out: Path, width: int = 1280, height: int = 4000, timeout: float = 120.0) -> Path:
    """Screenshot of ``page`` (a local HTML file) at width × height pixels, written to ``out``."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="ckv-chromium-") as profile:
        cmd = [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={out}",
               f"--window-size={width},{height}", page.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        sys.exit(f"chromium failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("page", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/html_report/report_screenshot.png"))
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=4000)
    a = p.parse_args()
    if not a.page.is_file():
        sys.exit(f"{a.page}: no such file")
    out = render(a.page, a.out, a.width, a.height)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
