"""The RuleOptimizer wrapper and LoRA pair discovery on a small peft-wrapped model (Conv2d + Linear)."""
import copy
import time
from collections import defaultdict

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from balora_diffusion.lora import balance_diagnostics, find_lora_pairs
from balora_diffusion.rules import METHODS, LoRAPair, build_optimizer
from balora_diffusion.rules.balora_reference import balanced_projection_reference
from balora_diffusion.rules.ilora_reference import imbalance_step_reference
from balora_diffusion.rules.scaled_reference import precondition_grads_reference

RANK = 4


class TinyNet(nn.Module):
    """fc2 and fc3 share a shape, so their pairs go through the rules in one batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 6)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        h = torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(h))))))
        return self.head(h)


def make_model(seed=0):
    """A LoRA-injected TinyNet plus `shift`, a trainable non-LoRA parameter (like a token embedding)."""
    torch.manual_seed(seed)
    net = TinyNet()
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["conv", "fc1", "fc2", "fc3", "head"])
    net = inject_adapter_in_model(config, net)
    net.shift = nn.Parameter(torch.zeros(6))
    return net


def make_data(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g)
    return x, torch.randn(n, 6, generator=g)


def loss_of(net, data):
    x, y = data
    return ((net(x) + net.shift - y) ** 2).mean()


def lora_params(net):
    return [p for n, p in net.named_parameters() if "lora_" in n]


def groups_of(net, lr=1e-2):
    return [{"params": lora_params(net), "lr": lr, "name": "unet"},
            {"params": [net.shift], "lr": lr, "name": "token_embedding"}]


def train(net, optimizer, data, steps):
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_of(net, data)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def warmed_model(seed=0):
    """A model after a few plain SGD steps, so every B is nonzero and full rank."""
    net = make_model(seed)
    train(net, torch.optim.SGD(net.parameters(), lr=0.05), make_data(), 3)
    return net


def matrices(pair):
    return pair.a_matrix(pair.A), pair.b_matrix(pair.B)


def write(pair, A, B):
    with torch.no_grad():
        pair.A.copy_(A.reshape(pair.A.shape))
        pair.B.copy_(B.reshape(pair.B.shape))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_a_peft_model(method):
    net = make_model()
    data = make_data()
    optimizer = build_optimizer(method, groups_of(net), find_lora_pairs(net), loraplus_ratio=4.0)
    start = loss_of(net, data).item()
    train(net, optimizer, data, 40)
    end = loss_of(net, data).item()
    assert end < 0.75 * start, (method, start, end)


# after-step maps by their reference implementations, on matrices in float64
REFERENCE_AFTER = {
    "balora": lambda A, B, lr: balanced_projection_reference(A, B),
    "hilora": lambda A, B, lr: (lambda a, b: (a, b / (RANK / B.shape[0]) ** 0.5))(
        *balanced_projection_reference(A, B * (RANK / B.shape[0]) ** 0.5)),
    "ilora": lambda A, B, lr: imbalance_step_reference(A, B, lr=lr, lam=3.0),
}


def reference_step(pairs, plain, loss, method, after, lr, reg):
    """What the wrapper's step should do: the reference preconditioner per pair, `plain`'s step, the
    reference after-step map per pair."""
    plain.zero_grad()
    loss().backward()
    if method in ("scaled", "pilora", "balora+scaled"):
        for pair in pairs:
            gA, gB = precondition_grads_reference(*matrices(pair), pair.a_matrix(pair.A.grad),
                                                  pair.b_matrix(pair.B.grad), reg)
            pair.A.grad.copy_(gA.reshape(pair.A.shape))
            pair.B.grad.copy_(gB.reshape(pair.B.shape))
    plain.step()
    if after is not None:
        for pair in pairs:
            A, B = (t.double() for t in matrices(pair))
            write(pair, *REFERENCE_AFTER[after](A, B, lr))


@pytest.mark.parametrize("method,after,scaled", [
    ("balora", "balora", False), ("hilora", "hilora", False), ("ilora", "ilora", False),
    ("scaled", None, False), ("pilora", "ilora", True), ("balora+scaled", "balora", True),
])
def test_wrapper_equals_base_step_plus_reference_rule_per_pair(method, after, scaled):
    net = warmed_model()
    twin = copy.deepcopy(net)
    data, lr, reg = make_data(seed=2), 1e-2, 1e-3
    optimizer = build_optimizer(method, groups_of(net, lr), find_lora_pairs(net), reg=reg, lam=3.0)
    train(net, optimizer, data, 2)

    twin_pairs = find_lora_pairs(twin)
    plain = torch.optim.AdamW(groups_of(twin, lr))
    for _ in range(2):
        reference_step(twin_pairs, plain, lambda: loss_of(twin, data), method, after, lr, reg)
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5, msg=name)


class MixedShapes(nn.Module):
    """A Linear and a 1x1 conv whose LoRA matrices have one shape: one batch, 2-d and 4-d parameters."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.mix = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        return self.mix(torch.tanh(self.fc(x))[:, :, None, None]).flatten(1)


