"""The run folder of one training: one training at a time, never mixed with an older run, free of
the debris of killed writes, and resumed only from an intact checkpoint of the same training.

Only the main process of a multi-process launch touches the folder; it hands what it found (an
error, or the checkpoint to resume from) to the others, so that all of them stop or go on together.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import sys
from contextlib import ExitStack, closing
from pathlib import Path
from typing import TypeVar

from balora_diffusion import checkpoint as ckpt
from balora_diffusion.atomic import remove_leftovers, temp_sibling
from balora_diffusion.errors import UserError
from balora_diffusion.run_layout import BEST, CHECKPOINTS, CONFIG_TREE, LOCK, META_TREE, RUN_OUTPUTS, STEP_GRIDS
from balora_diffusion.train_config import TrainConfig

T = TypeVar("T")

# TrainConfig keys that a resumed run may set differently from its checkpoint: how long to train,
# how often to checkpoint, evaluate, score and draw (the best so far is the best of the steps scored), where to write, and settings of speed and memory
# (an fp16 run that diverged may go on in bf16). Every other key is part of what is trained, so a
# key added to TrainConfig later must match too until it is listed here.
RESUMABLE_CHANGES = frozenset({
    "steps", "checkpoint_every", "eval_every", "grid_every", "grid_prompts", "grid_seeds", "fusion",
    "sample_steps", "guidance_scale", "output_dir", "resume", "overwrite", "cpu_threads",
    "mixed_precision", "gradient_checkpointing", "eval_metrics_every"})


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a training, with where to go on from: the CLI prints it as one line, status 130."""


def held_outputs(out: Path) -> list[Path]:
    """The outputs of an earlier run in `out` (empty: `out` holds no run). An empty folder is none:
    a run killed while it wrote its first checkpoint leaves an empty checkpoints/."""
    found = [out / name for name in RUN_OUTPUTS] + sorted(out.glob(STEP_GRIDS))
    return [p for p in found if p.is_file() or (p.is_dir() and any(p.iterdir()))]


def resume_checkpoint(out: Path, cfg: TrainConfig) -> Path:
    """The checkpoint that `cfg.resume` names, intact and written by a training `cfg` may continue.
    `latest` passes over damaged checkpoints to the newest intact one, with a warning."""
    if cfg.resume == "latest":
        root = out / CHECKPOINTS
        folder, skipped = ckpt.newest_intact(root)
        if folder is None:
            raise UserError(f"--resume latest: no intact checkpoint in {root}: {'; '.join(skipped)}" if skipped
                            else f"--resume latest: no checkpoint in {root}")
        if skipped:
            print(f"balora: warning: damaged checkpoint(s) {'; '.join(skipped)}; resuming from {folder}",
                  file=sys.stderr)
    else:
        folder = Path(cfg.resume)
        damage = ckpt.damage(folder)
        if damage:
            raise UserError(f"--resume {cfg.resume}: not an intact checkpoint folder ({damage})")
    check_resumable(ckpt.load_tree(folder, CONFIG_TREE), cfg, folder)
    check_steps_left(folder, cfg)
    return folder


def check_steps_left(folder: Path, cfg: TrainConfig) -> None:
    """Refuse a resume whose --steps end before the checkpoint's step: it would train nothing and
    rewrite the run's outputs as a shorter run that it never was. Equal steps go on: a run killed
    after its last checkpoint still writes its adapter that way."""
    step = int(ckpt.load_tree(folder, META_TREE)["step"])  # the folder's name may have been changed
    if cfg.steps < step:
        raise UserError(f"--resume: {folder} is at step {step}, past --steps {cfg.steps}: give --steps {step} or "
                        "more to continue it, or train a shorter run into another --output-dir")


def check_resumable(saved: dict, cfg: TrainConfig, folder: Path) -> None:
    """Raise a UserError naming the first key, in TrainConfig's order, that `cfg` sets differently
    from the training that wrote checkpoint `folder` (its config: `saved`)."""
    for f in dataclasses.fields(cfg):
        if f.name in RESUMABLE_CHANGES:
            continue
        # a key newer than the checkpoint: the training that wrote it ran with the default
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        before, now = saved.get(f.name, default), getattr(cfg, f.name)
        if before != now:
            raise UserError(f"--resume: {folder} was trained with {f.name} = {before!r}, this run has "
                            f"{f.name} = {now!r}; a resumed run must keep it (train into another "
                            "--output-dir, or start over with --overwrite true)")


