// Python module entry for sag_fast._C, and the schemas of every C++ op in the `sag_fast` namespace.
// The kernels register per device with TORCH_LIBRARY_IMPL (guidance_cpu.cpp, guidance_cuda.cu, degrade_cpu.cpp);
// the CUDA kernel of degrade is Triton, registered from Python (sag_fast/ops/degrade.py), and so are the fakes
// that FakeTensor and torch.compile use (sag_fast/ops/*.py; `import sag_fast` imports them all).
#include <Python.h>
#include <torch/library.h>

// The one definition of the namespace: other C++ files may only add kernels (TORCH_LIBRARY_IMPL) or
// fragments. Ops defined from Python with torch.library.custom_op("sag_fast::...") are fragments too.
TORCH_LIBRARY(sag_fast, m) {
  // pred: (B, C, ...) one way, or (2B, C, ...) two ways with the unconditional half first.
  m.def("guidance_combine(Tensor pred, Tensor degraded, float cfg_scale, float sag_scale, "
        "int guided_channels=-1) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // pred: (k*B, C, ...) k ways; adds sag_scale*(way[uncond_index] - degraded) to every way, in place.
  m.def("guidance_shift_(Tensor(a!) pred, Tensor degraded, float sag_scale, int guided_channels=-1, "
        "int uncond_index=0) -> ()",
        {at::Tag::pt2_compliant_tag});
  // x~ = x + M*(G_sigma*s - s), s = c1*x + c2*model_output (csrc/degrade_cpu.cpp for CPU, the Triton kernel of
  // sag_fast/ops/degrade.py for CUDA). x: (B, C, H, W), or video (B, C, F, H, W) blurred per frame; c1, c2: 0-dim
  // or (B,); mask: (B, h, w) (video: (B, f, h, w)), nonzero = blur, or None.
  m.def("degrade(Tensor x, Tensor model_output, Tensor? mask, Tensor c1, Tensor c2, int kernel_size, "
        "float sigma) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

namespace {
PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef SAG_FAST_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}
PyMethodDef methods[] = {{"has_cuda", has_cuda, METH_NOARGS, "whether the CUDA kernels were built"},
                         {nullptr, nullptr, 0, nullptr}};
PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
