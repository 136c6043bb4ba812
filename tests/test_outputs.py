"""The rule for what commands write: balora_diffusion/outputs.py."""
import argparse
from pathlib import Path

import pytest

from balora_diffusion.errors import UserError
from balora_diffusion.outputs import add_overwrite_flag, check_writable, claim


def test_a_new_output_in_a_new_folder_is_accepted_and_nothing_is_left_behind(tmp_path):
    claim([tmp_path / "new" / "deeper" / "out.png"], overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused_naming_it_and_the_flag(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match=r"--out .*out.*already exists.*--overwrite true"):
        claim([tmp_path / "out"], overwrite=False)


def test_a_file_written_beside_the_output_is_refused_like_the_output(tmp_path):
    (tmp_path / "out.json").write_text("{}")
    with pytest.raises(UserError, match="out.json already exists"):
        claim([tmp_path / "out.safetensors", tmp_path / "out.json"], overwrite=False, flag="--save")


def test_an_existing_output_is_accepted_with_overwrite(tmp_path):
    (tmp_path / "out.png").write_bytes(b"mine")
    claim([tmp_path / "out.png"], overwrite=True)
    assert (tmp_path / "out.png").read_bytes() == b"mine"  # claiming never writes the output itself


def test_a_broken_link_counts_as_an_existing_output(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match="already exists"):
        claim([tmp_path / "out"], overwrite=False)


def test_a_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="notes.txt is a file, not a folder"):
        check_writable(tmp_path / "notes.txt" / "sub" / "out.png")


def test_a_broken_link_where_a_folder_would_be_made_is_refused(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match="broken link"):
        check_writable(tmp_path / "link" / "out.png")


@pytest.mark.parametrize("folder", ["/proc", "/sys"])
def test_a_folder_that_refuses_writes_is_refused_even_for_root(folder):
    # root passes every permission check, so only an attempted write tells
    if not Path(folder).is_dir():
        pytest.skip(f"no {folder} here")
    with pytest.raises(UserError, match=f"cannot write in {folder}"):
        check_writable(Path(folder) / "balora-out" / "grid.png", flag="--save")


def test_the_overwrite_flag_reads_true_false_and_bare():
    parser = argparse.ArgumentParser()
    add_overwrite_flag(parser, "the output")
    assert parser.parse_args([]).overwrite is False
    assert parser.parse_args(["--overwrite"]).overwrite is True
    assert parser.parse_args(["--overwrite", "true"]).overwrite is True
    assert parser.parse_args(["--overwrite", "no"]).overwrite is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--overwrite", "maybe"])
