"""Fused ops. Each runs its Triton kernel on CUDA tensors (or under TRITON_INTERPRET=1) and the same
function in PyTorch otherwise; ``use_backend`` pins the choice, ``launch_counts`` shows what ran.

Each op module registers itself (``registry.register``) on import; this list of imports is the registry's
only index. README.md here says how an op file is laid out and how to add one.
"""
from .attention import MAX_HEAD_DIM, attention
from .attention_probs import attention_probabilities
from .dispatch import backend_for, launch_counts, reset_launch_counts, use_backend
from .dropout import dropout
from .head import classification_head, pool_tokens
from .latent_attention import latent_attention as latent_attention  # re-exported (registers the op)
from .layer_norm import layer_norm
from .layer_norm_linear import layer_norm_linear
from .linear import linear, save_pre_activations
from .mlp import mlp
from .patch_embed import patch_embed
from .registry import registered_ops

__all__ = ["MAX_HEAD_DIM", "attention", "attention_probabilities", "backend_for", "classification_head", "dropout",
           "launch_counts", "layer_norm", "layer_norm_linear", "linear", "mlp", "patch_embed",
           "pool_tokens", "registered_ops", "reset_launch_counts", "save_pre_activations", "use_backend"]
