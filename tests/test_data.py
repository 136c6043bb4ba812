"""Concept folders: bad input fails early and clearly; batches are a pure function of the step."""
import numpy as np
import pytest
import torch
from PIL import Image

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
    a, caps_a = data.batch(5, 4)
    b, caps_b = data.batch(5, 4)
    assert torch.equal(a, b) and caps_a == caps_b
    assert a.shape == (4, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    # one epoch = every image `repeats` times
    seen = [data._index(i) for i in range(data.epoch_len)]
    assert sorted(seen) == sorted(list(range(5)) * 2)
    # two processes split the global batch: together they see what one process with 2x batch sees
    r0, _ = data.batch(7, 2, rank=0, world_size=2)
    r1, _ = data.batch(7, 2, rank=1, world_size=2)
    both, _ = data.batch(7, 4)
    assert torch.equal(torch.cat([r0, r1]), both)