@pytest.mark.parametrize("method,after", [("balora", "balora"), ("pilora", "ilora")])
def test_a_batch_of_linear_and_conv_factors_is_written_back_in_each_ones_shape(method, after):
    torch.manual_seed(0)
    net = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["fc", "mix"]), MixedShapes())
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    for p in lora_params(net):
        nn.init.normal_(p, std=0.3)
    twin = copy.deepcopy(net)
    pairs, lr = find_lora_pairs(net), 1e-2
    assert {p.A.dim() for p in pairs} == {2, 4} and len({matrices(p)[0].shape for p in pairs}) == 1
    optimizer = build_optimizer(method, [{"params": lora_params(net), "lr": lr}], pairs, lam=3.0)
    optimizer.zero_grad()
    ((net(x) - y) ** 2).mean().backward()
    optimizer.step()

    plain = torch.optim.AdamW([{"params": lora_params(twin), "lr": lr}])
    reference_step(find_lora_pairs(twin), plain, lambda: ((twin(x) - y) ** 2).mean(), method, after, lr, 1e-6)
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        assert p.shape == q.shape, name
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["balora", "balora+scaled", "hilora"])
def test_zero_and_rank_deficient_pairs_survive_and_then_train(method):
    net = make_model()
    pairs = find_lora_pairs(net)
    assert all(torch.count_nonzero(p.B) == 0 for p in pairs)      # peft's init
    start_A = {p.name: p.A.detach().clone() for p in pairs}
    data = make_data()
    optimizer = build_optimizer(method, groups_of(net), pairs, base_kwargs={"weight_decay": 0.0})
    # One sample: dL/dW of a Linear layer is rank 1, so after the first step B A has rank < r.
    train(net, optimizer, (data[0][:1], data[1][:1]), 1)
    for pair in pairs:
        if not pair.conv:
            A, B = matrices(pair)
            assert torch.linalg.matrix_rank(B @ A).item() < RANK
            # grad_A = s B^T dL/dW = 0 at B = 0, so only a projection could have moved A
            assert torch.equal(pair.A, start_A[pair.name]), pair.name
    losses = train(net, optimizer, data, 100)
    assert losses[-1] < 0.2 * losses[0]
    for name, report in balance_diagnostics(pairs).items():
        A, B = matrices(next(p for p in pairs if p.name == name))
        s = torch.linalg.svdvals((B @ A).detach())
        assert s[RANK - 1] > 1e-3 * s[0], name                      # all r components alive
        target = 1.0 if method.startswith("balora") else report["rho"]
        assert abs(report["ratio"] - target) < 1e-4 * target, (name, report)


