"""Training from the app: uploaded images checked and copied into a new run folder, then `balora
train` in a process of its own, so the page stays responsive and a crash of the training cannot
take the app down. One training at a time: a second is refused while the first runs.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from balora_diffusion import checkpoint as ckpt
from balora_diffusion import masks
from balora_diffusion.atomic import atomic_path, temp_sibling
from balora_diffusion.data import IMAGE_SUFFIXES, load_image, read_caption, read_concept_folder
from balora_diffusion.errors import UserError
from balora_diffusion.run_layout import CHECKPOINTS, GRID, RUN, STEP_GRIDS
from balora_diffusion.runs import new_run_folder, own_file, read_metrics, read_run, resolve_run
from balora_diffusion.stop_request import STOP_SIGNAL

MIN_IMAGES, MAX_IMAGES = 3, 30
MAX_FILE_MB = 20  # per uploaded file; the server refuses larger uploads before they reach here
CONFIG_FILE, LOG_FILE, DATA_FOLDER = "train.toml", "train.log", "data"
INTERRUPTED = 130  # the exit status of a stopped training (128 + SIGINT, as a shell reports Ctrl-C)


@dataclass
class Uploads:
    """Uploaded files by kind, each keyed by the name of the image it belongs to."""
    images: dict[str, Path]
    captions: dict[str, Path]
    masks: dict[str, Path]


def sort_uploads(files: list[str | Path]) -> Uploads:
    """Images, their same-name .txt captions and NAME.mask.png masks; anything else, a file over
    the size limit, two files of one name or a count of images outside MIN_IMAGES..MAX_IMAGES is
    a UserError. A caption or mask is paired with its image by name, so one without is refused."""
    found = Uploads({}, {}, {})
    for given in files:
        path = Path(given)
        suffix = path.suffix.lower()
        if masks.is_mask_file(path):
            kind, stem, ending = found.masks, path.name[:-len(masks.SUFFIX)], masks.SUFFIX
        elif suffix in IMAGE_SUFFIXES or suffix == ".txt":
            kind, stem, ending = (found.captions, path.stem, ".txt") if suffix == ".txt" else (found.images, path.stem, "")
        else:
            raise UserError(f"{path.name}: neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}), a .txt caption "
                            f"nor a {masks.SUFFIX} mask")
        if path.stat().st_size > MAX_FILE_MB * 2**20:
            raise UserError(f"{path.name} is larger than {MAX_FILE_MB} MB")
        if stem in kind:
            raise UserError(f"two uploads are named {stem}{ending}: each image, caption and mask needs its own name")
        kind[stem] = path
    if not MIN_IMAGES <= len(found.images) <= MAX_IMAGES:
        raise UserError(f"{len(found.images)} image(s) uploaded: a concept needs {MIN_IMAGES} to {MAX_IMAGES}")
    for kind, ending, what in [(found.captions, ".txt", "caption"), (found.masks, masks.SUFFIX, "mask")]:
        if orphans := sorted(set(kind) - set(found.images)):
            raise UserError(f"{what}(s) without an image of the same name: {', '.join(o + ending for o in orphans)} "
                            f"(NAME{ending} goes with the image NAME.png or NAME.jpg)")
    return found


def stage_uploads(files: list[str | Path], dest: Path) -> int:
    """Copy uploaded images with their captions and masks (see `sort_uploads`) into `dest` (which
    must not exist); an unreadable image, or a mask that is not its image's size or marks nothing,
    is a UserError too, and leaves nothing behind. Returns the number of images."""
    found = sort_uploads(files)
    sizes = {stem: load_image(path).size for stem, path in found.images.items()}  # a UserError naming the file
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        for stem, path in found.images.items():
            image = tmp / f"{stem}{path.suffix.lower()}"
            shutil.copyfile(path, image)
            if stem in found.captions:
                shutil.copyfile(found.captions[stem], tmp / f"{stem}.txt")
            if stem in found.masks:
                staged = masks.mask_file(image)
                shutil.copyfile(found.masks[stem], staged)
                try:
                    masks.read_mask(image, sizes[stem])  # its image's size, and some subject marked
                except UserError as exc:  # named as uploaded, not by the folder it was staged in
                    raise UserError(str(exc).replace(str(staged), staged.name)) from None
    return len(found.images)


def check_uploads(files: list[str | Path]) -> Uploads:
    """`sort_uploads` and every check `stage_uploads` makes, staged into a folder that is then
    deleted: what Train would refuse, said while the files are still being chosen."""
    with tempfile.TemporaryDirectory() as folder:
        stage_uploads(files, Path(folder) / DATA_FOLDER)
    return sort_uploads(files)


def preview(files: list[str | Path], template: str) -> list[tuple[Path, str, Path | None]]:
    """(image, the caption it trains with: its .txt, else `template`, its mask or None) of each
    uploaded image in name order; files of other kinds are left out."""
    paths = [Path(f) for f in files]
    captions = {p.stem: p for p in paths if p.suffix.lower() == ".txt"}
    masked = {p.name[:-len(masks.SUFFIX)]: p for p in paths if masks.is_mask_file(p)}
    found = []
    for path in sorted((p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES and not masks.is_mask_file(p)),
                       key=lambda p: p.name):
        try:
            caption = read_caption(captions[path.stem]) if path.stem in captions else f"{template} (caption template)"
        except UserError:
            caption = f"its caption {captions[path.stem].name} cannot be read: save it as UTF-8"
        found.append((path, caption, masked.get(path.stem)))
    return found


def unmasked_images(folder: Path) -> list[str]:
    """The images of a staged concept folder with neither a NAME.mask.png nor an alpha channel."""
    missing = []
    for example in read_concept_folder(folder, [], "{token}"):
        if masks.mask_file(example.path).is_file():
            continue
        with Image.open(example.path) as raw:
            if not masks.has_alpha(raw):  # the rule read_mask applies
                missing.append(example.path.name)
    return missing


@dataclass
class Job:
    name: str
    folder: Path
    steps: int
    process: subprocess.Popen

    def running(self) -> bool:
        return self.process.poll() is None

    def step(self) -> int:
        return max((s for s, _ in read_metrics(self.folder).get("loss", [])), default=0)

    def outcome(self) -> str:
        """One line: how far it is, or how it ended (the training's own last message if it failed)."""
        if self.running():
            return f"training {self.name}: step {self.step()} of {self.steps}"
        code = self.process.returncode
        if code == 0:
            return f"{self.name} finished: {self.steps} steps"
        if code == INTERRUPTED:
            return stopped_message(self.name, self.folder, self.steps)
        return f"{self.name} stopped (exit status {code}): {self.last_message()}"

    def last_message(self) -> str:
        try:
            text = (self.folder / LOG_FILE).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "no log"
        lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("balora:")]
        return (errors or lines or ["no output"])[-1]


