"""pacnet.engine.solver: the solver section, Caffe lr policies, CaffeSGD, groups, updates."""

import math

import pytest
import torch
from torch import nn

from pacnet.errors import Location, PacnetValueError, SchemaError
from pacnet.engine.solver import (
    SOLVER_SCHEMA, CaffeSGD, LearningRate, Solver, clip_gradients, param_groups, parse_solver,
)

BASE = {"base_lr": 0.01, "max_iter": 1000}


def cfg(**kw):
    return parse_solver({**BASE, **kw})


# ----------------------------------------------------------------------------- parsing


def test_defaults_are_caffes():
    c = cfg()
    assert (c.type, c.lr_policy, c.momentum, c.momentum2, c.delta) == ("SGD", "fixed", 0.0, 0.999, 1e-8)
    assert (c.weight_decay, c.regularization_type, c.clip_gradients, c.iter_size) == (0.0, "L2", -1.0, 1)
    assert (c.average_loss, c.random_seed, c.test_initialization, c.snapshot_after_train) == (1, -1, True, True)
    assert c.momentum_form == "caffe"
    assert c.to_dict()["test_iter"] == []


def test_every_schema_property_has_a_description():
    for key, sub in SOLVER_SCHEMA["properties"].items():
        assert sub.get("description"), key


@pytest.mark.parametrize("raw, field, words", [
    ({**BASE, "base_lr": "fast"}, "solver.base_lr", "expected a number, got 'fast'"),
    ({**BASE, "max_iter": 1.5}, "solver.max_iter", "expected an integer"),
    ({**BASE, "momentum": [0.9]}, "solver.momentum", "expected a number"),
    ({**BASE, "lr_policy": "stpe"}, "solver.lr_policy", "must be one of"),
    ({**BASE, "stepvalue": [10, "x"]}, "solver.stepvalue", ""),
    ({**BASE, "iter_size": 0}, "solver.iter_size", "must be >= 1"),
    ({**BASE, "test_initialization": "yes"}, "solver.test_initialization", "true or false"),
    ({"max_iter": 10}, "solver.base_lr", "required"),
    ({**BASE, "bse_lr": 1}, "solver.bse_lr", "unknown field 'bse_lr'"),
])
def test_wrong_fields_raise_schema_error_naming_the_field(raw, field, words):
    with pytest.raises(SchemaError) as info:
        parse_solver(raw, source="net.yaml")
    text = str(info.value)
    assert text.startswith("net.yaml: " + field), text
    assert words in text


def test_unknown_field_suggests_the_close_one():
    with pytest.raises(SchemaError, match="did you mean 'lr_policy'"):
        parse_solver({**BASE, "lr_polcy": "poly"})


def test_locate_callback_gives_the_line():
    seen = []

    def locate(path):
        seen.append(path)
        return Location("net.yaml", 7, 3) if path == ("solver", "gamma") else None

    with pytest.raises(SchemaError) as info:
        parse_solver({**BASE, "gamma": "big"}, locate=locate)
    assert str(info.value).startswith("net.yaml:7:3: solver.gamma:")
    assert ("solver", "gamma") in seen


@pytest.mark.parametrize("policy, missing", [
    ("step", "gamma"), ("step", "stepsize"), ("exp", "gamma"), ("inv", "power"), ("inv", "gamma"),
    ("multistep", "stepvalue"), ("poly", "power"), ("sigmoid", "stepsize"),
])
def test_policy_fields_are_required(policy, missing):
    full = {"gamma": 0.1, "power": 0.9, "stepsize": 10, "stepvalue": [5]}
    del full[missing]
    with pytest.raises(SchemaError, match=f"solver.{missing}: lr_policy '{policy}' needs '{missing}'"):
        parse_solver({**BASE, "lr_policy": policy, **full})


def test_semantic_errors():
    with pytest.raises(SchemaError, match="max_iter"):
        parse_solver({"base_lr": 1, "max_iter": 0, "lr_policy": "poly", "power": 1})
    with pytest.raises(SchemaError, match="RMSProp does not use momentum"):
        cfg(type="RMSProp", momentum=0.9)
    with pytest.raises(SchemaError, match="L1 is not defined"):
        cfg(type="AdamW", regularization_type="L1")
    with pytest.raises(SchemaError, match="beta1"):
        cfg(type="Adam", momentum=1.0)
    with pytest.raises(SchemaError, match="momentum_form: only applies"):
        cfg(type="Adam", momentum_form="torch")
    with pytest.raises(SchemaError, match="solver: missing"):
        parse_solver(None)
    with pytest.raises(SchemaError, match="expected a mapping"):
        parse_solver([1, 2])


