"""RuleOptimizer: any torch optimizer plus LoRA update rules around its step.

A rule either transforms the pairs' gradients before the base step (scaled LoRA) or
maps the pairs' parameters after it (iLoRA's decoupled step, BaLoRA's projection, hard
iLoRA). Pairs of equal shape, dtype, device and param group go through the rule in one
batched call: a UNet has hundreds of pairs but a handful of distinct shapes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial

import torch

from balora_diffusion.errors import UserError
from balora_diffusion.rules.balora import Balanced, balance_many, compute_dtype
from balora_diffusion.rules.hilora import hard_imbalance_many
from balora_diffusion.rules.ilora import imbalance_step
from balora_diffusion.rules.pairs import LoRAPair
from balora_diffusion.rules.scaled import precondition_grads

AFTER_RULES = ("balora", "hilora", "ilora")
PROJECTIONS = ("balora", "hilora")
STATE_MODES = ("keep", "reset_once", "carry")
# first-moment buffers that live in parameter coordinates (torch Adam/AdamW, SGD momentum)
FIRST_MOMENT_KEYS = ("exp_avg", "momentum_buffer")
_OWN_STATE = "lora_rules"


class RuleConfigError(UserError, ValueError):
    """A method, base optimizer or rule option that cannot be used as given."""


def _ignore(phase: str) -> None:
    pass


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))


def _write(targets: Sequence[torch.Tensor], values: torch.Tensor) -> None:
    # one multi-tensor copy instead of a kernel launch per parameter; unbind once and reshape only the
    # conv factors (stored 4-d, batched as matrices): per-row indexing and reshapes were most of a rule's time
    rows = values.unbind(0)
    torch._foreach_copy_(list(targets), [row if row.shape == target.shape else row.reshape(target.shape)
                                         for target, row in zip(targets, rows)])


class RuleOptimizer(torch.optim.Optimizer):
    """Wraps `base`, sharing its `param_groups` and `state` (so LR schedulers and accelerate see one optimizer).

    precondition: apply scaled LoRA's preconditioner to the gradients before the step.
    after: None, "ilora", "balora" or "hilora", the map applied after the step.
    reg, lam: defaults for the preconditioner's damping and iLoRA's factor; a param group
        may override them with its own "reg" / "lam" entries (A's group decides).
    rho: iLoRA's / hard iLoRA's target ratio, r / m per pair when None.
    project_every, align, tol: BaLoRA / hard iLoRA projection period, sign alignment, rank cutoff.
    state: what a projection does to the base optimizer's state: "keep" it, "reset_once"
        (clear the pair's state after its first projection) or "carry" the first moment
        through the gauge change (m_A <- G m_A, m_B <- m_B G^-1).
    """

    def __init__(self, base: torch.optim.Optimizer, pairs: Iterable[LoRAPair], *, precondition: bool = False,
                 after: str | None = None, reg: float = 1e-6, lam: float = 1.0, rho: float | None = None,
                 project_every: int = 1, align: bool = True, tol: float = 1e-6, state: str = "keep") -> None:
        if after not in (None, *AFTER_RULES):
            raise RuleConfigError(f"unknown after-step rule {after!r}; expected one of {', '.join(AFTER_RULES)}")
        if state not in STATE_MODES:
            raise RuleConfigError(f"unknown state mode {state!r}; expected one of {', '.join(STATE_MODES)}")
        if not (isinstance(project_every, int) and project_every >= 1):
            raise RuleConfigError(f"project_every must be a positive integer, got {project_every!r}")
        if after not in PROJECTIONS and (state != "keep" or project_every != 1):
            raise RuleConfigError("state and project_every only apply to the projection rules "
                                  f"({', '.join(PROJECTIONS)}), not to {after or 'plain LoRA'}")
        if reg < 0:
            raise RuleConfigError(f"reg must be >= 0, got {reg}")
        self.base = base
        # Optimizer.__init__ registers the hook tables; the groups it builds are the base's own dicts.
        super().__init__(base.param_groups, base.defaults)
        self._share_base()
        self.precondition, self.after = precondition, after
        self.reg, self.lam, self.rho = reg, lam, rho
        self.project_every, self.align, self.tol, self.state_mode = project_every, align, tol, state
        self.pairs, self._groups = self._index_pairs(list(pairs))
        self._position = {id(p): i for i, p in enumerate(self.pairs)}
        self._steps = 0
        self._projected: set[int] = set()
        # step() calls it with "rule" or "optimizer" as each part ends: a profiler's hook
        self.phase_ends: Callable[[str], None] = _ignore

    def _share_base(self) -> None:
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    def _index_pairs(self, pairs: list[LoRAPair]) -> tuple[list[LoRAPair], list[int]]:
        """The pairs the base optimizes, and the index of each one's A param group (its lr, lam, reg)."""
        group_of = {id(p): g for g, group in enumerate(self.base.param_groups) for p in group["params"]}
        kept, groups = [], []
        for pair in pairs:
            ga, gb = group_of.get(id(pair.A)), group_of.get(id(pair.B))
            if (ga is None) != (gb is None):
                raise RuleConfigError(f"LoRA pair {pair.name!r}: only one of its factors is in the optimizer")
            if ga is not None:
                kept.append(pair)
                groups.append(ga)
        return kept, groups

    def _batches(self, use: Callable[[LoRAPair], bool]) -> Iterator[tuple[dict, list[LoRAPair]]]:
        """(A's param group, pairs) for each batch of pairs passing `use` with equal shapes, dtypes, device, group.

        Keyed at every step, as a model may be moved or cast after the optimizer was built.
        """
        by_key: dict[tuple, list[LoRAPair]] = {}
        for pair, group in zip(self.pairs, self._groups):
            if use(pair):
                a, b = pair.a_matrix(pair.A), pair.b_matrix(pair.B)
                key = (a.shape, b.shape, a.dtype, b.dtype, a.device, group)
                by_key.setdefault(key, []).append(pair)
        for key, batch in by_key.items():
            yield self.base.param_groups[key[-1]], batch

    @staticmethod
    def _factors(batch: list[LoRAPair]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [p.A for p in batch], [p.B for p in batch]

    @staticmethod
    def _matrices(batch: list[LoRAPair], As: list[torch.Tensor],
                  Bs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return (_stack([p.a_matrix(t) for p, t in zip(batch, As)]),
                _stack([p.b_matrix(t) for p, t in zip(batch, Bs)]))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # what ran before this body (torch's step hooks, accelerate's wrapper) is the optimizer's time
        self.phase_ends("optimizer")
        if self.precondition:
            self._precondition()
        # like weight decay, the after-step maps touch only pairs the base step moved
        moved = {id(p) for p in self.pairs if p.A.grad is not None or p.B.grad is not None} if self.after else set()
        self.phase_ends("rule")
        self.base.step()
        self.phase_ends("optimizer")
        self._steps += 1
        if self.after == "ilora":
            self._imbalance(moved)
        elif self.after is not None and self._steps % self.project_every == 0:
            self._project(moved)
        self.phase_ends("rule")
        return loss

    def _precondition(self) -> None:
        for group, batch in self._batches(lambda p: p.A.grad is not None and p.B.grad is not None):
            A, B = self._matrices(batch, *self._factors(batch))
            grads_A, grads_B = [p.A.grad for p in batch], [p.B.grad for p in batch]
            new_A, new_B = precondition_grads(A, B, *self._matrices(batch, grads_A, grads_B),
                                              reg=group.get("reg", self.reg))
            _write(grads_A, new_A)
            _write(grads_B, new_B)

    def _imbalance(self, moved: set[int]) -> None:
        for group, batch in self._batches(lambda p: id(p) in moved):
            As, Bs = self._factors(batch)
            new_A, new_B = imbalance_step(*self._matrices(batch, As, Bs), lr=float(group["lr"]),
                                          lam=group.get("lam", self.lam), rho=self.rho)
            _write(As, new_A)
            _write(Bs, new_B)

    def _project(self, moved: set[int]) -> None:
        if self.after == "balora":
            project = partial(balance_many, align=self.align, tol=self.tol)
        else:
            project = partial(hard_imbalance_many, rho=self.rho, align=self.align, tol=self.tol)
        batches = [batch for _, batch in self._batches(lambda p: id(p) in moved)]
        factors = [self._factors(batch) for batch in batches]
        outs: list[Balanced] = project([self._matrices(batch, As, Bs) for batch, (As, Bs) in zip(batches, factors)])
        for batch, (As, Bs), out in zip(batches, factors, outs):
            _write(As, out.A)
            _write(Bs, out.B)
            if self.state_mode == "carry":
                self._carry(batch, out.G, out.G_inv)
            elif self.state_mode == "reset_once":
                self._reset_newly_projected(batch, out.ok)

    def _first_moment(self, param: torch.Tensor) -> torch.Tensor | None:
        state = self.base.state.get(param)
        if not state:
            return None
        for key in FIRST_MOMENT_KEYS:
            if torch.is_tensor(state.get(key)):
                return state[key]
        raise RuleConfigError(f"state='carry' needs a first-moment buffer named {' or '.join(FIRST_MOMENT_KEYS)} "
                              f"in the base optimizer's state; {type(self.base).__name__} keeps {sorted(state)}")

    def _carry(self, batch: list[LoRAPair], G: torch.Tensor, G_inv: torch.Tensor) -> None:
        """m_A <- G m_A, m_B <- m_B G^-1 for the pairs whose base state has a first moment."""
        with_A = [(i, m) for i, m in enumerate(self._first_moment(p.A) for p in batch) if m is not None]
        with_B = [(i, m) for i, m in enumerate(self._first_moment(p.B) for p in batch) if m is not None]
        if with_A:
            index, moments = zip(*with_A)
            a = _stack([batch[i].a_matrix(m) for i, m in with_A])
            a = a.to(compute_dtype(a))
            _write(moments, G[list(index)].to(a.dtype) @ a)
        if with_B:
            index, moments = zip(*with_B)
            b = _stack([batch[i].b_matrix(m) for i, m in with_B])
            b = b.to(compute_dtype(b))
            _write(moments, b @ G_inv[list(index)].to(b.dtype))

    def _reset_newly_projected(self, batch: list[LoRAPair], ok: torch.Tensor) -> None:
        indices = [self._position[id(p)] for p in batch]
        if all(i in self._projected for i in indices):
            return  # no device sync once every pair has had its reset
        projected = ok.reshape(len(batch), -1).any(dim=1).tolist()
        for i, pair, done in zip(indices, batch, projected):
            if done and i not in self._projected:
                self._projected.add(i)
                self.base.state.pop(pair.A, None)
                self.base.state.pop(pair.B, None)

    def state_dict(self) -> dict:
        """The base optimizer's state dict plus the wrapper's step counter and reset bookkeeping."""
        state = self.base.state_dict()
        state[_OWN_STATE] = {"steps": self._steps, "projected": sorted(self._projected)}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop(_OWN_STATE, None)
        if own is None:
            raise RuleConfigError(f"not a RuleOptimizer state dict: it has no {_OWN_STATE!r} entry")
        self.base.load_state_dict(state_dict)
        self._share_base()  # torch's load_state_dict replaces the group dicts and the state table
        self._steps = int(own["steps"])
        self._projected = {int(i) for i in own["projected"]}

    def __repr__(self) -> str:
        rules = "+".join(r for r in (self.after, "scaled" if self.precondition else None) if r) or "none"
        return (f"RuleOptimizer(base={type(self.base).__name__}, rules={rules}, "
                f"pairs={len(self.pairs)}, state={self.state_mode!r})")