@pytest.mark.parametrize("method", ["balora+scaled", "hilora", "pilora+loraplus"])
def test_seeds_stacked_in_one_parameter_train_like_separate_runs(method):
    """The synthetic benchmark's layout: (seeds, r, n) factors; Adam is elementwise, the rules are batched."""
    g = torch.Generator().manual_seed(4)
    seeds, r, m, n = 5, 3, 9, 7
    Z, W0 = torch.randn(seeds, m, n, generator=g), torch.randn(seeds, m, n, generator=g)
    A0, B0 = torch.randn(seeds, r, n, generator=g), torch.zeros(seeds, m, r)

    def run(A, B, target, base):
        pair = LoRAPair(nn.Parameter(A.clone()), nn.Parameter(B.clone()))
        optimizer = build_optimizer(method, [pair.A, pair.B], [pair], base_kwargs={"lr": 0.05}, reg=1e-2)
        for _ in range(6):
            optimizer.zero_grad()
            (0.5 * ((target - base - pair.B @ pair.A) ** 2).sum()).backward()
            optimizer.step()
        return pair.A.detach(), pair.B.detach()

    stacked = run(A0, B0, Z, W0)
    for k in range(seeds):
        single = run(A0[k], B0[k], Z[k], W0[k])
        torch.testing.assert_close(stacked[0][k], single[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stacked[1][k], single[1], atol=1e-5, rtol=1e-5)


ROUND_TRIPS = [
    ("lora", "keep", 1), ("balora", "keep", 1), ("balora", "reset_once", 1), ("hilora", "reset_once", 2),
    ("balora+scaled+loraplus", "carry", 2), ("pilora+loraplus", "keep", 1),
]


@pytest.mark.parametrize("method,state,every", ROUND_TRIPS)
def test_state_dict_round_trip_gives_identical_next_steps(method, state, every):
    net, data = make_model(), make_data()
    options = dict(state=state, project_every=every, lam=0.5)
    optimizer = build_optimizer(method, groups_of(net), find_lora_pairs(net), **options)
    train(net, optimizer, data, 3)
    saved = copy.deepcopy(optimizer.state_dict())
    restored_net = copy.deepcopy(net)
    restored = build_optimizer(method, groups_of(restored_net), find_lora_pairs(restored_net), **options)
    restored.load_state_dict(saved)
    # schedulers and accelerate hold the wrapper: it must still share the base's groups and state
    assert restored.param_groups is restored.base.param_groups and restored.state is restored.base.state
    train(net, optimizer, data, 3)
    train(restored_net, restored, data, 3)
    for (name, p), q in zip(net.named_parameters(), restored_net.parameters()):
        assert torch.equal(p, q), name


def test_project_every_k_projects_on_every_kth_step_only():
    net, data = warmed_model(), make_data()
    pairs = find_lora_pairs(net)
    optimizer = build_optimizer("balora", groups_of(net), pairs, project_every=3)
    for step in range(1, 7):
        train(net, optimizer, data, 1)
        ratios = [r["ratio"] for r in balance_diagnostics(pairs).values()]
        balanced = all(abs(r - 1) < 1e-4 for r in ratios)
        assert balanced == (step % 3 == 0), (step, ratios)


def test_loading_a_plain_optimizer_state_dict_is_refused():
    net = make_model()
    optimizer = build_optimizer("balora", groups_of(net), find_lora_pairs(net))
    with pytest.raises(ValueError, match="not a RuleOptimizer state dict"):
        optimizer.load_state_dict(torch.optim.AdamW(groups_of(net)).state_dict())


def test_reset_once_restarts_the_pair_state_exactly_once():
    net, data = warmed_model(), make_data()
    pairs = find_lora_pairs(net)
    optimizer = build_optimizer("balora", groups_of(net), pairs, state="reset_once")
    train(net, optimizer, data, 5)
    # every pair is full rank from step 1, so its state was cleared after step 1 only
    for pair in pairs:
        assert optimizer.state[pair.A]["step"].item() == 4 and optimizer.state[pair.B]["step"].item() == 4
    assert optimizer.state[net.shift]["step"].item() == 5


def test_carry_moves_the_first_moment_through_the_gauge_change():
    net = warmed_model()
    twin = copy.deepcopy(net)
    data = make_data(seed=3)
    carried = build_optimizer("balora", groups_of(net), find_lora_pairs(net), state="carry")
    plain = build_optimizer("lora", groups_of(twin), find_lora_pairs(twin))
    train(net, carried, data, 1)
    train(twin, plain, data, 1)
    for pair, before in zip(find_lora_pairs(net), find_lora_pairs(twin)):
        A_pre, B_pre = (t.detach().double() for t in matrices(before))
        A_post, B_post = (t.detach().double() for t in matrices(pair))
        G = A_post @ torch.linalg.pinv(A_pre)                     # A' = G A
        G_inv = torch.linalg.pinv(B_pre) @ B_post                  # B' = B G^-1
        torch.testing.assert_close(G @ G_inv, torch.eye(RANK, dtype=torch.float64), atol=1e-4, rtol=0)
        m_A, m_B = carried.state[pair.A]["exp_avg"], carried.state[pair.B]["exp_avg"]
        m_A_pre, m_B_pre = plain.state[before.A]["exp_avg"], plain.state[before.B]["exp_avg"]
        torch.testing.assert_close(pair.a_matrix(m_A).double(), G @ before.a_matrix(m_A_pre).double(),
                                   atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(pair.b_matrix(m_B).double(), before.b_matrix(m_B_pre).double() @ G_inv,
                                   atol=1e-6, rtol=1e-4)
        # the second moment has no exact transport and stays as it was
        assert torch.equal(carried.state[pair.A]["exp_avg_sq"], plain.state[before.A]["exp_avg_sq"])


def test_ilora_uses_the_scheduled_learning_rate():
    net = warmed_model()
    pairs = find_lora_pairs(net)
    optimizer = build_optimizer("ilora", groups_of(net, lr=0.1), pairs, base="sgd", lam=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 ** epoch)
    for epoch in range(3):
        before = [tuple(t.detach().double().clone() for t in matrices(p)) for p in pairs]
        for p in net.parameters():
            p.grad = torch.zeros_like(p)          # the SGD step is a no-op; only iLoRA moves the pair
        optimizer.step()
        lr = 0.1 * 0.5 ** epoch
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)
        for pair, (A, B) in zip(pairs, before):
            A_ref, B_ref = imbalance_step_reference(A, B, lr=lr, lam=2.0)
            A_new, B_new = matrices(pair)
            torch.testing.assert_close(A_new.double(), A_ref, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(B_new.double(), B_ref, atol=1e-6, rtol=1e-5)
        scheduler.step()


def test_loraplus_splits_groups_and_keeps_per_group_rates_through_a_scheduler():
    net = make_model()
    pairs = find_lora_pairs(net)
    head = [p for p in pairs if p.name.startswith("head")]
    rest = [p for p in pairs if not p.name.startswith("head")]
    groups = [{"params": [t for p in rest for t in (p.A, p.B)], "lr": 1e-3, "name": "unet"},
              {"params": [head[0].A, head[0].B], "lr": 5e-4, "name": "text_encoder", "weight_decay": 0.0},
              {"params": [net.shift], "lr": 5e-3, "name": "token_embedding"}]
    optimizer = build_optimizer("balora+loraplus", groups, pairs, loraplus_ratio=16.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.1 if epoch else 1.0)
    for _ in range(2):
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for pair, base_lr in [(p, 1e-3) for p in rest] + [(head[0], 5e-4)]:
            scale = optimizer.param_groups[0]["lr"] / 1e-3
            assert group_of[id(pair.A)]["lr"] == pytest.approx(base_lr * scale)
            assert group_of[id(pair.B)]["lr"] == pytest.approx(16 * base_lr * scale)
        assert group_of[id(net.shift)]["lr"] == pytest.approx(5e-3 * scale)
        assert group_of[id(head[0].B)]["name"] == "text_encoder.lora_B"
        assert group_of[id(head[0].B)]["weight_decay"] == 0.0
        optimizer.step()                          # no gradients: nothing moves, the schedule advances
        scheduler.step()
    all_params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(all_params) == len(set(map(id, all_params))) == 2 * len(pairs) + 1


def test_pairs_without_gradients_are_left_alone():
    net = warmed_model()
    pairs = find_lora_pairs(net)
    optimizer = build_optimizer("ilora", groups_of(net), pairs, lam=10.0)
    fc3 = next(p for p in pairs if p.name.startswith("fc3"))
    fc2 = next(p for p in pairs if p.name.startswith("fc2"))
    frozen = (fc3.A.detach().clone(), fc3.B.detach().clone())
    moved = fc2.A.detach().clone()
    optimizer.zero_grad()
    loss_of(net, make_data()).backward()
    fc3.A.grad = fc3.B.grad = None
    optimizer.step()
    assert torch.equal(fc3.A, frozen[0]) and torch.equal(fc3.B, frozen[1])
    assert not torch.equal(fc2.A, moved)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["balora+scaled", "pilora", "hilora"])
def test_half_precision_parameters_keep_their_dtype_and_follow_fp32(dtype, method):
    half = warmed_model().to(dtype)
    full = copy.deepcopy(half).float()
    data = make_data()
    # SGD, so that the only rounding on top of the rules' is one multiply-add per step
    optimizers = [build_optimizer(method, groups_of(net, 0.05), find_lora_pairs(net), base="sgd", reg=1e-3)
                  for net in (half, full)]
    eps = torch.finfo(dtype).eps
    for _ in range(3):
        full.zero_grad()
        loss_of(full, data).backward()
        for p, q in zip(lora_params(full) + [full.shift], lora_params(half) + [half.shift]):
            q.grad = p.grad.to(dtype)                              # both see the same (rounded) gradients
            p.grad = q.grad.float()
        for optimizer in optimizers:
            optimizer.step()
        for (name, p), q in zip(full.named_parameters(), half.parameters()):
            assert q.dtype == dtype and torch.isfinite(q).all(), name
            assert (q.double() - p.double()).norm() <= 8 * eps * p.double().norm(), name


def test_accelerate_prepare_keeps_the_rules_working():
    accelerate = pytest.importorskip("accelerate")
    net, data = make_model(), make_data()
    pairs = find_lora_pairs(net)
    optimizer = build_optimizer("balora", groups_of(net), pairs, state="reset_once")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5)
    accelerator = accelerate.Accelerator(cpu=True)
    net, prepared, scheduler = accelerator.prepare(net, optimizer, scheduler)
    losses = []
    for _ in range(20):
        prepared.zero_grad()
        loss = loss_of(net, data)
        accelerator.backward(loss)
        prepared.step()
        scheduler.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert prepared.param_groups[0]["lr"] == pytest.approx(0.5e-2)
    assert "lora_rules" in prepared.state_dict()
    for report in balance_diagnostics(pairs).values():
        assert abs(report["ratio"] - 1) < 1e-4


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_find_lora_pairs_sees_conv_linear_and_embedding_layers_and_skips_frozen_adapters():
    net = make_model()
    net = inject_adapter_in_model(LoraConfig(r=2, target_modules=["fc1"]), net, adapter_name="frozen")
    for name, p in net.named_parameters():
        if ".frozen" in name:
            p.requires_grad_(False)
    pairs = {p.name: p for p in find_lora_pairs(net)}
    assert sorted(pairs) == ["conv.default", "fc1.default", "fc2.default", "fc3.default", "head.default"]
    conv = pairs["conv.default"]
    assert conv.conv and conv.A.shape == (RANK, 3, 3, 3) and conv.B.shape == (8, RANK, 1, 1)
    assert conv.a_matrix(conv.A).shape == (RANK, 27) and conv.b_matrix(conv.B).shape == (8, RANK)
    assert pairs["fc1.default"].A is net.fc1.lora_A["default"].weight

    embed = inject_adapter_in_model(LoraConfig(r=3, target_modules=["0"]), nn.Sequential(nn.Embedding(10, 6)))
    (pair,) = find_lora_pairs(embed)
    assert not pair.conv and pair.A.shape == (3, 10) and pair.B.shape == (6, 3)


