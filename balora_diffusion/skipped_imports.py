"""Libraries the `balora` executable never uses that others import whenever they are installed.

torchvision sits beside torch in most Stable Diffusion environments, and transformers' image
utilities (pulled in by `transformers.modeling_utils`, so by every CLIP text encoder) import it
when it is there. Nothing here calls it, yet every command would pay its import and its own
libraries' resident memory (most of what it loads, torch loads anyway). The executable marks it absent before
anything imports (None in `sys.modules`, Python's way to make an import fail as for a missing
package), so transformers and diffusers take their torchvision-free paths (PIL image processors)
from the start. Library users importing balora_diffusion keep their process as it is.
"""
from __future__ import annotations

import sys

SKIPPED = ("torchvision",)


def skip_unused_libraries() -> None:
    """Mark SKIPPED absent, unless one is already imported (then it is in use and stays)."""
    for name in SKIPPED:
        sys.modules.setdefault(name, None)
