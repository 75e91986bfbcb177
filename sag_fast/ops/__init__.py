"""The fused ops, one module each (import the function from its module, e.g.
`from sag_fast.ops.degrade import degrade`): mask.py and degrade.py (Triton), guidance.py (C++/CUDA in csrc/).

Nothing is re-exported here: `sag_fast.ops.degrade` must stay the module, not the function of the same name."""
