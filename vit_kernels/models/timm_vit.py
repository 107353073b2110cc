"""timm ``VisionTransformer`` on the fused kernels, patched in place (``from_timm`` / ``accelerate``).

Patched on the user's own model: each ``Block.forward`` (the fused block), ``patch_embed.forward`` (the fused
patch projection, used by ``forward_intermediates``), the LayerNorms ``norm_pre`` / ``norm`` / ``fc_norm``,
and the model's ``forward_features`` / ``forward_head`` / ``forward`` (patch projection, prefix tokens and
position embedding in one kernel; with token pooling the final LayerNorm runs on the pooled token only).
Everything is read from the model at call time, so ``.eval()``, ``reset_classifier``, ``load_state_dict(...,
assign=True)``, ``.data`` writes, ``set_grad_checkpointing``, hooks and FSDP2 all act as on timm's own model.
Features the kernels cannot compute raise ``NotImplementedError`` when patching, naming the module.
"""
from __future__ import annotations

import functools
import math
import sys

import torch
from torch import nn

from .. import ops
from ._fused import (
    autocast_on,
    caster,
    check_head_dim,
    check_image_batch,
    check_input,
    check_layer_norm,
    check_qk_norm,
    compute_dtype,
    drop_path_factors,
    drop_rate,
    explicit_dtypes,
    is_identity,
    mlp_block,
    norm_linear,
    patch_layer_norm,
    qk_norm_args,
    qk_norm_kind,
    residual_linear,
    self_attention,
)
from .graphs import DEFAULT_BUCKETS, use_cuda_graphs
from .patching import patch
from .pos_embed import image_grid, resample_pos_embed

POOLS = {"token": "token", "avg": "mean"}
DYNAMIC = "vit_kernels_dynamic_img_size"  # from_timm's opt-in / opt-out for other image sizes


def _unsupported(feature: str):
    raise NotImplementedError(f"from_timm: {feature} is not supported by the vit_kernels kernels")


def activation_mode(where: str, act) -> str:
    """The GEMM epilogue computing ``act``: nn.GELU (exact or tanh), timm's GELU / GELUTanh / QuickGELU (OpenAI
    CLIP's x * sigmoid(1.702 x)), nn.SiLU; anything else is refused."""
    if type(act) is nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    mode = _timm_activations().get(type(act))
    if mode is None:
        _unsupported(f"{where} activation {type(act).__name__} (only GELU exact or tanh, QuickGELU, SiLU)")
    return mode


@functools.cache
def _timm_activations() -> dict:
    from timm.layers.activations import GELU, GELUTanh, QuickGELU

    return {GELU: "gelu", GELUTanh: "gelu_tanh", QuickGELU: "quick_gelu", nn.SiLU: "silu"}


def _check_layer_scale(where: str, module) -> None:
    """Identity or timm's LayerScale (a per-feature gamma, which the GEMM epilogue applies)."""
    if not is_identity(module) and (type(module).__name__ != "LayerScale" or not hasattr(module, "gamma")):
        _unsupported(f"{where} of type {type(module).__name__}")


