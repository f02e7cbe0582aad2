// Every schema of the mbwq library, in one place. Kernels live in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

// An empty Python module so that `import mbwq_ops._C` loads this library (and with it the
// registrations below) without pybind11.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mbwq, m) {
  // The full weight W [K, N] in ORIGINAL input order (y = x @ W), K = 32 * blocks.size(0).
  // qweight int32 [R, N] (stored format), scales/zeros fp16 [G, N], blocks int32 [K/32, 3],
  // perm int32 [K] or [0] (identity); see format.h. Values are the fp16 single rounding of
  // code*scale - zero, then converted to `dtype` (float16 gives the original's bits exactly).
  m.def("dequant(Tensor qweight, Tensor scales, Tensor zeros, Tensor blocks, Tensor perm, "
        "ScalarType dtype) -> Tensor");

  // y = round(x * channel_scale) @ W + bias for x [M, K] (M >= 0), y [M, N] in x's dtype.
  // x * channel_scale is rounded to x's dtype first (as the original layer did); the product
  // is accumulated in fp32 and rounded once. channel_scale [K] and bias [N] are optional.
  // Every kernel multiplies by dequant's fp16 weights (bf16 activations: those weights
  // rounded to bf16), so no intermediate can overflow where the plain dot product would not.
  m.def("gemm(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor blocks, Tensor perm, "
        "Tensor? channel_scale, Tensor? bias) -> Tensor");
}
