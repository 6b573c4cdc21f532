"""Training loops on accelerate: VGT-AE (two stages) and VGT-AR, with shared run plumbing in ``run``."""