def _same_forward(module, cls) -> bool:
    """``module`` is a ``cls`` running ``cls.forward`` (FSDP2's per-module subclasses keep it)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _check_attn_pool(pool) -> None:
    """timm's AttentionPoolLatent (MAP pooling: SigLIP's head) with what its fused forward computes."""
    from timm.layers import AttentionPoolLatent

    if not _same_forward(pool, AttentionPoolLatent):
        _unsupported(f"attn_pool of type {type(pool).__name__} (only timm's AttentionPoolLatent)")
    if getattr(pool, "pos_embed", None) is not None:
        _unsupported("attn_pool with pos_embed='abs'")
    if pool.pool not in ("token", "avg"):
        _unsupported(f"attn_pool pool_type={pool.pool!r}")
    check_qk_norm("from_timm: attn_pool", pool.q_norm, pool.k_norm)
    if qk_norm_kind(pool.q_norm) not in (None, "layer"):
        _unsupported("attn_pool qk_norm other than LayerNorm")
    if not math.isclose(pool.scale, pool.head_dim ** -0.5, rel_tol=1e-6):
        _unsupported(f"attn_pool scale {pool.scale} (only head_dim ** -0.5)")
    check_head_dim("from_timm: attn_pool", pool.kv.out_features // 2, pool.num_heads)
    if pool.mlp is not None:
        check_layer_norm("from_timm: attn_pool.norm", pool.norm, allow_identity=True)
        check_mlp("attn_pool.mlp", pool.mlp)


def _check_head(model) -> None:
    if getattr(model, "attn_pool", None) is not None:
        _check_attn_pool(model.attn_pool)
    elif model.global_pool not in POOLS:
        _unsupported(f"global_pool={model.global_pool!r} (supported: 'token', 'avg', 'map')")
    if not (is_identity(model.head) or isinstance(model.head, nn.Linear)):
        _unsupported(f"head of type {type(model.head).__name__}")


def check_supported(model) -> None:
    """Everything the fused forward would fail on, refused now, naming the module and the feature."""
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"from_timm expects a timm VisionTransformer, got {type(model).__name__}")
    _check_head(model)
    check_patch_embed(model.patch_embed)
    for name in ("norm_pre", "norm", "fc_norm"):
        check_layer_norm(f"from_timm: {name}", getattr(model, name), allow_identity=True)
    for i, blk in enumerate(model.blocks):
        where = f"blocks.{i}"
        if not _same_forward(blk, Block):
            _unsupported(f"{where} of type {type(blk).__name__} (only timm's pre-norm Block)")
        attn, mlp = blk.attn, blk.mlp
        if not _same_forward(attn, Attention):
            _unsupported(f"{where}.attn of type {type(attn).__name__}")
        if attn.qkv.in_features != attn.proj.out_features or attn.attn_dim != attn.proj.out_features:
            _unsupported(f"{where}.attn with attn_dim != embed_dim")
        check_attention(f"{where}.attn", attn, attn.attn_dim)
        check_layer_norm(f"from_timm: {where}.norm1", blk.norm1)
        check_layer_norm(f"from_timm: {where}.norm2", blk.norm2)
        check_mlp(f"{where}.mlp", mlp)
        _check_layer_scale(f"{where}.ls1", blk.ls1)
        _check_layer_scale(f"{where}.ls2", blk.ls2)


def check_patch_embed(pe) -> None:
    """timm's PatchEmbed as the fused patch-embedding kernel computes it: a square stride-kernel Conv2d."""
    from timm.layers import PatchEmbed

    if not _same_forward(pe, PatchEmbed):
        _unsupported(f"patch embedding {type(pe).__name__} (only timm's PatchEmbed)")
    if getattr(pe, "dynamic_img_pad", False):
        _unsupported("dynamic_img_pad=True (padding images to a multiple of the patch)")
    if not (pe.flatten or pe.output_fmt.value == "NHWC"):
        _unsupported(f"patch embedding with output format {pe.output_fmt.value}")
    conv = pe.proj
    if (not isinstance(conv, nn.Conv2d) or conv.kernel_size != conv.stride or conv.padding != (0, 0)
            or conv.kernel_size[0] != conv.kernel_size[1] or conv.groups != 1 or conv.dilation != (1, 1)):
        _unsupported("a patch projection other than a square Conv2d with stride = kernel")
    if not is_identity(pe.norm):
        _unsupported("patch_embed.norm (norm after patch projection)")


def check_attention(where: str, attn, width: int) -> None:
    """What the fused attention computes of a timm attention module: qk-norm, an inner LayerNorm before the
    projection (scale_norm), the usual 1/sqrt(head_dim) scale; no gating."""
    check_qk_norm(f"from_timm: {where}", attn.q_norm, attn.k_norm)
    check_layer_norm(f"from_timm: {where}.norm (scale_norm)", getattr(attn, "norm", None), allow_identity=True)
    if getattr(attn, "gate", None) is not None:
        _unsupported(f"{where} gating")
    if not math.isclose(attn.scale, attn.head_dim ** -0.5, rel_tol=1e-6):
        _unsupported(f"{where} scale {attn.scale} (only head_dim ** -0.5)")
    check_head_dim(f"from_timm: {where}", width, attn.num_heads)


