"""Concept training end to end on a random-weight SD-architecture pipeline (milliseconds a step)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from fnmatch import fnmatch
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from balora_diffusion import paths, run_layout
from balora_diffusion.checkpoint import list_checkpoints, load_tree
from balora_diffusion.cli import main as cli_main
from balora_diffusion.formats.run_files import kohya_file_name
from balora_diffusion.rules import NAMED_METHODS
from balora_diffusion.runfolder import LOCK
from balora_diffusion.train import TrainingDiverged, train
from balora_diffusion.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONCEPT = paths.DEMO_CONCEPT
METHODS = [*NAMED_METHODS, "balora+scaled"]


def _config(model_dir, out, **kw) -> TrainConfig:
    base = dict(data_dir=str(CONCEPT), base_model=str(model_dir), token=["<zorb>"], init_word="heart",
                caption_template="a {token}", flip=False, output_dir=str(out), steps=12, batch_size=2,
                lr_unet=1e-2, lr_text=1e-3, lr_embedding=1e-2, eval_every=12, checkpoint_every=6,
                heldout_size=8, grid_seeds=[1], fusion=[0.0, 1.0], sample_steps=2, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _init_row(model_dir: Path) -> torch.Tensor:
    """The embedding <zorb> starts from: the mean of the init word's rows of the base table."""
    from transformers import CLIPTextModel, CLIPTokenizer

    ids = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")("heart", add_special_tokens=False).input_ids
    table = CLIPTextModel.from_pretrained(model_dir / "text_encoder").get_input_embeddings().weight
    return table[ids].mean(0).detach()


def _assert_trained(row: torch.Tensor, init: torch.Tensor) -> None:
    # weight decay alone would only rescale the row: a trained one also moves across it
    across = row - (row @ init) / (init @ init) * init
    assert across.norm() > 0.01 * init.norm(), "the token embedding did not train"


def _heldout(out: Path) -> list[float]:
    return [json.loads(line)["value"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["name"] == "heldout_loss"]


def _assert_named_by_run_layout(out: Path) -> None:
    """Every file and folder of the run, and of its checkpoints, has its name from run_layout."""
    for entry in out.iterdir():
        assert entry.name in (*run_layout.RUN_OUTPUTS, run_layout.LOCK) or fnmatch(entry.name, run_layout.STEP_GRIDS)
    trees = (run_layout.TRAINABLE_TREE, run_layout.OPTIMIZER_TREE, run_layout.SCHEDULE_TREE, run_layout.META_TREE,
             run_layout.CONFIG_TREE)
    checkpoints = list_checkpoints(out / run_layout.CHECKPOINTS)
    assert checkpoints
    for checkpoint in checkpoints:
        assert checkpoint.name == run_layout.checkpoint_name(load_tree(checkpoint, run_layout.META_TREE)["step"])
        assert sorted(f.name for f in checkpoint.iterdir()) == sorted(
            [run_layout.MANIFEST, *(f"{t}.json" for t in trees), *(f"{t}.safetensors" for t in trees)])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_lowers_the_heldout_loss_and_writes_a_run(method, random_sd_dir, tmp_path):
    out = train(_config(random_sd_dir, tmp_path / method, method=method, steps=24, eval_every=24))
    before, after = _heldout(out)
    assert after < before, f"{method}: held-out loss {before:.4f} -> {after:.4f}"
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == method and run["final"]["heldout_loss"] == after
    # the loop also ran a held-out eval and wrote a checkpoint: its rate is below the steps' own
    assert run["training_steps_per_second"] > run["steps_per_second"] > 0
    assert run["peak_gpu_memory_mib"] is None and run["peak_train_gpu_memory_mib"] is None  # CPU run
    adapter = load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("unet.") for k in adapter) and any(k.startswith("text_encoder.") for k in adapter)
    assert load_file(str(out / "adapter" / "zorb.safetensors"))["<zorb>"].shape == (1, 32)
    assert sorted(p.name for p in (out / "kohya").iterdir()) == sorted([kohya_file_name(method), "zorb.safetensors"])
    for png in ("grid.png", "loss.png", "heldout_loss.png", "balance.png"):
        assert (out / png).stat().st_size > 0
    _assert_named_by_run_layout(out)
    if method in ("balora", "balora+scaled"):
        # every trained pair sits on the balanced manifold at the end
        assert max(d["imbalance"] for d in run["diagnostics"].values()) < 1e-4


