"""Finite-difference checks of every op's analytic backward, needing no reference implementation.

The kernels accumulate in fp32 whatever the input dtype, so ``torch.autograd.gradcheck`` in float64 cannot
pass (its finite differences resolve far below fp32 rounding), and its fp32 ``fast_mode`` normalizes the
probe vectors until a wrong gradient hides under the absolute tolerance (tried: a backward that skipped the
dropout mask passed), while the full Jacobian takes many minutes in the interpreter. So: for each input
separately, a few random directions u, compare the analytic directional derivative <dL/dx, u> of
L = sum(g * f(x)) with the central difference (L(x + eps u) - L(x - eps u)) / (2 eps), L summed in float64.
With eps = 1e-3 the truncation error is ~1e-6 and fp32 rounding ~1e-3 of |L|'s scale: rtol 1e-2.
The exact comparison against the fp64 reference's gradients is in tests/test_backward.py.
"""
import pytest
import torch

from vit_kernels.ops.registry import registered_ops

EPS, RTOL, DIRECTIONS = 1e-3, 1e-2, 3
DIFFERENTIABLE = [spec.name for spec in registered_ops() if spec.custom_ops]


def gradcheck(fn, *inputs):
    """fn(*inputs) -> a tensor; every input requires grad."""
    out = fn(*inputs)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), inputs)

    def loss(args):
        with torch.no_grad():
            return (fn(*args).double() * g.double()).sum().item()

    for i, (x, grad) in enumerate(zip(inputs, grads)):
        for _ in range(DIRECTIONS):
            u = torch.randn_like(x)
            plus = [t.detach() + EPS * u if j == i else t.detach() for j, t in enumerate(inputs)]
            minus = [t.detach() - EPS * u if j == i else t.detach() for j, t in enumerate(inputs)]
            numeric = (loss(plus) - loss(minus)) / (2 * EPS)
            analytic = (grad.double() * u.double()).sum().item()
            scale = grad.double().norm().item() * u.double().norm().item()  # |<a, u>| can be small by chance
            assert abs(numeric - analytic) <= RTOL * scale + 1e-4, \
                f"input {i}: analytic {analytic:.6g} vs finite difference {numeric:.6g} (scale {scale:.3g})"


def test_the_check_catches_a_wrong_gradient():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            return g * ctx.saved_tensors[0]  # should be 2 x g

    with pytest.raises(AssertionError, match="finite difference"):
        gradcheck(Square.apply, torch.randn(6, dtype=torch.float32).requires_grad_())


@pytest.mark.every_op
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_finite_differences(name, device):
    """Every GradCase of every registered differentiable op: analytic gradients vs central differences."""
    cases = next(spec for spec in registered_ops() if spec.name == name).grad_cases(device)
    assert cases, f"{name} registers custom ops but gives no gradient cases"
    for case in cases:
        try:
            gradcheck(case.fn, *case.inputs)
        except AssertionError as exc:
            raise AssertionError(f"{name} [{case.label}]: {exc}") from None
