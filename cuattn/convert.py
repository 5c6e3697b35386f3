"""Checkpoint conversion: multi-head attention weights to grouped-query / multi-query.

Ainslie et al. (2023), "GQA: Training Generalized Multi-Query Transformer Models from
Multi-Head Checkpoints": the key and value heads of each group are mean-pooled into one,
then the model is briefly trained further ("uptrained"). Query head h belongs to group
h // (num_heads / num_kv_heads), as everywhere in cuattn.
"""

from __future__ import annotations

from .spec import _check_int


def mha_to_gqa(weight, num_heads: int, num_kv_heads: int, *, head_dim: int | None = None):
    """Mean-pool the heads of a K or V projection into ``num_kv_heads`` groups.

    Args:
        weight: the projection's weight, (num_heads * head_dim, hidden) as PyTorch's Linear
            stores it, or its bias, (num_heads * head_dim,). NumPy, CuPy, PyTorch or JAX.
        num_heads: heads of the multi-head checkpoint.
        num_kv_heads: heads to keep: a divisor of num_heads (1 gives multi-query attention).
        head_dim: defaults to weight.shape[0] // num_heads.

    Returns:
        (num_kv_heads * head_dim, hidden), or (num_kv_heads * head_dim,) for a bias, of the
        input's kind: a drop-in weight for the grouped-query model's K or V projection.

    Example:
        >>> import numpy as np
        >>> from cuattn.convert import mha_to_gqa
        >>> k_proj = np.random.randn(32 * 128, 4096).astype(np.float32)   # 32 heads of 128
        >>> mha_to_gqa(k_proj, num_heads=32, num_kv_heads=8).shape
        (1024, 4096)
    """
    num_heads = _check_int("num_heads", num_heads, 1)
    num_kv_heads = _check_int("num_kv_heads", num_kv_heads, 1)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: must divide num_heads={num_heads}, got {num_kv_heads}")
    shape = tuple(getattr(weight, "shape", ()))
    if not shape:
        raise TypeError(
            "weight: expected a weight or bias array (NumPy, CuPy, PyTorch or JAX), got "
            f"{type(weight).__name__}" + (" of 0 dimensions" if hasattr(weight, "shape") else "")
        )
    rows = shape[0]
    if head_dim is None:
        head_dim = rows // num_heads
    else:
        head_dim = _check_int("head_dim", head_dim, 1)
    if head_dim * num_heads != rows:
        raise ValueError(
            f"weight: dimension 0 must be num_heads * head_dim = {num_heads} * {head_dim}, "
            f"got {rows}"
        )
    group = num_heads // num_kv_heads
    rest = tuple(weight.shape[1:])
    # Positional arguments only: reshape and mean read the same in every framework.
    grouped = weight.reshape(num_kv_heads, group, head_dim, *rest)
    return grouped.mean(1).reshape(num_kv_heads * head_dim, *rest)
