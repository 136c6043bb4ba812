import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from transformers import CLIPTokenizer

from balora_diffusion import paths, world
from balora_diffusion.concept import fidelity, fidelity_batch, load_concept
from balora_diffusion.data import read_concept_folder
from balora_diffusion.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DEMO = paths.DEMO_CONCEPT


def _script():
    spec = importlib.util.spec_from_file_location("make_demo_concept", REPO / "training" / "make_demo_concept.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    return load_concept(DEMO)


@pytest.fixture(scope="module")
def script():
    return _script()


def test_demo_concept_folder(demo):
    assert 5 <= len(demo.images) <= 8 and all(p.suffix == ".png" for p in demo.images)
    examples = read_concept_folder(demo.path, [demo.token], demo.caption_template)
    assert len(examples) == len(demo.images)
    backgrounds = set()
    for example in examples:
        assert example.image.size == (128, 128)
        assert example.path.with_suffix(".txt").is_file() and demo.token in example.caption
        # the caption's background word is the colour of the image's whole border
        pixels = np.asarray(example.image, dtype=np.int64)
        ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        named = [b for b in world.BACKGROUNDS if f"on a {b} background" in example.caption]
        assert len(named) == 1 and (ring == world.BACKGROUNDS[named[0]]).all()
        backgrounds.add(named[0])
        # two-tone: the first colour is the left half, the second the right half
        ys, xs = np.mgrid[0:128, 0:128]
        first, second = (np.all(pixels == rgb, axis=-1) for rgb in demo.colours.values())
        assert first.sum() > 100 and second.sum() > 100
        assert xs[first].mean() < xs[second].mean()
    assert len(backgrounds) >= 4
    assert all(demo.token in p for p in demo.eval_prompts) and len(demo.eval_prompts) >= 4
    train_contexts = {e.caption.replace(demo.token, "") for e in examples}
    assert all(p.replace(demo.token, "") not in train_contexts for p in demo.eval_prompts)


def test_demo_token_is_new_and_its_words_are_real(demo):
    tokenizer = CLIPTokenizer.from_pretrained(paths.TOKENIZER)
    assert len(tokenizer(demo.token, add_special_tokens=False).input_ids) > 1
    for word in (demo.initializer, demo.class_word):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1


def test_concept_colours_stay_out_of_the_world(demo):
    for rgb in demo.colours.values():
        for other in [*world.COLOURS.values(), *world.BACKGROUNDS.values()]:
            assert np.linalg.norm(np.subtract(rgb, other)) > 100
    a, b = demo.colours.values()
    assert np.linalg.norm(np.subtract(a, b)) > 100


def test_fidelity_is_high_on_the_concept(demo, script):
    assert min(fidelity(Image.open(p), demo) for p in demo.images) > 0.8
    # new contexts at the model's resolutions, also blurred as a VAE would
    for (background, size, position), resolution in itertools.product(
            itertools.product(world.BACKGROUNDS, world.SIZES, ("center", "right", "bottom")), (32, 64)):
        image = script.render_zorb(background, size, position, resolution, jitter_seed=11)
        assert fidelity(image, demo) > 0.8
        assert fidelity(image.filter(ImageFilter.GaussianBlur(0.8)), demo) > 0.8


def test_fidelity_is_low_on_other_images(demo, script, monkeypatch):
    scenes = world.all_scenes()
    assert max(fidelity(world.render(s, 64, i), demo) for i, s in enumerate(scenes[::3])) < 0.2
    for rgb in [*world.BACKGROUNDS.values(), *demo.colours.values()]:
        assert fidelity(np.full((64, 64, 3), rgb, dtype=np.uint8), demo) == 0.0
    rng = np.random.default_rng(0)
    assert fidelity(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), demo) < 0.2
    # the right silhouette in one of the two colours only
    for rgb in demo.colours.values():
        monkeypatch.setattr(script, "COLOURS", {"left": rgb, "right": rgb})
        assert fidelity(script.render_zorb("white", "large", "center", 64), demo) < 0.2


def test_fidelity_falls_monotonically_as_the_object_is_recoloured(demo, script):
    image = np.asarray(script.render_zorb("gray", "large", "center", 64, jitter_seed=4)).copy()
    background = np.asarray(world.BACKGROUNDS["gray"])
    rows = np.nonzero(np.any(np.abs(image.astype(int) - background).sum(-1) > 0, axis=1))[0]
    scores = []
    for row in range(rows[0], rows[-1] + 2):
        recoloured = image.copy()
        part = recoloured[:row]
        part[np.abs(part.astype(int) - background).sum(-1) > 0] = world.COLOURS["orange"]
        scores.append(fidelity(recoloured, demo))
    assert scores[0] > 0.8 and scores[-1] == 0.0
    assert all(b <= a + 1e-12 for a, b in zip(scores, scores[1:]))
    assert len(set(np.round(scores, 6))) > 5  # it falls gradually, not in one step


