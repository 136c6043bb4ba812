"""Method names, base optimizers and option checks of build_optimizer."""
import importlib.util

import pytest
import torch
from torch import nn

from balora_diffusion.errors import UserError
from balora_diffusion.rules import METHODS, LoRAPair, RuleOptimizer, build_optimizer, parse_method


def make_pairs(count=2):
    g = torch.Generator().manual_seed(0)
    return [LoRAPair(nn.Parameter(torch.randn(4, 12, generator=g)), nn.Parameter(torch.randn(10, 4, generator=g)),
                     name=f"p{i}") for i in range(count)]


def params_of(pairs):
    return [t for p in pairs for t in (p.A, p.B)]


def test_every_listed_method_is_its_own_canonical_name_and_all_combinations_are_listed():
    for name, description in METHODS.items():
        assert parse_method(name).name == name and description
    # 4 after-step choices (none, ilora, balora, hilora) x scaled x loraplus
    assert len(METHODS) == 16
    assert {"lora", "loraplus", "scaled", "ilora", "pilora", "balora", "balora+scaled", "hilora",
            "balora+loraplus", "balora+scaled+loraplus"} <= set(METHODS)


def test_aliases_order_and_case_do_not_matter():
    assert parse_method("pilora") == parse_method("ilora+scaled") == parse_method(" Scaled + iLoRA ")
    assert parse_method("loraplus+balora").name == "balora+loraplus"
    assert parse_method("lora+balora") == parse_method("balora")
    assert parse_method("pilora+scaled+loraplus").name == "pilora+loraplus"


@pytest.mark.parametrize("method,named", [("balora+ilora", ("balora", "ilora")),
                                          ("hilora+pilora", ("hilora", "ilora")),
                                          ("balora+hilora", ("balora", "hilora"))])
def test_contradictory_methods_are_rejected_naming_the_conflict(method, named):
    with pytest.raises(ValueError) as info:
        parse_method(method)
    assert all(n in str(info.value) for n in named)
    assert isinstance(info.value, UserError)          # the CLI prints it as one line


def test_unknown_components_are_rejected():
    with pytest.raises(ValueError, match="unknown method component 'dora'"):
        parse_method("balora+dora")
    with pytest.raises(ValueError, match="unknown method component ''"):
        parse_method("balora+")


@pytest.mark.parametrize("base,kind", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                       ("sgd", torch.optim.SGD), ("SGD", torch.optim.SGD)])
def test_named_bases_receive_the_groups_and_base_kwargs(base, kind):
    pairs = make_pairs()
    optimizer = build_optimizer("balora", [{"params": params_of(pairs), "lr": 0.1}], pairs, base=base,
                                base_kwargs={"weight_decay": 0.25})
    assert isinstance(optimizer, RuleOptimizer) and isinstance(optimizer.base, kind)
    assert optimizer.param_groups is optimizer.base.param_groups
    assert optimizer.param_groups[0]["weight_decay"] == 0.25 and optimizer.param_groups[0]["lr"] == 0.1


def test_a_callable_base_and_a_plain_parameter_list():
    pairs = make_pairs()
    seen = []

    def factory(groups, momentum):
        seen.append(groups)
        return torch.optim.SGD(groups, lr=0.5, momentum=momentum)

    optimizer = build_optimizer("lora", params_of(pairs), pairs, base=factory, base_kwargs={"momentum": 0.9})
    assert seen[0][0]["params"] == params_of(pairs)
    assert optimizer.param_groups[0]["momentum"] == 0.9


def test_bad_bases_are_rejected():
    pairs = make_pairs()
    with pytest.raises(ValueError, match="unknown base optimizer 'lion'"):
        build_optimizer("lora", params_of(pairs), pairs, base="lion")
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer"):
        build_optimizer("lora", params_of(pairs), pairs, base=lambda groups: object())


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes_says_what_to_install():
    pairs = make_pairs()
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        build_optimizer("balora", params_of(pairs), pairs, base="adamw8bit")


def test_projection_options_on_methods_without_a_projection_are_rejected():
    pairs = make_pairs()
    with pytest.raises(ValueError, match="only apply to the projection rules"):
        build_optimizer("ilora", params_of(pairs), pairs, state="carry")
    with pytest.raises(ValueError, match="only apply to the projection rules"):
        build_optimizer("lora", params_of(pairs), pairs, project_every=2)
    with pytest.raises(ValueError, match="unknown state mode 'reset'"):
        build_optimizer("balora", params_of(pairs), pairs, state="reset")
    with pytest.raises(ValueError, match="project_every must be a positive integer"):
        build_optimizer("balora", params_of(pairs), pairs, project_every=0)


def test_pairs_are_matched_to_the_optimizer_parameters():
    pairs = make_pairs(3)
    optimizer = build_optimizer("balora", params_of(pairs[:2]), pairs)
    assert optimizer.pairs == pairs[:2]           # a pair the optimizer does not train is no business of the rules
    with pytest.raises(ValueError, match="only one of its factors"):
        build_optimizer("balora", params_of(pairs[:2]) + [pairs[2].A], pairs)


def test_loraplus_needs_a_learning_rate_and_leaves_the_callers_groups_alone():
    pairs = make_pairs()
    with pytest.raises(ValueError, match="loraplus needs a learning rate"):
        build_optimizer("loraplus", [{"params": params_of(pairs)}], pairs)
    groups = [{"params": params_of(pairs)}]
    optimizer = build_optimizer("loraplus", groups, pairs, base_kwargs={"lr": 0.01}, loraplus_ratio=4.0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.04]
    assert groups == [{"params": params_of(pairs)}]


def test_mismatched_factor_shapes_are_rejected():
    with pytest.raises(ValueError, match="do not form a product"):
        LoRAPair(nn.Parameter(torch.zeros(4, 12)), nn.Parameter(torch.zeros(10, 3)))
    with pytest.raises(ValueError, match="conv factors"):
        LoRAPair(nn.Parameter(torch.zeros(4, 3, 3, 3)), nn.Parameter(torch.zeros(8, 4, 3, 3)), conv=True)
