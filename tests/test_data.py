"""Concept folders: bad input fails early and clearly; batches are a pure function of the step."""
import codecs
import os
import struct
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from balora_diffusion import paths
from balora_diffusion.data import ConceptData, read_concept_folder, to_rgb
from balora_diffusion.errors import UserError


def _save(path, mode, size=(40, 30)):
    rng = np.random.default_rng(len(str(path)))
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "RGBA":
        img = rgb.convert("RGBA")
        img.putalpha(128)
    elif mode == "P":
        img = rgb.convert("P")
    else:
        img = rgb.convert(mode)
    img.save(path)


@pytest.fixture
def folder(tmp_path):
    for i, mode in enumerate(["RGB", "RGBA", "L", "P", "CMYK"]):
        _save(tmp_path / f"img{i}.{'jpg' if mode == 'CMYK' else 'png'}", mode)
    (tmp_path / "img0.txt").write_text("a <sks> on a table")
    return tmp_path


def test_every_mode_becomes_rgb_and_captions_fall_back_to_template(folder):
    examples = read_concept_folder(folder, ["<sks>"], "a photo of a {token}")
    assert len(examples) == 5
    assert {e.image.mode for e in examples} == {"RGB"}
    assert examples[0].caption == "a <sks> on a table"
    assert all(e.caption == "a photo of a <sks>" for e in examples[1:])


def test_alpha_is_composited_over_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)
    img = Image.new("LA", (4, 4), (0, 255))
    assert to_rgb(img).getpixel((0, 0)) == (0, 0, 0)


def test_sixteen_bit_grayscale_is_rescaled_not_clipped():
    arr = np.array([[0, 65535]], dtype=np.uint16)
    out = to_rgb(Image.fromarray(arr))
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


