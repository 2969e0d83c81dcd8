import os
import sys

# tests import their helper modules (kernels, gaussian_truth) by name
sys.path.insert(0, os.path.dirname(__file__))
