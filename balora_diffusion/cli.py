"""The single `balora` command.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int | None`. Modules are imported only when their command runs,
so `balora --help` stays fast and a heavy import never slows the others down.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from balora_diffusion.errors import UserError
from balora_diffusion.versions import check_versions

# command words -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("train",): ("balora_diffusion.commands.train",
                 "train a concept LoRA on the UNet and text encoder with any update rule"),
    ("demo",): ("balora_diffusion.commands.demo",
                "train the shipped demo concept on the shipped model (BaLoRA) and draw it in new contexts"),
    ("generate",): ("balora_diffusion.commands.generate",
                    "images from a base model and adapters across prompts, seeds and fusion coefficients"),
    ("eval",): ("balora_diffusion.commands.eval",
                "CLIP-T, CLIP-I and DINO scores of a run's checkpoints, a sweep or adapter files; the best checkpoint"),
    ("export",): ("balora_diffusion.commands.export",
                  "a run's (or any checkpoint's, or any LoRA's) adapter in the diffusers or kohya format"),
    ("merge",): ("balora_diffusion.commands.merge",
                 "adapters fused into the base model, written as a diffusers folder or one .safetensors file"),
    ("fuse",): ("balora_diffusion.commands.fuse",
                "several concept adapters in one (gradient fusion or sum), every token kept, as a run folder"),
    ("inspect",): ("balora_diffusion.commands.inspect",
                   "what an adapter file or run holds: format, targets, rank, alpha, training, balance"),
    ("app",): ("balora_diffusion.commands.app",
               "the Gradio app: compare runs' generations, train a concept, read the curves"),
    ("sweep",): ("balora_diffusion.commands.sweep",
                 "train every cell of a grid of methods, learning rates, seeds and options (here or on SLURM)"),
    ("results",): ("balora_diffusion.commands.results",
                   "regenerate the results page (docs/results.md) from the benchmarks, running what is missing"),
    ("bench", "synthetic"): ("balora_diffusion.bench.synthetic",
                             "the BaLoRA paper's one- and two-layer synthetic benchmark, every method"),
    ("bench", "overhead"): ("balora_diffusion.bench.overhead",
                            "optimizer-step time of each method relative to plain AdamW on SD 1.5 LoRA shapes"),
    ("bench", "loop"): ("balora_diffusion.bench.loop",
                        "training steps/s of every method side by side, with where each step's time goes"),
    ("bench", "base-model"): ("balora_diffusion.bench.base_model",
                              "prompt-following accuracy of a base model on the procedural world"),
    ("bench", "fusion"): ("balora_diffusion.bench.fusion",
                          "two concepts per update rule fused by sum and by gradient: retention, bleed, drift, cost"),
    ("bench", "concept"): ("balora_diffusion.bench.concept",
                           "every method on the shipped concept: convergence, lr robustness, fidelity, adherence"),
    ("bench", "peer"): ("balora_diffusion.bench.peer",
                        "our trainer against diffusers' DreamBooth-LoRA script, same settings: steps/s and memory"),
    ("bench", "contention"): ("balora_diffusion.bench.contention",
                              "the main job alone and beside busy processes, per CPU thread setting"),
    ("bench", "agreement"): ("balora_diffusion.bench.agreement",
                             "CLIP-T and CLIP-I against the world's adherence and fidelity over a sweep's cells"),
    ("bench", "photos"): ("balora_diffusion.bench.photos",
                          "masked loss, prior preservation and aspect-ratio buckets, each against training without"),
}


# Notices that libraries log on stderr about what is so here on purpose, by logger name. They are
# dropped where they are logged, and only they: everything else those loggers say still shows.
NOTICES = {
    # diffusers imports transformers' CLIP and SigLIP image processors, which fall back to PIL
    # without torchvision; nothing here gives them an image, and torchvision is no dependency.
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    # load_textual_inversion grows the embedding table and then writes the learned vectors into
    # the new rows, so how transformers fills them first does not matter.
    "transformers.modeling_utils": "The new embeddings will be initialized from a multivariate normal",
}
# one filter object per logger: adding it again (main() called twice in one process) is a no-op
_NOTICE_FILTERS = {name: (lambda record, text=text: text not in record.getMessage()) for name, text in NOTICES.items()}


def drop_known_notices() -> None:
    """Filter NOTICES where they are logged; call it before the libraries are imported and log (worker
    processes, which never run main(), call it too)."""
    for name, keep in _NOTICE_FILTERS.items():
        logging.getLogger(name).addFilter(keep)


def _usage(prefix: tuple[str, ...]) -> str:
    rows = [(" ".join(words[len(prefix):]), help_text)
            for words, (_, help_text) in COMMANDS.items() if words[: len(prefix)] == prefix]
    width = max(len(w) for w, _ in rows)
    head = "usage: balora " + " ".join(prefix + ("COMMAND",)) + " [--help]\n\n"
    intro = ("LoRA concept training for Stable Diffusion 1.x with balanced / preconditioned\n"
             "update rules (BaLoRA, iLoRA, piLoRA, scaled LoRA, LoRA+).\n\ncommands:\n")
    return head + intro + "\n".join(f"  {w.ljust(width)}  {h}" for w, h in rows)


class _Parser(argparse.ArgumentParser):
    """argparse's mistakes (an unknown flag, a missing value) as the one-line UserError every
    other bad input gets, instead of its usage block."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    words: tuple[str, ...] = ()
    while words not in COMMANDS:
        nxt = words + (argv[0],) if argv else None
        if nxt is None or not any(k[: len(nxt)] == nxt for k in COMMANDS):
            if nxt is None or argv[0] in ("-h", "--help"):
                print(_usage(words))
                return 0 if argv else 2
            known = sorted({k[len(words)] for k in COMMANDS if k[: len(words)] == words})
            print(f"balora: error: unknown command {' '.join(nxt)!r}: use one of {', '.join(known)} "
                  f"(see balora {' '.join(words + ('--help',))})", file=sys.stderr)
            return 2
        words, argv = nxt, argv[1:]
    module_name, help_text = COMMANDS[words]
    # A process started in the background of a script (or by one that was) inherits SIGINT ignored,
    # and Python then leaves it ignored: Ctrl-C, or the app's Stop button, would not reach a training
    # that promises to stop at once with a resumable checkpoint.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    drop_known_notices()
    try:
        # before the command's module: a broken library combination can fail at import time
        check_versions()
        module = importlib.import_module(module_name)
        parser = _Parser(prog="balora " + " ".join(words), description=help_text)
        module.add_arguments(parser)
        args = parser.parse_args(argv)
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"balora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"balora: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130  # 128 + SIGINT: what a shell reports for a program that Ctrl-C ended


def entry() -> None:
    """The `balora` executable."""
    from balora_diffusion.collector import exit_without_final_collection
    from balora_diffusion.skipped_imports import skip_unused_libraries

    skip_unused_libraries()
    exit_without_final_collection(main())


if __name__ == "__main__":
    entry()
