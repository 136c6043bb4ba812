"""Atomic writes: permissions of what they leave, and the debris of the ones that were killed."""
import os
import stat

import torch
from safetensors.torch import save_file

from balora_diffusion.atomic import atomic_path, write_json_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_get_the_permissions_of_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))
        with atomic_path(tmp_path / "folder") as tmp:
            tmp.mkdir()
            save_file({"a": torch.zeros(2)}, str(tmp / "w.safetensors"))
        write_json_atomic(tmp_path / "j.json", {"a": 1})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "w.safetensors") == 0o640
    assert _mode(tmp_path / "folder") == 0o750 and _mode(tmp_path / "folder" / "w.safetensors") == 0o640
    assert _mode(tmp_path / "j.json") == 0o640


def test_leftovers_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    from balora_diffusion.atomic import remove_leftovers

    with atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
        killed_file = tmp.with_name(tmp.name.replace(str(os.getpid()), "4242"))
        killed_folder = tmp.with_name(".ckpt.tmp4243")
    killed_file.write_text("{")
    (killed_folder / "inner").mkdir(parents=True)
    others = [tmp_path / ".hidden", tmp_path / "data.tmp4242", tmp_path / ".x.tmp"]
    for path in others:
        path.write_text("x")
    assert sorted(p.name for p in remove_leftovers(tmp_path)) == sorted([killed_file.name, killed_folder.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.json"] + [p.name for p in others])
    assert remove_leftovers(tmp_path / "missing") == []