def test_fidelity_batch_is_the_mean(demo):
    images = [Image.open(demo.images[0]), np.full((64, 64, 3), 128, dtype=np.uint8)]
    assert fidelity_batch(images, demo) == pytest.approx((fidelity(images[0], demo) + 0.0) / 2)
    with pytest.raises(ValueError):
        fidelity_batch([], demo)


GOOD_TOML = """token = "<tok>"
initializer = "cat"
class_word = "cat"
caption_template = "a photo of {token}"
eval_prompts = ["a <tok> on a beach"]
[colours]
red = [255, 0, 0]
"""


@pytest.mark.parametrize("broken", [
    None,  # no concept.toml
    GOOD_TOML.replace('initializer = "cat"\n', ""),
    GOOD_TOML.replace("{token}", "it"),
    GOOD_TOML.replace("[255, 0, 0]", "[255, 0, 300]"),
    GOOD_TOML.replace("a <tok> on a beach", "a dog on a beach"),
    GOOD_TOML.replace("token = ", "token == "),
    GOOD_TOML.replace("[colours]", 'colour_space = "srgb"\n[colours]'),
])
def test_load_concept_rejects_bad_folders(tmp_path, broken):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    if broken is not None:
        (tmp_path / "concept.toml").write_text(broken)
    with pytest.raises(UserError):
        load_concept(tmp_path)


def test_load_concept_reads_a_valid_folder(tmp_path):
    (tmp_path / "concept.toml").write_text(GOOD_TOML)
    with pytest.raises(UserError):  # no images yet
        load_concept(tmp_path)
    for name in ("b.png", "a.JPG"):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG" if name.endswith("png") else "JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    concept = load_concept(tmp_path)
    assert concept.colours == {"red": (255, 0, 0)} and concept.initializer == "cat"
    assert [p.name for p in concept.images] == ["a.JPG", "b.png"]


def test_mask_files_beside_the_images_are_no_reference_images(tmp_path):
    # the images eval compares against (clip-i, dino) are the ones training reads, never a mask
    folder = tmp_path / "zorb-masked"
    folder.mkdir()
    for path in [*DEMO.iterdir(), *paths.DEMO_MASKS.glob("*.mask.png")]:
        (folder / path.name).write_bytes(path.read_bytes())
    concept = load_concept(folder)
    trained = read_concept_folder(folder, [concept.token], concept.caption_template)
    assert [p.name for p in concept.images] == [e.path.name for e in trained] == [p.name for p in load_concept(DEMO).images]
    for mask in folder.glob("*.mask.png"):
        mask.unlink()
    (folder / "only.mask.png").write_bytes(next(paths.DEMO_MASKS.glob("*.mask.png")).read_bytes())
    for image in [*folder.glob("*.png")]:
        if not image.name.endswith(".mask.png"):
            image.unlink()
    with pytest.raises(UserError, match="no images"):  # a folder of masks alone holds no images
        load_concept(folder)


def test_the_second_concept_is_a_two_tone_ring_that_the_first_ones_score_does_not_take(demo, script):
    ring = load_concept(paths.RING_CONCEPT)
    assert ring.token == script.RING_TOKEN and ring.token != demo.token and len(ring.images) == 6
    for example in read_concept_folder(ring.path, [ring.token], ring.caption_template):
        pixels = np.asarray(example.image, dtype=np.int64)
        ys, _ = np.mgrid[0:128, 0:128]
        top, bottom = (np.all(pixels == rgb, axis=-1) for rgb in ring.colours.values())
        assert example.image.size == (128, 128) and top.sum() > 100 and bottom.sum() > 100
        assert ys[top].mean() < ys[bottom].mean()  # first colour on top
        # a ring: the centre shows the background
        centre = np.array(np.nonzero(top | bottom)).mean(axis=1).round().astype(int)
        assert np.array_equal(pixels[centre[0], centre[1]], pixels[0, 0])
    for rgb in ring.colours.values():
        for other in [*world.COLOURS.values(), *world.BACKGROUNDS.values(), *demo.colours.values()]:
            assert np.linalg.norm(np.subtract(rgb, other)) > 100
    assert min(fidelity(Image.open(p), ring) for p in ring.images) > 0.8
    assert max(fidelity(Image.open(p), demo) for p in ring.images) < 0.2
    assert max(fidelity(Image.open(p), ring) for p in demo.images) < 0.2
