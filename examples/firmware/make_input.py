"""Write the first sample of a .npy file as the C array the firmware example links:
python3 examples/firmware/make_input.py SAMPLES.npy OUT/input_data.h"""

import sys

import numpy as np

samples, header = sys.argv[1], sys.argv[2]
x = np.load(samples)[:1].astype(np.float32).reshape(-1)
values = ",".join(f"{v:.9e}f" for v in x)
with open(header, "w") as handle:
    handle.write(f"static const float pfp_example_input[{x.size}] = {{{values}}};\n")
