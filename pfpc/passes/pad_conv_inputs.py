"""Give every zero-padded convolution an explicitly padded input (compile time).

    y = R.nn.conv2d(x, w, padding=[t, l, b, r])   ->   xp = R.nn.pad(x, [0, 0, 0, 0, t, b, l, r])
                                                       y  = R.nn.conv2d(xp, w, padding=[0, 0, 0, 0])

A padded convolution kernel tests, for every multiply-add, whether its input position lies in the
padding: a branch in the innermost loop, which keeps the C compiler from vectorising it and costs
a compare per MAC on scalar cores (on LeNet's 8x8 and 4x4 feature maps most windows touch the
border, so loop partitioning would leave most of the work branchy). The padded copy costs one
pass over the input, its branches outside any reduction, and an arena buffer of the padded size.
Runs on the deterministic module, before `SubstituteLayers` turns both into Gaussian kernels.

``border_taps``: in a network with a posterior, convolutions whose window has at most this many
taps keep their padding and test the border themselves (`pipeline.for_target` asks for 9 on
scalar cores, where the PFP's unrolled 3x3 window pays less for its tests than for the copy; the
deterministic network, one multiply-add per tap, keeps the copy; see there).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .. import ir_state
from ..ir import MainRewriter, call_op_name, func_attrs, main_bindings


def _padded(binding, border_taps: int = 0) -> bool:
    call = binding.value
    if call_op_name(call) != "relax.nn.conv2d":
        return False
    attrs = call.attrs
    if not (attrs.data_layout == "NCHW" and attrs.kernel_layout == "OIHW" and any(int(p) for p in attrs.padding)):
        return False
    _, _, height, width = (int(d) for d in call.args[1].ty.shape)
    return height * width > border_taps


class _PadInputs(MainRewriter):
    def __init__(self, mod, border_taps):
        super().__init__(mod)
        self.border_taps = border_taps

    def visit_binding(self, binding):
        if not _padded(binding, self.border_taps):
            self.copy_binding(binding)
            return
        call, attrs = binding.value, binding.value.attrs
        top, left, bottom, right = (int(p) for p in attrs.padding)
        data = self.bb.emit(relax.op.nn.pad(self.remap(call.args[0]), [0, 0, 0, 0, top, bottom, left, right], "constant", 0.0),
                            f"{binding.var.name}_padded_input")
        out = relax.op.nn.conv2d(
            data, self.remap(call.args[1]), strides=[int(s) for s in attrs.strides], padding=[0, 0, 0, 0],
            dilation=[int(d) for d in attrs.dilation], groups=int(attrs.groups),
            data_layout="NCHW", kernel_layout="OIHW", out_layout=attrs.out_layout, out_dtype=attrs.out_dtype,
        )
        self.env[binding.var] = self.bb.emit(out, binding.var.name)


@tvm.transform.module_pass(opt_level=0, name="pfpc.PadConvInputs")
class PadConvInputs:
    after = ("pfpc.Lower1dTo2d",)  # run before it when in the pipeline

    def __init__(self, border_taps: int = 0):
        self.border_taps = border_taps

    def transform_module(self, mod, ctx):
        func = mod["main"]
        stochastic = any(np.any(v) for v in ir_state.variances(func).values())
        border_taps = self.border_taps if stochastic else 0
        if not any(_padded(b, border_taps) for b in main_bindings(func)):
            return mod
        return _PadInputs(mod, border_taps).run(list(func.params), func_attrs(func))