def test_legacy_solver_type_and_case():
    assert cfg(solver_type="ADAM").type == "Adam"
    assert cfg(solver_type=1).type == "Nesterov"
    assert cfg(type="adam").type == "Adam"
    assert cfg(type="Adam", solver_type="ADAM").type == "Adam"
    with pytest.raises(SchemaError, match="solver_type: says 'SGD' but type says 'Adam'"):
        cfg(type="Adam", solver_type="SGD")


def test_numbers_written_without_a_dot_are_numbers():
    # PyYAML reads 1e-3 and 2e4 as strings.
    c = parse_solver({"base_lr": "1e-3", "max_iter": "2e4", "weight_decay": "5e-4"})
    assert c.base_lr == 1e-3 and c.max_iter == 20000 and isinstance(c.max_iter, int)
    assert c.weight_decay == 5e-4


def test_repeated_fields_accept_scalars_and_lists():
    c = cfg(lr_policy="multistep", gamma=0.5, stepvalue=100, test_iter=[5, 7])
    assert c.stepvalue == (100,) and c.test_iter == (5, 7)


# ----------------------------------------------------------------------------- lr policies


ITERS = [0, 1, 2, 7, 99, 100, 101, 250, 999]


@pytest.mark.parametrize("policy, extra, formula", [
    ("fixed", {}, lambda it: 0.01),
    ("step", {"gamma": 0.1, "stepsize": 100}, lambda it: 0.01 * 0.1 ** math.floor(it / 100)),
    ("exp", {"gamma": 0.99}, lambda it: 0.01 * 0.99 ** it),
    ("inv", {"gamma": 1e-4, "power": 0.75}, lambda it: 0.01 * (1 + 1e-4 * it) ** -0.75),
    ("poly", {"power": 0.9}, lambda it: 0.01 * (1 - it / 1000) ** 0.9),
    ("sigmoid", {"gamma": -0.05, "stepsize": 100},
     lambda it: 0.01 / (1 + math.exp(0.05 * (it - 100)))),
    ("multistep", {"gamma": 0.5, "stepvalue": [100, 250]},
     lambda it: 0.01 * 0.5 ** ((it >= 100) + (it >= 250))),
])
def test_lr_policies_follow_caffe_formulas(policy, extra, formula):
    lr = LearningRate(cfg(lr_policy=policy, **extra))
    for it in ITERS:
        assert lr(it) == pytest.approx(formula(it), rel=1e-12, abs=0), (policy, it)


def test_poly_reaches_zero_at_max_iter():
    assert LearningRate(cfg(lr_policy="poly", power=0.9))(1000) == 0.0


@pytest.mark.parametrize("stepvalue", [[10, 10, 5], [30, 20], [0, 3, 3, 3], [5]])
def test_multistep_advances_one_step_per_iteration_like_caffe(stepvalue):
    lr = LearningRate(cfg(lr_policy="multistep", gamma=0.5, stepvalue=stepvalue))
    current = 0  # SGDSolver::GetLearningRate's current_step_, simulated call by call
    for it in range(60):
        if current < len(stepvalue) and it >= stepvalue[current]:
            current += 1
        assert lr(it) == 0.01 * 0.5 ** current, (stepvalue, it)


# ----------------------------------------------------------------------------- CaffeSGD


def _scalar_run(opt_factory, lrs, w0=1.0):
    """Minimise 0.5 w^2 (gradient w), changing the lr per step; return w after each."""
    w = nn.Parameter(torch.tensor([w0], dtype=torch.float64))
    opt = opt_factory([w])
    out = []
    for lr in lrs:
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        (0.5 * w ** 2).sum().backward()
        opt.step()
        out.append(float(w.detach()))
    return out


