"""Take docs/serve.png: start `meloformer serve` on a checkpoint or model folder (default: the shipped model),
generate one sample in headless Chromium (the browser test's set-up: Debian's chromium-headless-shell driven
by playwright), and screenshot the page.

    python scripts/serve_screenshot.py        # the page's defaults (choir SATB, 8 bars) over C G Am F, C major

The instruments are chosen in the page's dropdowns by name, as a user does.
"""

from __future__ import annotations

import argparse
import shutil

from playwright.sync_api import sync_playwright

from meloformer.module import open_checkpoint
from meloformer.serve import Studio, build_app, launch

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
BROWSER_ARGS += ["--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", default=None, help="a checkpoint or model folder (default: the shipped model)")
    parser.add_argument("--out", default="docs/serve.png")
    parser.add_argument(
        "--tracks", nargs="*", default=None, help="instrument names, one per track (default: the page's)"
    )
    parser.add_argument("--bars", default="8")
    parser.add_argument("--chords", default="C G Am F")
    parser.add_argument("--key", default="C major")
    parser.add_argument("--seed", default="1")
    args = parser.parse_args()
    browser_path = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    if browser_path is None:
        raise SystemExit("no Chromium: apt-get install chromium-headless-shell")
    app = build_app(Studio(open_checkpoint(args.ckpt_path, "cpu")))
    url = launch(app, port=7861, block=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(300_000)
        page.goto(url)
        for slot, name in enumerate(args.tracks or [], start=1):
            page.locator(f"#track_{slot} input").fill(name)
            page.get_by_role("option", name=name, exact=True).first.click()
        page.locator("#key input").fill(args.key)
        page.get_by_role("option", name=args.key, exact=True).first.click()
        page.locator("#bars input").fill(args.bars)
        page.locator("#chords textarea").fill(args.chords)
        page.locator("#seed input").fill(args.seed)
        page.locator("#generate").click()
        page.locator("#pianoroll img").wait_for(state="visible")
        page.locator("#audio audio[src]").first.wait_for(state="attached")
        page.wait_for_timeout(1000)  # let the waveform draw
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    app.close()
    print(args.out)


if __name__ == "__main__":
    main()
