"""The float16 range accounting of conversion (architecture.md §8); which tensors stay float32 is the model's
one policy, `Model.cast_predicate`, applied alike on disk and at load.

The checkpoints are bfloat16. float16 has more mantissa but far less range: bfloat16 -> float16 is exact for
6.1e-5 <= |x| <= 65504, loses precision below (subnormals), flushes the smallest values to zero and turns
anything above 65504 into an infinity. The converter counts all three and refuses to write an infinity.
"""

import logging
from dataclasses import dataclass, field
from typing import Dict

import mlx.core as mx

from ..errors import UserError

logger = logging.getLogger(__name__)

FLOAT16_MAX = 65504.0
FLOAT16_MIN_NORMAL = 2.0**-14  # 6.1e-5

# Values per pass of the range check: bounds the temporaries to a few tens of MB whatever the tensor size.
_CHUNK = 1 << 22


class DtypeError(UserError):
    """A tensor that cannot be written in the requested dtype without corrupting it."""


@dataclass
class RangeStats:
    """What casting to float16 did to the values, summed over tensors."""

    subnormal: int = 0  # nonzero |x| < 6.1e-5: stored with reduced precision
    flushed: int = 0  # nonzero values that became 0
    tensors: Dict[str, int] = field(default_factory=dict)  # key -> subnormal count, for the log

    def summary(self) -> str:
        worst = sorted(self.tensors.items(), key=lambda kv: -kv[1])[:3]
        where = ", ".join(f"{k} ({n})" for k, n in worst)
        return (f"float16 range: {self.subnormal:,} values below {FLOAT16_MIN_NORMAL:.2g} kept as subnormals "
                f"(reduced precision), {self.flushed:,} flushed to zero, none overflowed"
                + (f"; most in {where}" if where else ""))


# Range tests on the bit patterns (magnitude = bits without the sign): integer compares are several times
# faster than float ops on the CPU. Per source dtype: (bits dtype, magnitude mask, first non-finite, first value
# that rounds to inf in float16, float16's smallest normal, largest value that rounds to 0 in float16).
_BITS = {
    mx.bfloat16: (mx.uint16, 0x7FFF, 0x7F80, 0x4780, 0x3880, 0x3300),
    mx.float32: (mx.uint32, 0x7FFFFFFF, 0x7F800000, 0x477FF000, 0x38800000, 0x33000000),
    mx.float16: (mx.uint16, 0x7FFF, 0x7C00, None, None, None),
}


def _chunk_counts(x: mx.array, to_float16: bool) -> mx.array:
    """[non-finite, overflowing, subnormal, flushed] counts of one chunk (the last three for float16 only)."""
    bits, mask, inf, over, normal, flush = _BITS[x.dtype]
    m = x.view(bits) & mask
    nonfinite = mx.sum(m >= inf)
    if not to_float16 or over is None:
        return mx.stack([nonfinite, mx.array(0), mx.array(0), mx.array(0)])
    overflow = mx.sum(m >= over) - nonfinite
    subnormal = mx.sum((m > 0) & (m < normal))
    flushed = mx.sum((m > 0) & (m <= flush))
    return mx.stack([nonfinite, overflow, subnormal, flushed])


def cast(key: str, x: mx.array, dtype: mx.Dtype, stats: RangeStats) -> mx.array:
    """`x` as `dtype`, after checking that the cast writes no infinity (and the source holds none).

    Raises DtypeError naming the tensor for NaN/inf in the source or values beyond float16's range.
    """
    if x.dtype not in _BITS:
        raise DtypeError(f"{key}: dtype {x.dtype} is not float32, float16 or bfloat16; a VibeVoice checkpoint "
                         "holds only float weights.")
    to_float16 = dtype == mx.float16 and x.dtype != mx.float16
    flat = x.reshape(-1)
    totals = [0, 0, 0, 0]
    for start in range(0, flat.size, _CHUNK):
        counts = _chunk_counts(flat[start:start + _CHUNK], to_float16).tolist()
        totals = [t + c for t, c in zip(totals, counts)]
    nonfinite, overflow, subnormal, flushed = totals
    if nonfinite:
        raise DtypeError(f"{key}: the source checkpoint holds {nonfinite:,} NaN or infinite values; "
                         "the file is corrupt: download it again.")
    if overflow:
        raise DtypeError(f"{key}: {overflow:,} values exceed float16's range (|x| > {FLOAT16_MAX:g}) and would "
                         "become infinite: convert with --dtype bfloat16 or --dtype float32.")
    if subnormal:
        stats.subnormal += subnormal
        stats.flushed += flushed
        stats.tensors[key] = subnormal
        logger.debug("%s: %d values below float16's normal range, %d flushed to zero", key, subnormal, flushed)
    return x.astype(dtype)