def check_mlp(where: str, mlp) -> None:
    """timm's Mlp (any supported activation), GluMlp / SwiGLUPacked (SiLU gate, packed fc1) and SwiGLU (separate
    gate and value Linears), each optionally with the inner LayerNorm before fc2 (EVA-02's sub-LN)."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    linears = {Mlp: ("fc1", "fc2"), GluMlp: ("fc1", "fc2"), SwiGLU: ("fc1_g", "fc1_x", "fc2")}
    kind = next((cls for cls in linears if _same_forward(mlp, cls)), None)
    if kind is None or not all(isinstance(getattr(mlp, n), nn.Linear) for n in linears[kind]):
        _unsupported(f"{where} of type {type(mlp).__name__} (only timm Mlp, GluMlp/SwiGLUPacked or SwiGLU with "
                     f"Linear layers)")
    check_layer_norm(f"from_timm: {where}.norm", mlp.norm, allow_identity=True)
    if kind is Mlp:
        activation_mode(where, mlp.act)
    elif type(mlp.act) is not nn.SiLU:
        _unsupported(f"{where} gate activation {type(mlp.act).__name__} (only SiLU: SwiGLU)")
    elif kind is GluMlp and mlp.chunk_dim not in (-1, 2):
        _unsupported(f"{where} chunk_dim={mlp.chunk_dim}")


# --- the patched methods ----------------------------------------------------------------------------------------
def _bool_mask(attn_mask, is_causal: bool, tokens: int, device):
    """timm's attn_mask / is_causal as the kernels' boolean mask (True = attend), or None."""
    if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool):
        _unsupported("a float (additive) attn_mask; pass a torch.bool mask, True = attend")
    if is_causal:
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
        return causal if attn_mask is None else attn_mask & causal
    return attn_mask


def mlp_residual(mlp, norm, x, cast, training: bool, gamma=None, drop_path=None, stats=None):
    """``x + drop_path(gamma * mlp(norm(x)))`` for a ``check_mlp``-checked timm MLP (``norm``: a LayerNorm or
    Identity): the first GEMM with the norm folded in and its activation (SwiGLU: gate and value in one GEMM),
    then fc2 (the optional inner LayerNorm folded in) with dropout, layer scale, stochastic depth and the
    residual in its epilogue. ``stats``: x's LayerNorm statistics from the GEMM that wrote it, or None."""
    from timm.layers import Mlp, SwiGLU

    drop1 = drop_rate(mlp.drop1, training)
    if isinstance(mlp, SwiGLU):
        h = norm_linear(x, norm, (mlp.fc1_g.weight, mlp.fc1_x.weight), _pair(mlp.fc1_g.bias, mlp.fc1_x.bias), cast,
                        stats=stats, activation="swiglu", dropout=drop1)
    elif isinstance(mlp, Mlp):
        activation = activation_mode("mlp", mlp.act)
        if is_identity(mlp.norm):  # training: ops.mlp (fc1's activation gradient inside fc2's dgrad)
            return mlp_block(x, norm, mlp.fc1, mlp.fc2, cast, stats=stats, activation=activation, gamma=gamma,
                             hidden_drop=drop1, out_drop=drop_rate(mlp.drop2, training), drop_path=drop_path)
        h = norm_linear(x, norm, mlp.fc1.weight, mlp.fc1.bias, cast, stats=stats, activation=activation,
                        dropout=drop1)
    else:  # GluMlp: fc1's output rows are [gate; value] (or [value; gate] with gate_last)
        halves = [w.chunk(2) for w in (mlp.fc1.weight, mlp.fc1.bias) if w is not None]
        weight, bias = halves[0], (halves[1] if len(halves) > 1 else None)
        order = slice(None, None, -1 if mlp.gate_last else 1)
        h = norm_linear(x, norm, tuple(weight[order]), None if bias is None else tuple(bias[order]), cast,
                        stats=stats, activation="swiglu", dropout=drop1)
    return norm_linear(h, mlp.norm, mlp.fc2.weight, mlp.fc2.bias, cast, scale=cast(gamma), residual=x,
                       dropout=drop_rate(mlp.drop2, training), branch_scale=drop_path)


def _pair(a, b):
    return None if a is None and b is None else (a, b)


