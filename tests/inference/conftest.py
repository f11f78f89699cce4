import os

import torch

# The decode kernel runs under the Triton interpreter when there is no GPU; the switch must be set
# before the kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