def test_balance_diagnostics_match_their_definitions():
    A = torch.zeros(2, 5)
    A[0, 0], A[1, 1] = 2.0, 1.0                       # singular values 2, 1
    B = torch.zeros(4, 2)
    B[0, 0], B[1, 1] = 2.0, 0.5                       # singular values 2, 0.5
    report = balance_diagnostics([LoRAPair(nn.Parameter(A), nn.Parameter(B), name="p"),
                                  LoRAPair(nn.Parameter(A.clone()), nn.Parameter(torch.zeros(4, 2)))])
    p = report["p"]
    # A A^T = diag(4, 1), B^T B = diag(4, 0.25)
    assert p["imbalance"] == pytest.approx(0.75 / 17 ** 0.5)
    assert p["ratio"] == pytest.approx(17 ** 0.5 / (16 + 0.0625) ** 0.5)
    assert p["rho"] == 0.5 and p["cond_A"] == pytest.approx(2.0) and p["cond_B"] == pytest.approx(4.0)
    zero = report["pair1"]
    assert zero["ratio"] == float("inf") and zero["cond_B"] == float("inf") and zero["imbalance"] == 1.0
    batched = balance_diagnostics([LoRAPair(nn.Parameter(A.expand(3, 2, 5).clone()),
                                            nn.Parameter(B.expand(3, 4, 2).clone()), name="b")])["b"]
    assert batched["ratio"] == pytest.approx([p["ratio"]] * 3)


@pytest.mark.parametrize("method", ["lora", "scaled", "balora"])
def test_time_spent_before_the_step_body_is_the_optimizers_not_the_rules(method):
    """What runs before RuleOptimizer.step's body (torch's step hooks, accelerate's wrapper) is not the rule."""
    net, data = make_model(), make_data()
    optimizer = build_optimizer(method, groups_of(net), find_lora_pairs(net))
    optimizer.register_step_pre_hook(lambda *_: time.sleep(0.2))
    spent, last = defaultdict(float), [0.0]

    def phase_ends(phase):
        now = time.perf_counter()
        spent[phase] += now - last[0]
        last[0] = now

    optimizer.phase_ends = phase_ends
    loss_of(net, data).backward()
    last[0] = time.perf_counter()
    optimizer.step()
    assert spent["optimizer"] >= 0.2
    assert spent["rule"] < 0.2
