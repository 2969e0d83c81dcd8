import os
import sys

# tests import their helper modules (kernels, gaussian_truth) by name
sys.path.insert(0, os.path.dirname(__file__))

import torch

# The kernels work on small K x K tensors, where torch's intra-op threads cost more than
# they save (and fight each other on a 2-core CI machine).
torch.set_num_threads(1)
