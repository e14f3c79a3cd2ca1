"""Lower 1-D convolution and pooling to their 2-D versions with a unit height (compile time).

    y = R.nn.conv1d(x, w, strides=[s], padding=[l, r])   ->   x4 = R.reshape(x, [N, C, 1, W])
                                                              w4 = R.reshape(w, [O, C/g, 1, K])
                                                              y4 = R.nn.conv2d(x4, w4, strides=[1, s],
                                                                               padding=[0, l, 0, r])
                                                              y  = R.reshape(y4, [N, O, W'])

max_pool1d and avg_pool1d likewise (window [1, k]). Runs on the deterministic module, before
`FoldWeightLayout` (which turns the weight reshape into a reshaped weight), so the Gaussian
library needs the 2-D operators only.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..ir import MainRewriter, call_op_name, func_attrs, main_bindings, shape_of
from ..ops.registry import LOWERED_1D

LOWERED = LOWERED_1D


def _ints(values):
    return [int(v) for v in values]


def _with_unit_height(shape):
    return relax.ShapeExpr([shape[0], shape[1], 1, shape[2]])


class _Lower(MainRewriter):
    def visit_binding(self, binding):
        op = call_op_name(binding.value)
        if op not in LOWERED:
            self.copy_binding(binding)
            return
        call, attrs = binding.value, binding.value.attrs
        name = binding.var.name
        data = self.bb.emit(relax.op.reshape(self.remap(call.args[0]), _with_unit_height(shape_of(call.args[0]))), f"{name}_2d_input")
        pad_left, pad_right = _ints(attrs.padding)
        if op == "relax.nn.conv1d":
            if attrs.data_layout != "NCW" or attrs.kernel_layout != "OIW":
                self.copy_binding(binding)  # the substitution reports it
                return
            weight = self.bb.emit(relax.op.reshape(self.remap(call.args[1]), _with_unit_height(shape_of(call.args[1]))), f"{name}_2d_weight")
            out = relax.op.nn.conv2d(
                data, weight, strides=[1] + _ints(attrs.strides), padding=[0, pad_left, 0, pad_right],
                dilation=[1] + _ints(attrs.dilation), groups=int(attrs.groups),
            )
        else:
            if attrs.layout != "NCW":
                self.copy_binding(binding)
                return
            pool = relax.op.nn.max_pool2d if op == "relax.nn.max_pool1d" else relax.op.nn.avg_pool2d
            out = pool(
                data, pool_size=[1] + _ints(attrs.pool_size), strides=[1] + _ints(attrs.strides),
                padding=[0, pad_left, 0, pad_right], dilation=[1] + _ints(attrs.dilation),
                ceil_mode=bool(attrs.ceil_mode), count_include_pad=bool(attrs.count_include_pad),
            )
        out = self.bb.emit(out, f"{name}_2d")
        self.env[binding.var] = self.bb.emit(relax.op.reshape(out, relax.ShapeExpr(shape_of(binding.var))), name)


@tvm.transform.module_pass(opt_level=0, name="pfpc.Lower1dTo2d")
class Lower1dTo2d:
    def transform_module(self, mod, ctx):
        func = mod["main"]
        if not any(call_op_name(b.value) in LOWERED for b in main_bindings(func)):
            return mod
        return _Lower(mod).run(list(func.params), func_attrs(func))
