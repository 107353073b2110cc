"""The fused GEMM (bias, GELU erf/tanh, layer scale, residual, q/k/v de-interleave, weight row blocks) against
PyTorch."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from vit_kernels import ops
from vit_kernels.ops.linear import linear_torch

from helpers import DTYPES, assert_matches, randn

SHAPES = [(1, 1, 1), (37, 70, 50), (130, 96, 48), (5, 300, 33), (2, 26, 40, 24)]  # [..., M, N, K] odd sizes


def operands(shape, dtype, device, bias=True, scale=False, residual=False):
    *lead, n, k = shape
    x = randn(*lead, k, dtype=dtype, device=device)
    w = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
    b = randn(n, dtype=dtype, device=device) if bias else None
    s = randn(n, dtype=dtype, device=device) if scale else None
    r = randn(*lead, n, dtype=dtype, device=device) if residual else None
    return x, w, b, s, r


def check(shape, dtype, device, activation=None, deinterleave=1, **flags):
    x, w, b, s, r = operands(shape, dtype, device, **flags)
    got = ops.linear(x, w, b, activation=activation, scale=s, residual=r, deinterleave=deinterleave)
    as64 = [None if t is None else t.double() for t in (x, w, b, s, r)]
    expected = linear_torch(*as64[:2], as64[2], activation, as64[3], as64[4], deinterleave)
    lowp = linear_torch(x, w, b, activation, s, r, deinterleave)
    assert got.dtype == dtype
    assert_matches(got, lowp, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_plain_and_bias(shape, dtype, device):
    check(shape, dtype, device, bias=False)
    check(shape, dtype, device, bias=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(37, 70, 50), (2, 26, 40, 24)])
def test_gelu_epilogues(shape, activation, dtype, device):
    check(shape, dtype, device, activation=activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 70, 50), (130, 96, 48)])
def test_scale_and_residual_epilogues(shape, dtype, device):
    check(shape, dtype, device, residual=True)
    check(shape, dtype, device, scale=True, residual=True)
    check(shape, dtype, device, activation="gelu", scale=True, residual=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deinterleave_writes_grouped_columns(dtype, device):
    check((2, 26, 72 * 3, 72), dtype, device, deinterleave=3)
    x, w, b, _, _ = operands((9, 3 * 24, 24), torch.float32, device)
    got = ops.linear(x, w, b, deinterleave=3)
    plain = ops.linear(x, w, b)
    torch.testing.assert_close(got, plain.view(9, 24, 3).transpose(1, 2).reshape(9, 72))


def test_non_contiguous_input(device):
    x = randn(40, 30, device=device).t()  # [30, 40], feature stride != 1
    w = randn(20, 40, device=device)
    torch.testing.assert_close(ops.linear(x, w), x @ w.t(), rtol=1e-4, atol=1e-4)


def test_strided_vectors(device):
    """Bias, scale and bias blocks that are strided views (stride 2) are read by element, not by memory slot."""
    x, w, _, _, _ = operands((9, 24, 20), torch.float32, device)
    b, s = randn(48, device=device)[::2], randn(48, device=device)[::2]
    torch.testing.assert_close(ops.linear(x, w, b, scale=s), F.linear(x, w, b) * s, rtol=1e-4, atol=1e-4)
    ws, bs = blocks_of((24, 24), 20, torch.float32, device)
    bs[1] = randn(48, device=device)[1::2]
    torch.testing.assert_close(ops.linear(x, ws, bs), F.linear(x, torch.cat(ws), torch.cat(bs)), rtol=1e-4,
                               atol=1e-4)


def test_kernel_ran_and_poisoned_output_fully_written(device):
    ops.reset_launch_counts()
    x, w, b, _, _ = operands((65, 33, 17), torch.float32, device)
    y = ops.linear(x, w, b)
    assert ops.launch_counts() == {"linear": 1}
    assert torch.isfinite(y).all()


def test_empty_batch(device):
    x, w, b, _, _ = operands((0, 8, 4), torch.float32, device)
    assert ops.linear(x, w, b).shape == (0, 8)


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w: ops.linear(x[0, 0], w), ValueError, "at least 2 dimensions"),
    (lambda x, w: ops.linear(x, w[:, :5]), ValueError, "features but weight expects"),
    (lambda x, w: ops.linear(x, w.half()), TypeError, "must match the input"),
    (lambda x, w: ops.linear(x.long(), w), TypeError, "supported: float32"),
    (lambda x, w: ops.linear(x, w, torch.ones(3)), ValueError, "bias has 3 elements"),
    (lambda x, w: ops.linear(x, w, activation="relu"), ValueError, "activation must be one of"),
    (lambda x, w: ops.linear(x, w, residual=torch.ones(4, 6)), ValueError, "residual has shape"),
    (lambda x, w: ops.linear(x, w, scale=torch.ones(7, 1)), ValueError, "scale must have 1 dimensions"),
    (lambda x, w: ops.linear(x, w, deinterleave=4), ValueError, "deinterleave must be"),
    (lambda x, w: ops.linear(x, "w"), TypeError, "weight must be a torch.Tensor"),
])
def test_bad_input(call, error, match):
    x, w = torch.randn(2, 4, 10), torch.randn(6, 10)
    with pytest.raises(error, match=match):
        call(x, w)


@pytest.mark.parametrize("split", [False, True])
def test_both_epilogue_paths(split, device):
    """The split (two column halves) and the whole-tile epilogue, pinned instead of autotuned."""
    from vit_kernels.ops.launch import config
    from vit_kernels.ops.linear import linear_launch

    x, w, b, s, r = operands((70, 96, 40), torch.float32, device, scale=True, residual=True)
    cfg = config(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, SPLIT_EPILOGUE=split)
    for activation in (None, "gelu"):
        got = linear_launch(x, w, b, activation, s, r, deinterleave=3, config=cfg)
        torch.testing.assert_close(got, linear_torch(x, w, b, activation, s, r, 3), rtol=1e-4, atol=1e-4)


# --- weight (and bias) as row blocks, read in place: Hugging Face's separate q/k/v Linears ----------------------
def blocks_of(rows, k, dtype, device, bias=True, strided=False):
    """Weight blocks [n_i, k] and bias blocks [n_i]; strided: block 2 is a column slice (row stride k + 7)."""
    ws = [randn(n, k, dtype=dtype, device=device, scale=k ** -0.5) for n in rows]
    if strided and len(ws) > 1:
        ws[1] = randn(rows[1], k + 7, dtype=dtype, device=device, scale=k ** -0.5)[:, :k]
    bs = [randn(n, dtype=dtype, device=device) for n in rows] if bias else None
    return ws, bs


def check_blocks(lead, k, rows, dtype, device, bias=True, strided=False, activation=None, scale=False,
                 residual=False):
    x = randn(*lead, k, dtype=dtype, device=device)
    ws, bs = blocks_of(rows, k, dtype, device, bias, strided)
    n = sum(rows)
    s = randn(n, dtype=dtype, device=device) if scale else None
    r = randn(*lead, n, dtype=dtype, device=device) if residual else None
    ops.reset_launch_counts()
    got = ops.linear(x, tuple(ws), None if bs is None else tuple(bs), activation=activation, scale=s, residual=r)
    assert ops.launch_counts() == {"linear": 1}  # one GEMM over all blocks, nothing else (no concatenation)

    def d(t):
        return None if t is None else t.double()

    expected = linear_torch(x.double(), torch.cat([w.double() for w in ws]),
                            None if bs is None else torch.cat([b.double() for b in bs]), activation, d(s), d(r))
    lowp = linear_torch(x, torch.cat(ws), None if bs is None else torch.cat(bs), activation, s, r)
    assert got.dtype == dtype and got.shape == (*lead, n)
    assert_matches(got, lowp, expected)


# E=24 blocks of 24 rows with the interpreter's BLOCK_N=32: column tiles straddle the block boundaries
BLOCK_CASES = [((9,), 24, (24, 24, 24)), ((2, 9), 24, (24, 24, 24)), ((37,), 33, (5, 17, 30)),
               ((9,), 40, (24, 40)), ((9,), 20, (8, 0, 8)), ((1,), 1, (1, 1, 1))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,rows", BLOCK_CASES)
def test_weight_blocks_equal_their_concatenation(lead, k, rows, dtype, device):
    check_blocks(lead, k, rows, dtype, device, bias=True)
    check_blocks(lead, k, rows, dtype, device, bias=False, strided=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_weight_blocks_with_gelu_scale_and_residual(activation, dtype, device):
    check_blocks((2, 9), 24, (24, 24, 24), dtype, device, activation=activation, residual=True)
    check_blocks((37,), 33, (5, 17, 30), dtype, device, activation=activation, scale=True, residual=True)


def test_weight_blocks_single_block_list_is_the_plain_call(device):
    x, w, b, _, _ = operands((9, 24, 24), torch.float32, device)
    torch.testing.assert_close(ops.linear(x, [w], [b]), ops.linear(x, w, b), rtol=0, atol=0)
    torch.testing.assert_close(ops.linear(x, [w], [None]), ops.linear(x, w), rtol=0, atol=0)
    torch.testing.assert_close(ops.linear(x, [w], [b], deinterleave=3), ops.linear(x, w, b, deinterleave=3))


@pytest.mark.parametrize("split", [False, True])
def test_weight_blocks_every_epilogue_equals_the_concatenated_weight(split, device):
    """Bias, GELU, dropout (same seed: the same mask), scale, stochastic depth and residual, both epilogue
    paths pinned: the blocks give the same output as one launch on the concatenated weight and bias."""
    from vit_kernels.ops.dropout import new_seed
    from vit_kernels.ops.launch import config
    from vit_kernels.ops.linear import linear_launch

    x = randn(70, 40, device=device)
    ws, bs = blocks_of((24, 24, 24), 40, torch.float32, device, strided=True)
    s, r = randn(72, device=device), randn(70, 72, device=device)
    factors = torch.tensor([0.0, 1.25], device=device)
    cfg = config(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, SPLIT_EPILOGUE=split)
    seed = new_seed()
    for activation, p, branch in ((None, 0.0, None), ("gelu", 0.3, factors), ("gelu_tanh", 0.0, factors)):
        args = (activation, s, r, 1, p, seed if p else None, branch)
        got = linear_launch(x, ws[0], bs[0], *args, ws[1], ws[2], bs[1], bs[2], config=cfg)
        expected = linear_launch(x, torch.cat(ws), torch.cat(bs), *args, config=cfg)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    two = linear_launch(x, ws[0], None, "gelu", weight2=ws[1], config=cfg)
    torch.testing.assert_close(two, linear_launch(x, torch.cat(ws[:2]), None, "gelu", config=cfg), rtol=1e-6,
                               atol=1e-6)


def test_weight_blocks_public_dropout_and_stochastic_depth(device):
    x = randn(2, 9, 24, device=device)
    ws, bs = blocks_of((24, 24, 24), 24, torch.float32, device)
    factors = torch.tensor([0.0, 2.0], device=device)
    got = ops.linear(x, ws, bs, activation="gelu", dropout=0.4, branch_scale=factors)
    dense = linear_torch(x, ws, bs, "gelu")
    assert (got[0] == 0).all()
    kept = got[1] != 0
    assert 0.4 < kept.float().mean() < 0.8
    torch.testing.assert_close(got[1][kept], (dense[1] * 2.0 / 0.6)[kept], rtol=1e-4, atol=1e-4)


def test_weight_blocks_torch_fallback(device):
    x = randn(2, 9, 24, device=device)
    ws, bs = blocks_of((24, 17, 24), 24, torch.float32, device)
    with ops.use_backend("torch"):
        got = ops.linear(x, ws, bs, activation="gelu")
    torch.testing.assert_close(got, F.gelu(F.linear(x, torch.cat(ws), torch.cat(bs))))


@pytest.mark.parametrize("activation,scale", [(None, False), ("gelu", True)])
def test_weight_blocks_gradients_reach_every_block(activation, scale, device):
    """x, every weight block, every bias block, the scale and the residual: the same gradients as autograd
    through torch.cat and F.linear (fp32)."""
    x = randn(2, 9, 24, device=device, grad=True)
    ws, bs = blocks_of((24, 24, 24), 24, torch.float32, device)
    ws, bs = [w.requires_grad_() for w in ws], [b.requires_grad_() for b in bs]
    s = randn(72, device=device, grad=True) if scale else None
    r = randn(2, 9, 72, device=device, grad=True)
    inputs = [x, *ws, *bs, r] + ([s] if scale else [])
    g = randn(2, 9, 72, device=device)
    ops.reset_launch_counts()
    got = ops.linear(x, ws, bs, activation=activation, scale=s, residual=r)
    grads = torch.autograd.grad((got * g).sum(), inputs)
    assert ops.launch_counts()["linear"] == 1  # backward reads the pre-activation the forward saved
    expected = linear_torch(x, torch.cat(ws), torch.cat(bs), activation, s, r)
    expected_grads = torch.autograd.grad((expected * g).sum(), inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for i, (a, e) in enumerate(zip(grads, expected_grads)):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"input {i}: {m}")


def test_weight_blocks_gradients_when_only_later_blocks_require_grad(device):
    """Only the key/value blocks are trainable: the op must still record the graph for them."""
    x = randn(9, 24, device=device)
    ws, bs = blocks_of((24, 24, 24), 24, torch.float32, device)
    ws[2].requires_grad_()
    bs[1].requires_grad_()
    out = ops.linear(x, ws, bs)
    assert out.requires_grad
    dw, db = torch.autograd.grad(out.square().sum(), [ws[2], bs[1]])
    ref_ws, ref_bs = [w.detach().clone().requires_grad_() for w in ws], [b.detach().clone().requires_grad_()
                                                                          for b in bs]
    ref = F.linear(x, torch.cat(ref_ws), torch.cat(ref_bs))
    ref.square().sum().backward()
    torch.testing.assert_close(dw, ref_ws[2].grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db, ref_bs[1].grad, rtol=1e-4, atol=1e-4)


def test_weight_blocks_compile_fullgraph(device):
    """torch.compile(fullgraph=True) traces the blocks through the custom op: no graph break, same values and
    gradients as eager."""
    torch._dynamo.reset()
    x = randn(2, 9, 24, device=device)
    ws, bs = blocks_of((24, 24, 24), 24, torch.float32, device)
    params = [torch.nn.Parameter(t) for t in (*ws, *bs)]

    def qkv(x):
        return ops.linear(x, params[:3], params[3:], activation="gelu")

    eager = qkv(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), params)
    compiled = torch.compile(qkv, fullgraph=True)(x)
    grads = torch.autograd.grad(compiled.square().sum(), params)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_weight_blocks_are_read_fresh_on_every_call(device):
    """No cached concatenation: writing one block's .data between calls changes the next output."""
    x = randn(9, 24, device=device)
    ws, bs = blocks_of((24, 24, 24), 24, torch.float32, device)
    params = [torch.nn.Parameter(t) for t in (*ws, *bs)]
    wq, wk, wv, bq, bk, bv = params
    first = ops.linear(x, (wq, wk, wv), (bq, bk, bv))
    torch.testing.assert_close(first, F.linear(x, torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv])))
    with torch.no_grad():
        wk.data.mul_(-2)
        bv.data.add_(1.0)
        second = ops.linear(x, (wq, wk, wv), (bq, bk, bv))
        torch.testing.assert_close(second, F.linear(x, torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv])))
    torch.testing.assert_close(second[:, 24:48], -2 * first[:, 24:48] + 3 * bk.detach())
    torch.testing.assert_close(second[:, 48:], first[:, 48:] + 1.0)


