"""The Gradio app over a folder of runs: Compare, Train, Curves.

`App` holds the callbacks as plain methods (tested without a browser); `build_ui` lays them out in
Gradio and names the endpoints that scripts call with gradio_client: list_runs, compare, train,
stop, downloads, curves. Started by `balora app --runs DIR` (also `python -m app`, or this file).
"""
from __future__ import annotations

import functools
import hashlib
import html
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from balora_diffusion.app import compare as grids
from balora_diffusion import masks
from balora_diffusion.app import curves, methods, scores, training
from balora_diffusion.app.downloads import stage_downloads
from balora_diffusion.app.engine import Engine, Sampling
from balora_diffusion.app.training import MAX_FILE_MB, MAX_IMAGES, MIN_IMAGES, Job, Trainer
from balora_diffusion.errors import UserError
from balora_diffusion.rules import METHODS
from balora_diffusion.atomic import atomic_path
from balora_diffusion.run_layout import CONFIG, RUN
from balora_diffusion.runs import COLUMNS, list_runs, own_file, read_run

POLL_SECONDS = 1.0
SAMPLE_POLL_SECONDS = 2.0  # how often an open Train tab looks for new samples
SAMPLE_EVERY = 100  # the Train tab's starting sample interval; scripts that leave it out get it too
# The text encoder reads 77 tokens of a prompt; a longer text is a mistake, and tokenizing a huge
# one would hold the only drawing slot.
MAX_PROMPT_CHARS = 1000
SEED_LIMIT = 2**63  # torch's generators take seeds below it


def _items(text: str) -> list[str]:
    return [t for t in re.split(r"[,\s]+", text.strip()) if t]


def parse_numbers(text: str, kind: type, label: str) -> list:
    """"0.7, 1" -> [0.7, 1.0]: the numbers in a text box, separated by commas or spaces."""
    items = _items(str(text))
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise UserError(f"{label}: expected {'integers' if kind is int else 'numbers'} separated by commas, "
                        f"got {text!r}") from None
    if not values or any(isinstance(v, float) and not math.isfinite(v) for v in values):
        raise UserError(f"{label}: expected at least one finite number, got {text!r}")
    return values


def number_list(text, kind: type, label: str, low: float, high: float) -> list:
    """"20, 30" -> [20, 30], each checked as `checked_number` does; a lone number passes too."""
    items = _items("" if text is None else str(text))
    return [checked_number(item, kind, label, low, high) for item in items or [text]]


def checked_text(label: str, text) -> str:
    text = str(text or "").strip()
    if len(text) > MAX_PROMPT_CHARS:
        raise UserError(f"the {label} is {len(text)} characters; at most {MAX_PROMPT_CHARS} (the text "
                        "encoder reads only its first 77 tokens)")
    return text


def checked_prompts(text) -> list[str]:
    """The prompts of the prompt box, one a line (blank lines skipped)."""
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    if not lines:
        raise UserError("the prompt is empty")
    return [checked_text("prompt", line) for line in lines]


def checked_number(value, kind: type, label: str, low: float, high: float = math.inf) -> int | float:
    """A number box's value as `kind` (int or float) from `low` to `high`; a cleared box (None),
    text, NaN or a fraction where an integer is wanted is a UserError."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not low <= number <= high or (kind is int and not number.is_integer()):
        bounds = f"from {low:g}" + ("" if high == math.inf else f" to {high:g}")
        raise UserError(f"{label} must be {'an integer' if kind is int else 'a number'} {bounds}, got {value!r}")
    return kind(number)


def checked_token(token: str) -> str:
    """The placeholder token of the Train tab: one word (the captions must name it as typed)."""
    token = str(token or "").strip()
    if not token:
        raise UserError("the token is empty: type the placeholder word the captions name, e.g. <zorb>")
    if len(token.split()) > 1:
        raise UserError(f"the token must be one word without spaces, got {token!r}")
    return token


# where the files are and how the process runs: the page decides these, not a loaded file
IGNORED_ON_LOAD = {"data_dir", "output_dir", "cpu_threads", "overwrite", "resume"}


def safe_name(name: str) -> str:
    """A run name as a file name (a run below a folder, "sweep/a", is "sweep_a")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "train"


def run_prompts(run) -> list[str]:
    """A run's validation prompts (its config's grid_prompts), else the one the listing shows."""
    from balora_diffusion.runs import read_json  # the listing's own reading of a run's files

    config = read_json(run.path, RUN).get("config") or read_json(run.path, CONFIG)
    prompts = [str(p) for p in config.get("grid_prompts") or [] if str(p).strip()]
    return prompts or ([run.prompt] if run.prompt else [])


