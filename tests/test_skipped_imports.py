"""The executable keeps torchvision out of its process even where it is installed.
Each check runs in a fresh interpreter, with a stand-in torchvision on the path that fails loudly
when anything imports it (the project's own environment has no torchvision)."""
import os
import subprocess
import sys

import pytest


@pytest.fixture
def env_with_torchvision(tmp_path):
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('torchvision was imported')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}


def python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


IMPORT_THE_MODELS = "import transformers.modeling_utils, transformers, diffusers\n" \
                    "transformers.CLIPTextModel, diffusers.UNet2DConditionModel, diffusers.StableDiffusionPipeline\n"


def test_transformers_imports_an_installed_torchvision(env_with_torchvision):
    """The premise: without the skip, loading a CLIP text encoder's module imports torchvision."""
    result = python(IMPORT_THE_MODELS, env_with_torchvision)
    assert result.returncode != 0 and "torchvision was imported" in result.stderr


def test_the_models_import_without_torchvision_once_it_is_skipped(env_with_torchvision):
    result = python("import importlib.util\n"
                    "from balora_diffusion.skipped_imports import skip_unused_libraries\n"
                    "skip_unused_libraries()\n" + IMPORT_THE_MODELS +
                    "assert importlib.util.find_spec('torchvision') is None\n", env_with_torchvision)
    assert result.returncode == 0, result.stderr


def test_the_executable_skips_it_and_a_library_user_does_not(env_with_torchvision):
    check = "import atexit, sys\natexit.register(lambda: print('torchvision' in sys.modules and sys.modules['torchvision']))\n"
    executable = python(check + "sys.argv = ['balora', '--help']\nfrom balora_diffusion.cli import entry\nentry()\n",
                        env_with_torchvision)
    library = python(check + "from balora_diffusion.cli import main\nmain(['--help'])\n", env_with_torchvision)
    assert executable.returncode == 0 and executable.stdout.splitlines()[-1] == "None", executable.stderr
    assert library.returncode == 0 and library.stdout.splitlines()[-1] == "False", library.stderr