def test_weight_blocks_empty_batch(device):
    ws, bs = blocks_of((4, 4, 4), 8, torch.float32, device)
    assert ops.linear(randn(0, 8, device=device), ws, bs).shape == (0, 12)


@pytest.mark.parametrize("call,error,match", [
    (lambda x, ws, bs: ops.linear(x, []), ValueError, "1 to 3 tensors, got 0"),
    (lambda x, ws, bs: ops.linear(x, [*ws, ws[0]]), ValueError, "1 to 3 tensors, got 4"),
    (lambda x, ws, bs: ops.linear(x, [ws[0], ws[1][:, :5], ws[2]]), ValueError, r"weight\[1\] expects 5"),
    (lambda x, ws, bs: ops.linear(x, [ws[0], ws[1], ws[2].half()]), TypeError, r"weight\[2\] has dtype"),
    (lambda x, ws, bs: ops.linear(x, [ws[0], ws[1].to("meta"), ws[2]]), ValueError, r"weight\[1\] is on meta"),
    (lambda x, ws, bs: ops.linear(x, [ws[0], "w", ws[2]]), TypeError, r"weight\[1\] must be a torch\.Tensor"),
    (lambda x, ws, bs: ops.linear(x, [ws[0], ws[1][0], ws[2]]), ValueError, r"weight\[1\] must have 2 dim"),
    (lambda x, ws, bs: ops.linear(x, ws, bs[:2]), ValueError, "bias has 2 blocks but weight has 3"),
    (lambda x, ws, bs: ops.linear(x, ws, [bs[0], None, bs[2]]), ValueError, "all tensors or all None"),
    (lambda x, ws, bs: ops.linear(x, ws, torch.cat(bs)), TypeError, "bias must be None or a tuple/list"),
    (lambda x, ws, bs: ops.linear(x, ws[0], bs), TypeError, "bias is a tuple/list of blocks but weight is"),
    (lambda x, ws, bs: ops.linear(x, ws, [bs[0], bs[1][:3], bs[2]]), ValueError, r"bias\[1\] has 3 elements"),
    (lambda x, ws, bs: ops.linear(x, ws, [bs[0], bs[1].half(), bs[2]]), TypeError, r"bias\[1\] has dtype"),
    (lambda x, ws, bs: ops.linear(x, ws, [bs[0], bs[1], bs[2].to("meta")]), ValueError, r"bias\[2\] is on meta"),
    (lambda x, ws, bs: ops.linear(x, ws, bs, deinterleave=3), ValueError, "cannot combine with 3 weight blocks"),
    (lambda x, ws, bs: ops.linear(x, ws, bs, scale=torch.ones(6)), ValueError, "scale has 6 elements, expected 18"),
    (lambda x, ws, bs: ops.linear(x, ws, bs, residual=torch.ones(2, 4, 6)), ValueError, "residual has shape"),
])
def test_weight_blocks_bad_input(call, error, match):
    x = torch.randn(2, 4, 10)
    ws, bs = [torch.randn(6, 10) for _ in range(3)], [torch.randn(6) for _ in range(3)]
    with pytest.raises(error, match=match):
        call(x, ws, bs)