def check_best_folder(out: Path, cfg: TrainConfig) -> None:
    """With --best-by the run swaps RUN/best in whole as a better checkpoint is scored: refuse, before
    training, a file or a link there, which the swap would fail on mid-run or write through."""
    best = out / BEST
    if cfg.best_by and (best.is_symlink() or (best.exists() and not best.is_dir())):
        raise UserError(f"{best} is a {'link' if best.is_symlink() else 'file'}, not the folder of the best "
                        f"checkpoint that --best-by writes: move it out of {out} and start again")


class RunFolder:
    """`with RunFolder(cfg, accelerator) as run:` around a training. On entry the main process locks
    the folder, removes the leftovers of killed writes, refuses a folder that holds a run unless
    the config resumes or overwrites it, and finds the checkpoint to resume from (`resume_from`).
    On exit, however the training ends, what it registered with `closing` is closed and the lock
    released; Ctrl-C becomes a TrainingInterrupted that says how to go on."""

    def __init__(self, cfg: TrainConfig, accelerator):
        self.cfg, self.out, self.accelerator = cfg, Path(cfg.output_dir), accelerator
        self.resume_from: Path | None = None
        self._stack = ExitStack()
        self._created = not self.out.exists()
        self._lock_created = not (self.out / LOCK).exists()
        self._locked = False

    def __enter__(self) -> RunFolder:
        from accelerate.utils import broadcast_object_list

        error, resume = None, None
        if self.accelerator.is_main_process:
            try:
                resume = self._prepare()
            except UserError as exc:
                error = str(exc)
            except OSError as exc:
                error = f"cannot use {self.out} as the run folder: {exc}"
        error, resume = broadcast_object_list([error, resume and str(resume)])
        if error:
            self._stack.close()
            self._remove_if_untouched()
            raise UserError(error)
        self.resume_from = Path(resume) if resume else None
        return self

    def _prepare(self) -> Path | None:
        cfg, out = self.cfg, self.out
        if cfg.resume and cfg.overwrite:
            raise UserError("--resume continues the run in the folder and --overwrite true deletes it: "
                            "give one of them")
        self._lock()
        for folder in (out, out / CHECKPOINTS):
            remove_leftovers(folder)
        held = held_outputs(out)
        if held and not cfg.resume:
            if not cfg.overwrite:
                names = ", ".join(p.name for p in held[:3]) + (", ..." if len(held) > 3 else "")
                raise UserError(f"{out} already holds a run ({names}): continue it with --resume latest, "
                                "or delete it and start again with --overwrite true")
            # Moved aside at once, deleted after: a kill during the slow delete leaves a temporary
            # name that the next start removes, never a mix of the old run and the new one.
            trash = temp_sibling(out / "overwritten")
            trash.mkdir()
            for path in held:
                os.replace(path, trash / path.name)
            shutil.rmtree(trash)
        check_best_folder(out, cfg)
        resume = resume_checkpoint(out, cfg) if cfg.resume else None
        self._sign()
        return resume

    def _lock(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self._handle = self._stack.enter_context((self.out / LOCK).open("a+"))
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._locked = True
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "unknown"
            raise UserError(f"another training (process {holder}) is writing into {self.out}: wait for it to "
                            "end, or choose another --output-dir") from None

    def _sign(self) -> None:
        """The holder's pid, for the message above only (the lock is what counts); written once the
        run is accepted, so that a refused one leaves the folder as it found it."""
        self._handle.truncate(0)
        self._handle.write(f"{os.getpid()}\n")
        self._handle.flush()

    def closing(self, thing: T) -> T:
        """Close `thing` when the training ends, however it ends (a progress bar then ends its line
        before the last message)."""
        return self._stack.enter_context(closing(thing))

    def __exit__(self, kind, exc, tb) -> None:
        self._stack.close()
        if exc is not None:
            self._remove_if_untouched()
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, TrainingInterrupted):
            raise TrainingInterrupted(self._how_to_go_on()) from None

    def _remove_if_untouched(self) -> None:
        """A training that ends in an error takes back the lock file it added, and a folder it
        created that is then empty (a refused start: a bad resolution, a model that fails to load),
        so that the name stays free and an existing folder is left as it was found."""
        if not self._locked:  # the lock is another training's, or the folder never got one
            return
        try:
            if self._lock_created:
                (self.out / LOCK).unlink(missing_ok=True)
            if self._created and not any(self.out.iterdir()):
                self.out.rmdir()
        except OSError:  # somebody else wrote into it meanwhile: it is theirs now
            pass

    def _how_to_go_on(self) -> str:
        found = ckpt.list_checkpoints(self.out / CHECKPOINTS)
        if not found:
            return f"interrupted before the first checkpoint of {self.out}; start again with --overwrite true"
        instead = " instead of --overwrite true" if self.cfg.overwrite else ""
        return (f"interrupted; the last checkpoint is {found[-1]}: to continue, run the same command with "
                f"--resume latest{instead}")
