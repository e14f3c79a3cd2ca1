"""Give every zero-padded convolution an explicitly padded input (compile time).

    y = R.nn.conv2d(x, w, padding=[t, l, b, r])   ->   xp = R.nn.pad(x, [0, 0, 0, 0, t, b, l, r])
                                                       y  = R.nn.conv2d(xp, w, padding=[0, 0, 0, 0])

A padded convolution kernel tests, for every multiply-add, whether its input position lies in the
padding: a branch in the innermost loop, which keeps the C compiler from vectorising it and costs
a compare per MAC on scalar cores (on LeNet's 8x8 and 4x4 feature maps most windows touch the
border, so loop partitioning would leave most of the work branchy). The padded copy costs one
pass over the input, its branches outside any reduction, and an arena buffer of the padded size.
Runs on the deterministic module, before `SubstituteLayers` turns both into Gaussian kernels.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..ir import MainRewriter, call_op_name, func_attrs, main_bindings


def _padded(binding) -> bool:
    call = binding.value
    if call_op_name(call) != "relax.nn.conv2d":
        return False
    attrs = call.attrs
    return attrs.data_layout == "NCHW" and attrs.kernel_layout == "OIHW" and any(int(p) for p in attrs.padding)


class _PadInputs(MainRewriter):
    def visit_binding(self, binding):
        if not _padded(binding):
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

    def transform_module(self, mod, ctx):
        func = mod["main"]
        if not any(_padded(b) for b in main_bindings(func)):
            return mod
        return _PadInputs(mod).run(list(func.params), func_attrs(func))
