"""One module per pipeline stage (stage name = module name = params section)."""

import os

# Idle OpenMP threads sleep instead of spinning.  On a small shared machine (2 cores, other
# jobs) spinning workers of torch/MKL starve each other: one encoder training step took 9.8 s
# with 2 spinning threads against 0.13 s with passive waiting.  Set before torch is imported
# by any stage; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
