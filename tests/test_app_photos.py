"""The Train tab's photo options: masks uploaded beside the images, buckets, hold-out and prior
preservation checked before any process starts and passed through to `balora train`; the uploads'
thumbnails with their captions; the samples the training writes as it goes.
"""
import json
from pathlib import Path

import pytest
from PIL import Image

from balora_diffusion import paths
from balora_diffusion.errors import UserError

pytest.importorskip("gradio", reason="the app's extra is not installed: pip install -e '.[app]'")

from balora_diffusion.app import training  # noqa: E402
from balora_diffusion.app.app import App, serve  # noqa: E402
from balora_diffusion.app.screenshot import free_port  # noqa: E402

MASKS = paths.DEMO_CONCEPT.parent / "zorb-masks"


def _uploads(n=3, masks=True) -> list[Path]:
    images = sorted(paths.DEMO_CONCEPT.glob("*.png"))[:n]
    return images + [p.with_suffix(".txt") for p in images] + \
        ([MASKS / f"{p.stem}.mask.png" for p in images] if masks else [])


def test_masks_are_staged_beside_their_images_by_name(tmp_path):
    assert training.stage_uploads(_uploads(), tmp_path / "data") == 3
    staged = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert staged == ["00.mask.png", "00.png", "00.txt", "01.mask.png", "01.png", "01.txt", "02.mask.png", "02.png",
                      "02.txt"]
    assert (tmp_path / "data" / "01.mask.png").read_bytes() == (MASKS / "01.mask.png").read_bytes()


@pytest.mark.parametrize("case, message", [
    ("orphan", "mask\\(s\\) without an image of the same name: 05.mask.png"),
    ("other size", "^mask 00.mask.png is 64x64 but its image 00.png is 128x128"),
    ("all zero", "^mask 00.mask.png is all zero"),
    ("twice", "two uploads are named 00.mask.png")])
def test_a_mask_without_its_image_or_of_another_size_is_refused_and_leaves_nothing(tmp_path, case, message):
    files = _uploads()
    if case == "orphan":
        files.append(MASKS / "05.mask.png")
    else:
        (tmp_path / "masks").mkdir()
        bad = tmp_path / "masks" / "00.mask.png"
        files[files.index(MASKS / "00.mask.png")] = bad
        Image.new("L", (64, 64) if case == "other size" else (128, 128), 0).save(bad)
        if case == "twice":
            files.append(MASKS / "00.mask.png")
    with pytest.raises(UserError, match=message):
        training.stage_uploads(files, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_the_uploads_show_each_image_with_its_caption_and_mask_and_what_train_would_refuse(tmp_path, random_sd_dir):
    app = App(tmp_path / "runs", str(random_sd_dir), device="cpu", cpu_threads=1)
    files = [str(p) for p in _uploads(n=3)]
    no_caption = [f for f in files if not f.endswith("02.txt")]
    items, message = app.uploads_preview(no_caption, "<zorb>")
    assert [(Path(p).name, caption) for p, caption in items] == [
        ("00.png", "00.png: a large <zorb> on a white background"),
        ("00.mask.png", "00.mask.png: mask of 00.png (white = subject)"),
        ("01.png", f"01.png: {(paths.DEMO_CONCEPT / '01.txt').read_text().strip()}"),
        ("01.mask.png", "01.mask.png: mask of 01.png (white = subject)"),
        ("02.png", "02.png: a photo of a <zorb> (caption template)"),
        ("02.mask.png", "02.mask.png: mask of 02.png (white = subject)")]
    assert message.splitlines()[0] == "3 image(s), 2 caption(s), 3 mask(s)"
    assert "| 02.png | a photo of a &lt;zorb&gt; (caption template) | yes |" in message.splitlines()
    _, message = app.uploads_preview([*files, str(MASKS / "05.mask.png")], "<zorb>")
    assert message.startswith("**mask(s) without an image of the same name: 05.mask.png")
    assert app.uploads_preview([], "<zorb>") == ([], "")


@pytest.mark.parametrize("change, message", [
    ({"masked_loss": True, "files": _uploads(masks=False)}, "masked loss needs a mask for every image; none for "
                                                            "00.png, 01.png, 02.png"),
    ({"holdout": 3}, "holdout 3 keeps every image out of training"),
    ({"prior_prompt": "a <zorb>"}, "prior_prompt 'a <zorb>' names <zorb>"),
    ({"buckets": "wide"}, "expected off, auto or sizes such as 64x48 48x64, got wide"), ({"unmasked_weight": 2}, "background weight must be a number from 0 to 1"),
    ({"prior_weight": None}, "prior weight must be"), ({"sample_every": -1}, "samples every must be"),
    # files are named as uploaded, not by the folder they were staged in
    ({"token": "<quax>"}, "^caption of 00.png \\(00.txt\\) never names <quax>")])
def test_bad_photo_options_are_one_message_before_any_process_starts(tmp_path, random_sd_dir, change, message):
    app = App(tmp_path / "runs", str(random_sd_dir), device="cpu", cpu_threads=1)
    options = dict(files=_uploads(), name="photos", token="<zorb>", init_word="heart", method="lora", lr_unet=1e-3,
                   lr_text=1e-4, steps=2, rank=2)
    with pytest.raises(UserError, match=message):
        app.train(**{**options, **change})
    assert app.trainer.job is None
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".app-cache"]


def test_a_run_trained_from_the_page_with_the_photo_options_records_them_and_shows_its_samples(tmp_path,
                                                                                                random_sd_dir):
    from gradio_client import Client, handle_file

    app = App(tmp_path / "runs", str(random_sd_dir), device="cpu", cpu_threads=1)
    port = free_port()
    ui = serve(app, "127.0.0.1", port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        status, _, files = client.predict(
            [handle_file(p) for p in _uploads(n=4)], "photos", "<zorb>", "heart", "lora", 1e-2, 1e-3, 4, 2, False,
            "auto", True, 0.1, 1, "a heart", 0.5, 2, api_name="/train")
    finally:
        ui.close()
    assert status == "photos finished: 4 steps", status
    folder = tmp_path / "runs" / "photos"
    recorded = json.loads((folder / "run.json").read_text())["config"]
    assert {key: recorded[key] for key in ("buckets", "masked_loss", "unmasked_weight", "holdout", "prior_prompt",
                                           "prior_weight", "grid_every")} == \
        {"buckets": ["auto"], "masked_loss": True, "unmasked_weight": 0.1, "holdout": 1, "prior_prompt": "a heart",
         "prior_weight": 0.5, "grid_every": 2}
    assert json.loads((folder / "config.json").read_text())["masked_loss"] is True
    assert sorted(p.name for p in (folder / "data").glob("*.mask.png")) == [f"0{i}.mask.png" for i in range(4)]
    # the samples drawn at step 2 while it trained, then the final grid
    assert [p.name for p in folder.glob("grid-step*.png")] == ["grid-step000002.png"]
    image, label, key = app.samples()
    assert label == "photos: samples of the finished run" and image.size == Image.open(folder / "grid.png").size
    assert app.samples(key)[0] is None  # what the page shows already is not sent again
    (folder / "grid.png").unlink()
    assert app.samples()[1] == "photos: samples at step 2"
