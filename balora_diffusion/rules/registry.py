"""Method names: components joined by "+", parsed into what the optimizer wrapper runs.

Components: `lora` (the base optimizer alone), `loraplus` (B's lr = ratio x A's),
`scaled` (preconditioned gradients), and at most one after-step map: `ilora`, `balora`
or `hilora`. `pilora` is `ilora+scaled`. Order and case do not matter.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from balora_diffusion.rules.optimizer import AFTER_RULES, RuleConfigError

_PHRASES = {
    "balora": "BaLoRA: project (A, B) to the balanced point A A^T = B^T B after each step",
    "hilora": "hard iLoRA: project (A, B) to A A^T = rho B^T B after each step",
    "ilora": "iLoRA: decoupled step on (lam/4)||A A^T - rho B^T B||^2 after each step",
    "scaled": "scaled LoRA: gradients preconditioned by (B^T B + reg I)^-1 and (A A^T + reg I)^-1",
    "loraplus": "LoRA+: B's learning rate = ratio x A's",
}
# The methods a user names, in the order menus and benchmarks list them, each with the components it
# runs: every list of methods elsewhere (benchmarks, the app's help) is made from this one.
NAMED_METHODS: dict[str, tuple[str, ...]] = {
    "lora": (), "loraplus": ("loraplus",), "scaled": ("scaled",), "ilora": ("ilora",),
    "pilora": ("ilora", "scaled"), "balora": ("balora",), "hilora": ("hilora",),
}


@dataclass(frozen=True)
class MethodSpec:
    after: str | None = None   # "balora", "hilora", "ilora" or None
    scaled: bool = False
    loraplus: bool = False

    @property
    def name(self) -> str:
        """Canonical name: the after-step map, then scaled, then loraplus (ilora+scaled spelled pilora)."""
        head = ["pilora"] if (self.after == "ilora" and self.scaled) else [
            c for c in (self.after, "scaled" if self.scaled else None) if c]
        return "+".join(head + (["loraplus"] if self.loraplus else [])) or "lora"

    @property
    def uses_lambda(self) -> bool:
        """Whether --ilora-lambda changes what the method does."""
        return self.after == "ilora"

    @property
    def description(self) -> str:
        parts = [c for c in (self.after, "scaled" if self.scaled else None, "loraplus" if self.loraplus else None) if c]
        return " + ".join(_PHRASES[c] for c in parts) or "plain LoRA: the base optimizer alone"


def parse_method(method: str) -> MethodSpec:
    """The MethodSpec for a name such as "balora+scaled+loraplus"; RuleConfigError on unknown or conflicting parts."""
    tokens = [t.strip().lower() for t in str(method).split("+")]
    components: set[str] = set()
    for token in tokens:
        if token in NAMED_METHODS:
            components.update(NAMED_METHODS[token])
        else:
            known = ", ".join(sorted(NAMED_METHODS))
            raise RuleConfigError(f"unknown method component {token!r} in {method!r}; known: {known}")
    afters = sorted(components.intersection(AFTER_RULES))
    if len(afters) > 1:
        raise RuleConfigError(f"method {method!r} combines {' and '.join(afters)}, which both reshape the pair "
                              "after the step towards different targets; use one of them")
    return MethodSpec(after=afters[0] if afters else None, scaled="scaled" in components,
                      loraplus="loraplus" in components)


METHODS: dict[str, str] = {
    spec.name: spec.description
    for spec in (MethodSpec(after, scaled, loraplus)
                 for after, scaled, loraplus in product((None, *AFTER_RULES), (False, True), (False, True)))
}
