"""Realtime rows that join a running batch at any step, wait outside it for their text, or leave it early: each
row's audio equals its solo run bit for bit, with the batch-invariant model, under the BLAS the command loads
(BLIS, OpenBLAS) and the wheel's own. Each BLAS runs in a fresh interpreter that loads it as the command does.
"""

import sys

import pytest

from vibevoice_mlx.testing import BLAS_KINDS, run_under_blas, system_blas

CHILD = """
import json, sys, tempfile
from vibevoice_mlx import blas
library = blas.use_fast_blas({library!r}) if {library!r} else None
import mlx.core as mx
import numpy as np
from vibevoice_mlx.testing import realtime_tiny
from vibevoice_mlx.windows import Batch, Row, TextIds, invariant_model

pipe, voice = realtime_tiny(tempfile.mkdtemp())
invariant_model(pipe.model)
texts = [list(range(60, 73)), list(range(100, 110)), list(range(140, 143))]  # 13, 10 and 3 ids
stops = [16, 13, 4]

def row(k, text=None):
    noise = mx.random.normal((40, 16), key=mx.random.key(k))
    return Row(text or TextIds(texts[k], closed=True), lambda f: noise[f], lambda f, p: f >= stops[k])

def run(schedule):
    # schedule: {{step: [row index, ...]}} of joins; a row given as ("late", k) gets its text 7 steps after joining
    b, rows, out, late = Batch(pipe.model), {{}}, {{}}, {{}}
    step = 0
    while step == 0 or b.active or any(s >= step for s in schedule):
        for item in schedule.get(step, []):
            if isinstance(item, tuple):
                k = item[1]
                rows[k] = row(k, TextIds(texts[k][:3]))
                late[k] = step + 7
            else:
                k = item
                rows[k] = row(k)
            b.add(rows[k], voice)
        for k, due in list(late.items()):
            if step == due:
                rows[k].text.extend(texts[k][3:])
                rows[k].text.close()
                del late[k]
        for r, a in b.step():
            k = next(i for i in rows if rows[i] is r)
            out.setdefault(k, []).append(np.array(a))
        step += 1
        if step > 200:
            raise RuntimeError("no end")
    return {{k: np.concatenate(v) for k, v in out.items()}}

solo = {{k: run({{0: [k]}})[k] for k in range(3)}}
cases = {{"together": {{0: [0, 1, 2]}}, "staggered": {{0: [0], 1: [1], 5: [2]}}, "at every step": {{0: [2], 3: [0], 6: [1]}},
         "waiting for text": {{0: [0, ("late", 1)], 2: [2]}}}}
result = {{}}
for name, schedule in cases.items():
    got = run(schedule)
    result[name] = [bool(got[k].shape == solo[k].shape and np.array_equal(got[k], solo[k])) for k in range(3)]
print(json.dumps({{"blas": blas.active_blas()["name"], "frames": [len(solo[k]) // 3200 for k in range(3)],
                   "equal": result}}))
"""

@pytest.mark.skipif(sys.platform != "linux", reason="MLX's BLAS is only replaceable on Linux")
@pytest.mark.parametrize("kind", BLAS_KINDS)
def test_rows_that_join_wait_and_leave_equal_their_solo_runs_under_each_blas(kind):
    library, name = system_blas(kind)
    r = run_under_blas(CHILD.format(library=library), library)
    assert r["blas"] == name
    assert r["frames"] == [17, 14, 5], r  # each row stops where its rule says (a frame after its stop frame)
    assert all(all(v) for v in r["equal"].values()), r
