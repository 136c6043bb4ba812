"""Screenshots of the Compare tab and of the Train tab, drawn in a real headless browser (Debian's
chromium through playwright; no browser is downloaded). Run from a source checkout:

    python -m app.screenshot --runs runs/sweep --out docs/img/app-compare.png \
        --prompt "a large <zorb> on a blue background" --fusion "0.7, 1" --train-out docs/img/app-train.png

The Train tab is shown with the shipped concept's images, captions and masks uploaded, before
anything trains. Both are saved in 256 colours, a third of the size of the browser's PNG.
"""
from __future__ import annotations

import argparse
import socket
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
# As root chromium needs --no-sandbox; the rest keep it from calling out of a closed network.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def launch_chromium(playwright):
    """Debian's chromium, headless, with a fresh profile folder (playwright makes one per launch)."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_tab(page, expect) -> int:
    """The Train tab with the shipped concept's images, captions and masks uploaded, the photo
    options open and masked loss ticked; the height of the page down to its Train button."""
    from balora_diffusion import paths

    page.get_by_role("tab", name="Train").click()
    masks = paths.DEMO_CONCEPT.parent / "zorb-masks"
    images = sorted(paths.DEMO_CONCEPT.glob("*.png"))
    page.locator("#uploads input[type=file]").set_input_files(
        [str(p) for p in images] + [str(p.with_suffix(".txt")) for p in images] + [str(p) for p in sorted(masks.iterdir())])
    expect(page.locator("#upload-check")).to_contain_text("image(s)", timeout=60_000)
    page.get_by_role("button", name="Your own photos: buckets, masks, hold-out, prior preservation").click()
    page.locator("#masked-loss input").check()
    page.wait_for_timeout(1000)  # the thumbnails' images load after the gallery
    page.evaluate("window.scrollTo(0, 0)")
    box = page.get_by_role("button", name="Train", exact=True).bounding_box()
    return int(box["y"] + box["height"]) + 12


def save_small(png: bytes, out: Path, height: int = 0) -> None:
    """A screenshot in 256 colours at `out`; with `height`, only its top that many pixels."""
    import io

    from PIL import Image

    from balora_diffusion.atomic import atomic_path

    with Image.open(io.BytesIO(png)) as shot:
        image = shot.convert("RGB")
    if height:
        image = image.crop((0, 0, image.width, min(image.height, height)))
    with atomic_path(out) as tmp:
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(tmp, format="PNG", optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m app.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base-model", default="")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--fusion", default="0.7, 1")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch CPU threads; 0 = automatic (see balora train --help)")
    parser.add_argument("--train-out", type=Path, help="also the Train tab, with the shipped concept uploaded")
    args = parser.parse_args()

    from playwright.sync_api import expect, sync_playwright

    from balora_diffusion.app.app import App, serve

    port = free_port()
    ui = serve(App(args.runs, args.base_model, cpu_threads=args.cpu_threads), "127.0.0.1", port, block=False)
    try:
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            # the page's load fills in the prompt of the runs there are now; typed before, it is replaced
            expect(page.get_by_label("prompt", exact=True)).not_to_have_value("")
            if args.prompt:
                page.get_by_label("prompt", exact=True).fill(args.prompt)
            page.get_by_label("fusion coefficients (LoRA strength)").fill(args.fusion)
            page.get_by_role("button", name="Draw grid").click()
            expect(page.locator("#grid img")).to_be_visible(timeout=600_000)
            page.wait_for_function("document.querySelector('#grid img').complete")
            if args.prompt:
                # the page's load can land after the first fill and put the runs' prompt back; the
                # box is to show what the grid drew
                page.get_by_label("prompt", exact=True).fill(args.prompt)
            save_small(page.screenshot(full_page=True, type="png"), args.out)
            if args.train_out:
                height = train_tab(page, expect)
                save_small(page.screenshot(full_page=True, type="png"), args.train_out, height)
            browser.close()
    finally:
        ui.close()
    print(f"screenshot: {args.out}")


if __name__ == "__main__":
    main()