def test_saved_adapter_loads_in_plain_diffusers_at_its_alpha(random_sd_dir, tmp_path):
    from balora_diffusion.generate import generate
    from balora_diffusion.lora import find_lora_pairs
    from balora_diffusion.models import load_pipeline

    cfg = _config(random_sd_dir, tmp_path / "run", method="balora", alpha=8.0, steps=6)
    out = train(cfg)
    fresh = load_pipeline(random_sd_dir, device="cpu")
    fresh.load_lora_weights(str(out / "adapter"))
    fresh.load_textual_inversion(str(out / "adapter" / "zorb.safetensors"))  # no token=: the file names it
    assert "<zorb>" in fresh.tokenizer.get_vocab()
    # alpha 8 at rank 4 must come back as scale 2, not diffusers' default alpha = r
    scaling = {next(iter(m.scaling.values())) for m in fresh.unet.modules() if hasattr(m, "scaling") and m.scaling}
    assert scaling == {2.0}
    assert len(find_lora_pairs(fresh.unet)) > 0
    image = generate(fresh, ["a <zorb>"], [1], steps=2, progress=False)[0][0]
    assert image.size == (16, 16)


def test_trains_from_a_single_file_checkpoint_offline(random_sd_dir, tmp_path):
    from balora_diffusion.models import load_pipeline
    from balora_diffusion.formats.ldm_checkpoint import save_single_file

    single = save_single_file(load_pipeline(random_sd_dir, device="cpu"), tmp_path / "model.safetensors",
                              dtype=torch.float32)
    out = train(_config(single, tmp_path / "sf", base_config=str(random_sd_dir), method="balora", steps=4,
                        eval_every=4))
    from_folder = train(_config(random_sd_dir, tmp_path / "folder", method="balora", steps=4, eval_every=4))
    # the same weights, so the same run
    a = load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(from_folder / "adapter" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(random_sd_dir, tmp_path):
    # Warm-up from 0 to an absurd learning rate: step 0 changes nothing, step 1 blows the weights
    # up (they are checkpointed as step 2), and the loss of step 2 is not finite.
    cfg = _config(random_sd_dir, tmp_path / "nan", method="lora", steps=40, checkpoint_every=1,
                  lr_unet=1e30, lr_scheduler="constant_with_warmup", warmup_steps=1_000_000_000)
    with pytest.raises(TrainingDiverged, match="loss became") as info:
        train(cfg)
    checkpoints = list_checkpoints(tmp_path / "nan" / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-0000001"], "only the checkpoint that still gave a finite loss"
    assert str(checkpoints[-1]) in str(info.value)
    assert not (tmp_path / "nan" / "adapter").exists(), "no adapter from a diverged run"
    # and it is a usable checkpoint: finite weights and the optimizer state to resume from
    trainable = load_tree(checkpoints[-1], "trainable")
    assert trainable and all(torch.isfinite(t).all() for t in trainable.values())
    assert load_tree(checkpoints[-1], "meta") == {"step": 1}


def test_the_token_embedding_trains_and_is_checkpointed(random_sd_dir, tmp_path):
    out = train(_config(random_sd_dir, tmp_path / "emb", method="balora", steps=6, eval_every=6))
    saved = load_file(str(out / "adapter" / "zorb.safetensors"))["<zorb>"]
    _assert_trained(saved[0], _init_row(random_sd_dir))
    # the last checkpoint (step 6, the end) holds the trained rows
    trainable = load_tree(list_checkpoints(out / "checkpoints")[-1], "trainable")
    rows = [value for key, value in trainable.items() if key.endswith("token_embedding.extra")]
    assert len(rows) == 1 and torch.equal(rows[0], saved)


def test_bad_inputs_exit_2_with_one_line(random_sd_dir, tmp_path, capsys):
    common = ["train", "--base-model", str(random_sd_dir), "--token", "<zorb>", "--init-word", "heart",
              "--caption-template", "a {token}", "--output-dir", str(tmp_path / "bad"), "--steps", "1"]
    cases = [
        (["--data-dir", str(tmp_path / "missing")], "concept folder not found"),
        (["--data-dir", str(CONCEPT), "--base-model", str(tmp_path / "nomodel")], "not found"),
        (["--data-dir", str(CONCEPT), "--rank", "64"], "larger than layer"),
        (["--data-dir", str(CONCEPT), "--method", "balora+ilora"], "balora"),
        (["--data-dir", str(CONCEPT), "--token", "<sks>"], "never names <sks>"),
    ]
    for extra, message in cases:
        assert cli_main(common + extra) == 2, extra
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("balora: error: ") and message in errors[0], errors
    assert not (tmp_path / "bad" / "adapter").exists()


def _run_cli(args, env=None, **kw):
    # one thread, like this test process (conftest): float reductions then add up in the same order
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "balora_diffusion.cli", *args], env=env,
                            **{"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **kw})


def _wait_until(proc: subprocess.Popen, condition, timeout: float | None = 300) -> None:
    """Poll `condition` while `proc` runs; timeout None: however long a busy machine takes."""
    deadline = None if timeout is None else time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert deadline is None or time.time() < deadline, "timed out"
        time.sleep(0.05)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _our_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("balora: ")]


def _flags(cfg: TrainConfig) -> list[str]:
    from balora_diffusion.config import to_toml

    path = Path(cfg.output_dir).with_suffix(".toml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(cfg))
    return ["train", "--config", str(path)]


def test_resume_after_a_kill_gives_the_uninterrupted_adapter(random_sd_dir, tmp_path):
    cfg = _config(random_sd_dir, tmp_path / "straight", method="balora", steps=30, checkpoint_every=3,
                  eval_every=10, balora_state="reset_once", lr_scheduler="linear")
    train(cfg)

    killed = replace(cfg, output_dir=str(tmp_path / "killed"))
    proc = _run_cli(_flags(killed))
    _wait_until(proc, lambda: list_checkpoints(tmp_path / "killed" / "checkpoints"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = [int(p.name.split("-")[1]) for p in list_checkpoints(tmp_path / "killed" / "checkpoints")]
    assert steps_done and max(steps_done) < 30, "the run must have been killed before its end"

    assert (tmp_path / "killed" / LOCK).is_file(), "the killed run's lock file stays; its OS lock died with it"
    train(replace(killed, resume="latest"))
    assert _records(tmp_path / "killed") == _records(tmp_path / "straight"), "every step's metrics, once each"
    _assert_equal(_adapter(tmp_path / "straight"), _adapter(tmp_path / "killed"))
    _assert_trained(_adapter(tmp_path / "killed")["<zorb>"][0], _init_row(random_sd_dir))


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors")),
            **load_file(str(out / "adapter" / "zorb.safetensors"))}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(random_sd_dir, tmp_path, capsys):
    cfg = _config(random_sd_dir, tmp_path / "run", steps=2, checkpoint_every=1, eval_every=2)
    out = train(cfg)
    adapter = _adapter(out)
    assert cli_main(_flags(replace(cfg, seed=1))) == 2
    (error,) = _our_lines(capsys.readouterr().err)
    assert "already holds a run" in error and "--resume latest" in error and "--overwrite true" in error, error
    _assert_equal(_adapter(out), adapter)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000001", "step-0000002"]

    assert cli_main(_flags(replace(cfg, resume="latest", overwrite=True))) == 2
    (error,) = _our_lines(capsys.readouterr().err)
    assert "--resume" in error and "--overwrite" in error, error

    (out / "notes.txt").write_text("mine")
    shutil.copytree(out / "adapter", out / "best" / "adapter")  # what `balora eval --best-by` exports
    again = replace(cfg, seed=1, steps=3, checkpoint_every=3, eval_every=3, overwrite=True)
    assert cli_main(_flags(again)) == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000003"], "the old run's are gone"
    assert json.loads((out / "run.json").read_text())["seed"] == 1
    assert any(not torch.equal(v, adapter[k]) for k, v in _adapter(out).items())
    assert [r["step"] for r in _records(out) if r["name"] == "heldout_loss"] == [0, 3], "only the new run's metrics"
    assert (out / "notes.txt").read_text() == "mine", "files that are not the run's stay"
    assert not (out / "best").exists(), "the old run's best checkpoint is gone with it"


def test_a_second_training_into_the_same_folder_is_refused_at_once(random_sd_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _config(random_sd_dir, out, steps=100_000, checkpoint_every=100_000, eval_every=100_000)
    with (tmp_path / "first.log").open("w") as log:
        first = _run_cli(_flags(cfg), stdout=log)
    try:
        _wait_until(first, lambda: (out / LOCK).is_file() and (out / LOCK).read_text().strip() == str(first.pid),
                    timeout=120)
        leftover = out / ".run.json.tmp4242"  # as if the first run were writing it right now
        leftover.write_text("{")
        # a missing base model would be the error if the second run got as far as loading it
        assert cli_main(_flags(replace(cfg, steps=2, base_model=str(tmp_path / "no-model")))) == 2
        (error,) = _our_lines(capsys.readouterr().err)
        assert "another training" in error and str(first.pid) in error, error
        assert first.poll() is None and leftover.exists(), "the first run and its files are untouched"
    finally:
        first.kill()
        first.wait()


def test_leftovers_of_interrupted_writes_are_removed_at_the_next_start(random_sd_dir, tmp_path):
    out = tmp_path / "run"
    leftovers = [out / ".run.json.tmp4242", out / ".adapter.tmp4242" / "pytorch_lora_weights.safetensors",
                 out / "checkpoints" / ".step-0000006.tmp4242" / "trainable.safetensors"]
    kept = [out / ".notes", out / "notes.tmp4242"]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    train(_config(random_sd_dir, out, steps=1, checkpoint_every=1, eval_every=1))
    assert not any(p.exists() for p in (out / ".run.json.tmp4242", out / ".adapter.tmp4242",
                                         out / "checkpoints" / ".step-0000006.tmp4242"))
    assert all(p.read_text() == "x" for p in kept)


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(random_sd_dir, tmp_path, capsys):
    cfg = _config(random_sd_dir, tmp_path / "run", steps=4, checkpoint_every=2, eval_every=4)
    out = train(cfg)
    adapter = _adapter(out)
    older, latest = list_checkpoints(out / "checkpoints")
    weights = latest / "trainable.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    capsys.readouterr()

    train(replace(cfg, resume="latest"))
    (warning,) = _our_lines(capsys.readouterr().err)
    assert warning.startswith("balora: warning: ") and latest.name in warning and older.name in warning, warning
    _assert_equal(_adapter(out), adapter)  # steps 3 and 4 again from step 2: the same adapter
    assert load_tree(latest, "meta") == {"step": 4}, "and a whole checkpoint of step 4"

    os.truncate(weights, weights.stat().st_size // 2)
    (older / "optimizer.json").unlink()
    assert cli_main(_flags(replace(cfg, resume="latest"))) == 2
    (error,) = _our_lines(capsys.readouterr().err)
    assert "no intact checkpoint" in error and latest.name in error and older.name in error, error


def test_resume_refuses_a_changed_training_option_and_names_it(random_sd_dir, tmp_path, capsys):
    cfg = _config(random_sd_dir, tmp_path / "run", steps=2, checkpoint_every=2, eval_every=2)
    train(cfg)
    for key, value in (("rank", 8), ("method", "lora"), ("init_word", "cat")):
        assert cli_main(_flags(replace(cfg, resume="latest", **{key: value}))) == 2
        (error,) = _our_lines(capsys.readouterr().err)
        assert f"{key} = {getattr(cfg, key)!r}" in error and f"{key} = {value!r}" in error, error
    # how long to train and what to evaluate or draw may change
    out = train(replace(cfg, resume="latest", steps=4, eval_every=4, fusion=[1.0]))
    assert json.loads((out / "run.json").read_text())["resumed_from"] == 2


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_exits_130_with_one_line_naming_the_checkpoint_and_how_to_resume(random_sd_dir, tmp_path, inherited):
    cfg = _config(random_sd_dir, tmp_path / "run", steps=100_000, checkpoint_every=2, eval_every=100_000)
    # "ignored": started the way a script's background job is (SIGINT ignored, which exec keeps)
    handler = signal.SIG_IGN if inherited == "ignored" else signal.SIG_DFL
    with (tmp_path / "stderr.txt").open("w") as err:
        proc = _run_cli(_flags(cfg), stdout=subprocess.DEVNULL, stderr=err,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, handler))
        # Ctrl-C once the first checkpoint is there, and the end waited for, however long each
        # takes on a busy machine: the test is about what the interrupted run says, not its speed
        _wait_until(proc, lambda: list_checkpoints(tmp_path / "run" / "checkpoints"), timeout=None)
        proc.send_signal(signal.SIGINT)
        assert proc.wait() == 130
    text = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in text, text[-3000:]
    (line,) = _our_lines(text)
    last = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert str(last) in line and "--resume latest" in line, line


def _safetensors_header(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])


def test_identical_runs_write_identical_adapter_files_without_local_paths(random_sd_dir, tmp_path):
    # Two processes with different string hashing, so nothing may depend on a set's or a map's order.
    # the same folder name in two places: the name is the kohya file's and is written into the files
    runs = [_config(random_sd_dir, tmp_path / f"copy{n}" / "run", method="balora", steps=2, eval_every=2) for n in (1, 2)]
    procs = [_run_cli(_flags(cfg), env={"PYTHONHASHSEED": str(n)}) for n, cfg in enumerate(runs, 1)]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stdout.read()
    for name in ("adapter/pytorch_lora_weights.safetensors", "adapter/zorb.safetensors", "kohya/run.safetensors"):
        first, second = (Path(cfg.output_dir) / name for cfg in runs)
        assert first.read_bytes() == second.read_bytes(), name
        metadata = _safetensors_header(first).get("__metadata__", {})
        assert str(tmp_path.parent) not in json.dumps(metadata), "a path of this machine in the header"
        adapter_configs = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        assert not [v for v in adapter_configs.values() if isinstance(v, str) and os.path.isabs(v)]


def test_two_processes_keep_identical_replicas(random_sd_dir, tmp_path):
    pytest.importorskip("accelerate")
    cfg = _config(random_sd_dir, tmp_path / "ddp", method="balora+scaled", steps=6, batch_size=1)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # accelerate has no multi-CPU flag of its own: --multi_gpu on a machine without GPUs starts
    # torch.distributed processes that accelerate runs as MULTI_CPU (gloo).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "balora_diffusion.cli", *_flags(cfg)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["processes"] == 2
    assert len(run["replica_checksums"]) == 2 and run["replica_checksums"][0] == run["replica_checksums"][1]


def _small_demo(model_dir: Path, tmp_path: Path) -> list[str]:
    from balora_diffusion.config import read_toml, to_toml
    cfg = TrainConfig(**read_toml(TrainConfig, paths.config_file("demo")))
    config = tmp_path / "demo.toml"
    config.write_text(to_toml(replace(cfg, base_model=str(model_dir), steps=3, eval_every=3, sample_steps=2,
                                      grid_seeds=[1], fusion=[1.0])))
    return ["demo", "--config", str(config), "--output-dir", str(tmp_path / "demo"), "--seeds", "1"]


def test_demo_trains_then_draws_the_concept_with_and_without_the_adapter(random_sd_dir, tmp_path, capsys):
    assert cli_main(_small_demo(random_sd_dir, tmp_path)) == 0
    printed = capsys.readouterr().out
    scores = [float(line.split("mean ")[1].split()[0]) for line in printed.splitlines() if line.startswith("fidelity")]
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    from PIL import Image

    grid = Image.open(tmp_path / "demo" / "demo.png")
    # 6 evaluation prompts x (without, with) rows of 16 px images drawn at least 96 px wide
    assert grid.height > 12 * 96


def test_a_command_prints_nothing_on_stderr_but_its_own_lines_and_progress_bars(random_sd_dir, tmp_path):
    proc = _run_cli(_small_demo(random_sd_dir, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    bar = re.compile(r"^.*: *\d+%\|.*\| *\d+/\d+ \[")  # tqdm: "train:  40%|####      | 2/5 [00:01<00:01, ...]"
    pieces = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err))
    foreign = [p for p in pieces if p.strip() and not bar.match(p) and not p.startswith("balora: ")]
    assert not foreign, foreign


def test_the_shipped_model_learns_the_shipped_concept(tmp_path):
    """The product's claim end to end on the real assets: a short BaLoRA run of the demo puts the
    concept's colours where the prompt asks, and without the adapter the base model never draws them.
    (The full demo's figures: docs/results/demo.md.)"""
    out = tmp_path / "demo"
    assert cli_main(["demo", "--output-dir", str(out), "--steps", "150", "--seeds", "1"]) == 0
    report = json.loads((out / "demo.json").read_text())
    assert report["steps"] == 150 and len(report["fidelity"]["1"]) == len(report["prompts"])
    assert report["fidelity_mean"]["0"] < 0.02
    assert report["fidelity_mean"]["1"] > 0.1
