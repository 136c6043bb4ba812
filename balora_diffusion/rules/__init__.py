"""LoRA update rules as pure tensor functions, and one wrapper that runs them around any torch optimizer.

Convention. The rules act on peft's raw factors: A = lora_A.weight (r x n, "down"),
B = lora_B.weight (m x r, "up"), and a layer computes W0 + s * B @ A with
s = lora_alpha / r (lora_alpha / sqrt(r) for rsLoRA). The scale s is NOT folded into
the factors, which has these consequences for the effective step in weight space:

- plain LoRA / LoRA+ with Adam: Adam normalises the gradients (which carry one
  factor s), so the weight step is about s * lr * |factor|.
- scaled LoRA: the preconditioners (B^T B + reg I)^-1 and (A A^T + reg I)^-1 are
  built from the raw factors, so with SGD the weight step grows like s^2 * lr (one s
  from the gradient, one from the product); reg is on the raw factors' scale.
  (Folding s in, as Zhang & Pilanci's derivation does, would give s^0.)
- BaLoRA: balancing is gauge-only, so the balanced point of (A, B) and of
  (sqrt(s) A, sqrt(s) B) is the same pair up to that common scale. With balanced
  factors |A| = |B| = sqrt(|B A|) = sqrt(|dW| / s), so an Adam step moves the
  weight by about lr * sqrt(s * |dW|): sweep the learning rate and alpha together.
- iLoRA / hard iLoRA: the target A A^T = rho B^T B (rho = r / m by default) and the
  factor lam are on the raw factors, independent of s.

Every function takes A (..., r, n) and B (..., m, r) with any leading batch dims,
computes in float32 (float64 for the small r x r cores) whatever the input dtype, and
returns the input dtype. balora, ilora and scaled each have a plain, slow
`*_reference.py` beside them, tested equal (hard iLoRA is tested through balora's).
"""
from balora_diffusion.rules.balora import balanced_projection
from balora_diffusion.rules.build import build_optimizer
from balora_diffusion.rules.hilora import hard_imbalance_projection
from balora_diffusion.rules.ilora import imbalance_step
from balora_diffusion.rules.optimizer import RuleConfigError, RuleOptimizer
from balora_diffusion.rules.pairs import LoRAPair
from balora_diffusion.rules.registry import METHODS, NAMED_METHODS, MethodSpec, parse_method
from balora_diffusion.rules.scaled import precondition_grads

__all__ = [
    "METHODS",
    "NAMED_METHODS",
    "LoRAPair",
    "MethodSpec",
    "RuleConfigError",
    "RuleOptimizer",
    "balanced_projection",
    "build_optimizer",
    "hard_imbalance_projection",
    "imbalance_step",
    "parse_method",
    "precondition_grads",
]