def test_weight_blocks_launcher_rejects_inconsistent_blocks():
    from vit_kernels.ops.linear import linear_launch

    x, w, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)
    with pytest.raises(ValueError, match="weight3 is given without weight2"):
        linear_launch(x, w, weight3=w)
    with pytest.raises(ValueError, match="as many bias blocks"):
        linear_launch(x, w, b, weight2=w)
    with pytest.raises(ValueError, match="as many bias blocks"):
        linear_launch(x, w, None, weight2=w, bias2=b)


@pytest.mark.parametrize("grad", [False, True])
def test_outputs_are_no_views(device, grad):
    """Outputs over leading dims are allocated with them, not views of a 2-D result: a model's blocks return
    them, and FSDP2 warns of (and an in-place op on a view would skip) its pre-backward hook."""
    x = torch.randn(2, 5, 8, device=device, requires_grad=grad)
    w, b = torch.randn(6, 8, device=device, requires_grad=grad), torch.randn(6, device=device)
    res = torch.randn(10, 6, device=device)  # a residual given as rows
    with torch.set_grad_enabled(grad):
        outs = [ops.linear(x, w, b, activation="gelu"), ops.linear(x, w, b, scale=b, residual=res),
                ops.linear(x, w, b, residual=res.view(2, 5, 6), norm_stats=True)[0],
                ops.layer_norm_linear(x, None, None, w, b, activation="gelu"),
                ops.linear(x[0], w, b)]
    assert [tuple(out.shape) for out in outs] == [(2, 5, 6)] * 4 + [(5, 6)]
    assert all(out._base is None for out in outs)
    expected = torch.nn.functional.linear(x, w, b) * b + res.view(2, 5, 6)
    torch.testing.assert_close(outs[1], expected, rtol=1e-5, atol=1e-5)
    if grad:
        outs[1].sum().backward()
        assert x.grad.shape == x.shape


def test_custom_op_residual_must_have_the_output_shape(device):
    """The ops return dy as the residual's gradient, so a residual of another shape (rows for 3-D x) is refused
    (the public ops give it x's leading dims themselves)."""
    linear_module = importlib.import_module("vit_kernels.ops.linear")
    x, w = torch.randn(3, 5, 16, device=device), torch.randn(24, 16, device=device)
    with pytest.raises(ValueError, match=r"residual has shape \(15, 24\); it must have the output's, \(3, 5, 24\)"):
        linear_module.linear_launch(x, w, residual=torch.randn(15, 24, device=device))
