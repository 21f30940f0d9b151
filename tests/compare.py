"""NaN-safe comparisons for tests: a NaN is unequal to everything, so `assert not torch.equal(a, b)` passes on NaN."""
from __future__ import annotations

import torch


def assert_differs(a: torch.Tensor, b: torch.Tensor, msg: str = "", **tol) -> None:
    """a and b are finite and differ: not torch.equal(a, b), or with atol/rtol given, not torch.allclose(a, b, **tol)."""
    bad = [n for n, t in (("first", a), ("second", b)) if not torch.isfinite(t).all()]
    assert not bad, f"non-finite values in the {' and '.join(bad)} tensor" + (f" ({msg})" if msg else "")
    same = torch.allclose(a, b, **tol) if tol else torch.equal(a, b)
    assert not same, msg or f"the tensors do not differ{f' beyond {tol}' if tol else ''}"
