"""The fused ops, one module each (import the function from its module, e.g.
`from sag_fast.ops.degrade import degrade`): degrade.py (C++ on CPU, Triton on CUDA), mask.py (torch on CPU,
Triton on CUDA), guidance.py (C++ and CUDA in csrc/). Each registers its `sag_fast::` custom ops: the
kernels per device and the fake; `import sag_fast` imports all three. _dispatch.py holds what they share.

Modules here import torch, triton, sag_fast._lib (the compiled extension) and each other only.
Nothing is re-exported here: `sag_fast.ops.degrade` must stay the module, not the function of the same name."""
