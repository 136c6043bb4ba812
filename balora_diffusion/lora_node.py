"""A peft LoRA Linear's forward and backward as one autograd node.

peft computes base(x) + lora_B(lora_A(dropout(x))) * scaling as five autograd nodes (and a
Python dropout call even at p = 0). On small layers, where a step is bound by dispatch rather
than arithmetic, their bookkeeping costs more than the products themselves. The node below does
the same products, with the scaling folded into the last one (addmm's alpha), and saves the same
tensors (the input and the rank-r activation).

Only the plain case takes this path: one active vanilla adapter on an nn.Linear, no dropout, no
LoRA bias, not merged, frozen base, one dtype throughout and no autocast. Everything else goes
through peft's own forward, DoRA layers (a peft variant) included, so that the norm of their
adapted weight (detached from the gradient, as the DoRA paper prescribes) stays peft's own.
"""
from __future__ import annotations

import types

import torch
from peft.tuners.lora import Linear as LoraLinear


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + scale (x A^T) B^T, with W and b frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale: float):
        rows = x.reshape(-1, x.shape[-1])
        h = rows @ A.mT
        y = rows @ weight.mT if bias is None else torch.addmm(bias, rows, weight.mT)
        y.addmm_(h, B.mT, alpha=scale)
        ctx.save_for_backward(rows, h, weight, A, B)
        ctx.scale, ctx.in_shape = scale, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        rows, h, weight, A, B = ctx.saved_tensors
        need_x, _, _, need_A, need_B, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_A = grad_B = None
        # The two products with an r-wide result are written with the r-wide operand transposed:
        # at small r, MKL's sgemm is several times faster in that layout than in autograd's (g^T h, g B).
        if need_B:
            grad_B = torch.mm(h.mT, g).mul_(ctx.scale).mT
        if need_x or need_A:
            grad_h = torch.mm(g, B.mT.contiguous().mT).mul_(ctx.scale)
            if need_A:
                grad_A = grad_h.mT @ rows
            if need_x:
                grad_x = torch.mm(g, weight).addmm_(grad_h, A).view(ctx.in_shape)
        return grad_x, None, None, grad_A, grad_B, None


def _plain_adapter(layer: LoraLinear, x: torch.Tensor, args, kwargs) -> str | None:
    """The adapter name when `layer`'s forward on `x` is the plain case, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or layer.fan_in_fan_out:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or active[0] in layer.lora_variant:
        return None
    name = active[0]
    base, down, up = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if (type(base) is not torch.nn.Linear or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity) or down.bias is not None or up.bias is not None:
        return None
    if torch.is_autocast_enabled(x.device.type) or not (
            x.dtype == base.weight.dtype == down.weight.dtype == up.weight.dtype):
        return None
    return name


def _forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _plain_adapter(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    return LoRALinearFunction.apply(x, self.base_layer.weight, self.base_layer.bias,
                                    self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])


def use_single_node_forward(model: torch.nn.Module) -> int:
    """Give every peft LoRA Linear in `model` the one-node forward; returns how many.

    Per instance, not on peft's class, so models elsewhere in the process keep peft's forward.
    """
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
    return len(layers)
