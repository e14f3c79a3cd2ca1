import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest


@pytest.fixture(params=[False, True], ids=["posterior", "zero_variance"])
def zero_var(request):
    return request.param


@pytest.fixture(autouse=True, scope="session")
def _check_ir_after_each_pass():
    """Every pfpc pass the tests run is followed by the IR state check (`pfpc.ir_state.check_module`),
    the way TVM's well-formedness check follows its passes."""
    import tvm

    from pfpc.ir_state import CheckAfterEachPass

    with tvm.transform.PassContext(instruments=[CheckAfterEachPass()]):
        yield