def test_bad_folders_are_user_errors(tmp_path, folder):
    with pytest.raises(UserError, match="not found"):
        read_concept_folder(tmp_path / "nope", ["<sks>"], "{token}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        read_concept_folder(empty, ["<sks>"], "{token}")
    (folder / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match="broken.png"):
        read_concept_folder(folder, ["<sks>"], "{token}")
    (folder / "broken.png").unlink()
    (folder / "img1.txt").write_text("a dog")
    with pytest.raises(UserError, match="never names <sks>"):
        read_concept_folder(folder, ["<sks>"], "{token}")


def test_batches_are_deterministic_and_cover_each_epoch(folder):
    examples = read_concept_folder(folder, ["<sks>"], "a photo of a {token}")
    data = ConceptData(examples, resolution=16, repeats=2, seed=3, random_crop=True, flip=True)
    a, caps_a, no_masks = data.batch(5, 4)
    b, caps_b, _ = data.batch(5, 4)
    assert no_masks is None
    assert torch.equal(a, b) and caps_a == caps_b
    assert a.shape == (4, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    # one epoch = every image `repeats` times
    seen = [data._index(i) for i in range(data.epoch_len)]
    assert sorted(seen) == sorted(list(range(5)) * 2)
    # two processes split the global batch: together they see what one process with 2x batch sees
    r0, _, _ = data.batch(7, 2, rank=0, world_size=2)
    r1, _, _ = data.batch(7, 2, rank=1, world_size=2)
    both, _, _ = data.batch(7, 4)
    assert torch.equal(torch.cat([r0, r1]), both)


# ---- data people really have: phone photos, other editors' encodings, long captions, odd sizes

def _concept(folder, images: dict[str, Image.Image], captions: dict[str, bytes] | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(folder / name)
    for name, raw in (captions or {}).items():
        (folder / name).write_bytes(raw)
    return folder


def _noise(size):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    # Upright: 24 wide, 48 tall, red top, blue bottom, a green square in the top-left corner.
    upright = np.zeros((48, 24, 3), dtype=np.uint8)
    upright[:24] = (255, 0, 0)
    upright[24:] = (0, 0, 255)
    upright[:12, :12] = (0, 255, 0)
    # A phone stores the sensor's pixels and an Orientation tag (6: rotate 90 degrees clockwise to view).
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)

    [example] = read_concept_folder(tmp_path, ["<sks>"], "a {token}")
    assert example.image.size == (24, 48)
    assert np.abs(np.asarray(example.image, dtype=np.int16) - upright).mean() < 8


@pytest.mark.parametrize("encode", [
    lambda s: codecs.BOM_UTF8 + s.encode("utf-8"),
    lambda s: codecs.BOM_UTF16_LE + s.encode("utf-16-le"),
    lambda s: codecs.BOM_UTF16_BE + s.encode("utf-16-be"),
], ids=["utf-8-bom", "utf-16-le-bom", "utf-16-be-bom"])
def test_captions_with_a_byte_order_mark_are_read(tmp_path, encode):
    folder = _concept(tmp_path, {"a.png": _noise((32, 32))}, {"a.txt": encode("un <sks> sur la table, café\n")})
    [example] = read_concept_folder(folder, ["<sks>"], "a {token}")
    assert example.caption == "un <sks> sur la table, café"


@pytest.mark.parametrize("raw, problem", [
    ("un <sks> au café".encode("latin-1"), "byte 0xe9 at offset 15"),
    (codecs.BOM_UTF8 + "un <sks> au café".encode("latin-1"), "byte 0xe9 at offset 18"),
    ("a <sks> on a table".encode("utf-16-le"), "NUL"),  # no BOM: valid UTF-8 bytes full of NULs
], ids=["latin-1", "utf-8-bom-then-latin-1", "utf-16-no-bom"])
def test_captions_in_other_encodings_are_refused_naming_the_file(tmp_path, raw, problem):
    folder = _concept(tmp_path, {"a.png": _noise((32, 32))}, {"a.txt": raw})
    with pytest.raises(UserError, match="save it as UTF-8") as info:
        read_concept_folder(folder, ["<sks>"], "a {token}")
    assert str(folder / "a.txt") in str(info.value) and problem in str(info.value)


def _tokenizer_with(tokens):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(paths.TOKENIZER)
    tokenizer.add_tokens(tokens)
    return tokenizer


def test_a_placeholder_must_fall_inside_the_text_encoders_window(tmp_path):
    from balora_diffusion.data import check_caption_tokens

    tokenizer = _tokenizer_with(["<sks>"])
    # "a" is one CLIP token: BOS + 74 words + <sks> + EOS is exactly the 77-token window
    fits = " ".join(["a"] * 74) + " <sks>"
    assert len(tokenizer(fits).input_ids) == tokenizer.model_max_length == 77
    folder = _concept(tmp_path, {"a.png": _noise((32, 32)), "b.png": _noise((32, 32))},
                      {"a.txt": fits.encode()})
    check_caption_tokens(read_concept_folder(folder, ["<sks>"], "{token}"), tokenizer, ["<sks>"])

    (folder / "b.txt").write_text("a " + fits + " on a table")
    with pytest.raises(UserError, match=r"81 tokens.*<sks>") as info:
        check_caption_tokens(read_concept_folder(folder, ["<sks>"], "{token}"), tokenizer, ["<sks>"])
    assert str(folder / "b.txt") in str(info.value)

    (folder / "b.txt").unlink()
    with pytest.raises(UserError, match="caption template.*78 tokens"):
        check_caption_tokens(read_concept_folder(folder, ["<sks>"], fits.replace("<sks>", "a {token}")),
                             tokenizer, ["<sks>"])


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_an_image_claiming_a_huge_size_is_refused_from_its_header(tmp_path):
    folder = _concept(tmp_path, {"a.png": _noise((32, 32))})
    (folder / "huge.png").write_bytes(_png_header(100_000, 100_000))
    started = time.perf_counter()
    with pytest.raises(UserError, match="10000000000 pixels") as info:
        read_concept_folder(folder, ["<sks>"], "a {token}")
    assert str(folder / "huge.png") in str(info.value)
    assert time.perf_counter() - started < 5


def test_images_over_pils_pixel_limit(tmp_path, monkeypatch):
    folder = _concept(tmp_path, {"a.png": _noise((40, 30))})  # 1200 pixels
    # Between the limit and twice it PIL only warns: accepted, and without a Python warning on stderr.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [example] = read_concept_folder(folder, ["<sks>"], "a {token}")
    assert example.image.size == (40, 30)
    # Past twice the limit: refused, naming the file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(UserError, match="1200 pixels") as info:
        read_concept_folder(folder, ["<sks>"], "a {token}")
    assert str(folder / "a.png") in str(info.value)


def test_image_size_rule_against_the_training_resolution(tmp_path, capsys):
    from balora_diffusion.data import check_image_sizes

    folder = _concept(tmp_path, {"big.png": _noise((80, 70)), "small.png": _noise((40, 16))})
    check_image_sizes(read_concept_folder(folder, ["<sks>"], "a {token}"), 64)
    warned = capsys.readouterr().err.splitlines()
    assert len(warned) == 1 and warned[0].startswith("balora: warning: ") and "small.png" in warned[0]
    check_image_sizes(read_concept_folder(folder, ["<sks>"], "a {token}"), 64, quiet=True)
    assert capsys.readouterr().err == ""

    _noise((40, 15)).save(folder / "small.png")  # below a quarter of 64
    with pytest.raises(UserError, match="40x15") as info:
        check_image_sizes(read_concept_folder(folder, ["<sks>"], "a {token}"), 64)
    assert str(folder / "small.png") in str(info.value)


def _train_config(model_dir, data_dir, out, **kw):
    from balora_diffusion.train_config import TrainConfig

    return TrainConfig(data_dir=str(data_dir), base_model=str(model_dir), token=["<sks>"], init_word="dog",
                       caption_template="a {token}", output_dir=str(out), steps=1, batch_size=1, eval_every=1,
                       checkpoint_every=1, heldout_size=1, grid_seeds=[1], fusion=[1.0], sample_steps=1, **kw)


def test_training_refuses_a_placeholder_past_the_window(random_sd_dir, tmp_path):
    from balora_diffusion.train import train

    folder = _concept(tmp_path / "data", {"a.png": _noise((32, 32))},
                      {"a.txt": (" ".join(["a"] * 80) + " <sks>").encode()})
    with pytest.raises(UserError, match="83 tokens") as info:
        train(_train_config(random_sd_dir, folder, tmp_path / "run"))
    assert str(folder / "a.txt") in str(info.value)
    assert not (tmp_path / "run" / "adapter").exists()


def test_training_warns_about_upscaled_images(random_sd_dir, tmp_path, capsys):
    from balora_diffusion.train import train

    # the random pipeline trains at 16 px: an 8 px image is upscaled 2x
    folder = _concept(tmp_path / "data", {"a.png": _noise((32, 32)), "b.png": _noise((8, 12))})
    out = train(_train_config(random_sd_dir, folder, tmp_path / "run"))
    assert (out / "adapter").is_dir()
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("balora: warning: ")]
    assert len(warned) == 1 and "b.png" in warned[0] and "8x12" in warned[0]


@pytest.mark.parametrize("case", ["latin-1 caption", "1x1 image"])
def test_cli_exits_2_with_one_error_line(random_sd_dir, tmp_path, case):
    folder = _concept(tmp_path / "data", {"a.png": _noise((32, 32))})
    if case == "latin-1 caption":
        (folder / "a.txt").write_bytes("un <sks> au café".encode("latin-1"))
        # a missing model: the data folder must be refused before the model is even looked for
        model, named = tmp_path / "no-model", folder / "a.txt"
    else:
        _noise((1, 1)).save(folder / "tiny.png")
        model, named = random_sd_dir, folder / "tiny.png"
    result = subprocess.run(
        [sys.executable, "-m", "balora_diffusion.cli", "train", "--data-dir", str(folder),
         "--base-model", str(model), "--token", "<sks>", "--output-dir", str(tmp_path / "run"), "--steps", "1"],
        # TRANSFORMERS_VERBOSITY: transformers' own import-time notices (e.g. that torchvision is not
        # installed) are not this check's subject; everything balora prints still counts
        env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error"), capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    ours = [line for line in lines if line.startswith("balora: ")]
    assert ours == lines[-1:] and ours[0].startswith("balora: error: ") and str(named) in ours[0], lines
    if case == "latin-1 caption":
        assert len(lines) == 1, lines  # refused before the model's loading progress bars
    assert not (tmp_path / "run" / "adapter").exists()


def test_size_conditions_give_each_drawn_image_its_original_size_and_crop():
    from balora_diffusion.data import View, size_condition
    from balora_diffusion.families import SizeCondition

    # an 80 x 48 image covering 32 x 32: resized to 53 x 32, the centre crop starts 10 px in from the left,
    # and its mirror image 53 - 42 = 11 px in
    view = View(resized=(53, 32), box=(10, 0, 42, 32), flipped=False, upscaled=False)
    assert size_condition((80, 48), view) == SizeCondition(original=(48, 80), crop=(0, 10), target=(32, 32))
    assert size_condition((80, 48), View((53, 32), (10, 0, 42, 32), True, False)).crop == (0, 11)


def test_size_conditions_follow_the_batches_random_crops(folder):
    examples = read_concept_folder(folder, ["<sks>"], "a {token}")
    data = ConceptData(examples, resolution=24, seed=3, random_crop=True, flip=True)
    sizes = [data.size_conditions(step, 2) for step in range(6)]
    # every image is 40 x 30: resized to 32 x 24, a crop starts 0 to 8 px in from the left
    assert all(len(s) == 2 and all(c.target == (24, 24) and c.original == (30, 40) for c in s) for s in sizes)
    assert {c.crop[0] for s in sizes for c in s} == {0} and all(0 <= c.crop[1] <= 8 for s in sizes for c in s)
    assert len({c.crop for s in sizes for c in s}) > 1, "random crops start at different corners"
    assert sizes == [data.size_conditions(step, 2) for step in range(6)], "a pure function of the step"