def fused_block(self, x, qkv_weight, qkv_bias, gamma1, gamma2, attn_mask=None, is_causal=False, rope_args=None):
    """A timm pre-norm block (``Block``, ``EvaBlock``) on the kernels: LN1, the qkv GEMM, attention (qk-norm
    and rotary embedding in its prologue), the optional inner LayerNorm, proj (+ dropout, layer scale,
    stochastic depth, residual), LN2, the MLP (``mlp_residual``). Returns x's dtype (under autocast as timm:
    its dtype promoted with autocast's)."""
    attn = self.attn
    check_input(f"timm {type(self).__name__}", self.norm1.weight, x)
    mask = _bool_mask(attn_mask, is_causal, x.shape[1], x.device)
    dtype = compute_dtype(x)
    out_dtype = torch.promote_types(x.dtype, dtype)
    training, cast, batch = self.training, caster(dtype), x.shape[0]
    with explicit_dtypes(x):
        x = cast(x)
        h = norm_linear(x, self.norm1, qkv_weight, qkv_bias, cast)
        h = self_attention(h, attn.num_heads, "paper", mask, drop_rate(attn.attn_drop, training),
                           dict(qk_norm_args(attn.q_norm, attn.k_norm, cast, dtype), **(rope_args or {})))
        inner = getattr(attn, "norm", None)
        proj_args = dict(scale=cast(gamma1), residual=x, dropout=drop_rate(attn.proj_drop, training),
                         branch_scale=drop_path_factors(self.drop_path1, batch, training, x.device))
        if is_identity(inner):  # proj also hands norm2 its statistics
            x, stats = residual_linear(h, attn.proj.weight, attn.proj.bias, cast, self.norm2, **proj_args)
        else:
            x, stats = norm_linear(h, inner, attn.proj.weight, attn.proj.bias, cast, **proj_args), None
        x = mlp_residual(self.mlp, self.norm2, x, cast, training, gamma2,
                         drop_path_factors(self.drop_path2, batch, training, x.device), stats)
    return x.to(out_dtype)


def block_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """timm ``Block.forward`` as one fused block (``fused_block``)."""
    return fused_block(self, x, self.attn.qkv.weight, self.attn.qkv.bias, getattr(self.ls1, "gamma", None),
                       getattr(self.ls2, "gamma", None), attn_mask, is_causal)


def _check_image(pe, x, dynamic: bool) -> tuple[int, int]:
    """timm PatchEmbed's image checks as ValueErrors; returns the patch grid."""
    check_image_batch(pe.proj, x)
    if tuple(x.shape[2:]) == tuple(pe.img_size):
        return tuple(pe.grid_size)
    if not dynamic:
        raise ValueError(f"image size {tuple(x.shape[2:])} differs from the model's {tuple(pe.img_size)}; for other "
                         f"sizes build the timm model with dynamic_img_size=True or use "
                         f"from_timm(model, dynamic_img_size=True)")
    return image_grid(x.shape[2], x.shape[3], pe.patch_size)


def patch_embed_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm ``PatchEmbed.forward`` (the Conv2d patch projection) on the fused kernel, same output format."""
    grid = _check_image(self, x, not self.strict_img_size)
    check_input("timm PatchEmbed", self.proj.weight, x)
    dtype = compute_dtype(x)
    with explicit_dtypes(x):
        cast = caster(dtype)
        prefix = self.proj.weight.new_empty((0, self.proj.out_channels), dtype=dtype)
        out = ops.patch_embed(cast(x), cast(self.proj.weight), cast(self.proj.bias), prefix, None)
    return out if self.flatten else out.view(x.shape[0], *grid, out.shape[-1])


def _positions(model, grid) -> torch.Tensor | None:
    """pos_embed as a [T, E] table for this grid, resampled as timm does (every forward: nothing cached)."""
    pos = model.pos_embed
    native = tuple(model.patch_embed.grid_size)
    if pos is None or grid == native:
        return None if pos is None else pos[0]
    return resample_pos_embed(pos[0], native, grid, 0 if model.no_embed_class else model.num_prefix_tokens)


def embed_tokens(self, x, grid, pos_drop: float) -> torch.Tensor:
    """Patch projection, prefix (cls, register) tokens, absolute positions (resampled for another grid) and
    position dropout in one kernel (+ the dropout kernel in training)."""
    conv = self.patch_embed.proj
    check_input(f"timm {type(self).__name__}", conv.weight, x)
    dtype = compute_dtype(x)
    with explicit_dtypes(x):
        cast = caster(dtype)
        prefix = [t.view(-1, t.shape[-1]) for t in (self.cls_token, self.reg_token) if t is not None]
        prefix = torch.cat(prefix) if prefix else conv.weight.new_empty((0, conv.out_channels))
        x = ops.patch_embed(cast(x), cast(conv.weight), cast(conv.bias), cast(prefix), cast(_positions(self, grid)),
                            not self.no_embed_class)
        return ops.dropout(x, pos_drop)


def _trunk(self, x, attn_mask=None, is_causal=False) -> torch.Tensor:
    """timm's forward_features up to the final norm: patch projection + prefix + positions in one kernel,
    embedding dropout in the kernels, timm's patch dropout module, norm_pre, then the blocks as timm runs them."""
    dynamic = self.__dict__.get(DYNAMIC)
    grid = _check_image(self.patch_embed, x, self.dynamic_img_size if dynamic is None else dynamic)
    x = embed_tokens(self, x, grid, drop_rate(self.pos_drop, self.training))
    x = self.norm_pre(self.patch_drop(x))  # patch dropout: timm's module (a PyTorch gather), identity in eval
    if attn_mask is not None or is_causal:
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
    elif self.grad_checkpointing and not torch.jit.is_scripting():
        from timm.models._manipulate import checkpoint_seq

        x = checkpoint_seq(self.blocks, x)
    else:
        x = self.blocks(x)
    return x


