"""metrics.jsonl after a kill: whole lines are kept, a line cut half way is dropped."""
import json

import pytest

from balora_diffusion.errors import UserError
from balora_diffusion.runlog import RunLog


def _lines(steps) -> list[str]:
    return [json.dumps({"step": s, "name": "loss", "value": 1.0 / (s + 1)}) for s in steps]


def test_a_half_written_last_line_is_dropped_on_resume(tmp_path):
    whole = _lines(range(4))
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in whole) + _lines([4])[0][:12])
    log = RunLog(tmp_path, resume_step=10)
    log.scalar(11, "loss", 0.5)
    log.close()
    assert log.series["loss"] == [(s, 1.0 / (s + 1)) for s in range(4)] + [(11, 0.5)]
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == whole + [
        json.dumps({"step": 11, "name": "loss", "value": 0.5})]


def test_a_damaged_line_before_the_last_is_a_user_error(tmp_path):
    whole = _lines(range(3))
    (tmp_path / "metrics.jsonl").write_text(whole[0] + "\n{\"ste\n" + whole[2] + "\n")
    with pytest.raises(UserError, match="metrics.jsonl line 2"):
        RunLog(tmp_path, resume_step=10)
