"""`balora train --eval-metrics ... --best-by METRIC` through the CLI on the random SD model with tiny saved
CLIP and DINOv2 models: the scores at each scored step are the scores `balora eval` gives the same
adapters, RUN/best/ holds the best-scored step in every format, a resumed run keeps the best so far, and
bad inputs fail in one line before any training."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from balora_diffusion import checkpoint as ckpt
from balora_diffusion import paths
from balora_diffusion.checkpoint_scoring import SCORING_GUIDANCE, SCORING_SCHEDULER
from balora_diffusion.cli import main as cli_main
from balora_diffusion.formats.run_files import kohya_file_name

METRICS = ["clip-t", "clip-i", "dino", "fidelity", "adherence"]


def _args(model, out, clip, dino, *extra, steps=4):
    return ["train", "--data-dir", str(paths.DEMO_CONCEPT), "--base-model", str(model), "--token", "<zorb>",
            "--init-word", "heart", "--caption-template", "a {token}", "--flip", "false", "--steps", str(steps),
            "--batch-size", "2", "--lr-unet", "1e-2", "--lr-text", "1e-3", "--lr-embedding", "1e-2",
            "--eval-every", "2", "--checkpoint-every", "2", "--heldout-size", "2", "--grid-seeds", "1",
            "--fusion", "1", "--sample-steps", "1", "--cpu-threads", "1", "--eval-clip", str(clip),
            "--eval-dino", str(dino), "--eval-sample-steps", "2", "--output-dir", str(out), *extra]


def _scores(out: Path) -> dict[str, dict[int, float]]:
    found: dict[str, dict[int, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["name"].startswith("eval/"):
            found.setdefault(record["name"][5:], {})[record["step"]] = record["value"]
    return found


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(folder / "pytorch_lora_weights.safetensors")), **load_file(str(folder / "zorb.safetensors"))}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def scored(random_sd_dir, tiny_clip_dir, tiny_dino_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "run"
    assert cli_main(_args(random_sd_dir, out, tiny_clip_dir, tiny_dino_dir, "--eval-metrics", *METRICS,
                          "--eval-metrics-every", "1", "--best-by", "dino")) == 0
    return out


def test_every_scored_step_is_logged_plotted_and_checkpointed(scored):
    scores = _scores(scored)
    assert sorted(scores) == sorted(METRICS)
    assert all(sorted(by_step) == [1, 2, 3, 4] for by_step in scores.values())
    assert 0 <= min(scores["fidelity"].values()) <= max(scores["fidelity"].values()) <= 1
    assert (scored / "scores.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(scored / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/dino")] == [1, 2, 3, 4]
    # a scored step is a checkpoint even off checkpoint_every (the newest two are kept)
    assert [ckpt.checkpoint_step(f) for f in ckpt.list_checkpoints(scored / "checkpoints")] == [3, 4]
    run = json.loads((scored / "run.json").read_text())
    assert run["final"]["eval/clip-i"] == scores["clip-i"][4]


def test_the_scores_are_balora_evals_and_best_holds_the_best_step_in_every_format(scored, tiny_clip_dir, tiny_dino_dir,
                                                                                   tmp_path):
    scores = _scores(scored)
    # balora eval, with the training's sampling settings (scored images' sampler and guidance), on the same run:
    # the newest checkpoints
    out = tmp_path / "eval"
    assert cli_main(["eval", str(scored), "--clip", str(tiny_clip_dir), "--dino", str(tiny_dino_dir), "--seeds", "1",
                     "--steps", "2", "--fusion", "1", "--scheduler", SCORING_SCHEDULER, "--guidance",
                     str(SCORING_GUIDANCE), "--metrics", *METRICS, "--out", str(out)]) == 0
    results = json.loads((out / "eval.json").read_text())["results"]
    assert [r["step"] for r in results] == [3, 4]
    for r in results:
        for metric in METRICS:
            assert scores[metric][r["step"]] == pytest.approx(r[metric], abs=1e-6), (metric, r["step"])

    best = json.loads((scored / "best" / "best.json").read_text())
    step = max(sorted(scores["dino"]), key=lambda s: scores["dino"][s])  # the first of equal scores
    assert best["by"] == "dino" and best["step"] == step and best["value"] == scores["dino"][step]
    assert {m: best[m] for m in METRICS} == {m: scores[m][step] for m in METRICS}
    assert json.loads((scored / "run.json").read_text())["best"]["step"] == step
    kohya = scored / "best" / "kohya"
    assert (kohya / kohya_file_name("run")).is_file() and (kohya / "zorb.safetensors").is_file()
    if step in (3, 4):  # the checkpoint is still there: the export is that state's adapter
        from balora_diffusion.formats.read import read_adapter

        exported, kept = read_adapter(scored / "best" / "adapter"), read_adapter(
            scored / "checkpoints" / f"step-{step:07d}")
        assert torch.equal(exported.embedding, kept.embedding)
        for (_, path, module), (_, _, other) in zip(exported.modules(), kept.modules()):
            assert torch.equal(module.delta(), other.delta()), path


def test_a_resumed_run_keeps_the_best_so_far_and_mends_best(scored, random_sd_dir, tiny_clip_dir, tiny_dino_dir,
                                                           tmp_path):
    out = tmp_path / "resumed"
    args = [*_args(random_sd_dir, out, tiny_clip_dir, tiny_dino_dir, "--eval-metrics", *METRICS,
                   "--eval-metrics-every", "1", "--best-by", "dino", steps=2)]
    assert cli_main(args) == 0
    assert cli_main([*args, "--steps", "4", "--resume", "latest"]) == 0
    assert _scores(out) == _scores(scored)
    best, reference = (json.loads((o / "best" / "best.json").read_text()) for o in (out, scored))
    assert {k: v for k, v in best.items() if k != "label"} == {k: v for k, v in reference.items() if k != "label"}
    _assert_equal(_tensors(out / "best" / "adapter"), _tensors(scored / "best" / "adapter"))

    # killed between the checkpoint and the export (best/ missing), or best/ from a later step than the
    # checkpoint resumed: the resumed run writes the checkpoint's best so far again
    for damage in ("missing", "later"):
        if damage == "missing":
            import shutil

            shutil.rmtree(out / "best")
        else:
            record = json.loads((out / "best" / "best.json").read_text())
            (out / "best" / "best.json").write_text(json.dumps({**record, "step": 99, "value": 1.0}))
        assert cli_main([*args, "--steps", "4", "--resume", "latest"]) == 0
        assert json.loads((out / "best" / "best.json").read_text())["step"] == reference["step"]
        _assert_equal(_tensors(out / "best" / "adapter"), _tensors(scored / "best" / "adapter"))


@pytest.mark.parametrize("extra, message", [
    (["--eval-metrics", "clip-x"], "eval-metrics must be one of"),
    (["--eval-metrics", "clip-i", "--best-by", "dino"], "dino is not among eval_metrics"),
    (["--eval-metrics", "clip-i", "--eval-clip", "{tmp}/no-clip"], "--eval-clip"),
    (["--eval-metrics", "dino", "--eval-dino", "{clip}"], "--eval-dino"),
    (["--eval-metrics", "fidelity", "--data-dir", "{plain}"], "needs a concept.toml"),
])
def test_bad_inputs_are_one_line_errors_before_training(extra, message, random_sd_dir, tiny_clip_dir, tiny_dino_dir,
                                                        tmp_path, capsys):
    plain = tmp_path / "plain"  # the zorb images without concept.toml
    plain.mkdir()
    for image in paths.DEMO_CONCEPT.glob("*.png"):
        (plain / image.name).write_bytes(image.read_bytes())
    extra = [e.format(tmp=tmp_path, clip=tiny_clip_dir, plain=plain) for e in extra]
    out = tmp_path / "run"
    assert cli_main(_args(random_sd_dir, out, tiny_clip_dir, tiny_dino_dir, *extra)) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("balora: error: ") and message in errors[0], errors
    assert not out.exists()


def test_the_options_are_toml_keys_checked_like_the_flags(tmp_path):
    from balora_diffusion.config import read_toml
    from balora_diffusion.errors import UserError
    from balora_diffusion.train_config import TrainConfig

    config = tmp_path / "scored.toml"
    config.write_text('eval_metrics = ["clip-i", "dino"]\neval_clip = "clip"\neval_metrics_every = 50\n'
                      'eval_seeds = [3]\nbest_by = "dino"\n')
    cfg = TrainConfig(**read_toml(TrainConfig, config))
    assert (cfg.eval_metrics, cfg.eval_clip, cfg.eval_metrics_every, cfg.eval_seeds, cfg.best_by) == (
        ["clip-i", "dino"], "clip", 50, [3], "dino")
    config.write_text('eval_metrics = "clip-i"\nbest_by = "clip-t"\n')
    with pytest.raises(UserError, match="best_by clip-t is not among eval_metrics"):
        TrainConfig(**read_toml(TrainConfig, config))
