import json
from pathlib import Path

from balora_diffusion.bench import sweep as sweep_module
from balora_diffusion.bench.cell import CELL_FILE
from balora_diffusion.bench.sweep import Cell, SweepConfig


class _Done:
    def __init__(self, record):
        self.record = record

    def done(self):
        return True

    def result(self):
        return self.record


def test_cells_of_two_sweeps_with_the_same_names_keep_their_own_records(tmp_path, monkeypatch):
    """A benchmark runs one sweep per concept together; their cells share names (method, lr, seed)."""
    first, second = tmp_path / "zorb" / "lora-s0", tmp_path / "quax" / "lora-s0"
    first.mkdir(parents=True)
    (first / CELL_FILE).write_text(json.dumps({"name": "lora-s0", "status": "done", "wall_seconds": 1.0, "folder": "zorb"}))
    cells = [Cell("lora-s0", {}, {"output_dir": str(first)}), Cell("lora-s0", {}, {"output_dir": str(second)})]
    submitted = []

    def submitter(sweep, scoring):
        def submit(cell):
            submitted.append(Path(cell.values["output_dir"]))
            return _Done({"name": "lora-s0", "status": "done", "wall_seconds": 1.0, "folder": "quax"})
        return submit, lambda cancel: None

    monkeypatch.setattr(sweep_module, "_submitter", submitter)
    records = sweep_module.run_cells(SweepConfig(), cells, None)
    assert submitted == [second]
    assert [r["folder"] for r in records] == ["zorb", "quax"]
