"""What ships and how it installs: package data, the version guard, a wheel in a fresh venv."""
import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from balora_diffusion import paths
from balora_diffusion.errors import UserError
from balora_diffusion.versions import KNOWN_BROKEN, changed_since_lock, held_back, problems, read_lock

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_package_folder_is_listed_in_pyproject():
    # packages are listed by hand (two are mapped from outside balora_diffusion/): a new
    # subpackage missing from the list would be missing from the wheel.
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "balora_diffusion").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
    assert {"balora_diffusion.assets", "balora_diffusion.training_configs"} <= listed


def test_shipped_files_are_found_through_paths():
    for model in (paths.TINY_SD, paths.SD15_CONFIG):
        assert (model / "model_index.json").is_file()
        assert (model / "unet" / "config.json").is_file() and (model / "tokenizer" / "vocab.json").is_file()
    assert (paths.TINY_SD / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    # SDXL's configs ship without tokenizer files: its loaders take the shipped CLIP tokenizer
    assert all((paths.SDXL_CONFIG / part / "config.json").is_file()
               for part in ("unet", "vae", "text_encoder", "text_encoder_2"))
    assert (paths.SDXL_CONFIG / "scheduler" / "scheduler_config.json").is_file()
    assert (paths.TOKENIZER / "merges.txt").is_file()
    assert (paths.DEMO_CONCEPT / "concept.toml").is_file() and list(paths.DEMO_CONCEPT.glob("*.png"))
    assert {"demo", "mixofshow", "mixofshow-balora", "mixofshow-pilora"} <= set(paths.shipped_configs())


def test_config_file_takes_a_path_or_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.config_file("demo") == paths.CONFIGS / "demo.toml"
    assert paths.config_file("mixofshow-balora.toml") == paths.CONFIGS / "mixofshow-balora.toml"
    (tmp_path / "demo.toml").write_text('method = "lora"\n')
    assert paths.config_file("demo.toml") == Path("demo.toml")  # a file in the folder wins
    with pytest.raises(UserError, match=r"config file not found: nope\.toml \(shipped configs.*mixofshow-balora"):
        paths.config_file("nope.toml")
    with pytest.raises(UserError, match="config file not found"):
        paths.config_file("sub/demo")  # a path is never looked up among the shipped names


def test_lock_pins_every_direct_dependency_inside_pyprojects_ranges():
    assert "torch==2" in LOCK.read_text() and "torch==2.13.0+" not in LOCK.read_text(), \
        "torch is locked by version only, so a CUDA build fits"
    locked = read_lock(LOCK)
    for text in PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["dev"]:
        req = Requirement(text)
        assert req.name in locked, f"{req.name} is not in the lock"
        assert req.specifier.contains(locked[req.name]), f"lock has {req.name} {locked[req.name]}, pyproject {req}"
    assert problems(version_of=locked.get, requirements=[]) == [], "the lock holds a known-broken combination"


def test_drift_report_lists_changed_and_held_back_releases(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\ntorch==2.13.0\nPyYAML==6.0.1\nsix==1.16.0\n")
    assert read_lock(lock) == {"torch": "2.13.0", "pyyaml": "6.0.1", "six": "1.16.0"}
    installed = {"torch": "2.13.0", "pyyaml": "6.0.2", "tqdm": "4.70.1"}
    assert changed_since_lock(read_lock(lock), installed) == ["pyyaml: 6.0.1 -> 6.0.2", "six: 1.16.0 -> -",
                                                              "tqdm: - -> 4.70.1"]
    reqs = [Requirement("transformers>=5.0,<5.24"), Requirement("numpy>=1.26"), Requirement("peft!=0.21.0")]
    newest = {"transformers": "5.24.0", "numpy": "9.0", "peft": "0.21.2"}.get
    assert held_back(reqs, newest=newest) == ["transformers 5.24.0 (pyproject: transformers<5.24,>=5.0)"]


def test_version_guard_names_the_broken_combination_and_the_fix():
    versions = {"transformers": "5.24.0", "peft": "0.21.2"}
    (line,) = problems(version_of=versions.get, requirements=[])
    assert line == ("transformers 5.24.0 needs peft >=0.22, but peft 0.21.2 is installed: "
                    "pip install 'transformers<5.24'")
    assert problems(version_of={"transformers": "5.24.0", "peft": "0.22.0"}.get, requirements=[]) == []
    assert problems(version_of={"transformers": "5.23.0", "peft": "0.21.2"}.get, requirements=[]) == []
    assert "peft is not installed" in problems(version_of={"transformers": "5.25.1"}.get, requirements=[])[0]


def test_version_guard_checks_the_requirement_ranges():
    reqs = [Requirement("transformers>=5.0,<5.24"), Requirement("numpy>=1.26")]
    installed = {"transformers": "4.57.1", "peft": "0.21.2"}
    assert problems(version_of=installed.get, requirements=reqs) == [
        "transformers 4.57.1 is installed, balora-diffusion needs transformers<5.24,>=5.0: "
        "pip install 'transformers<5.24,>=5.0'",
        "numpy is not installed: pip install 'numpy>=1.26'"]
    assert problems(version_of={"transformers": "5.3.0", "numpy": "2.0.0+local"}.get, requirements=reqs) == []


def _fake_distribution(site: Path, name: str, version: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_cli_stops_on_a_faked_broken_combination_with_one_line(tmp_path):
    # Distributions earlier on sys.path win importlib.metadata's lookup: this environment now
    # "has" transformers 5.24.0 beside peft 0.21.0, the combination that broke fresh installs.
    site = tmp_path / "site"
    _fake_distribution(site, "transformers", "5.24.0")
    _fake_distribution(site, "peft", "0.21.0")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    result = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", "demo", "--output-dir", str(tmp_path / "out")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == ("balora: error: transformers 5.24.0 needs peft >=0.22, but peft 0.21.0 is installed: "
                             "pip install 'transformers<5.24'\n")
    assert not (tmp_path / "out").exists()
    assert [c.package for c in KNOWN_BROKEN] == ["transformers"]


@pytest.mark.wheel
def test_wheel_installs_into_a_fresh_venv_and_runs_from_any_folder(tmp_path):
    """The wheel carries the shipped model, configs and concept: a fresh venv with the lock runs
    `balora demo`, `balora train` on the default model and single-file loading from a folder that
    is not the repository."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("balora_diffusion-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python, balora = env_dir / "bin" / "python", env_dir / "bin" / "balora"
    import torch
    torch_spec = "torch==" + torch.__version__.split("+")[0]  # the torch under test (the CPU wheel on a CPU box)
    for spec in ([torch_spec], [str(wheel)]):
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(LOCK), *spec],
                       check=True, capture_output=True, timeout=900)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"

    def run(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([str(a) for a in args], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    where = run(python, "-c", "from balora_diffusion import paths; print(paths.ASSETS)").stdout.strip()
    assert Path(where).is_relative_to(env_dir), where

    run(balora, "demo", "--steps", "20", "--seeds", "1", "--output-dir", "demo")
    assert (work / "demo" / "demo.png").is_file() and (work / "demo" / "demo.json").is_file()
    assert (work / "demo" / "adapter" / "pytorch_lora_weights.safetensors").is_file()

    run(balora, "train", "--config", "demo", "--data-dir", paths.DEMO_CONCEPT, "--token", "<zorb>", "--steps", "2",
        "--eval-every", "1", "--sample-steps", "2", "--grid-seeds", "1", "--fusion", "1", "--output-dir", "train")
    assert (work / "train" / "run.json").is_file()

    single_file = """
import sys
from balora_diffusion import paths
from balora_diffusion.errors import UserError
from balora_diffusion.models import load_pipeline
from balora_diffusion.formats.ldm_checkpoint import save_single_file
from balora_diffusion.models import load_single_file
path = save_single_file(load_pipeline(device="cpu"), "tiny.safetensors")
load_single_file(path, config=paths.TINY_SD, device="cpu")
try:  # no config: the shipped SD 1.5 configs, which the tiny model's shapes do not fit
    load_single_file(path, device="cpu")
except UserError as exc:
    assert str(paths.SD15_CONFIG) in str(exc) and "expected [320, 4, 3, 3]" in str(exc), exc
else:
    sys.exit("the tiny model loaded against SD 1.5's configs")
"""
    run(python, "-c", single_file)
