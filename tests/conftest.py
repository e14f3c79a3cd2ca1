import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over ~20 s (large models, QEMU); runs only with PFPC_SLOW_TESTS=1")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow are skipped unless PFPC_SLOW_TESTS=1 (CI's default run stays fast)."""
    if os.environ.get("PFPC_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set PFPC_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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
