"""The Train tab's fields saved as a train TOML that `balora train --config` trains, and loaded back."""
import json
import shutil
import subprocess
import sys

import pytest

from balora_diffusion import paths
from balora_diffusion.errors import UserError

pytest.importorskip("gradio", reason="the app's extra is not installed: pip install -e '.[app]'")

from balora_diffusion.app.app import App  # noqa: E402

FIELDS = ["dog", "<sks>", "dog", "pilora", 3e-3, 2e-4, 2, 2, "auto", True, 0.25, 1, "a dog", 0.5, 1]


@pytest.fixture
def app(tmp_path, random_sd_dir) -> App:
    return App(tmp_path / "runs", str(random_sd_dir), device="cpu", cpu_threads=1)


def test_the_fields_saved_as_toml_train_with_balora_train_and_load_back(app, tmp_path):
    saved = app.save_config(*FIELDS)
    assert saved.endswith("/dog.toml") and saved.startswith(str(app.engine.cache))
    out, photos = tmp_path / "from-toml", tmp_path / "photos"
    shutil.copytree(paths.DEMO_CONCEPT, photos)
    for mask in (paths.DEMO_CONCEPT.parent / "zorb-masks").glob("*.mask.png"):
        shutil.copy(mask, photos)
    result = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", "train", "--config", saved, "--data-dir",
                             str(photos), "--token", "<zorb>", "--output-dir", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("method", "lr_unet", "lr_text", "steps", "rank", "buckets", "masked_loss",
                                   "unmasked_weight", "holdout", "prior_weight", "grid_every")} == \
        {"method": "pilora", "lr_unet": 3e-3, "lr_text": 2e-4, "steps": 2, "rank": 2, "buckets": ["auto"],
         "masked_loss": True, "unmasked_weight": 0.25, "holdout": 1, "prior_weight": 0.5, "grid_every": 1}
    assert "data_dir" not in open(saved).read()  # said on the command line, not relative to the file
    assert app.load_config(saved) == (["", *FIELDS[1:]], "loaded dog.toml")


def test_a_loaded_toml_names_the_options_the_tab_does_not_use(app, tmp_path):
    (tmp_path / "mine.toml").write_text('token = "<zorb>"\nbatch_size = 2\nalpha = 8.0\nmethod = "balora"\n')
    fields, note = app.load_config(str(tmp_path / "mine.toml"))
    assert fields[1:4] == ["<zorb>", "object", "balora"]
    assert note == "loaded mine.toml; the Train tab has no field for alpha, batch_size: its own values of them are used"


@pytest.mark.parametrize("text, message", [
    ("method = ", "mine.toml is not valid TOML"), ("batch = 2", "unknown option\\(s\\) batch"),
    ('method = "bolora"', "bolora"), ('token = ["<a>", "<b>"]', "the Train tab trains one token")])
def test_a_bad_toml_is_one_message(app, tmp_path, text, message):
    (tmp_path / "mine.toml").write_text(text + "\n")
    with pytest.raises(UserError, match=message):
        app.load_config(str(tmp_path / "mine.toml"))


def test_the_page_saves_and_loads_a_train_toml_and_shows_a_bad_one_as_one_message(app, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from balora_diffusion.app.app import serve
    from balora_diffusion.app.screenshot import free_port

    port = free_port()
    ui = serve(app, "127.0.0.1", port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        saved = client.predict(*FIELDS, api_name="/save_config")
        assert open(saved).read() == open(app.save_config(*FIELDS)).read()
        *fields, note = client.predict(handle_file(saved), api_name="/load_config")
        assert fields == ["", *FIELDS[1:]] and note == "loaded dog.toml"
        (tmp_path / "bad.toml").write_text("method = \n")
        with pytest.raises(AppError, match="bad.toml is not valid TOML") as refused:
            client.predict(handle_file(str(tmp_path / "bad.toml")), api_name="/load_config")
        assert str(tmp_path) not in str(refused.value)
    finally:
        ui.close()
