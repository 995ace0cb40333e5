"""Open a run's report in headless Chromium and check that every picture on it loads.

    python -m bench.check_report --run NAME [--outputs outputs] [--screenshot PATH]

The page itself has no script. Chromium loads a copy of it from a temporary folder with a
`<base href>` pointing at the run folder (so the relative picture paths resolve as they do for
report.html) and a few lines of script added: after the load event (which waits for every
picture) they write `<div id="img-status" data-total data-loaded data-broken>` into the page,
counting a picture as loaded when it decoded to a non-empty size. `--dump-dom` prints that DOM.
The check fails, listing the broken pictures, when any did not load, or when the browser saw fewer
pictures than the page's HTML holds. A screenshot of the real report.html (1400 x 3000) is written
too, for a person to look at.

Needs `/usr/bin/chromium` (Debian: `apt-get install -y chromium`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")
STATUS_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  const status = document.createElement("div");
  status.id = "img-status";
  status.dataset.total = images.length;
  status.dataset.loaded = images.length - broken.length;
  status.dataset.broken = JSON.stringify(broken);
  document.body.appendChild(status);
});
</script>"""


class _Tags(HTMLParser):
    """The src of every <img> and the attributes of the #img-status element."""

    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []
        self.status: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs.get("src") or "")
        elif attrs.get("id") == "img-status":
            self.status = attrs


def parse(html_text: str) -> _Tags:
    tags = _Tags()
    tags.feed(html_text)
    return tags


def instrumented(page_html: str, base: Path) -> str:
    """The page with a <base> at the run folder and the status script before </body>."""
    base_tag = f'<base href="{base.resolve().as_uri()}/">'
    if "<head>" not in page_html or "</body>" not in page_html:
        raise ValueError("the report has no <head> or no </body>")
    return page_html.replace("<head>", "<head>" + base_tag, 1).replace("</body>", STATUS_SCRIPT + "</body>", 1)


def chromium(binary: str, profile: Path, *args: str, timeout: float) -> str:
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"error: chromium did not finish in {timeout:.0f} s: {' '.join(cmd)}") from None
    if done.returncode != 0:
        raise SystemExit(f"error: chromium exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def check(page: Path, binary: str, screenshot: Path, timeout: float = 120) -> list[str]:
    """Problems with the report's pictures (empty: all loaded); writes `screenshot`."""
    page_html = page.read_text()
    expected = parse(page_html).srcs
    problems = [f"{src}: file not found" for src in expected if not (page.parent / unquote(src)).is_file()]
    with tempfile.TemporaryDirectory(prefix="wsss-check-report-") as tmp:
        tmp = Path(tmp)
        probe = tmp / "probe.html"
        probe.write_text(instrumented(page_html, page.parent))
        dom = chromium(binary, tmp / "profile", "--run-all-compositor-stages-before-draw",
                       "--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), timeout=timeout)
        chromium(binary, tmp / "profile", f"--screenshot={screenshot.resolve()}", "--window-size=1400,3000",
                 page.resolve().as_uri(), timeout=timeout)
    status = parse(dom).status
    if status is None:
        return problems + ["the browser's DOM has no #img-status element: the page did not finish loading"]
    total, loaded = int(status["data-total"]), int(status["data-loaded"])
    broken = json.loads(status["data-broken"])
    problems += [f"{src}: did not load in the browser" for src in broken]
    if total != len(expected):
        problems.append(f"the browser saw {total} pictures, the HTML has {len(expected)}")
    print(f"{page}: {loaded} of {total} pictures loaded in headless Chromium")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="demo")
    p.add_argument("--outputs", type=Path, default=Path("outputs"))
    p.add_argument("--chromium", default="/usr/bin/chromium", help="the browser binary")
    p.add_argument("--screenshot", type=Path, default=None,
                   help="where to write the screenshot (default: <tmp>/wsss-report-RUN.png)")
    p.add_argument("--timeout", type=float, default=120, help="seconds allowed to each browser run")
    args = p.parse_args(argv)
    page = args.outputs / args.run / "report.html"
    if not page.is_file():
        print(f"error: {page} not found; write it first: python -m wsss.report --run {args.run}", file=sys.stderr)
        return 1
    binary = shutil.which(args.chromium)
    if binary is None:
        print(f"error: {args.chromium} not found; install it (Debian: apt-get install -y chromium)", file=sys.stderr)
        return 1
    screenshot = args.screenshot or Path(tempfile.gettempdir()) / f"wsss-report-{args.run}.png"
    problems = check(page, binary, screenshot, args.timeout)
    print(f"screenshot: {screenshot}")
    if problems:
        print(f"FAILED: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print("OK: every picture loaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