def test_caffe_sgd_matches_hand_computation_across_an_lr_change():
    # V1 = 0.1*1 = 0.1, w1 = 0.9;  lr -> 0.01: V2 = 0.9*0.1 + 0.01*0.9 = 0.099, w2 = 0.801
    caffe = _scalar_run(lambda p: CaffeSGD(p, lr=0.1, momentum=0.9), [0.1, 0.01])
    assert caffe == pytest.approx([0.9, 0.801], abs=1e-15)
    # torch: B1 = 1, w1 = 0.9; B2 = 0.9*1 + 0.9 = 1.8, w2 = 0.9 - 0.01*1.8 = 0.882
    torchform = _scalar_run(lambda p: CaffeSGD(p, lr=0.1, momentum=0.9, form="torch"), [0.1, 0.01])
    assert torchform == pytest.approx([0.9, 0.882], abs=1e-15)


def test_caffe_nesterov_matches_hand_computation():
    # V1 = 0.1, step = 1.9*0.1 - 0.9*0 = 0.19, w1 = 0.81
    # V2 = 0.9*0.1 + 0.01*0.81 = 0.0981, step = 1.9*0.0981 - 0.9*0.1 = 0.09639, w2 = 0.71361
    out = _scalar_run(lambda p: CaffeSGD(p, lr=0.1, momentum=0.9, nesterov=True), [0.1, 0.01])
    assert out == pytest.approx([0.81, 0.71361], abs=1e-14)


def test_caffe_and_torch_forms_agree_at_constant_lr():
    lrs = [0.05] * 6
    a = _scalar_run(lambda p: CaffeSGD(p, lr=0.05, momentum=0.9), lrs)
    b = _scalar_run(lambda p: CaffeSGD(p, lr=0.05, momentum=0.9, form="torch"), lrs)
    assert a == pytest.approx(b, rel=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_torch_form_is_torch_sgd(nesterov):
    torch.manual_seed(0)
    lrs = [0.1, 0.1, 0.03, 0.01, 0.01]
    a = _scalar_run(lambda p: CaffeSGD(p, lr=0.1, momentum=0.8, weight_decay=0.01, form="torch",
                                       nesterov=nesterov), lrs, w0=2.0)
    b = _scalar_run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, weight_decay=0.01,
                                              nesterov=nesterov), lrs, w0=2.0)
    assert a == pytest.approx(b, rel=1e-12)


def test_caffe_sgd_weight_decay_l2_and_l1():
    # g = w + d*w (L2): w0 = 2, lr .1, d .5: g = 3, w1 = 1.7
    assert _scalar_run(lambda p: CaffeSGD(p, lr=0.1, weight_decay=0.5), [0.1], w0=2.0) == pytest.approx([1.7])
    # L1: g = w + d*sign(w) = 2.5, w1 = 1.75
    assert _scalar_run(lambda p: CaffeSGD(p, lr=0.1, weight_decay=0.5, regularization="L1"),
                       [0.1], w0=2.0) == pytest.approx([1.75])


@pytest.mark.parametrize("kwargs, words", [
    ({"lr": -1}, "lr must be"), ({"lr": 0.1, "momentum": float("nan")}, "momentum must be"),
    ({"lr": 0.1, "form": "keras"}, "form must be"), ({"lr": 0.1, "regularization": "L3"}, "regularization"),
])
def test_caffe_sgd_rejects_bad_arguments(kwargs, words):
    with pytest.raises(PacnetValueError, match=words):
        CaffeSGD([nn.Parameter(torch.zeros(1))], **kwargs)


# ----------------------------------------------------------------------------- groups


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)
        self.c = nn.Linear(2, 2)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


