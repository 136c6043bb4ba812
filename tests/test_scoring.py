"""Prompt adherence from pixels: contexts parsed from prompts, read back from rendered images."""
import itertools

import numpy as np
import pytest
from PIL import Image

from balora_diffusion import paths, scoring, world
from balora_diffusion.data import read_concept_folder

SCENES = world.all_scenes()


@pytest.fixture(scope="module")
def world_calibration():
    # calibrated on one jitter draw of every 5th scene, tested on other draws below
    return scoring.calibrate((world.render(s, 64, jitter_seed=i), s.caption()) for i, s in enumerate(SCENES[::5]))


@pytest.fixture(scope="module")
def zorb():
    return read_concept_folder(paths.DEMO_CONCEPT, ["<zorb>"], "a {token}")


def test_context_prompts_parse_back_to_themselves():
    for background, size, position in itertools.product([None, *world.BACKGROUNDS], [None, *world.SIZES],
                                                        [None, *scoring.POSITION_PHRASES]):
        context = scoring.Context(background, size, position)
        assert scoring.parse_context(context.prompt("<zorb>")) == context


def test_world_captions_name_what_they_say():
    scene = world.Scene("star", "red", "blue", "small", "top")
    assert scoring.parse_context(scene.caption()) == scoring.Context("blue", "small", "top")
    # the centre has no phrase, so it is never named; an omitted size is not named either
    assert scoring.parse_context(world.Scene("star", "red", "gray", "large", "center").caption(omit=["size"])) \
        == scoring.Context("gray", None, None)


def test_every_world_scene_is_read_back(world_calibration):
    wrong = []
    for i, scene in enumerate(SCENES):
        reading = scoring.read_context(world.render(scene, 64, jitter_seed=10_000 + i))
        got = (reading.background, reading.size(world_calibration), reading.position(world_calibration))
        if got != (scene.background, scene.size, scene.position):
            wrong.append((scene, got))
    assert wrong == []


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_the_concepts_training_images_adhere_to_their_captions(zorb, resolution):
    calibration = scoring.calibrate((e.image, e.caption) for e in zorb)
    assert calibration.area is not None
    for example in zorb:
        image = example.image.resize((resolution, resolution), Image.BICUBIC)
        checks = scoring.adherence(image, scoring.parse_context(example.caption), calibration)
        assert checks and all(checks.values()), (example.caption, checks)


def test_without_the_heart_shift_a_large_centred_heart_reads_as_top(zorb):
    # why the calibration has a shift: the heart's centroid sits above the middle of its outline
    calibration = scoring.calibrate((e.image, e.caption) for e in zorb)
    centred = next(e for e in zorb if e.caption == "a large <zorb> on a white background")
    reading = scoring.read_context(centred.image)
    assert calibration.shift[1] < -0.1
    assert reading.position(calibration) == "center"
    assert reading.position(scoring.Calibration(calibration.area)) == "top"


def test_a_context_the_image_does_not_show_fails_on_that_attribute(world_calibration):
    image = world.render(world.Scene("circle", "red", "white", "small", "left"), 64)
    checks = scoring.adherence(image, scoring.Context("white", "large", "right"), world_calibration)
    assert checks == {"background": True, "size": False, "position": False}
    assert scoring.adherence_score([checks]) == pytest.approx(1 / 3)


def test_an_image_without_an_object_shows_no_size_or_position(world_calibration):
    flat = Image.new("RGB", (64, 64), world.BACKGROUNDS["gray"])
    checks = scoring.adherence(flat, scoring.Context("gray", "small", "top"), world_calibration)
    assert checks == {"background": True, "size": False, "position": False}


def test_sizes_are_not_scored_without_sized_captions():
    image = world.render(world.Scene("circle", "red", "white", "small", "left"), 64)
    calibration = scoring.calibrate([(image, "a red circle on the left on a white background")])
    assert calibration.area is None
    assert scoring.adherence(image, scoring.Context("white", "large", "left"), calibration) == \
        {"background": True, "position": True}


def test_adherence_score_averages_per_image_shares():
    assert scoring.adherence_score([{"a": True, "b": False}, {"a": True}]) == pytest.approx(0.75)
    assert scoring.adherence_score([{}, {}]) is None


def test_unseen_contexts_avoid_the_seen_ones_and_are_a_fixed_draw():
    seen = [scoring.Context(b, "small", p) for b in world.BACKGROUNDS for p in scoring.POSITION_PHRASES]
    drawn = scoring.unseen_contexts(seen, 5)
    assert len(drawn) == 5 and len(set(drawn)) == 5
    assert all(c.size == "large" and c not in seen for c in drawn)
    assert scoring.unseen_contexts(seen, 5) == drawn
    assert len(scoring.unseen_contexts(seen, 1000)) == len(world.BACKGROUNDS) * len(scoring.POSITION_PHRASES)


def test_position_offset_separates_centre_jitter_from_the_nearest_off_centre_placement():
    jitter = max(abs(world.placement(size, "center", seed)[k] - 0.5) for size in world.SIZES
                 for seed in range(200) for k in (0, 1))
    nearest = min(abs(world.placement(size, "left")[0] - 0.5) for size in world.SIZES)
    assert jitter < scoring.POSITION_OFFSET < nearest - jitter
    assert np.isclose(scoring.POSITION_OFFSET, nearest / 2)
