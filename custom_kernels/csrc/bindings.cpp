// bindings.cpp -- pybind11 module `custom_kernels._case4_cuda`.
// No libtorch: Python hands raw device pointers (ints). Every call releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "check.h"
#include "graphs.h"

namespace py = pybind11;
using namespace case4;

template <typename P>
static P ptr(const py::dict &d, const char *k) {
    return reinterpret_cast<P>(d[k].cast<uintptr_t>());
}

static int device_sm_count() {
    int dev = 0, n = 0;
    CASE4_CUDA_CHECK(cudaGetDevice(&dev));
    CASE4_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
}

static Plan plan_from_dict(const py::dict &d) {
    Plan p;
    const std::string dt = d["dtype"].cast<std::string>();
    if (dt == "float16") p.dtype = kF16;
    else if (dt == "bfloat16") p.dtype = kBF16;
    else throw std::runtime_error("dtype must be float16 or bfloat16, got " + dt);
    p.V = d["V"].cast<int>(); p.H = d["H"].cast<int>(); p.I = d["I"].cast<int>(); p.L = d["L"].cast<int>();
    p.Hq = d["Hq"].cast<int>(); p.Hkv = d["Hkv"].cast<int>(); p.D = d["D"].cast<int>(); p.R = d["R"].cast<int>();
    p.max_seq = d["max_seq"].cast<int>(); p.sessions = d["sessions"].cast<int>();
    p.eps = d["eps"].cast<float>();
    p.round_logits = d.contains("round_logits") ? d["round_logits"].cast<int>() : 1;
    p.embed = ptr<const void *>(d, "embed");
    p.final_norm = ptr<const void *>(d, "final_norm");
    p.lm_head = ptr<const void *>(d, "lm_head");
    p.rope_cos = ptr<const float *>(d, "rope_cos");
    p.rope_sin = ptr<const float *>(d, "rope_sin");
    for (auto item : d["layers"].cast<py::list>()) {
        py::dict l = item.cast<py::dict>();
        p.layers.push_back({ptr<const void *>(l, "attn_norm"), ptr<const void *>(l, "w_qkv"),
                            ptr<const void *>(l, "w_o"), ptr<const void *>(l, "mlp_norm"),
                            ptr<const void *>(l, "w_gu"), ptr<const void *>(l, "w_down")});
    }
    p.kv = ptr<void *>(d, "kv");
    p.x = ptr<void *>(d, "x"); p.xn = ptr<void *>(d, "xn"); p.qkv = ptr<void *>(d, "qkv");
    p.ctx = ptr<void *>(d, "ctx"); p.mlp = ptr<void *>(d, "mlp"); p.tmp = ptr<void *>(d, "tmp");
    p.logits = ptr<float *>(d, "logits");
    p.part_acc = ptr<float *>(d, "part_acc"); p.part_ml = ptr<float *>(d, "part_ml");
    p.counters = ptr<int *>(d, "counters"); p.max_splits = d["max_splits"].cast<int>();
    p.o_sum = d.contains("o_sum") ? ptr<unsigned long long *>(d, "o_sum") : nullptr;
    p.token_dev = ptr<int *>(d, "token_dev"); p.seq_len_dev = ptr<int *>(d, "seq_len_dev");
    p.params_dev = ptr<SampleParams *>(d, "params_dev");
    p.ring = ptr<int *>(d, "ring"); p.ring_len = d["ring_len"].cast<int>();
    p.use_cublas = d["gemm"].cast<std::string>() == "cublas";
    if (d.contains("pdl")) set_pdl(d["pdl"].cast<int>());
    p.sm_count = device_sm_count();
    return p;
}

// ---- single-kernel entry points for the kernel tests (enqueue on `stream`, no sync)
static void k_gemv(uintptr_t W, int N, int K, uintptr_t x, uintptr_t norm_w, float eps, uintptr_t out, int mode,
                   int dtype, uintptr_t stream, int round_logits, int max_blocks) {
    GemvArgs a;
    a.W = (const void *)W; a.N = N; a.K = K; a.x = (const void *)x; a.norm_w = (const void *)norm_w;
    a.eps = eps; a.out = (void *)out; a.mode = mode; a.round_logits = round_logits; a.max_blocks = max_blocks;
    gemv_init(dtype);
    launch_gemv(a, dtype, (cudaStream_t)stream);
}

static void k_attention(uintptr_t qkv, uintptr_t k_cache, uintptr_t v_cache, uintptr_t cos, uintptr_t sin, int R,
                        int Hq, int Hkv, int D, int max_seq, int pos, uintptr_t part_acc, uintptr_t part_ml,
                        int max_splits, uintptr_t counters, uintptr_t ctx, int dtype, uintptr_t stream,
                        uintptr_t pos_dev) {
    AttnArgs a;
    a.qkv = (const void *)qkv; a.k_cache = (void *)k_cache; a.v_cache = (void *)v_cache;
    a.rope_cos = (const float *)cos; a.rope_sin = (const float *)sin; a.rotary_dim = R;
    a.Hq = Hq; a.Hkv = Hkv; a.D = D; a.max_seq = max_seq; a.pos = pos;
    a.pos_dev = (const int *)pos_dev;
    a.grid_splits = pos_dev ? max_splits : (pos + 1 + kSplitLen - 1) / kSplitLen;
    a.part_acc = (float *)part_acc; a.part_ml = (float *)part_ml; a.max_splits = max_splits;
    a.counters = (int *)counters; a.ctx = (void *)ctx;
    a.sm_count = device_sm_count();
    launch_attention(a, dtype, (cudaStream_t)stream);
}