class Shared(nn.Module):
    """Two layers sharing one weight blob (Caffe param.name sharing)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 3, bias=False)
        self.second = nn.Linear(3, 3, bias=False)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(self.first(x))


def test_groups_by_lr_and_decay_mult_and_frozen_blobs():
    torch.manual_seed(0)
    m = Three()
    specs = {"a.weight": (1, 1), "a.bias": {"lr_mult": 2, "decay_mult": 0},
             "b.weight": (1, 1), "b.bias": (2, 0), "c.weight": (0, 0), "c.bias": (0, 0)}
    groups, frozen = param_groups(m, specs)
    assert sorted((g.lr_mult, g.decay_mult, tuple(g.names)) for g in groups) == [
        (1.0, 1.0, ("a.weight", "b.weight")), (2.0, 0.0, ("a.bias", "b.bias"))]
    assert frozen == ["c.weight", "c.bias"]
    assert not m.c.weight.requires_grad and m.a.weight.requires_grad


def test_param_lr_mult_globs_override_the_nets_multipliers_longest_glob_first():
    torch.manual_seed(0)
    m = Three()
    specs = {"a.weight": (1, 1), "a.bias": (2, 0), "c.weight": (0, 0)}
    # freeze everything but layer b, whatever the net's param entries say
    config = parse_solver({"base_lr": 0.1, "max_iter": 1, "param_lr_mult": {"*": 0, "b.*": 1, "b.bias": 3}})
    assert config.param_lr_mult == (("*", 0.0), ("b.*", 1.0), ("b.bias", 3.0))
    assert config.to_dict()["param_lr_mult"] == {"*": 0.0, "b.*": 1.0, "b.bias": 3.0}
    s = Solver(config, m, specs)
    assert sorted((g.lr_mult, tuple(g.names)) for g in s.groups) == [(1.0, ("b.weight",)), (3.0, ("b.bias",))]
    assert sorted(s.frozen) == ["a.bias", "a.weight", "c.bias", "c.weight"] and not m.a.weight.requires_grad
    # every blob at base_lr, as an optimizer given model.parameters(); a blob the net froze
    # by its lr_mult 0 (codegen turned its requires_grad off) learns again
    m = Three()
    m.c.weight.requires_grad_(False)
    groups, frozen = param_groups(m, specs, lr_mult_globs=(("*", 1.0),))
    assert {g.lr_mult for g in groups} == {1.0} and sum(len(g.names) for g in groups) == 6 and not frozen
    assert m.c.weight.requires_grad
    with pytest.raises(PacnetValueError, match=r"param_lr_mult: 'crf.\*' matches no learnable blob"):
        param_groups(Three(), specs, lr_mult_globs=(("crf.*", 1.0),))
    with pytest.raises(SchemaError, match="param_lr_mult"):
        parse_solver({"base_lr": 0.1, "max_iter": 1, "param_lr_mult": {"*": -1}})


def test_param_spec_objects_and_unknown_keys():
    class Spec:
        lr_mult, decay_mult = 3.0, 0.5

    groups, _ = param_groups(Three(), {"a.weight": Spec()})
    assert {(g.lr_mult, g.decay_mult) for g in groups} == {(1.0, 1.0), (3.0, 0.5)}
    with pytest.raises(PacnetValueError, match="'z.weight'"):
        param_groups(Three(), {"z.weight": (1, 1)})
    with pytest.raises(PacnetValueError, match=">= 0"):
        param_groups(Three(), {"a.weight": (-1, 1)})


def test_solver_applies_lr_mult_and_decay_mult_per_group():
    torch.manual_seed(0)
    m = Three()
    specs = {"a.weight": (1, 1), "a.bias": (2, 0), "b.weight": (1, 3), "b.bias": (1, 1),
             "c.weight": (0, 1), "c.bias": (0, 1)}
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    s = Solver({"base_lr": 0.1, "max_iter": 5, "weight_decay": 0.01}, m, specs)
    s.zero_grad()
    info = s.apply()  # zero gradients: the update is decay only, w <- w - lr*lr_mult*wd*decay_mult*w
    assert info.iter == 0 and info.lr == 0.1 and s.iter == 1
    after = m.state_dict()
    for key, (lr_mult, decay_mult) in specs.items():
        expect = before[key] * (1 - 0.1 * lr_mult * 0.01 * decay_mult) if lr_mult else before[key]
        torch.testing.assert_close(after[key], expect, msg=key)
    assert {g["lr"] for g in s.optimizer.param_groups} == {0.1, 0.2}


def test_shared_blob_is_counted_and_updated_once():
    torch.manual_seed(0)
    m = Shared()
    assert list(m.state_dict()) == ["first.weight", "second.weight"]
    groups, _ = param_groups(m, {"first.weight": (1, 1), "second.weight": (1, 1)})
    assert [g.names for g in groups] == [["first.weight"]]
    w0 = m.first.weight.detach().clone()
    x = torch.randn(4, 3)
    s = Solver({"base_lr": 0.1, "max_iter": 1}, m)
    s.step(lambda: m(x).sum())
    # the gradient of the shared blob is the sum over both uses; one update with it
    w = w0.clone().requires_grad_(True)
    (x @ w.t() @ w.t()).sum().backward()
    torch.testing.assert_close(m.first.weight.detach(), w0 - 0.1 * w.grad)
    assert m.second.weight is m.first.weight


def test_nothing_to_train():
    with pytest.raises(PacnetValueError, match="nothing to train"):
        Solver(BASE, Three(), {k: (0, 0) for k in Three().state_dict()})


# ----------------------------------------------------------------------------- the update


def test_iter_size_accumulates_clips_the_sum_then_averages_then_decays():
    # one scalar blob w; passes k = 0,1 have loss c_k * w (gradients 3 and 5)
    w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    m = nn.Module()
    m.w = w
    s = Solver({"base_lr": 0.1, "max_iter": 2, "iter_size": 2, "clip_gradients": 4.0,
                "weight_decay": 0.5}, m)
    coeffs = iter([3.0, 5.0])
    info = s.step(lambda: next(coeffs) * w.sum())
    # Caffe: sum 8 -> clipped to 4 (norm 8 > 4) -> /iter_size = 2 -> + 0.5*w = 2.5 -> w = 1 - 0.25
    assert info.grad_norm == pytest.approx(8.0) and info.clipped
    assert float(w.detach()) == pytest.approx(0.75)
    assert info.loss == pytest.approx(4.0)  # mean of the two pass losses (3, 5)


def test_clip_gradients_helper():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert clip_gradients([a, b], 10.0) == (5.0, False)
    assert clip_gradients([a, b], 1.0) == (5.0, True)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(b.grad, torch.tensor([0.8]))


def test_smoothed_loss_averages_the_window():
    m = Three()
    s = Solver({**BASE, "average_loss": 2}, m)
    x = torch.ones(1, 2)
    losses = iter([torch.tensor(1.0), torch.tensor(3.0), torch.tensor(7.0)])
    out = [s.step(lambda: next(losses) + 0 * m(x).sum()).smoothed_loss for _ in range(3)]
    assert out == [1.0, 2.0, 5.0]


def test_poly_schedule_with_caffe_momentum_end_to_end():
    """The Solver's SGD follows Caffe's V = m V + lr(it) g, with lr from the policy."""
    w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    m = nn.Module()
    m.w = w
    s = Solver({"base_lr": 0.1, "max_iter": 4, "lr_policy": "poly", "power": 1.0, "momentum": 0.9}, m)
    ref_w, ref_v = 1.0, 0.0
    while not s.done:
        rate = 0.1 * (1 - s.iter / 4)
        ref_v = 0.9 * ref_v + rate * ref_w
        ref_w -= ref_v
        s.step(lambda: 0.5 * (w ** 2).sum())
        assert float(w.detach()) == pytest.approx(ref_w, abs=1e-15)
    assert s.iter == 4


def test_adam_matches_torch_adam_with_coupled_decay():
    torch.manual_seed(0)
    m1, m2 = Three(), Three()
    m2.load_state_dict(m1.state_dict())
    s = Solver({"base_lr": 0.01, "max_iter": 3, "type": "Adam", "momentum": 0.9, "momentum2": 0.99,
                "weight_decay": 0.1, "delta": 1e-6}, m1)
    ref = torch.optim.Adam(m2.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    x = torch.randn(5, 2)
    for _ in range(3):
        s.step(lambda: (m1(x) ** 2).sum())
        ref.zero_grad()
        (m2(x) ** 2).sum().backward()
        ref.step()
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(v, m2.state_dict()[k], msg=k)


def test_adamw_gets_decoupled_decay_per_group():
    m = Three()
    s = Solver({"base_lr": 0.01, "max_iter": 3, "type": "AdamW", "momentum": 0.9, "weight_decay": 0.1},
               m, {"a.bias": (1, 0)})
    wd = {tuple(g["names"]): g["weight_decay"] for g in s.optimizer.param_groups}
    assert wd[("a.bias",)] == 0.0 and 0.1 in wd.values()
    assert isinstance(s.optimizer, torch.optim.AdamW)


@pytest.mark.parametrize("kind, cls, check", [
    ("AdaGrad", torch.optim.Adagrad, lambda d: d["eps"] == 1e-7),
    ("RMSProp", torch.optim.RMSprop, lambda d: d["alpha"] == 0.95 and d["eps"] == 1e-7),
    ("AdaDelta", torch.optim.Adadelta, lambda d: d["rho"] == 0.9 and d["eps"] == 1e-7),
])
def test_other_caffe_types_map_their_hyperparameters(kind, cls, check):
    momentum = 0.0 if kind == "RMSProp" else 0.9
    s = Solver({"base_lr": 1.0, "max_iter": 1, "type": kind, "delta": 1e-7, "rms_decay": 0.95,
                "momentum": momentum}, Three())
    assert isinstance(s.optimizer, cls) and check(s.optimizer.defaults)
    assert all(g["weight_decay"] == 0.0 for g in s.optimizer.param_groups)


def test_adagrad_step_is_caffes_formula():
    w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    m = nn.Module()
    m.w = w
    s = Solver({"base_lr": 0.5, "max_iter": 2, "type": "AdaGrad", "delta": 1e-8}, m)
    s.step(lambda: 2.0 * w.sum())  # g = 2: h = 4, w -= 0.5 * 2 / (2 + 1e-8)
    assert float(w.detach()) == pytest.approx(1 - 0.5 * 2 / (2 + 1e-8), abs=1e-15)


# ----------------------------------------------------------------------------- state and schedule


def test_resume_from_state_dict_continues_exactly():
    torch.manual_seed(0)
    x = torch.randn(6, 2)
    conf = {"base_lr": 0.05, "max_iter": 6, "lr_policy": "step", "gamma": 0.5, "stepsize": 2,
            "momentum": 0.9, "weight_decay": 1e-3, "average_loss": 3}

    def run(model, solver, n):
        for _ in range(n):
            solver.step(lambda: (model(x) ** 2).mean())

    ref = Three()
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    s_ref = Solver(conf, ref)
    run(ref, s_ref, 6)

    a = Three()
    a.load_state_dict(init)
    s_a = Solver(conf, a)
    run(a, s_a, 3)
    state, weights = s_a.state_dict(), {k: v.clone() for k, v in a.state_dict().items()}
    b = Three()
    b.load_state_dict(weights)
    s_b = Solver(conf, b)
    s_b.load_state_dict(state)
    assert s_b.iter == 3 and s_b.smoothed_loss == s_a.smoothed_loss
    run(b, s_b, 3)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, msg=k)
    with pytest.raises(PacnetValueError, match="cannot resume"):
        Solver({**conf, "type": "Adam"}, Three()).load_state_dict(state)


def test_schedule_helpers_follow_caffes_solver_loop():
    s = Solver({**BASE, "max_iter": 10, "test_interval": 4, "snapshot": 5, "display": 3}, Three())
    tests, snaps, shown = [], [], []
    while not s.done:
        if s.should_test():
            tests.append(s.iter)
        s.zero_grad()
        s.apply(1.0)
        if s.should_display():
            shown.append(s.iter - 1)
        if s.should_snapshot():
            snaps.append(s.iter)
    assert tests == [0, 4, 8] and snaps == [5, 10] and shown == [0, 3, 6, 9]
    assert not s.snapshot_at_end()  # iteration 10 was just snapshotted
    assert not s.test_at_end()
    s2 = Solver({**BASE, "max_iter": 3, "test_interval": 3, "test_initialization": False}, Three())
    assert not s2.should_test()
    s2.iter = 3
    assert s2.snapshot_at_end() and s2.test_at_end()


def test_resume_takes_hyperparameters_from_the_config_and_history_from_the_state():
    torch.manual_seed(0)
    m = Three()
    s = Solver({"base_lr": 0.1, "max_iter": 5, "momentum": 0.9}, m)
    s.step(lambda: m(torch.ones(1, 2)).sum())
    state = s.state_dict()
    s2 = Solver({"base_lr": 0.1, "max_iter": 5, "momentum": 0.5}, m)
    s2.load_state_dict(state)
    assert all(g["momentum"] == 0.5 for g in s2.optimizer.param_groups)
    buffers = [s2.optimizer.state[p]["momentum_buffer"] for p in s2.params]
    assert all(float(b.abs().sum()) > 0 for b in buffers)
