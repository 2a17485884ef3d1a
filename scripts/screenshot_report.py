"""Render an HTML report in headless Chromium and write a PNG screenshot of the whole page.

    python scripts/screenshot_report.py kdvfs_runs/demo/report.html --out report.png

The page's height is measured first (a headless browser screenshots only its window), so the
screenshot shows every section. Uses playwright when it is installed, else a Chromium binary
(``--browser`` or the first of chromium, chromium-browser, google-chrome on PATH).
Exit status 0: PNG written; 2: no browser found; 1: the browser failed.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTH_PX = 1200
#: Fallback height when the page cannot be measured; tall enough for the demo's report.
DEFAULT_HEIGHT_PX = 9000
#: Height cap: Chromium refuses (or draws blank) screenshots much taller than this.
MAX_HEIGHT_PX = 16000


def find_browser(name: str | None = None) -> str | None:
    """The Chromium binary to use, or None."""
    for candidate in ([name] if name else BROWSERS):
        path = shutil.which(candidate)
        if path:
            return path
    return None


def _headless_args(browser: str) -> list[str]:
    # --no-sandbox: containers often run as root, where Chromium's sandbox refuses to start.
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--disable-dev-shm-usage", "--no-first-run"]


def page_height_px(browser: str, url: str, width_px: int) -> int:
    """The page's full height, read from the DOM that headless Chromium dumps after layout."""
    probe = ("<script>window.addEventListener('load',()=>{document.title='HEIGHT='+"
             "document.documentElement.scrollHeight;});</script>")
    src = Path(url.removeprefix("file://"))
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "probe.html"
        page.write_text(src.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
        try:
            out = subprocess.run(_headless_args(browser) + [f"--window-size={width_px},1000",
                                 "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                                 capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return DEFAULT_HEIGHT_PX
    m = re.search(r"HEIGHT=(\d+)", out.stdout)
    return min(int(m.group(1)) + 40, MAX_HEIGHT_PX) if m else DEFAULT_HEIGHT_PX


def screenshot_chromium(browser: str, html_path: Path, png_path: Path, width_px: int) -> None:
    url = html_path.resolve().as_uri()
    height = page_height_px(browser, url, width_px)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(_headless_args(browser) + [f"--screenshot={png_path.resolve()}",
                         f"--window-size={width_px},{height}", "--virtual-time-budget=5000", url],
                         capture_output=True, text=True, timeout=180)
    if out.returncode != 0 or not png_path.exists():
        raise RuntimeError(f"{browser} failed ({out.returncode}): {out.stderr[-1500:]}")


def screenshot_playwright(html_path: Path, png_path: Path, width_px: int) -> bool:
    """Full-page screenshot through playwright; False if it is not installed or has no browser."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        return False
    try:
        with sync_playwright() as p:
            b = p.chromium.launch()
            page = b.new_page(viewport={"width": width_px, "height": 1000})
            page.goto(html_path.resolve().as_uri())
            png_path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(png_path), full_page=True)
            b.close()
        return True
    except Error:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", type=Path, help="the report page (kdvfs report writes RUN_DIR/report.html)")
    ap.add_argument("--out", type=Path, default=None, help="PNG to write (default: next to the page, .png)")
    ap.add_argument("--width", type=int, default=WIDTH_PX, help=f"window width in px (default {WIDTH_PX})")
    ap.add_argument("--browser", default=None, help="Chromium binary (default: the first found on PATH)")
    args = ap.parse_args(argv)
    if not args.html.is_file():
        print(f"screenshot_report: no such page: {args.html}", file=sys.stderr)
        return 1
    png = args.out or args.html.with_suffix(".png")
    if args.browser is None and screenshot_playwright(args.html, png, args.width):
        print(f"screenshot_report: wrote {png}")
        return 0
    browser = find_browser(args.browser)
    if browser is None:
        print("screenshot_report: no Chromium found; install one (apt-get install chromium) or playwright",
              file=sys.stderr)
        return 2
    try:
        screenshot_chromium(browser, args.html, png, args.width)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"screenshot_report: {exc}", file=sys.stderr)
        return 1
    print(f"screenshot_report: wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