def option_help(name: str) -> str:
    """`balora train`'s own help for option `name`, which the Train tab shows under its field."""
    from dataclasses import fields

    from balora_diffusion.train_config import TrainConfig

    return next(f.metadata["help"] for f in fields(TrainConfig) if f.name == name)


def photo_options(buckets, masked_loss, unmasked_weight, holdout, prior_prompt, prior_weight) -> dict:
    """The Train tab's photo options as TrainConfig values (which check them further)."""
    return {"buckets": _items(str(buckets or "")) or ["off"], "masked_loss": bool(masked_loss),
            "unmasked_weight": checked_number(unmasked_weight, float, "background weight", 0, 1),
            "holdout": checked_number(holdout, int, "held-out images", 0, MAX_IMAGES - 1),
            "prior_prompt": checked_text("prior prompt", prior_prompt),
            "prior_weight": checked_number(prior_weight, float, "prior weight", 0)}


def base_tokenizer(base_model: str):
    """The base model's tokenizer on its own, for checking prompts before the model loads: a
    diffusers folder's own, else CLIP's, which every SD 1.x model shares."""
    from transformers import CLIPTokenizer

    from balora_diffusion import paths

    folder = Path(base_model) / "tokenizer" if base_model else paths.TINY_SD / "tokenizer"
    return CLIPTokenizer.from_pretrained(folder if folder.is_dir() else paths.TOKENIZER)


def train_defaults(base_model: str) -> dict:
    """The Train tab's starting values: the demo recipe on the shipped model (tuned for it), the
    Mix-of-Show defaults of TrainConfig on any other."""
    from balora_diffusion.config import read_toml
    from balora_diffusion.train_config import TrainConfig

    values = {} if base_model else read_toml(TrainConfig, Path("demo"))
    return {**asdict(TrainConfig()), **values, "base_model": base_model}


