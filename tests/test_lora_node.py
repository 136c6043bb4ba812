"""The one-node LoRA Linear: its backward is the derivative of its forward, a layer that takes it
computes what peft's forward computes, and every case it does not cover goes through peft."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from balora_diffusion.lora_node import LoRALinearFunction, use_single_node_forward


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 6), (7, 6), (6,)])
def test_backward_is_the_derivative_of_the_forward(bias, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64) if bias else None
    A = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = LoRALinearFunction.apply(x, W, b, A, B, 0.7)
    expected = x @ W.T + (0 if b is None else b) + 0.7 * (x @ A.T) @ B.T
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, A, B: LoRALinearFunction.apply(x, W, b, A, B, 0.7), (x, A, B))


def test_only_the_gradients_asked_for_are_computed():
    x, W = torch.randn(5, 6), torch.randn(4, 6)
    A, B = torch.randn(2, 6), torch.randn(4, 2, requires_grad=True)
    LoRALinearFunction.apply(x, W, None, A, B, 1.0).sum().backward()
    assert B.grad is not None and A.grad is None and x.grad is None


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(6, 8)
        self.k = torch.nn.Linear(8, 5, bias=False)

    def forward(self, x):
        return self.k(torch.tanh(self.q(x)))


def lora_net(seed=0, **config):
    torch.manual_seed(seed)
    model = get_peft_model(Net().double(), LoraConfig(r=3, lora_alpha=6, target_modules=["q", "k"], **config))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0, which would hide the LoRA branch's gradients
            torch.nn.init.normal_(p)
    return model


def outputs_and_grads(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def ours(layer_output: torch.Tensor) -> bool:
    return type(layer_output.grad_fn).__name__ == "LoRALinearFunctionBackward"


def test_a_layer_computes_what_peft_computes():
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    peft_model, model = lora_net(), lora_net()
    assert use_single_node_forward(model) == 2
    expected, got = outputs_and_grads(peft_model, x), outputs_and_grads(model, x)
    assert ours(model.base_model.model.k(torch.zeros(1, 8, dtype=torch.float64)))
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-12)
    assert got[2].keys() == expected[2].keys() and len(got[2]) == 4
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], rtol=1e-12, atol=1e-12)


def test_a_changed_scale_is_used():
    x = torch.randn(3, 6, dtype=torch.float64)
    peft_model, model = lora_net(), lora_net()
    use_single_node_forward(model)
    for m in (peft_model, model):
        m.base_model.model.q.set_scale("default", 0.25)
    torch.testing.assert_close(model(x), peft_model(x), rtol=1e-12, atol=1e-12)


def _disabled(model):
    model.base_model.disable_adapter_layers()


def _merged(model):
    model.base_model.model.q.merge()


def _base_trained(model):
    model.base_model.model.q.base_layer.weight.requires_grad_(True)


@pytest.mark.parametrize("config, change", [
    ({"lora_dropout": 0.5}, None),
    ({"lora_bias": True}, None),
    ({"use_dora": True}, None),
    ({}, _disabled),
    ({}, _merged),
    ({}, _base_trained),
], ids=["dropout", "lora-bias", "dora", "disabled", "merged", "base-trained"])
def test_other_cases_go_through_peft(config, change):
    x = torch.randn(3, 6, dtype=torch.float64)
    peft_model, model = lora_net(**config), lora_net(**config)
    use_single_node_forward(model)
    for m in (peft_model, model):
        if change:
            change(m)
        m.eval()  # dropout off, so that both draw nothing and must agree
    q = model.base_model.model.q
    assert not ours(q(x))
    torch.testing.assert_close(model(x), peft_model(x), rtol=1e-12, atol=1e-12)


def test_autocast_and_mixed_dtypes_go_through_peft():
    model = lora_net()
    use_single_node_forward(model)
    q = model.base_model.model.q
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ours(q(torch.randn(3, 6, dtype=torch.float64)))
    assert ours(q(torch.randn(3, 6, dtype=torch.float64)))
    q.lora_A["default"].float()
    q.lora_B["default"].float()
    assert not ours(q(torch.randn(3, 6, dtype=torch.float64)))


def test_the_trainer_s_lora_layers_take_the_one_node_forward(random_sd_dir, tmp_path):
    from accelerate import Accelerator
    from peft.tuners.lora import Linear as LoraLinear

    from balora_diffusion import paths
    from balora_diffusion.data import read_concept_folder
    from balora_diffusion.train import load_models
    from balora_diffusion.train_config import TrainConfig

    cfg = TrainConfig(data_dir=str(paths.DEMO_CONCEPT), base_model=str(random_sd_dir), token=["<zorb>"],
                      init_word="heart", caption_template="a {token}", output_dir=str(tmp_path))
    examples = read_concept_folder(cfg.data_dir, cfg.token, cfg.caption_template)
    pipe, *_ = load_models(cfg, Accelerator(cpu=True), examples)
    for model in (pipe.unet, pipe.text_encoder):
        layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        assert layers and all(ours(m(torch.zeros(2, m.in_features))) for m in layers)