def stopped_message(name: str, folder: Path, steps: int) -> str:
    """What the page can do with a stopped run: the CLI's advice names a command nobody typed."""
    newest, _ = ckpt.newest_intact(folder / CHECKPOINTS)
    if newest is None:
        return f"{name} stopped before its first checkpoint: tick Overwrite and press Train to start it again"
    return (f"{name} stopped at step {ckpt.checkpoint_step(newest)} of {steps}: Continue goes on from there; "
            "Overwrite (ticked) and Train starts it again")


def newest_samples(folder: Path) -> tuple[Path, str] | None:
    """The newest validation grid of a run folder and what it shows: a finished run's final
    grid.png, else the grid-stepN.png of the highest step (train's `grid_every`); None before one."""
    if own_file(folder, RUN) and (final := own_file(folder, GRID)):
        return final, "samples of the finished run"
    grids = sorted(p for p in folder.glob(STEP_GRIDS) if own_file(folder, p.name))
    if not grids:
        return None
    step = int(re.sub(r"\D", "", grids[-1].name))
    return grids[-1], f"samples at step {step}"


def check_photo_options(folder: Path, cfg) -> None:
    """What `balora train` would refuse about the staged images with these options, said in the
    page's words before any process starts: captions that do not name the token, masks missing
    for a masked loss, a hold-out that leaves nothing to train on, a prior prompt naming the token."""
    from balora_diffusion.data import split_holdout
    from balora_diffusion.prior import check_prior_prompt

    if cfg.masked_loss and (missing := unmasked_images(folder)):
        raise UserError(f"masked loss needs a mask for every image; none for {', '.join(missing)}: upload "
                        f"NAME{masks.SUFFIX} beside each (white = subject), images with an alpha channel, "
                        "or untick masked loss")
    examples = read_concept_folder(folder, cfg.token, cfg.caption_template, with_masks=cfg.masked_loss)
    split_holdout(examples, cfg.holdout, cfg.heldout_seed)
    check_prior_prompt(cfg.prior_prompt, cfg.token)


