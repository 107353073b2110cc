"""Device-side helpers shared by several kernels: ``@triton.jit`` functions called only from kernels.

Naming rule (all of vit_kernels/ops): ``_<name>_kernel`` is a kernel, launched from the host; ``tl_<name>``
is a device helper, called inside kernels (here when more than one op file uses it, else in its op file);
every other function is host code.
"""
import triton
import triton.language as tl


# --- elementwise -----------------------------------------------------------------------------------------
@triton.jit
def tl_gelu(x, APPROXIMATE_TANH: tl.constexpr):
    if APPROXIMATE_TANH:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(y) = 2 sigmoid(2y) - 1
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def tl_gelu_fast(x):
    """Exact GELU with erf from Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7): one exp2 and one approximate
    reciprocal, no libdevice erff. Its fp32 error vs fp64 matches PyTorch's fp32 erf (~7e-7 over [-12, 12],
    benchmarks/gelu_numerics.py); NaN and +-inf behave as the erf form."""
    z = tl.abs(x) * 0.7071067811865476
    t = tl.fdiv(1.0, 1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    e = 1.0 - poly * tl.exp2(-z * z * 1.4426950408889634)
    return 0.5 * x * (1.0 + tl.where(x >= 0, e, -e))


@triton.jit
def tl_activation(x, ACTIVATION: tl.constexpr, FAST_GELU: tl.constexpr):
    """x (fp32) through an elementwise activation: ``"gelu"`` (erf; FAST_GELU: tl_gelu_fast), ``"gelu_tanh"``,
    ``"quick_gelu"`` (x sigmoid(1.702 x): OpenAI CLIP), ``"silu"`` (x sigmoid(x)); any other value (None)
    leaves x as is."""
    if ACTIVATION == "gelu" and FAST_GELU:
        x = tl_gelu_fast(x)
    elif ACTIVATION == "gelu":
        x = tl_gelu(x, False)
    elif ACTIVATION == "gelu_tanh":
        x = tl_gelu(x, True)
    elif ACTIVATION == "quick_gelu":
        x = x * tl.sigmoid(1.702 * x)
    elif ACTIVATION == "silu":
        x = x * tl.sigmoid(x)
    return x


# --- dropout RNG: Philox on (seed, row, column, stream); backward regenerates the same mask ------------------
@triton.jit
def tl_dropout_keep(seed, rows, cols, stream, p):
    """[R, C] True where element (rows[r], cols[c]) of ``stream`` survives dropout at rate p.
    rows: int32 indices; cols: contiguous int32 indices starting at a multiple of 4 (every tile here).
    One Philox call, counter (col // 4, row, stream, 0), gives the four words of columns 4q .. 4q + 3:
    a quarter of the rounds of one call per element."""
    R: tl.constexpr = rows.shape[0]
    C: tl.constexpr = cols.shape[0]
    quads = tl.min(tl.reshape(cols, (C // 4, 4)), axis=1) // 4
    zero = rows[:, None] * 0 + quads[None, :] * 0
    w0, w1, w2, w3 = tl.random.philox(seed, quads[None, :] + zero, rows[:, None] + zero, zero + stream, zero)
    # [R, C/4, 2, 2] with [.., a, b] = word 2a + b, flattened in order: column 4q + k gets word k
    bits = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (R, C))
    return tl.random.uint_to_uniform_float(bits) >= p


@triton.jit
def tl_apply_dropout(x, seed, rows, cols, stream, p, keep_scale):
    """x [R, C] (fp32) with dropped elements zeroed and survivors scaled by keep_scale = 1 / (1 - p)."""
    return tl.where(tl_dropout_keep(seed, rows, cols, stream, p), x * keep_scale, 0.0)


# --- row statistics ---------------------------------------------------------------------------------------
@triton.jit
def tl_normalize_rows(x, cols, E, w_ptr, b_ptr, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """LayerNorm of x: fp32 [ROWS, BLOCK_E] with zeros past E. Returns (y, mean, rstd), statistics in fp32."""
    col_mask = cols < E
    mean = tl.sum(x, axis=1) / E
    centered = tl.where(col_mask[None, :], x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / E + eps)
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return y, mean, rstd


# --- attention: reading the fused qkv buffer in place ---------------------------------------------------------
@triton.jit
def tl_qkv_bases(qkv_ptr, b, h, E, stride_b, offs_d, D: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Pointers to head h's q, k and v features of sample b, and the feature offsets of offs_d.
    Compile-time feature strides keep address math cheap (and vectorized for the grouped layout)."""
    if INTERLEAVED:  # (h d qkv): feature = (h * D + d) * 3 + s
        q_base = qkv_ptr + b * stride_b + h * 3 * D
        return q_base, q_base + 1, q_base + 2, offs_d * 3
    q_base = qkv_ptr + b * stride_b + h * D  # (qkv h d): feature = s * E + h * D + d
    return q_base, q_base + E, q_base + 2 * E, offs_d


@triton.jit
def tl_allowed_keys(mask_rows, row_ok, cols, N, HAS_MASK: tl.constexpr):
    """[rows, cols] True where a query may attend a key: both in range and, with a mask, allowed by it.
    mask_rows: [rows, 1] pointers to each query's mask row (the launcher makes the key axis contiguous)."""
    ok = row_ok[:, None] & (cols[None, :] < N)
    if HAS_MASK:
        ok = ok & (tl.load(mask_rows + cols[None, :], mask=ok, other=0) != 0)
    return ok


@triton.jit
def tl_query_tile(qkv_ptr, mask_ptr, N, H, E, stride_b, stride_n, stride_mb, stride_mh, stride_mq, D: tl.constexpr,
                  INTERLEAVED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch x head, query tile) on a 1-D grid, query tiles of one (batch, head) adjacent (no
    grid-axis limit, K/V stay hot in L2). Returns bh, the query rows and their in-range flags, the loaded Q
    tile, the K and V bases with the feature offsets and mask, and each query row's mask pointer."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_M)
    bh = pid // n_tiles
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = (pid % n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_base, k_base, v_base, d_off = tl_qkv_bases(qkv_ptr, b, h, E, stride_b, offs_d, D, INTERLEAVED)
    row_ok = offs_m < N
    q = tl.load(q_base + offs_m[:, None] * stride_n + d_off[None, :], mask=row_ok[:, None] & d_mask[None, :],
                other=0.0)
    mask_rows = mask_ptr + b * stride_mb + h * stride_mh + offs_m[:, None].to(tl.int64) * stride_mq
    return bh, b, h, offs_m, row_ok, q, k_base, v_base, d_off, d_mask, mask_rows


# --- programmatic dependent launch (ops/pdl.py) ---------------------------------------------------------
@triton.jit
def tl_prefetch_rows(ptr, rows, stride, K):
    """Ask L2 for every 128-byte line of ``rows`` (int64 [R]) x K elements of a row-major matrix: issued before
    a dependent launch's wait, while the previous kernel still runs. A prefetch returns nothing to registers,
    so it cannot read a stale value: the loads after the wait see the previous kernel's writes. Eight lines of
    each row per step (one line per step spilled the 128x256 tile's registers, compile check, triton 3.8)."""
    LINE: tl.constexpr = 1024 // ptr.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
    LINES: tl.constexpr = 8
    offs = tl.arange(0, LINES) * LINE
    for k in range(tl.cdiv(K, LINE * LINES)):
        cols = tl.minimum(k * LINE * LINES + offs, K - 1)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptr + rows[:, None] * stride +
                                  cols[None, :]], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def tl_dependent_launch_wait(PDL: tl.constexpr, w_ptr, rows, stride_w, K):
    """PDL=1: wait for the previous kernel (its writes visible) before this kernel reads or writes anything;
    PDL=2: first prefetch this program's weight rows into L2 (weights are never the previous kernel's output
    in a forward, and a prefetch is only a hint). PDL=0: nothing (no griddepcontrol: sm_80 lacks it)."""
    if PDL == 2:
        tl_prefetch_rows(w_ptr, rows, stride_w, K)
    if PDL:
        tl.extra.cuda.gdc_wait()


# --- backward ---------------------------------------------------------------------------------------------
@triton.jit
def tl_activation_grad(x, ACTIVATION: tl.constexpr):
    """d activation / dx at x (fp32), for tl_activation's activations (swiglu excepted): exact GELU Phi(x) +
    x phi(x); the tanh approximation's own derivative; x sigmoid(a x): s + a x s (1 - s) (a = 1.702 quick_gelu,
    1 silu); None: 1."""
    if ACTIVATION == "gelu":
        return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACTIVATION == "gelu_tanh":
        t = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x)) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACTIVATION == "quick_gelu":
        s = tl.sigmoid(1.702 * x)
        return s + 1.702 * x * s * (1.0 - s)
    elif ACTIVATION == "silu":
        s = tl.sigmoid(x)
        return s + x * s * (1.0 - s)
    return x * 0.0 + 1.0
