// Operator schemas of qsegformers' multi-scale deformable attention, and the Python module stub.
//
// The kernels register themselves per device in cpu/ms_deform_attn_cpu.cpp and
// cuda/ms_deform_attn_cuda.cu (TORCH_LIBRARY_IMPL); autograd and the fake (meta) kernels are
// registered from Python in qsegformers/ops/ms_deform_attn.py.
#include <Python.h>

#include <torch/library.h>

extern "C" {
// `import qsegformers._C` loads this library, which runs the static registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "qsegformers compiled ops", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
#ifdef WITH_CUDA
    PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
    PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  }
  return module;
}
}

TORCH_LIBRARY(qsegformers, m) {
  // value: N x S x M x D; spatial_shapes: L x 2 int64 (H, W); level_start_index: L int64;
  // sampling_locations: N x Lq x M x L x P x 2 (x, y in [0, 1]); attention_weights: N x Lq x M x L x P.
  // Returns N x Lq x (M*D).
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  // Returns (grad_value, grad_sampling_locations, grad_attention_weights).
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}
