"""Values of Relax constants as NumPy, for the operator registry's attribute rules and the passes."""

from __future__ import annotations

import numpy as np
import tvm


def constant_value(expr):
    """The NumPy value of a Relax constant, else None."""
    for cls_name in ("Constant", "GenericConst"):
        cls = getattr(tvm.ir, cls_name, None)
        if cls is not None and isinstance(expr, cls):
            value = getattr(expr, "value", None)
            if value is None:
                value = getattr(expr, "data", None)
            return value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    return None


def scalar_value(expr):
    value = constant_value(expr)
    return None if value is None or value.size != 1 else float(value.reshape(-1)[0])
