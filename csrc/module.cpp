// Python module entry for sag_fast._C (the ops themselves are registered with TORCH_LIBRARY).
#include <Python.h>
#include <torch/library.h>

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
