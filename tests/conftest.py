import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest


@pytest.fixture(params=[False, True], ids=["posterior", "zero_variance"])
def zero_var(request):
    return request.param
