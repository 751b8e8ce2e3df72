"""Batch-invariant products: each script's rows through a matmul of their own, as if the script ran alone.

A BLAS picks its kernel, its blocking and its summation order from a product's shape, so a row of `x @ w`
can round differently with 1, 8 or 800 rows beside it. On BLIS 0.9 a one-row product (a decoder's first conv,
a connector) goes through another kernel than two rows, and from 400 to 800 rows on it takes another path again;
OpenBLAS 0.3.21 changes kernel at 3 to 40 rows for some of the tokenizers' shapes. A batch's audio then depends
on its batch-mates, and once one frame differs the frames after it diverge.

`matmul(x, w, group)` keeps a batch out of every product: the leading axis of `x` holds `group` entries per
script (2 for the language model's CFG pair, 1 elsewhere), and each script's rows are multiplied by a weight
broadcast along a script axis. MLX's CPU backend runs that as one sgemm call per script, with exactly the rows,
order and shape of the same script's solo run, so a row no longer depends on the others on any BLAS. The cost:
each script reads the weights once (README, Speed). A 2-D input is a plain matrix (a prompt's rows). Quantized
layers keep MLX's own quantized product, which calls no BLAS; only float layers are split (and tested).
"""

from typing import Optional

import mlx.core as mx


def matmul(x: mx.array, w: mx.array, group: int = 0, bias: Optional[mx.array] = None) -> mx.array:
    """`x @ w` (+ `bias`) for x [..., K] and w [K, N]; with `group` > 0 and a batch axis, one product per script
    (`group` leading entries each), so a script's rows come out as they do alone."""
    if group <= 0 or x.ndim < 3:
        return x @ w if bias is None else mx.addmm(bias, x, w)
    # One script alone takes the batched form too: MLX runs a 2-D product of one column (the decoder's last conv)
    # another way than a batched one, and OpenBLAS rounds the two differently.
    scripts = max(x.shape[0] // group, 1)
    rows = x.reshape(scripts, -1, x.shape[-1])
    w = mx.broadcast_to(w, (scripts, *w.shape))  # a stride-0 batch: MLX does not fold it into one product
    y = rows @ w if bias is None else mx.addmm(bias, rows, w)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def set_group(module, group: int) -> int:
    """Give every product under `module` that takes a `group` (decode-layout linears, convs) this one; returns
    how many. `group` 0 turns the per-script products off."""
    found = [m for _, m in module.named_modules() if hasattr(m, "group")]
    for m in found:
        m.group = group
    return len(found)
