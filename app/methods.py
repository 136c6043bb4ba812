"""What the Train tab says about each update rule: what it does, when to use it, the learning rate
it wants. A method such as `balora+scaled` is its parts, each said once. The facts are those of
docs/results.md (the benchmarks' verdicts) and the update rules' design; the measured numbers stay
on that page, which the help points to.
"""
from __future__ import annotations

RESULTS = "docs/results.md"

# part -> (what it does, when to use it, its learning rate)
PARTS: dict[str, tuple[str, str, str]] = {
    "lora": ("Plain LoRA: the base optimizer (AdamW) alone on the factors A and B.",
             "The baseline: every other rule is measured against it.",
             "The Train tab's starting rates are the demo recipe's, tuned for LoRA-family rules on the shipped "
             "model; on other models they start from Mix-of-Show's (UNet 1e-4, text encoder 1e-5)."),
    "loraplus": ("LoRA+ (Hayou et al.): B's learning rate is `loraplus_ratio` (16) times A's.",
                 "Meant to converge faster; in this project's benchmarks it did not (see the verdict table).",
                 "B already steps 16 times further, so keep the rate below LoRA's: at LoRA's best rate it drew "
                 "none of the shipped concept."),
    "scaled": ("Scaled (Riemannian-preconditioned) LoRA (Zhang & Pilanci): each factor's gradient is "
               "multiplied by the inverse Gram matrix of the other (damped by `precond_reg`) before the step.",
               "When you cannot tune the learning rate: it was more robust to it than LoRA on the shipped concept, "
               "not faster.",
               "The authors' Mix-of-Show runs used (text encoder, UNet) rates of (5e-4, 5e-4), (1e-5, 1e-4) and "
               "(5e-6, 5e-5)."),
    "ilora": ("iLoRA (Zhu et al.): after each step a decoupled step pulls A A^T towards rho B^T B "
              "(rho = rank / output size; strength `ilora_lambda`).",
              "When the learning rate is a guess, or when images must follow the prompt's context: it was robust "
              "to the learning rate and followed prompts better than LoRA on the shipped concept.",
              "LoRA's rates work; its spread over the learning-rate grid was small. The paper searched lambda from "
              "1e-3 to 1e2."),
    "pilora": ("piLoRA: scaled LoRA's preconditioner before the step and iLoRA's pull after it.",
               "The safest choice when the learning rate is unknown: the smallest spread of held-out loss over the "
               "learning-rate grid on the shipped concept; not faster than LoRA.",
               "LoRA's rates and above: it still learned the concept where LoRA's rate was too high for LoRA."),
    "balora": ("BaLoRA (Castin et al.): after every step (every `project_every`), A and B are moved to the "
               "balanced point A A^T = B^T B without changing the product B A; signs aligned so Adam's state "
               "stays meaningful (`balora_state`).",
               "Faster convergence: it was faster than LoRA in the synthetic benchmark and as fast on the shipped "
               "concept, with a lower held-out loss at its best rate.",
               "With balanced factors the weight-space step grows like lr x sqrt(alpha / rank): sweep its rate "
               "(and alpha) rather than copy LoRA's."),
    "hilora": ("hiLoRA: BaLoRA's projection onto iLoRA's target A A^T = rho B^T B instead of the balanced one.",
               "A comparison arm: it tells whether BaLoRA's balanced target matters (it did better).",
               "As BaLoRA's."),
}


def method_help(method: str) -> str:
    """Markdown: each part of `method` (split at '+') with what it does, when to use it, its rate."""
    lines = []
    for part in method.split("+"):
        if part not in PARTS:
            continue
        does, when, rate = PARTS[part]
        lines.append(f"**{part}**: {does} *When*: {when} *Learning rate*: {rate}")
    lines.append(f"Measured per method and learning rate on the shipped concept: `{RESULTS}` in the project's "
                 "source (the concept task's tables).")
    return "\n\n".join(lines)
