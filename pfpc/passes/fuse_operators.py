"""Fuse a linear operator with the element-wise operators that follow it into one kernel.

    conv2d -> add(bias) -> relu      ->   one kernel: the reduction accumulates mean and variance
                                          in two scalars; bias and ReLU moments are applied before
                                          the store, with no intermediate tensors.

A kernel is absorbed into its consumer when that consumer is its only user, starts with an
element-wise stage taking it as first operand only with an output of the same shape (no
broadcast of the reduction result), and the chain so far starts with a linear stage or a max-pool
(``maxpool2d -> relu``, the order `PoolBeforeRelu` leaves) and has no nonlinearity yet (a
nonlinearity computes two moments at once and ends a chain).
"""

from __future__ import annotations

import tvm

from ..ir import kernel_of, output_shape
from ..ops.gaussian import Moment
from ..ops.registry import Fusion, stages
from .kernel_rewriter import KernelRewriter

#: Element-wise stages that can follow a linear stage in one kernel; the nonlinear ones end a chain.
NONLINEAR = stages(Fusion.NONLINEAR)
ELEMENTWISE = stages(Fusion.ELEMENTWISE, Fusion.NONLINEAR)
#: Stages a chain starts with: a linear operator, or a max-pool (followed by the ReLU that
#: `PoolBeforeRelu` moved after it).
CHAIN_HEADS = stages(Fusion.LINEAR, Fusion.POOL)

class _Rewriter(KernelRewriter):
    def __init__(self, mod):
        super().__init__(mod)
        self.pending = {}

    def _absorbable(self, binding, spec):
        users = self.consumers.get(binding.var, [])
        if len(users) != 1 or users[0] == "output" or spec.ops[0] not in CHAIN_HEADS or set(spec.ops) & set(NONLINEAR):
            return False
        user_spec, _ = kernel_of(self.mod, users[0].value)
        if user_spec.ops[0] not in ELEMENTWISE or output_shape(users[0].var) != output_shape(binding.var):
            return False
        fields = list(users[0].value.args[1].fields)
        first_width = 1 if user_spec.operands[0] == Moment.NONE else 2  # mean (+ moment) of operand 0
        if any(self.source_of.get(arg, arg).same_as(binding.var) for arg in fields[first_width:]):
            return False  # e.g. y + y or y * reshape(y): the other operand needs the result as a tensor
        return self._direct_source(fields[0]).same_as(binding.var)

    def _direct_source(self, var):
        """The kernel call whose output ``var`` is, with no view in between (else ``var``)."""
        return self.item_of.get(var, var)

    def specialize(self, spec, operands, binding):
        args = list(binding.value.args[1].fields)
        source = self._direct_source(args[0])
        if source in self.pending:
            first_spec, first_operands = self.pending.pop(source)
            operands = first_operands + list(operands[1:])
            spec = first_spec.then(spec, tuple(o.repr for o in operands))
        if self._absorbable(binding, spec):
            self.pending[binding.var] = (spec, list(operands))
            return None, operands
        return spec, operands


@tvm.transform.module_pass(opt_level=0, name="pfpc.FuseOperators")
class FuseOperators:
    requires = ("pfpc.SubstituteLayers",)  # must have run before it
    after = ("pfpc.EliminateZeroVariance",)  # run before it when in the pipeline

    def transform_module(self, mod, ctx):
        return _Rewriter(mod).run()
