"""The procedural captioned image world that the shipped tiny model is trained on.

A scene is one flat-coloured shape on a flat background: shape x colour x background x size x
position. Everything is deterministic (from the scene and an optional jitter seed), rendered
anti-aliased at any resolution, and measurable back from pixels by `classify`, so a base model's
prompt-following can be scored without a human. Some (colour, background) and (shape, colour)
pairs never appear in the training split (`HELDOUT_PAIRS`): a model that draws them anyway has
learned to compose words, not to memorise images.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.path import Path
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Bold, far-apart colours: the tiny VAE blurs detail, and classify() must tell them apart after
# anti-aliasing. Pink/magenta and cyan/teal are deliberately absent: the demo concept owns them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "purple": (135, 50, 185),
}
# A background shares its RGB with the object colour of the same name; such scenes do not exist.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "blue": COLOURS["blue"],
    "green": COLOURS["green"],
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")

# Held out of the training split. Every colour, background and shape named here still appears
# in training in other combinations (tests/test_world.py checks it).
HELDOUT_PAIRS: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("colour", "background"): (("red", "white"), ("yellow", "gray"), ("purple", "green"),
                               ("orange", "blue")),
    ("shape", "colour"): (("star", "green"), ("triangle", "purple")),
}

# The parts of a caption that Scene.caption can leave out (the shape is always named).
CAPTION_ATTRIBUTES: tuple[str, ...] = ("size", "colour", "position", "background")
_POSITION_WORDS = {"center": "", "left": " on the left", "right": " on the right",
                   "top": " at the top", "bottom": " at the bottom"}
_SIZE_RADIUS = {"small": 0.12, "large": 0.21}  # as a fraction of the image side
# Shapes in units of the size radius, pointing up (y grows downwards), roughly equal in area.
_SQUARE_HALF_SIDE = 0.9
_TRIANGLE_RADIUS = 1.35
_STAR_OUTER, _STAR_INNER = 1.3, 0.65
MAX_EXTENT = 1.35  # the largest circumradius above
# Jitter ranges, and the clear margin that keeps the outer pixel ring pure background (classify
# reads the background there) even at 32 px.
_JITTER_SHIFT, _JITTER_SCALE, _JITTER_DEGREES = 0.03, 0.1, 15.0
_MARGIN = 0.04


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                                     (self.background, BACKGROUNDS, "background"),
                                     (self.size, SIZES, "size"), (self.position, POSITIONS, "position")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {sorted(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} object on a {self.background} background is invisible")

    def caption(self, omit: Collection[str] = ()) -> str:
        """E.g. "a small red star on a blue background", "a large green circle on the left on a white background".

        `omit` leaves out any of CAPTION_ATTRIBUTES ("a red star on the left" omits size and
        background), for prompts that do not say everything, as a concept's prompts do. Training
        captions that omit a colour, though, teach which colours were seen together and spoil the
        held-out pairs (the recipe's dropout_attributes).
        """
        unknown = set(omit) - set(CAPTION_ATTRIBUTES)
        if unknown:
            raise ValueError(f"cannot omit {sorted(unknown)}; expected some of {CAPTION_ATTRIBUTES}")
        words = [w for attr, w in (("size", self.size), ("colour", self.colour)) if attr not in omit]
        position = "" if "position" in omit else _POSITION_WORDS[self.position]
        background = "" if "background" in omit else f" on a {self.background} background"
        return f"a {' '.join(words + [self.shape])}{position}{background}"


def is_heldout(scene: Scene) -> bool:
    return any((getattr(scene, a), getattr(scene, b)) in pairs for (a, b), pairs in HELDOUT_PAIRS.items())


def all_scenes() -> list[Scene]:
    """Every valid combination, in a fixed order."""
    return [Scene(*combo) for combo in itertools.product(SHAPES, COLOURS, BACKGROUNDS, SIZES, POSITIONS)
            if combo[1] != combo[2]]


def train_scenes() -> list[Scene]:
    return [s for s in all_scenes() if not is_heldout(s)]


def heldout_scenes() -> list[Scene]:
    return [s for s in all_scenes() if is_heldout(s)]


def _outline(shape: str) -> list[tuple[float, float]]:
    """Polygon vertices of a non-circle shape in size-radius units, centred on the origin."""
    def ring(radius: float, n: int, offset_deg: float = 0.0) -> list[tuple[float, float]]:
        return [(radius * math.cos(math.radians(-90 + offset_deg + 360 * k / n)),
                 radius * math.sin(math.radians(-90 + offset_deg + 360 * k / n))) for k in range(n)]

    if shape == "square":
        h = _SQUARE_HALF_SIDE
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        return ring(_TRIANGLE_RADIUS, 3)
    outer, inner = ring(_STAR_OUTER, 5), ring(_STAR_INNER, 5, 36.0)
    return [p for pair in zip(outer, inner) for p in pair]


def placement(size: str, position: str, jitter_seed: int | None = None) -> tuple[float, float, float, float]:
    """(centre x, centre y, radius, rotation in degrees), lengths as fractions of the image side.

    Any outline within MAX_EXTENT radii of its centre stays inside the image, clear of the border.
    """
    radius = _SIZE_RADIUS[size]
    # Off-centre positions go as far out as the largest jittered shape of this size can go.
    reach = 0.5 - _MARGIN - _JITTER_SHIFT - radius * MAX_EXTENT * (1 + _JITTER_SCALE)
    dx, dy = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}[position]
    cx, cy, angle = 0.5 + dx * reach, 0.5 + dy * reach, 0.0
    if jitter_seed is not None:
        rng = np.random.default_rng(jitter_seed)
        sx, sy = rng.uniform(-_JITTER_SHIFT, _JITTER_SHIFT, size=2)
        cx, cy = cx + sx, cy + sy
        radius *= 1 + rng.uniform(-_JITTER_SCALE, _JITTER_SCALE)
        angle = rng.uniform(-_JITTER_DEGREES, _JITTER_DEGREES)
    return float(cx), float(cy), float(radius), float(angle)


Inside = Callable[[np.ndarray, np.ndarray], np.ndarray]


def shape_inside(shape: str, centre: tuple[float, float], radius: float, angle_deg: float = 0.0) -> Inside:
    """Point-in-shape test for a world shape, in image-fraction coordinates (x right, y down)."""
    cx, cy = centre
    if shape == "circle":
        return lambda x, y: (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    path = Path([(cx + radius * (c * x - s * y), cy + radius * (s * x + c * y)) for x, y in _outline(shape)])
    return lambda x, y: path.contains_points(np.stack([x.ravel(), y.ravel()], axis=1)).reshape(x.shape)


def rasterize(inside: Inside, resolution: int, bounds: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
              supersample: int = 8) -> np.ndarray:
    """Coverage (H, W) in [0, 1]: the share of supersample x supersample sample points per pixel inside.

    Point sampling is unbiased (PIL's polygon fill includes its edge pixels and grows shapes by
    half a pixel). Only pixels within `bounds` (x0, y0, x1, y1 as image fractions) are sampled.
    """
    x0, y0, x1, y1 = bounds
    c0, r0 = max(0, math.floor(x0 * resolution)), max(0, math.floor(y0 * resolution))
    c1, r1 = min(resolution, math.ceil(x1 * resolution)), min(resolution, math.ceil(y1 * resolution))
    coverage = np.zeros((resolution, resolution))
    if c1 <= c0 or r1 <= r0:
        return coverage
    offsets = (np.arange(supersample) + 0.5) / supersample
    xs = (np.arange(c0, c1)[:, None] + offsets).ravel() / resolution
    ys = (np.arange(r0, r1)[:, None] + offsets).ravel() / resolution
    hits = inside(*np.meshgrid(xs, ys)).astype(np.float64)
    coverage[r0:r1, c0:c1] = hits.reshape(r1 - r0, supersample, c1 - c0, supersample).mean(axis=(1, 3))
    return coverage


def paint(background: tuple[int, int, int], layers: list[tuple[np.ndarray, tuple[int, int, int]]]) -> Image.Image:
    """Composite flat colours over a flat background, each layer (coverage, rgb) blended on top in order."""
    height, width = layers[0][0].shape
    canvas = np.broadcast_to(np.asarray(background, dtype=np.float64), (height, width, 3))
    for coverage, rgb in layers:
        canvas = canvas + coverage[..., None] * (np.asarray(rgb, dtype=np.float64) - canvas)
    return Image.fromarray(np.round(canvas).astype(np.uint8), "RGB")


def render(scene: Scene, resolution: int = 64, jitter_seed: int | None = None) -> Image.Image:
    """The scene as an anti-aliased RGB image; `jitter_seed` adds a small deterministic shift/scale/rotation."""
    cx, cy, radius, angle = placement(scene.size, scene.position, jitter_seed)
    reach = radius * MAX_EXTENT
    coverage = rasterize(shape_inside(scene.shape, (cx, cy), radius, angle), resolution,
                         (cx - reach, cy - reach, cx + reach, cy + reach))
    return paint(BACKGROUNDS[scene.background], [(coverage, COLOURS[scene.colour])])


def render_random(resolution: int = 64, seed: int = 0) -> Image.Image:
    """A random image of flat shapes in arbitrary colours, outside the world's palette and shapes.

    What the VAE trains on beside the world: an autoencoder fitted to six colours and four shapes
    cannot encode what a user brings (the demo concept's pink and cyan heart came back as a red
    blob), while a UNet is free to know only the world. Random polygons and ellipses, some split
    into two colours along a random line, over a random background.
    """
    rng = np.random.default_rng(seed)

    def colour() -> tuple[int, int, int]:
        return tuple(int(v) for v in rng.integers(0, 256, size=3))

    layers = []
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0.15, 0.85, size=2)
        radius = rng.uniform(0.06, 0.3)
        if rng.random() < 0.3:
            ax, ay = radius, radius * rng.uniform(0.4, 1.0)
            inside = (lambda cx, cy, ax, ay: lambda x, y: ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1)(cx, cy, ax, ay)
        else:
            angles = np.sort(rng.uniform(0, 2 * math.pi, size=int(rng.integers(3, 9))))
            radii = radius * rng.uniform(0.5, 1.0, size=angles.size)
            inside = (lambda path: lambda x, y: path.contains_points(
                np.stack([x.ravel(), y.ravel()], axis=1)).reshape(x.shape))(
                Path(np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)))
        coverage = rasterize(inside, resolution)
        if rng.random() < 0.5:  # two-tone: a second colour on one side of a line through the shape
            theta = rng.uniform(0, 2 * math.pi)
            side = rasterize(lambda x, y, t=theta, cx=cx, cy=cy: (x - cx) * math.cos(t) + (y - cy) * math.sin(t) > 0,
                             resolution)
            layers += [(coverage, colour()), (coverage * side, colour())]
        else:
            layers.append((coverage, colour()))
    return paint(colour(), layers)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1], the range the VAE expects."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class WorldDataset(torch.utils.data.Dataset):
    """`length` random (scene, jitter) draws from a split, item i a pure function of (seed, i).

    split: "train" (held-out pairs excluded), "heldout", or "all".
    """

    def __init__(self, resolution: int = 64, seed: int = 0, length: int = 10_000, split: str = "train",
                 jitter: bool = True) -> None:
        splits = {"train": train_scenes, "heldout": heldout_scenes, "all": all_scenes}
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(splits)}")
        self.scenes = splits[split]()
        self.resolution, self.seed, self.length, self.jitter = resolution, seed, length, jitter

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, index))
        scene = self.scenes[int(rng.integers(len(self.scenes)))]
        jitter_seed = int(rng.integers(2**62)) if self.jitter else None
        image = render(scene, self.resolution, jitter_seed)
        return {"pixel_values": image_to_tensor(image), "caption": scene.caption(), "scene": scene}


# --- measuring a scene back from pixels -------------------------------------------------------

OBJECT_DISTANCE = 60.0  # RGB distance from the background that surely is object, not blend/noise
_MIN_OBJECT_PIXELS = 4
_HARMONICS = {3: "triangle", 4: "square", 5: "star"}
# Relative strength of the 3rd/4th/5th harmonic of the boundary radius below which the outline is
# round. Rendered circles stay under 0.01 even at 32 px; the weakest real corner signal, a square's
# 4th harmonic, is about 0.13 (tests/test_world.py checks both margins).
_ROUND_THRESHOLD = 0.05


def as_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image as a float64 (H, W, 3) array of 0-255 values."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {pixels.shape}")
    return pixels


def border_colour(pixels: np.ndarray) -> np.ndarray:
    """Median RGB of the outermost pixel ring: the background, since objects keep clear of it."""
    return np.median(np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]]), axis=0)


def nearest_colour(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    """The name of the palette colour closest to `rgb` (squared RGB distance)."""
    return min(palette, key=lambda name: float(np.sum((np.asarray(palette[name], dtype=np.float64) - rgb) ** 2)))


def _blend_fit(pixels: np.ndarray, background: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage alpha in [0, 1] and residual of each pixel read as alpha * colour + (1 - alpha) * background."""
    direction = colour - background
    alpha = np.clip((pixels - background) @ direction / float(direction @ direction), 0.0, 1.0)
    residual = np.linalg.norm(pixels - background - alpha[..., None] * direction, axis=-1)
    return alpha, residual


def boundary_harmonics(coverage: np.ndarray, n_angles: int = 72) -> dict[int, float]:
    """Rotation- and scale-invariant outline descriptor of a soft object mask.

    The boundary radius r(theta) around the centroid is the integral of the coverage along each
    ray (exact to sub-pixel level on anti-aliased edges); the magnitude of its k-th Fourier
    coefficient over r's mean measures k-fold corners: 3 for a triangle, 4 for a square, 5 for
    a star, none for a circle.
    """
    h, w = coverage.shape
    total = float(coverage.sum())
    ys, xs = np.mgrid[0:h, 0:w]
    cy, cx = float((coverage * ys).sum() / total), float((coverage * xs).sum() / total)
    step = 0.25
    rows, cols = np.nonzero(coverage)
    reach = float(np.sqrt((rows - cy) ** 2 + (cols - cx) ** 2).max()) + 1.5  # rays need not go further
    t = np.arange(0.0, reach, step)
    theta = np.arange(n_angles) * (2 * math.pi / n_angles)
    px = cx + np.cos(theta)[:, None] * t[None, :]
    py = cy + np.sin(theta)[:, None] * t[None, :]
    padded = np.pad(coverage, 1)  # zero outside the image; shifts indices by one
    x0, y0 = np.floor(px), np.floor(py)
    fx, fy = px - x0, py - y0
    xi = np.clip(x0.astype(int) + 1, 0, w)
    yi = np.clip(y0.astype(int) + 1, 0, h)
    sampled = (padded[yi, xi] * (1 - fx) * (1 - fy) + padded[yi, xi + 1] * fx * (1 - fy)
               + padded[yi + 1, xi] * (1 - fx) * fy + padded[yi + 1, xi + 1] * fx * fy)
    radius = sampled.sum(axis=1) * step
    spectrum = np.abs(np.fft.rfft(radius)) / n_angles
    return {k: float(2 * spectrum[k] / spectrum[0]) for k in _HARMONICS}


def classify(image: Image.Image | np.ndarray) -> dict:
    """Read a scene back from pixels.

    Returns {"background": nearest BACKGROUNDS name of the border pixels, "object": the COLOURS
    name whose blends with the background best explain the non-background pixels (None if there
    are none), "object_fraction": the object's soft area over the image area, "shape": the SHAPES
    name from the outline's corner count (None without an object)}.
    """
    pixels = as_pixels(image)
    background_rgb = border_colour(pixels)
    result = {"background": nearest_colour(background_rgb, BACKGROUNDS), "object": None,
              "object_fraction": 0.0, "shape": None}
    object_pixels = np.linalg.norm(pixels - background_rgb, axis=-1) > OBJECT_DISTANCE
    if object_pixels.sum() < _MIN_OBJECT_PIXELS:
        return result
    # Anti-aliased edges are blends that can sit nearer another palette colour (red on blue looks
    # purple); fitting each candidate's blend line instead reads the edges as what they are.
    candidates = {name: np.asarray(rgb, dtype=np.float64) for name, rgb in COLOURS.items()
                  if np.linalg.norm(np.asarray(rgb) - background_rgb) > OBJECT_DISTANCE}
    if not candidates:  # a background (of a generated image) so odd that every colour is near it
        return result
    errors = {name: float(_blend_fit(pixels[object_pixels], background_rgb, rgb)[1].sum())
              for name, rgb in candidates.items()}
    name = min(errors, key=errors.get)
    coverage, _ = _blend_fit(pixels, background_rgb, candidates[name])
    result.update(object=name, object_fraction=float(coverage.mean()))
    if coverage.sum() < 1.0:  # no outline to measure: the pixels are not blends towards that colour
        return result
    harmonics = boundary_harmonics(coverage)
    k = max(harmonics, key=harmonics.get)
    result["shape"] = _HARMONICS[k] if harmonics[k] >= _ROUND_THRESHOLD else "circle"
    return result