class App:
    def __init__(self, runs: Path, base_model: str = "", device: str = "auto", cpu_threads: int = 0):
        self.runs = Path(runs)
        self.engine = Engine(self.runs, base_model, device, cpu_threads)
        self.trainer = Trainer(self.runs, cpu_threads)
        self.defaults = train_defaults(base_model)
        self.engine.cache.mkdir(parents=True, exist_ok=True)
        self._tokenizers: dict[tuple[str, ...], object] = {}

    # ---- runs
    def list_runs(self) -> list[dict]:
        """Every run under the runs folder, as JSON-ready dicts (NaN as None), with its scores
        (`scores.scores`; {} where none)."""
        runs = list_runs(self.runs)
        found = scores.scores(self.runs, runs)
        return [{**{key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in asdict(run).items()
                    if key != "path"}, "scores": found.get(run.name, {})} for run in runs]

    def table(self) -> list[list]:
        """The rows of the runs table (`runs_table`); numbers to 6 significant digits (a learning rate of
        3 x 0.006 is 0.018, not 0.018000000000000002)."""
        return self.runs_table()[1]

    def runs_table(self) -> tuple[list[str], list[list]]:
        """(headers, rows) of the runs table: the listing's columns, then a column per score any
        run has (eval.json, or its training's own scoring), empty where a run has none."""
        runs = list_runs(self.runs)
        found = scores.scores(self.runs, runs)
        extra = scores.columns(found)
        rows = [[*run.row(), *(found.get(run.name, {}).get(m) for m in extra)] for run in runs]
        return [*COLUMNS, *extra], [[float(f"{v:.6g}") if isinstance(v, float) else v for v in row] for row in rows]

    def table_frame(self):
        """The runs table as the page shows it (a DataFrame: its headers change with the scores)."""
        import pandas as pd

        headers, rows = self.runs_table()
        return pd.DataFrame(rows, columns=headers)

    def finished(self) -> list[str]:
        return [run.name for run in list_runs(self.runs) if run.state == "finished"]

    def default_prompt(self) -> str:
        """The first finished run's validation prompt (it names the run's token)."""
        finished = self.finished()
        return read_run(self.runs, finished[0]).prompt if finished else ""

    # ---- Compare
    def compare(self, runs: list[str], rows: str, columns: str, prompt: str, negative_prompt: str, seeds: str,
                steps: int | str, guidance: float | str, fusion: str, checkpoints: bool = False,
                split: str = grids.NO_SPLIT, progress: Callable[[int, int], None] = lambda done, total: None) -> tuple:
        """(grid image, path of its PNG): the chosen runs (and "base model") x fusion coefficients x
        prompts (one a line) x sampling steps x guidances x seeds; with `checkpoints`, every
        checkpoint of a run too; with `split` (an axis), one grid per value of it."""
        names = list(runs or [])
        if not names:
            raise UserError("choose at least one run")
        prompts = checked_prompts(prompt)
        negative_prompt = checked_text("negative prompt", negative_prompt)
        seed_list = parse_numbers(seeds, int, "seeds")
        if not all(0 <= seed < SEED_LIMIT for seed in seed_list):
            raise UserError(f"seeds must be 0 to {SEED_LIMIT - 1}, got {seeds!r}")
        drawn = grids.samplings(prompts, negative_prompt, number_list(steps, int, "sampling steps", 1, 200),
                                number_list(guidance, float, "guidance", 0, 30), seed_list)
        infos = [read_run(self.runs, name) for name in names if name != grids.BASE]
        for label, text in [*(("prompt", p) for p in prompts), ("negative prompt", negative_prompt)]:
            self.check_window(label, text, infos)
        cells = grids.cells_for(infos, parse_numbers(fusion, float, "fusion coefficients"), drawn,
                                base=grids.BASE in names, with_checkpoints=bool(checkpoints))
        grids.split_groups(cells, rows, columns, split)  # a bad split is refused before anything is drawn
        return grids.render(self.engine, cells, rows, columns, progress, split)

    def prompts_of(self, runs: list[str]) -> str:
        """The prompt box for the chosen runs: each run's validation prompts (a fused adapter's are
        one per concept), one a line, each once, in the order of the runs."""
        found = [p for name in runs or [] if name != grids.BASE for p in run_prompts(read_run(self.runs, name))]
        if not found:
            raise UserError("choose a run: the base model has no prompts of its own")
        return "\n".join(dict.fromkeys(found))

    def check_window(self, label: str, text: str, runs: list) -> None:
        """Refuse a text in which a run's learned token falls past the text encoder's window: the
        run would draw it as if the token were not there."""
        from balora_diffusion.data import window_problem

        for tokens in {tuple(t for t in run.tokens if t in text) for run in runs} - {()}:
            if problem := window_problem(self.tokenizer_with(tokens), text, list(tokens)):
                raise UserError(f"the {label} {problem}, so it would be drawn without it: shorten the {label} or "
                                "name the token earlier")

    def tokenizer_with(self, tokens: tuple[str, ...]):
        """The base tokenizer with `tokens` added, as a run's pipeline reads its prompts."""
        if tokens not in self._tokenizers:
            tokenizer = base_tokenizer(self.engine.base_model)
            tokenizer.add_tokens(list(tokens))
            self._tokenizers[tokens] = tokenizer
        return self._tokenizers[tokens]

    # ---- Train
    def train(self, files: list[str], name: str, token: str, init_word: str, method: str, lr_unet: float,
              lr_text: float, steps: int, rank: int, overwrite: bool = False, buckets: str = "off",
              masked_loss: bool = False, unmasked_weight: float = 0.0, holdout: int = 0, prior_prompt: str = "",
              prior_weight: float = 1.0, sample_every: int = 0) -> Job:
        """Start a training; every option is checked (TrainConfig's checks included, in Trainer.start)
        before a run folder is made. `overwrite`: replace a run of that name trained from the page.
        The fields after it are `train_values`'."""
        name, values = self.train_values(name, token, init_word, method, lr_unet, lr_text, steps, rank, buckets,
                                         masked_loss, unmasked_weight, holdout, prior_prompt, prior_weight,
                                         sample_every)
        return self.trainer.start(name, list(files or []), values, overwrite=bool(overwrite))

    def train_values(self, name, token, init_word, method, lr_unet, lr_text, steps, rank, buckets="off",
                     masked_loss=False, unmasked_weight=0.0, holdout=0, prior_prompt="", prior_weight=1.0,
                     sample_every=0) -> tuple[str, dict]:
        """(run name, TrainConfig's values) of the Train tab's fields, each field checked; the
        photo options are TrainConfig's, `sample_every` its grid_every (0: samples only at the end)."""
        token = checked_token(token)
        name = str(name or "").strip() or f"{re.sub(r'[^A-Za-z0-9]+', '', token) or 'concept'}-{method}-" \
                                          f"{time.strftime('%Y%m%d-%H%M%S')}"
        steps, rank = checked_number(steps, int, "steps", 1), checked_number(rank, int, "rank", 1)
        return name, {**self.defaults, "token": [token], "init_word": str(init_word or "").strip(), "method": method,
                      "lr_unet": checked_number(lr_unet, float, "learning rate (UNet)", 0),
                      "lr_text": checked_number(lr_text, float, "learning rate (text encoder)", 0),
                      "steps": steps, "rank": rank, "alpha": float(rank), "text_rank": rank,
                      "text_alpha": float(rank), "eval_every": max(1, steps // 20),
                      **photo_options(buckets, masked_loss, unmasked_weight, holdout, prior_prompt, prior_weight),
                      "grid_every": checked_number(sample_every, int, "samples every", 0)}

    def save_config(self, *fields) -> str:
        """The Train tab's fields (`train_values`' arguments) as a TOML file that `balora train
        --config FILE --data-dir PHOTOS` trains, in the cache for download; its path."""
        from balora_diffusion.config import to_toml
        from balora_diffusion.train_config import TrainConfig

        name, values = self.train_values(*fields)
        cfg = TrainConfig(**{**values, "cpu_threads": self.trainer.cpu_threads})
        # a path in a TOML file is read relative to the file's folder, wherever it was downloaded to:
        # where the photos are and where the run goes are said on the command line instead
        lines = [line for line in to_toml(cfg).splitlines(keepends=True)
                 if line.split(" = ")[0] not in IGNORED_ON_LOAD]
        text = (f"# balora train --config {safe_name(name)}.toml --data-dir YOUR_PHOTOS --output-dir "
                f"runs/{safe_name(name)}\n# (YOUR_PHOTOS: images, same-name .txt captions, NAME.mask.png masks)\n"
                + "".join(lines))
        path = self.engine.cache / "configs" / hashlib.sha256(text.encode()).hexdigest()[:16] / f"{safe_name(name)}.toml"
        if own_file(self.engine.cache, path.relative_to(self.engine.cache)) is None:
            with atomic_path(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
        return str(path)

    def load_config(self, path: str | None) -> tuple[list, str]:
        """The Train tab's fields (`train_values`' arguments, in order) from a train TOML, checked
        as `balora train` checks it, and a line naming the file's options the tab has no field for
        (they are not used: the tab trains with its own values of them)."""
        from balora_diffusion.config import read_toml
        from balora_diffusion.train_config import TrainConfig

        if not path:
            raise UserError("choose a train TOML file to load")
        values = read_toml(TrainConfig, Path(path))
        cfg = TrainConfig(**{**self.defaults, **values})
        if len(cfg.token) != 1:
            raise UserError(f"the Train tab trains one token; {Path(path).name} names {len(cfg.token)}: "
                            f"{' '.join(cfg.token)}")
        fields = [Path(cfg.output_dir).name if "output_dir" in values else "", cfg.token[0], cfg.init_word,
                  cfg.method, cfg.lr_unet, cfg.lr_text, cfg.steps, cfg.rank, " ".join(cfg.buckets), cfg.masked_loss,
                  cfg.unmasked_weight, cfg.holdout, cfg.prior_prompt, cfg.prior_weight, cfg.grid_every]
        _, used = self.train_values(*fields)
        ignored = sorted(key for key in values if key not in IGNORED_ON_LOAD and getattr(cfg, key) != used.get(key))
        note = f"loaded {Path(path).name}" + (f"; the Train tab has no field for {', '.join(ignored)}: its own "
                                               "values of them are used" if ignored else "")
        return fields, for_page(note, self.runs)

    def uploads_preview(self, files: list[str] | None, token: str) -> tuple[list[tuple[str, str]], str]:
        """The uploads as the Train tab shows them: thumbnails of each image with the caption it
        trains with (its .txt, else the caption template with the token), its mask after it; and
        Markdown saying what was uploaded, each caption in full, or what Train would refuse about
        it (an unpaired caption or mask, a mask not of its image's size) before any training."""
        if not files:
            return [], ""
        template = self.defaults["caption_template"].format(token=str(token or "").strip())
        shown = training.preview(files, template)
        try:
            found = training.check_uploads(files)
            head = f"{len(found.images)} image(s), {len(found.captions)} caption(s), {len(found.masks)} mask(s)"
        except UserError as exc:
            head = f"**{for_page(str(exc), self.runs)}**"
        items = [item for image, caption, mask in shown for item in
                 [(str(image), f"{image.name}: {caption}")]
                 + ([(str(mask), f"{mask.name}: mask of {image.name} (white = subject)")] if mask else [])]
        rows = [f"| {html.escape(image.name)} | {html.escape(caption, quote=False)} | {'yes' if mask else ''} |"
                for image, caption, mask in shown]
        return items, "\n".join([head, "", "| image | caption it trains with | mask |", "|---|---|---|", *rows])

    def samples(self, shown: str = "") -> tuple:
        """(the newest samples of the training started here, what they show, a key naming that
        file's version); the image is None before there are any, and when `shown` is their key."""
        job = self.trainer.job
        found = None if job is None else training.newest_samples(job.folder)
        if found is None:
            return None, "", ""
        from PIL import Image

        path, label = found
        key = f"{path}:{path.stat().st_mtime_ns}"
        if key == shown:
            return None, f"{job.name}: {label}", key
        with Image.open(path) as image:
            return image.convert("RGB"), f"{job.name}: {label}", key

    def resume(self, name: str) -> Job:
        """Continue run `name`, stopped, from its newest checkpoint; no name: the last one trained here."""
        name = str(name or "").strip() or (self.trainer.job.name if self.trainer.job else "")
        if not name:
            raise UserError("type the name of the stopped run to continue")
        return self.trainer.resume(name)

    def selection_with(self, name: str, chosen: list[str]) -> tuple[list[str], str]:
        """Compare's runs and prompt once run `name` has finished: it joins the chosen runs that
        learned one of its tokens (the others would draw the prompt without their concept), and
        the prompt becomes its own validation prompt, which names its token. The base model, if
        chosen, stays: it draws any prompt."""
        run = read_run(self.runs, name)
        listed = {other.name: other for other in list_runs(self.runs) if other.state == "finished"}
        alike = [c for c in chosen or [] if c == grids.BASE
                 or c != name and c in listed and set(listed[c].tokens) & set(run.tokens)]
        return [*alike, name], run.prompt

    def job_curves(self, job: Job):
        """The curves of a training so far; none before it has written its config."""
        try:
            return curves.figure([read_run(self.runs, job.name)])
        except UserError:
            return None

    def stop(self) -> str:
        return self.trainer.stop()

    def downloads(self, run: str) -> list[str]:
        return [str(p) for p in stage_downloads(read_run(self.runs, run).path, self.engine.cache, run)]

    # ---- Curves
    def curves(self, runs: list[str]):
        if not runs:
            raise UserError("choose at least one run")
        return curves.figure([read_run(self.runs, name) for name in runs])


# an absolute path of two parts or more, as library messages write them (quoted or not)
SERVER_PATH = re.compile(r"(?<![\w.~])/(?:[^\s/'\"]+/)+([^\s/'\"]+)")


def for_page(message: str, runs: Path) -> str:
    """A message as the page shows it, in HTML (how gradio renders messages and Markdown): a
    <token> escaped, or the browser drops it as an unknown tag and the sentence loses its point;
    where the server keeps things is none of the page's business, so a path below the runs
    folder becomes the run's name, other paths their last part."""
    for root in sorted({str(runs), str(runs.resolve())}, key=len, reverse=True):
        message = message.replace(root + "/", "").replace(root, "the runs folder")
    return html.escape(SERVER_PATH.sub(r"\1", message), quote=False)


def page_error(exc: UserError, runs: Path):
    """The gr.Error that shows `exc` in the page; the server's log gets one line, not a traceback."""
    import gradio as gr

    print(f"balora: app: {exc}", file=sys.stderr)
    return gr.Error(for_page(str(exc), runs), print_exception=False)


def _shown(fn, runs: Path):
    """A callback whose UserErrors appear in the page as an error message (and keep the app serving)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise page_error(exc, runs) from None
    return call


def build_ui(app: App):
    import gradio as gr

    d = app.defaults
    finished = app.finished()
    with gr.Blocks(title="balora-diffusion", analytics_enabled=False) as ui:
        gr.Markdown(f"## balora-diffusion\nRuns in `{app.runs}`. Compare generations across learning rates, "
                    "methods and fusion coefficients; train a concept; read the training curves.")
        with gr.Tab("Compare"):
            table = gr.Dataframe(value=app.table_frame(), interactive=False, label="runs")
            with gr.Row():
                # custom values: a run trained after the page was built is still a valid name (read_run checks)
                chosen = gr.Dropdown([*finished, grids.BASE], value=finished[:12], multiselect=True,
                                     label="runs to compare", scale=4, allow_custom_value=True,
                                     info="finished runs; \"base model\" draws without any adapter, the token "
                                          "replaced by the run's init word")
                checkpoints = gr.Checkbox(False, label="their checkpoints too", scale=1)
                refresh = gr.Button("Refresh runs", scale=1)
            with gr.Row():
                rows = gr.Dropdown(grids.LAYOUT_AXES + ["run"], value="learning rate", label="rows",
                                   info="one row per value of this axis")
                columns = gr.Dropdown(grids.LAYOUT_AXES + ["run"], value="method", label="columns",
                                      info="one column per value; split further by what varies inside it")
                split = gr.Dropdown([grids.NO_SPLIT, *grids.LAYOUT_AXES, "run"], value=grids.NO_SPLIT,
                                    label="split by", info="one grid per value of this axis, one below the other")
                fusion = gr.Textbox("0.7, 1", label="fusion coefficients (LoRA strength)")
                seeds = gr.Textbox("1", label="seed(s), the same in every cell")
            with gr.Row():
                # several lines: one prompt each, an axis of the grid
                prompt = gr.Textbox(app.default_prompt(), label="prompt", lines=2, scale=3)
                their_prompts = gr.Button("Their prompts", scale=0, min_width=120)
                negative = gr.Textbox("", label="negative prompt", scale=2)
                steps = gr.Textbox(f"{d['sample_steps']}", label="sampling steps (e.g. 20, 30)")
                guidance = gr.Textbox(f"{d['guidance_scale']:g}", label="guidance (e.g. 5, 7.5)")
            gr.Markdown("Every run draws the same prompts (one a line; **Their prompts** puts in the chosen runs' "
                        "own, a fused adapter's one per concept), seeds, sampling steps and guidances (lists such "
                        "as `20, 30`), so only the training differs. The fusion coefficient is the LoRA's strength "
                        "(0: the base model with the learned token; 1: as trained). Images are cached: a redraw "
                        "is instant.")
            draw = gr.Button("Draw grid", variant="primary", elem_id="draw-grid")
            # no label badge: it would cover the start of the grid's own title
            grid = gr.Image(type="pil", label="grid", show_label=False, format="png", elem_id="grid",
                            interactive=False)
            grid_file = gr.File(label="grid as PNG")

        with gr.Tab("Train"):
            gr.Markdown(f"Upload {MIN_IMAGES} to {MAX_IMAGES} images of the concept (at most {MAX_FILE_MB} MB "
                        "each), with optional captions as same-name .txt files (a caption must name the token) and "
                        f"optional masks as NAME{masks.SUFFIX} (white = subject, the image's size) for a masked "
                        "loss.")
            with gr.Row():
                uploads = gr.File(file_count="multiple", label="images, captions and masks", type="filepath",
                                  elem_id="uploads", scale=2, height=320)
                with gr.Column(scale=3):
                    thumbnails = gr.Gallery(label="what trains: each image with its caption, its mask after it",
                                            columns=6, height=240, object_fit="contain", elem_id="thumbnails",
                                            interactive=False)
                    upload_check = gr.Markdown(elem_id="upload-check")
            with gr.Row():
                # ids: a textbox's help is part of its accessible name, so scripts find it by id
                run_name = gr.Textbox("", label="run name (empty: token-method-time)", elem_id="run-name",
                                      info="the run's folder under the runs folder")
                token = gr.Textbox(d["token"][0], label="token", elem_id="token", info=option_help("token") +
                                   "; every caption must name it")
                init_word = gr.Textbox(d["init_word"], label="init word", elem_id="init-word", info=option_help("init_word") +
                                       " (what the concept is: dog, heart); Compare's base model draws it")
                method = gr.Dropdown(list(METHODS), value=d["method"], label="method",
                                     info="update rule of the LoRA factors: what each does is said below")
            method_help = gr.Markdown(methods.method_help(d["method"]), elem_id="method-help")
            with gr.Row():
                lr_unet = gr.Number(d["lr_unet"], label="learning rate (UNet)", info=option_help("lr_unet") +
                                    "; each method's taste is said above")
                lr_text = gr.Number(d["lr_text"], label="learning rate (text encoder)", info=option_help("lr_text"))
                train_steps = gr.Number(d["steps"], precision=0, label="steps", minimum=1,
                                        info=f"optimizer steps of {d['batch_size']} images; a checkpoint every "
                                             f"{d['checkpoint_every']} (Stop keeps the step reached)")
                rank = gr.Number(d["rank"], precision=0, label="rank", minimum=1,
                                 info="LoRA rank of UNet and text encoder, alpha = rank (scale 1): higher holds "
                                      "more detail in a larger file")
                sample_every = gr.Number(SAMPLE_EVERY, precision=0, label="samples every N steps", minimum=0,
                                         info="a grid of the validation prompt (fusion coefficient x seed) every N "
                                              "steps, shown below as it trains; 0: only at the end. Each grid "
                                              "pauses the training while it draws")
            with gr.Accordion("Your own photos: buckets, masks, hold-out, prior preservation", open=False,
                              elem_id="photo-options"):
                with gr.Row():
                    buckets = gr.Textbox(" ".join(d["buckets"]), label="aspect-ratio buckets",
                                         info=option_help("buckets"))
                    holdout = gr.Number(d["holdout"], precision=0, minimum=0, label="held-out images",
                                        info=option_help("holdout"))
                with gr.Row():
                    masked_loss = gr.Checkbox(d["masked_loss"], label="masked loss", info=option_help("masked_loss"),
                                              elem_id="masked-loss")
                    unmasked_weight = gr.Number(d["unmasked_weight"], minimum=0, maximum=1,
                                                label="background weight (with masked loss)",
                                                info=option_help("unmasked_weight"))
                with gr.Row():
                    prior_prompt = gr.Textbox(d["prior_prompt"], label="prior prompt",
                                              info=option_help("prior_prompt"))
                    prior_weight = gr.Number(d["prior_weight"], minimum=0, label="prior weight",
                                             info=option_help("prior_weight"))
                gr.Markdown("What each costs and what it bought on the shipped concepts: `docs/results/photos.md` "
                            "in the project's source.")
            with gr.Row():
                config_in = gr.UploadButton("Load a train TOML into the fields", file_types=[".toml"],
                                            type="filepath", elem_id="config-in")
                save_config = gr.Button("Save the fields as a train TOML")
            # shown once there is a file to download
            config_out = gr.File(label="train TOML (balora train --config FILE --data-dir PHOTOS)",
                                 elem_id="config-out", visible=False)
            config_note = gr.Markdown(elem_id="config-note")
            with gr.Row():
                overwrite = gr.Checkbox(False, label="Overwrite: replace a run of this name trained here")
                start = gr.Button("Train", variant="primary")
                stop = gr.Button("Stop (keeps the step reached)")
                resume = gr.Button("Continue the stopped run")
            status = gr.Markdown(label="status", elem_id="train-status")
            # the label in a line of its own: a label badge would cover the start of the grid's title
            samples_note = gr.Markdown(elem_id="samples-note")
            samples = gr.Image(type="pil", label="samples", show_label=False, format="png", elem_id="live-samples",
                               interactive=False)
            live = gr.Plot(label="curves")
            # the samples appear as the training writes them, without changing the train endpoint's outputs
            ticker = gr.Timer(SAMPLE_POLL_SECONDS)
            with gr.Row():
                download_run = gr.Dropdown(finished, label="run", scale=3, allow_custom_value=True)
                prepare = gr.Button("Download files", scale=1)
            files = gr.File(label="adapter files (diffusers zip, and every other format the run holds)",
                            file_count="multiple", elem_id="adapter-files")

        with gr.Tab("Curves"):
            curve_runs = gr.Dropdown(finished, value=finished[:12], multiselect=True, label="runs",
                                     allow_custom_value=True,
                                     info="losses, balance diagnostics and the scores their trainings logged; "
                                          "one colour per method")
            plot = gr.Button("Plot")
            figure = gr.Plot(label="curves", elem_id="curves")

        def refreshed(**selection):
            names = app.finished()
            return (app.table_frame(), gr.update(choices=[*names, grids.BASE], **selection), gr.update(choices=names),
                    gr.update(choices=[r["name"] for r in app.list_runs()]))

        def loaded():
            """The page as of now, not as of the server's start: runs trained since are chosen."""
            return *refreshed(value=app.finished()[:12]), app.default_prompt()

        def trained(picked):
            """A run that has just finished is chosen in Compare, its token in the prompt."""
            job = app.trainer.job
            if job is None or job.running() or job.process.returncode != 0:
                return *refreshed(), gr.update()
            selection, prompt = app.selection_with(job.name, picked)
            return *refreshed(value=selection), prompt

        run_pickers = [table, chosen, curve_runs, download_run]
        refresh.click(_shown(refreshed, app.runs), None, run_pickers, api_visibility="private")
        ui.load(_shown(loaded, app.runs), None, [*run_pickers, prompt], api_visibility="private")
        gr.api(_shown(app.list_runs, app.runs), api_name="list_runs")

        def compare(runs, rows, columns, prompt, negative, seeds, steps, guidance, fusion, checkpoints=False,
                    split=grids.NO_SPLIT, progress=gr.Progress()):
            return app.compare(runs, rows, columns, prompt, negative, seeds, steps, guidance, fusion, checkpoints,
                               split, progress=lambda done, total: progress((done, total), desc="drawing",
                                                                            unit="images"))

        # "split by" after today's inputs: scripts' calls keep working
        draw.click(_shown(compare, app.runs),
                   [chosen, rows, columns, prompt, negative, seeds, steps, guidance, fusion, checkpoints, split],
                   [grid, grid_file], api_name="compare")
        their_prompts.click(_shown(app.prompts_of, app.runs), chosen, prompt, api_name="prompts_of")

        def watched(job, progress):
            """The training's status, curves and (once finished) files, about once a second."""
            while job.running():
                progress((job.step(), job.steps), desc=f"training {job.name}", unit="steps")
                yield for_page(job.outcome(), app.runs), app.job_curves(job), None
                time.sleep(POLL_SECONDS)
            done = job.process.returncode == 0
            yield for_page(job.outcome(), app.runs), app.job_curves(job), app.downloads(job.name) if done else None

        def train(files, name, token, init_word, method, lr_unet, lr_text, steps, rank, overwrite=False,
                  buckets="off", masked_loss=False, unmasked_weight=0.0, holdout=0, prior_prompt="", prior_weight=1.0,
                  sample_every=SAMPLE_EVERY, progress=gr.Progress()):
            try:
                job = app.train(files, name, token, init_word, method, lr_unet, lr_text, steps, rank, overwrite,
                                buckets, masked_loss, unmasked_weight, holdout, prior_prompt, prior_weight,
                                sample_every)
            except UserError as exc:
                raise page_error(exc, app.runs) from None
            yield from watched(job, progress)

        def resumed(name, progress=gr.Progress()):
            try:
                job = app.resume(name)
            except UserError as exc:
                raise page_error(exc, app.runs) from None
            yield from watched(job, progress)

        # not queued behind a running training: a second one is refused at once (Trainer); the
        # progress bar over the status line only, so the curves below stay in view
        watching = dict(outputs=[status, live, files], concurrency_limit=None, show_progress_on=status)
        # the photo options and the sample interval after today's inputs: scripts' calls keep working
        start.click(train, [uploads, run_name, token, init_word, method, lr_unet, lr_text, train_steps, rank, overwrite,
                            buckets, masked_loss, unmasked_weight, holdout, prior_prompt, prior_weight, sample_every],
                    api_name="train", **watching).then(trained, chosen, [*run_pickers, prompt],
                                                       api_visibility="private")
        resume.click(resumed, run_name, api_name="resume", **watching).then(trained, chosen, [*run_pickers, prompt],
                                                                            api_visibility="private")
        stop.click(app.stop, None, status, api_name="stop", concurrency_limit=None)

        for changed in (uploads.change, token.blur):
            changed(_shown(app.uploads_preview, app.runs), [uploads, token], [thumbnails, upload_check],
                    api_visibility="private", show_progress="hidden")
        fields = [run_name, token, init_word, method, lr_unet, lr_text, train_steps, rank, buckets, masked_loss,
                  unmasked_weight, holdout, prior_prompt, prior_weight, sample_every]
        save_config.click(_shown(app.save_config, app.runs), fields, config_out, api_name="save_config").then(
            lambda: gr.update(visible=True), None, config_out, api_visibility="private")

        def loaded_config(path):
            values, note = app.load_config(path)
            return *values, note
        config_in.upload(_shown(loaded_config, app.runs), config_in, [*fields, config_note], api_name="load_config")
        method.change(methods.method_help, method, method_help, api_visibility="private", show_progress="hidden")

        def sampled(shown):
            """The newest samples, sent only when they are new (the timer ticks on every open page)."""
            image, label, key = app.samples(shown)
            return (gr.update(), gr.update(), shown) if image is None else (image, for_page(label, app.runs), key)

        shown_samples = gr.State("")
        ticker.tick(sampled, shown_samples, [samples, samples_note, shown_samples], api_visibility="private",
                    show_progress="hidden", concurrency_limit=None)
        prepare.click(_shown(app.downloads, app.runs), download_run, files, api_name="downloads")
        plot.click(_shown(app.curves, app.runs), curve_runs, figure, api_name="curves")
    return ui


def serve(app: App, host: str = "127.0.0.1", port: int = 7860, auth: list[tuple[str, str]] | None = None,
          block: bool = True):
    """Launch the app's server; with block=False return the running Blocks (its `local_url`)."""
    ui = build_ui(app)
    # one request at a time per button (the base model is shared); waiting ones are queued
    ui.queue(default_concurrency_limit=1, max_size=64)
    ui.launch(server_name=host, server_port=port, auth=auth or None, share=False, inbrowser=False,
              ssr_mode=False, max_file_size=f"{MAX_FILE_MB}mb", prevent_thread_lock=not block, show_error=True,
              # the cache holds the grids and downloads it hands out; nothing else is served
              allowed_paths=[str(app.engine.cache)], quiet=not block)
    return ui


if __name__ == "__main__":  # python app/app.py --runs DIR
    from balora_diffusion.cli import main

    sys.exit(main(["app", *sys.argv[1:]]))