def forward_features(self, x, attn_mask=None, is_causal=False) -> torch.Tensor:
    return self.norm(_trunk(self, x, attn_mask, is_causal))


def _logits(self, x, dtype, pre_logits: bool) -> torch.Tensor:
    """Head dropout + head Linear (in the compute dtype) of pooled features; the features with ``pre_logits``."""
    with explicit_dtypes(x):
        x = ops.dropout(x, drop_rate(self.head_drop, self.training))
        if pre_logits or is_identity(self.head):
            return x
        cast = caster(dtype)
        return ops.linear(cast(x), cast(self.head.weight), cast(self.head.bias))


def _head(self, x, pool: str, start: int, norm, pre_logits: bool, fp32_norm: bool) -> torch.Tensor:
    """Pool (+ LayerNorm ``norm``, fused into the pooling kernel) + head dropout + head Linear. ``fp32_norm``:
    pool and normalize in fp32, as timm's LayerNorm under autocast returns fp32 (for pre-logit features)."""
    if fp32_norm:
        x = x.float()
    dtype = compute_dtype(x)
    with explicit_dtypes(x):
        cast = caster(x.dtype)
        x = ops.pool_tokens(x, pool, start, cast(getattr(norm, "weight", None)), cast(getattr(norm, "bias", None)),
                            getattr(norm, "eps", 1e-6), norm=norm is not None)
        return _logits(self, x, dtype, pre_logits)


