"""The loop's own measurements."""
from __future__ import annotations

import torch


class GpuPeaks:
    """Peak CUDA memory of the training steps alone and of the whole run: the validation grid
    (a VAE decode at full resolution) can outgrow a training step and would hide its cost."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device, self.train, self.overall = device, 0, 0

    def step_begins(self) -> None:
        """Fold the peak since the last step (its eval or grid included) into the run's, then restart it."""
        if self.cuda:
            self.overall = max(self.overall, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def step_ends(self) -> None:
        if self.cuda:
            self.train = max(self.train, torch.cuda.max_memory_allocated(self.device))

    def summary(self) -> dict[str, float | None]:
        if not self.cuda:
            return {"peak_gpu_memory_mib": None, "peak_train_gpu_memory_mib": None}
        self.step_begins()  # the final grid's peak
        return {"peak_gpu_memory_mib": self.overall / 2**20, "peak_train_gpu_memory_mib": self.train / 2**20}
