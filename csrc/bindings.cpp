// pybind11 module kernels._C: thin bindings of csrc/kernels_api.h. Compiled
// with the host compiler; the kernels are in nvcc-built objects linked in.
// Arguments are integers (device addresses, sizes, strides in elements, dtype
// codes, the stream handle) and floats; kernels/cuda_impl/ops.py builds them
// from tensors. C++ exceptions become Python exceptions: std::runtime_error
// -> RuntimeError (CUDA errors, no device), std::invalid_argument ->
// ValueError.
#include <pybind11/pybind11.h>

#include "kernels_api.h"

namespace py = pybind11;
using kx::ptr_t;

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA kernels of the `kernels` package (raw-pointer interface; see kernels/cuda_impl/ops.py)";

  m.attr("DTYPE_FLOAT32") = static_cast<int>(kx::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(kx::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(kx::kBFloat16);
  m.attr("DTYPE_FLOAT8_E4M3") = static_cast<int>(kx::kFloat8E4M3);
  m.attr("DTYPE_FLOAT8_E5M2") = static_cast<int>(kx::kFloat8E5M2);

  m.def("device_count", &kx::device_count, "Visible CUDA devices (0 when there is no driver or device).");
  m.def("runtime_info", &kx::runtime_info, "The CUDA runtime version and device count, or why there is none.");

  m.def(
      "softcap_ce",
      [](int device, ptr_t stream, ptr_t logits, int logits_dtype, std::int64_t ld_logits, ptr_t targets,
         std::int64_t rows, std::int64_t cols, float softcap, float logit_scale, std::int64_t ignore_index,
         ptr_t loss, ptr_t lse_out, ptr_t lse_in, ptr_t grad, std::int64_t grad_stride, float grad_mult,
         ptr_t dlogits, int dlogits_dtype, std::int64_t ld_dlogits, ptr_t dl_scale_ptr, float dl_scale,
         bool fast_tanh, bool round_bf16) {
        kx::SoftcapCEArgs a;
        a.logits = logits;
        a.logits_dtype = logits_dtype;
        a.ld_logits = ld_logits;
        a.targets = targets;
        a.rows = rows;
        a.cols = cols;
        a.softcap = softcap;
        a.logit_scale = logit_scale;
        a.ignore_index = ignore_index;
        a.loss = loss;
        a.lse_out = lse_out;
        a.lse_in = lse_in;
        a.grad = grad;
        a.grad_stride = grad_stride;
        a.grad_mult = grad_mult;
        a.dlogits = dlogits;
        a.dlogits_dtype = dlogits_dtype;
        a.ld_dlogits = ld_dlogits;
        a.dl_scale_ptr = dl_scale_ptr;
        a.dl_scale = dl_scale;
        a.fast_tanh = fast_tanh;
        a.round_bf16 = round_bf16;
        kx::softcap_ce(device, stream, a);
      },
      "Softcapped cross-entropy forward/backward over logit rows (see csrc/kernels_api.h).", py::arg("device"),
      py::arg("stream"), py::arg("logits"), py::arg("logits_dtype"), py::arg("ld_logits"), py::arg("targets"),
      py::arg("rows"), py::arg("cols"), py::arg("softcap"), py::arg("logit_scale"), py::arg("ignore_index"),
      py::arg("loss") = 0, py::arg("lse_out") = 0, py::arg("lse_in") = 0, py::arg("grad") = 0,
      py::arg("grad_stride") = 0, py::arg("grad_mult") = 1.0f, py::arg("dlogits") = 0,
      py::arg("dlogits_dtype") = static_cast<int>(kx::kBFloat16), py::arg("ld_dlogits") = 0,
      py::arg("dl_scale_ptr") = 0, py::arg("dl_scale") = 1.0f, py::arg("fast_tanh") = false,
      py::arg("round_bf16") = false);

  m.def("fp8_amax", &kx::fp8_amax, "amax = max |x| into a device float.", py::arg("device"), py::arg("stream"),
        py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("amax"));

  m.def(
      "fp8_cast",
      [](int device, ptr_t stream, ptr_t x, int x_dtype, std::int64_t rows, std::int64_t cols, std::int64_t ld_x,
         ptr_t out, std::int64_t ld_out, ptr_t out_t, std::int64_t ld_out_t, int out_dtype, float scale,
         ptr_t scale_ptr, ptr_t amax_ptr, ptr_t scale_out, bool round_bf16) {
        kx::Fp8CastArgs a;
        a.x = x;
        a.x_dtype = x_dtype;
        a.rows = rows;
        a.cols = cols;
        a.ld_x = ld_x;
        a.out = out;
        a.ld_out = ld_out;
        a.out_t = out_t;
        a.ld_out_t = ld_out_t;
        a.out_dtype = out_dtype;
        a.scale = scale;
        a.scale_ptr = scale_ptr;
        a.amax_ptr = amax_ptr;
        a.scale_out = scale_out;
        a.round_bf16 = round_bf16;
        kx::fp8_cast(device, stream, a);
      },
      "Scaled float8 cast with optional transposed output (see csrc/kernels_api.h).", py::arg("device"),
      py::arg("stream"), py::arg("x"), py::arg("x_dtype"), py::arg("rows"), py::arg("cols"), py::arg("ld_x"),
      py::arg("out") = 0, py::arg("ld_out") = 0, py::arg("out_t") = 0, py::arg("ld_out_t") = 0,
      py::arg("out_dtype") = static_cast<int>(kx::kFloat8E4M3), py::arg("scale") = 1.0f, py::arg("scale_ptr") = 0,
      py::arg("amax_ptr") = 0, py::arg("scale_out") = 0, py::arg("round_bf16") = false);

  m.def("relu2_forward", &kx::relu2_forward, "post = relu(pre)^2 (optionally also as float8).", py::arg("device"),
        py::arg("stream"), py::arg("pre"), py::arg("dtype"), py::arg("n"), py::arg("out"), py::arg("f8_out") = 0,
        py::arg("f8_dtype") = static_cast<int>(kx::kFloat8E4M3), py::arg("scale") = 1.0f, py::arg("scale_ptr") = 0);

  m.def("relu2_backward", &kx::relu2_backward, "dpre = dpost * 2 * sqrt(post) (optionally also as float8).",
        py::arg("device"), py::arg("stream"), py::arg("dpost"), py::arg("post"), py::arg("dtype"), py::arg("n"),
        py::arg("out"), py::arg("f8_out") = 0, py::arg("f8_dtype") = static_cast<int>(kx::kFloat8E5M2),
        py::arg("scale") = 1.0f, py::arg("scale_ptr") = 0);

  m.def("sym_xxt", &kx::sym_xxt, "out[b] = x[b] @ x[b]^T on tensor cores, upper tiles only (bf16 x).",
        py::arg("device"), py::arg("stream"), py::arg("x"), py::arg("batch"), py::arg("m"), py::arg("k"),
        py::arg("sbx"), py::arg("ldx"), py::arg("out"), py::arg("out_dtype"), py::arg("sbo"), py::arg("ldo"),
        py::arg("tile") = 0);
}