static void k_sample(uintptr_t logits, int V, int pos, float temperature, int top_k, float top_p,
                     unsigned long long seed, uintptr_t params_dev, uintptr_t token_dev, uintptr_t stream) {
    // params_dev: scratch for one SampleParams (set here), token_dev: the int output
    SampleParams p;
    p.temperature = temperature; p.top_k = top_k; p.top_p = top_p; p.enabled = 1; p.seed = seed;
    launch_set_params((SampleParams *)params_dev, p, (cudaStream_t)stream);
    FinishArgs f;
    f.logits = (const float *)logits; f.V = V; f.pos = pos; f.params = (const SampleParams *)params_dev;
    f.token_dev = (int *)token_dev; f.force_sample = 1;
    launch_finish(f, (cudaStream_t)stream);
}

// lm_head (fp32 logits) with per-block argmax partials in `part`, then greedy sampling from them
// (the custom decode path's last two kernels); returns the number of partials
static int k_greedy_lm(uintptr_t W, int N, int K, uintptr_t x, uintptr_t norm_w, float eps, uintptr_t logits,
                       uintptr_t part, uintptr_t params_dev, uintptr_t token_dev, int dtype, uintptr_t stream,
                       int max_blocks) {
    GemvArgs a;
    a.W = (const void *)W; a.N = N; a.K = K; a.x = (const void *)x; a.norm_w = (const void *)norm_w;
    a.eps = eps; a.out = (void *)logits; a.mode = kGemvF32; a.max_blocks = max_blocks;
    a.amax_part = (int2 *)part;
    gemv_init(dtype);
    const int n = launch_gemv(a, dtype, (cudaStream_t)stream);
    SampleParams p{};
    p.temperature = 0.f; p.top_k = 0; p.top_p = 1.f; p.enabled = 1; p.seed = 0;
    launch_set_params((SampleParams *)params_dev, p, (cudaStream_t)stream);
    FinishArgs f;
    f.logits = (const float *)logits; f.V = N; f.amax_part = (const int2 *)part; f.amax_n = n;
    f.params = (const SampleParams *)params_dev; f.token_dev = (int *)token_dev; f.force_sample = 1;
    launch_finish(f, (cudaStream_t)stream);
    return n;
}

PYBIND11_MODULE(_case4_cuda, m) {
    m.doc() = "Case4 custom CUDA decode kernels, decode-step plan and CUDA graph cache";
    m.attr("SPLIT_LEN") = kSplitLen;
    m.attr("SAMPLE_PARAMS_BYTES") = (int)sizeof(SampleParams);
    auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("gemv", &k_gemv, nogil);
    m.def("attention", &k_attention, nogil);
    m.def("greedy_lm", &k_greedy_lm, nogil);
    m.def("sample", &k_sample, nogil);
    m.def("rng_position", &sample_rng_position);
    m.def("set_pdl", &set_pdl);
    m.def("set_gemv_l2", &set_gemv_l2);
    m.def("set_step_skip", &set_step_skip);
    m.def("set_tuning", &set_tuning);
    m.def("gemv_rope_fits", &gemv_rope_fits);
    m.def("attn_o_parts", &attn_o_parts);
    m.def("tuning", &tuning);
    m.def("set_kernel_trace", &set_kernel_trace);
    m.def("kernel_trace_names", [](int lo, int hi) {
        std::vector<std::string> v;
        for (int i = lo; i < hi; ++i) v.emplace_back(kernel_trace_name(i));
        return v;
    });
    m.def("kernel_trace_next", &kernel_trace_next);

    py::class_<Engine>(m, "Engine")
        .def(py::init([](py::dict plan, const std::string &mode) { return new Engine(plan_from_dict(plan), mode); }))
        .def("set_token", &Engine::set_token, nogil)
        .def("set_seq_len", &Engine::set_seq_len, nogil)
        .def("set_params", &Engine::set_params, nogil)
        .def("eager", &Engine::eager, nogil)
        .def("replay", &Engine::replay, nogil)
        .def("generate", &Engine::generate, nogil)
        .def("fetch_logits", &Engine::fetch_logits, nogil)
        .def("fetch_ring", &Engine::fetch_ring, nogil)
        .def("sync", &Engine::sync, nogil)
        .def("bg_capture_start", &Engine::bg_capture_start, nogil)
        .def("bg_capture_stop", &Engine::bg_capture_stop, nogil)
        .def("wait_precapture", &Engine::wait_precapture, nogil)
        .def("prepare_dynamic", &Engine::prepare_dynamic, nogil)
        .def("stats", &Engine::stats, nogil)
        .def("trace_events", &Engine::trace_events, nogil)
        .def("last_error", &Engine::last_error, nogil)
        .def("replay_stream", &Engine::replay_stream)
        .def("close", &Engine::close, nogil);
}
