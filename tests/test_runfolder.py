import os
import subprocess
import sys

from balora_diffusion import paths


def test_a_refused_training_leaves_no_new_folder_behind(tmp_path):
    """A training refused after taking its folder's lock (here: a resolution the model cannot halve)
    must not leave a new --output-dir holding only the lock file."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", "train", "--data-dir",
                           str(paths.DEMO_CONCEPT), "--token", "<zorb>", "--steps", "2", "--resolution", "18", "--cpu-threads", "1",
                           "--output-dir", str(out)],
                          capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2, done.stderr
    assert "multiple of" in done.stderr
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_a_refused_training_leaves_an_existing_folder_as_it_was(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", "train", "--data-dir",
                           str(paths.DEMO_CONCEPT), "--token", "<zorb>", "--steps", "2", "--resolution", "18", "--cpu-threads", "1",
                           "--output-dir", str(out)],
                          capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_resume_refused_in_a_new_folder_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", "train", "--data-dir",
                           str(paths.DEMO_CONCEPT), "--token", "<zorb>", "--steps", "2", "--resume", "latest",
                           "--cpu-threads", "1", "--output-dir", str(out)],
                          capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2, done.stderr
    assert not out.exists(), sorted(p.name for p in out.iterdir())
