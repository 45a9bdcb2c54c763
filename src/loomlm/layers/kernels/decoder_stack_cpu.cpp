// A decode-only step through every layer of a pre-norm Llama decoder in one call from Python.
//
// Why: at one stream, a decode step of the default model spends about as long in Python (module
// calls, tensor views, ~15 kernel calls per layer, 30 layers) as in the kernels themselves. This
// class holds each layer's weights and KV pool once, and its forward runs the very kernels the
// Python layers call (rms_norm / add_rms_norm_, quant_gemm or gemm_f32, rotary_, reshape_and_cache,
// paged_decode_attention, silu_and_mul), in the same order on the same tensors, so the result is
// bit for bit that of the Python path (tests/test_decoder_stack.py). models/llama.py decides when
// it applies (a decode-only step, no LoRA, a plain pre-norm layout) and falls back otherwise.
#include <ATen/ATen.h>
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

// The kernels composed here (other files of this extension).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
void add_rms_norm_(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
at::Tensor silu_and_mul(const at::Tensor& gate_up);
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads, int64_t head_dim);
at::Tensor gemm_f32(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias,
                    const std::string& isa_name, int64_t large_m);
at::Tensor quant_gemm(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n,
                      const c10::optional<at::Tensor>& bias, const std::string& isa_name, int64_t activation_planes,
                      int64_t float_rows);
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                     int64_t window, double soft_cap);
void reshape_and_cache(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor k_cache,
                       torch::Tensor v_cache, const torch::Tensor& slot_mapping);

namespace {

// One linear layer's weight as its linear method keeps it: GGUF blocks (qtype > 0: quant_gemm)
// or float32 panels (qtype == 0: gemm_f32). `rows`: quant_gemm's float_rows / gemm_f32's large_m.
struct NativeLinear {
  at::Tensor w;
  int64_t qtype, n, rows, planes;

  at::Tensor apply(const at::Tensor& x) const {
    if (qtype == 0) return gemm_f32(x, w, n, c10::nullopt, "auto", rows);
    return quant_gemm(x, w, qtype, n, c10::nullopt, "auto", planes, rows);
  }
};

struct Layer {
  at::Tensor input_norm, post_norm;  // [hidden]
  NativeLinear qkv, o, gate_up, down;
  at::Tensor k_cache, v_cache;  // [KVH, num_blocks, block_size, D]
  double scale, soft_cap;       // soft_cap 0: none
  int64_t window;               // 0: none
};

class DecoderStack {
 public:
  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps)
      : heads_(num_heads), kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps) {}

  // linears: (weight, qtype, n, rows, planes) for qkv, o, gate_up, down.
  void add_layer(const at::Tensor& input_norm, const at::Tensor& post_norm,
                 const std::vector<std::tuple<at::Tensor, int64_t, int64_t, int64_t, int64_t>>& linears,
                 const at::Tensor& k_cache, const at::Tensor& v_cache, double scale, int64_t window, double soft_cap) {
    TORCH_CHECK(linears.size() == 4, "DecoderStack.add_layer: qkv, o, gate_up and down expected");
    NativeLinear l[4];
    for (int i = 0; i < 4; ++i) {
      const auto& [w, qtype, n, rows, planes] = linears[i];
      l[i] = {w, qtype, n, rows, planes};
    }
    layers_.push_back({input_norm, post_norm, l[0], l[1], l[2], l[3], k_cache, v_cache, scale, soft_cap, window});
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x: [S, hidden] embeddings of S decode tokens; cos, sin: [S, head_dim]; block_tables [S, max_blocks],
  // context_lens [S], slot_mapping [S] int64. Returns (x, residual): the last layer's output and the
  // residual stream before it (LlamaForCausalLM.forward's loop state; the final norm follows).
  std::tuple<at::Tensor, at::Tensor> forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                                             const at::Tensor& block_tables, const at::Tensor& context_lens,
                                             const at::Tensor& slot_mapping) const {
    TORCH_CHECK(!layers_.empty(), "DecoderStack.forward: no layers");
    const int64_t S = x.size(0);
    const int64_t q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
    at::Tensor residual;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& L = layers_[i];
      if (i == 0) {
        residual = x;
        x = rms_norm(x, L.input_norm, eps_);
      } else {
        add_rms_norm_(x, residual, L.input_norm, eps_);
      }
      at::Tensor qkv = L.qkv.apply(x);  // [S, q_size + 2 * kv_size]
      rotary_(qkv, cos, sin, heads_ + kv_heads_, head_dim_);
      const at::Tensor q = qkv.narrow(1, 0, q_size).unflatten(1, {heads_, head_dim_});
      const at::Tensor k = qkv.narrow(1, q_size, kv_size).unflatten(1, {kv_heads_, head_dim_});
      const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).unflatten(1, {kv_heads_, head_dim_});
      reshape_and_cache(k, v, L.k_cache, L.v_cache, slot_mapping);
      const at::Tensor attn = paged_decode_attention(q.contiguous(), L.k_cache, L.v_cache, block_tables, context_lens,
                                                     L.scale, L.window, L.soft_cap);  // [S, H, D]
      x = L.o.apply(attn.reshape({S, q_size}));
      add_rms_norm_(x, residual, L.post_norm, eps_);
      x = L.down.apply(silu_and_mul(L.gate_up.apply(x)));
    }
    return {x, residual};
  }

 private:
  int64_t heads_, kv_heads_, head_dim_;
  double eps_;
  std::vector<Layer> layers_;
};

}  // namespace

void register_decoder_stack(pybind11::module& m) {
  pybind11::class_<DecoderStack>(m, "DecoderStack",
                                 "every layer of a pre-norm Llama decoder for a decode-only step (CPU, float32)")
      .def(pybind11::init<int64_t, int64_t, int64_t, double>(), pybind11::arg("num_heads"),
           pybind11::arg("num_kv_heads"), pybind11::arg("head_dim"), pybind11::arg("eps"))
      .def("add_layer", &DecoderStack::add_layer)
      .def("num_layers", &DecoderStack::num_layers)
      .def("forward", &DecoderStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