def attn_pool_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm ``AttentionPoolLatent.forward`` (MAP pooling): the latent queries' projection, the kv GEMM over all
    tokens, ``ops.latent_attention`` (each latent query attends over the tokens), the output projection
    (+ dropout), then ``x + mlp(norm(x))`` with the residual in fc2's epilogue; token 0 or the latents' mean."""
    if attn_mask is not None:
        _unsupported("attn_pool with an attn_mask")
    check_input("timm AttentionPoolLatent", self.kv.weight, x)
    dtype, training = compute_dtype(x), self.training
    with explicit_dtypes(x):
        cast = caster(dtype)
        q = cast(self.latent)
        if not is_identity(self.q):
            q = ops.linear(q, cast(self.q.weight), cast(self.q.bias))
        kv = ops.linear(cast(x), cast(self.kv.weight), cast(self.kv.bias))
        norms = qk_norm_args(self.q_norm, self.k_norm, cast, dtype)
        norms.pop("qk_norm", None)  # LayerNorm: the only kind latent_attention applies
        x = ops.latent_attention(q.expand(x.shape[0], -1, -1), kv, self.num_heads, **norms)
        if not is_identity(self.proj):
            x = ops.linear(x, cast(self.proj.weight), cast(self.proj.bias), dropout=drop_rate(self.proj_drop, training))
        if self.mlp is not None:
            x = mlp_residual(self.mlp, self.norm, x, cast, training)
    return x[:, 0] if self.pool == "token" else x.mean(1)


def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """timm's forward_head: pool, fc_norm, head_drop, head, with the pooling and fc_norm in one kernel (MAP
    pooling: the fused ``attn_pool`` over the patch tokens, then the fused fc_norm)."""
    return head_forward(self, x, pre_logits, attn_pool_prefix=getattr(self, "pool_include_prefix", False))


def head_forward(self, x: torch.Tensor, pre_logits: bool, attn_pool_prefix: bool) -> torch.Tensor:
    """Pooling + fc_norm + head of a timm ViT; ``attn_pool_prefix``: the attention pool also sees the prefix
    tokens (timm's Eva does, VisionTransformer only with ``pool_include_prefix``)."""
    _check_head(self)
    if getattr(self, "attn_pool", None) is not None:
        if not attn_pool_prefix:
            x = x[:, self.num_prefix_tokens:]
        x = self.fc_norm(self.attn_pool(x))
        return _logits(self, x, compute_dtype(x), pre_logits)
    pool = POOLS[self.global_pool]
    start = self.num_prefix_tokens if pool == "mean" and not getattr(self, "pool_include_prefix", False) else 0
    norm = None if is_identity(self.fc_norm) else self.fc_norm
    return _head(self, x, pool, start, norm, pre_logits, fp32_norm=norm is not None and autocast_on(x))


def forward(self, x, attn_mask=None, is_causal=False) -> torch.Tensor:
    """With token pooling and no fc_norm, the final LayerNorm then token 0 equals token 0 then the LayerNorm:
    one fused kernel on B rows instead of a LayerNorm over all B x N tokens."""
    if self.global_pool == "token" and is_identity(self.fc_norm) and isinstance(self.norm, nn.LayerNorm) \
            and self.attn_pool is None and not self.norm._forward_hooks and not self.norm._forward_pre_hooks:
        # logits only: the pooled row is normalized in the compute dtype (no fp32 copy of the tokens)
        return _head(self, _trunk(self, x, attn_mask, is_causal), "token", 0, self.norm, False, fp32_norm=False)
    return self.forward_head(self.forward_features(x, attn_mask, is_causal))


def patch_timm(model, dynamic_img_size: bool | None = None):
    """Patch a timm ``VisionTransformer`` in place (see the module docstring); returns ``model``."""
    check_supported(model)
    return patch_modules(model, dynamic_img_size, block_forward, (forward_features, forward_head, forward))


def patch_modules(model, dynamic_img_size, block, methods):
    """Patch a checked timm model: each block's forward with ``block``, the patch embedding, LayerNorms and the
    attention pool, and the model's forward_features / forward_head / forward with ``methods``."""
    if dynamic_img_size is not None and not isinstance(dynamic_img_size, bool):
        raise TypeError(f"dynamic_img_size must be None, True or False, got {dynamic_img_size!r}")
    for blk in model.blocks:
        patch(blk, "forward", block)
    patch(model.patch_embed, "forward", patch_embed_forward)
    for norm in (model.norm_pre, model.norm, model.fc_norm):
        patch_layer_norm(norm)
    if getattr(model, "attn_pool", None) is not None:
        patch(model.attn_pool, "forward", attn_pool_forward)
    for name, method in zip(("forward_features", "forward_head", "forward"), methods):
        patch(model, name, method)
    if dynamic_img_size is not None:
        model.__dict__[DYNAMIC] = dynamic_img_size
    return model


def from_timm(model, dynamic_img_size: bool | None = None, cuda_graphs: bool = False,
              graph_buckets=DEFAULT_BUCKETS):
    """Put a timm ``VisionTransformer`` or ``Eva`` (EVA-02, DINOv3) on the fused kernels, in place; returns the
    same model.

    ``dynamic_img_size``: None follows the model (timm's ``dynamic_img_size``); True lets ``model(x)`` and
    ``forward_features`` take any image whose sides are multiples of the patch size, resampling ``pos_embed``
    exactly as timm's dynamic models do (bicubic, antialiased, every forward); False accepts only the model's
    ``img_size``. ``cuda_graphs``, ``graph_buckets``: as in ``vit_kernels.accelerate``.
    ``vit_kernels.restore(model)`` undoes the patch.
    """
    eva = sys.modules.get("timm.models.eva")
    if eva is not None and isinstance(model, eva.Eva):
        from .timm_eva import patch_eva

        patch_eva(model, dynamic_img_size)
    else:
        patch_timm(model, dynamic_img_size)
    return use_cuda_graphs(model, cuda_graphs, graph_buckets)