class Trainer:
    def __init__(self, runs: Path, cpu_threads: int = 0):
        self.runs, self.cpu_threads = Path(runs), cpu_threads
        self.job: Job | None = None
        self._lock = threading.Lock()

    def start(self, name: str, uploads: list[str | Path], values: dict, overwrite: bool = False) -> Job:
        """Stage the uploads into run folder `name` and start `balora train` there with the options
        in `values` (TrainConfig's names). The folder must be new, unless `overwrite`: then a run
        this app trained there is replaced, once the new uploads have passed their checks."""
        from balora_diffusion.config import to_toml
        from balora_diffusion.train_config import TrainConfig

        with self._lock:
            self._refuse_a_second()
            folder = self._folder(name, overwrite)
            fresh = not (folder / CONFIG_FILE).exists()
            cfg = TrainConfig(**{**values, "data_dir": str((folder / DATA_FOLDER).resolve()),
                                 "output_dir": str(folder.resolve()), "cpu_threads": self.cpu_threads,
                                 "overwrite": not fresh})
            staged = temp_sibling(folder / DATA_FOLDER)
            try:
                try:
                    stage_uploads(uploads, staged)
                    check_photo_options(staged, cfg)
                except UserError as exc:  # files named as uploaded, not by the folder they were staged in
                    raise UserError(str(exc).replace(f"{staged}{os.sep}", "")) from None
                with atomic_path(folder / DATA_FOLDER) as tmp:
                    os.replace(staged, tmp)
                with atomic_path(folder / CONFIG_FILE) as tmp:
                    tmp.write_text(to_toml(cfg), encoding="utf-8")
            except BaseException:
                shutil.rmtree(folder if fresh else staged, ignore_errors=True)
                raise
            return self._launch(name, folder, cfg.steps, [])

    def resume(self, name: str) -> Job:
        """Go on with run `name` (trained from this app and stopped) from its newest checkpoint."""
        from balora_diffusion.config import read_toml
        from balora_diffusion.train_config import TrainConfig

        with self._lock:
            self._refuse_a_second()
            folder = self._own_run(name)
            if (folder / RUN).exists():
                raise UserError(f"{name} has finished: there is nothing to continue")
            if ckpt.newest_intact(folder / CHECKPOINTS)[0] is None:
                raise UserError(f"{name} stopped before its first checkpoint: tick Overwrite and press Train to "
                                "start it again")
            steps = TrainConfig(**read_toml(TrainConfig, folder / CONFIG_FILE)).steps
            return self._launch(name, folder, steps, ["--resume", "latest", "--overwrite", "false"])

    def _folder(self, name: str, overwrite: bool) -> Path:
        try:
            return new_run_folder(self.runs, name)
        except UserError:
            if not overwrite:
                raise
            return self._own_run(name)

    def _refuse_a_second(self) -> None:
        if self.job is not None and self.job.running():
            raise UserError(f"a training is running already ({self.job.outcome()}): wait for it to end, "
                            "or stop it, before starting another")

    def _own_run(self, name: str) -> Path:
        """Run folder `name`, if this app trained it (its train.toml; nothing else is changed from
        the page) and no training writes into it."""
        folder = resolve_run(self.runs, name)
        if own_file(folder, CONFIG_FILE) is None:
            raise UserError(f"{name} was not trained from this page: continue or replace it with balora train")
        if read_run(self.runs, name).state == "training":
            raise UserError(f"{name} is training: stop it first")
        return folder

    def _launch(self, name: str, folder: Path, steps: int, flags: list[str]) -> Job:
        env = {**os.environ, **({"OMP_NUM_THREADS": str(self.cpu_threads)} if self.cpu_threads else {})}
        with (folder / LOG_FILE).open("a") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "balora_diffusion.cli", "train", "--config", str(folder / CONFIG_FILE), *flags],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.job = Job(name, folder, steps, process)
        return self.job

    def stop(self) -> str:
        """End the running training after its step in progress, with a checkpoint of it; before its
        first step there is nothing to keep, and it is interrupted at once."""
        job = self.job
        if job is None or not job.running():
            return "no training is running"
        # the stop signal's handler is in place once a step is logged; before, it would kill the process
        job.process.send_signal(STOP_SIGNAL if job.step() >= 1 else signal.SIGINT)
        return f"stopping {job.name}"
