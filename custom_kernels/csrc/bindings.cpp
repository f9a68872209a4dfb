// bindings.cpp -- pybind11 module `custom_kernels._case4_cuda`.
// No libtorch: Python hands raw device pointers (ints). Every call releases the GIL. Errors: PrecaptureTimeout
// (RuntimeError) and BadArgument (ValueError) by type (check.h), anything else RuntimeError.
#include <cmath>

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

// A matrix entry of the plan: an int (fp16/bf16 pointer into the weight arena) or, for a quantized matrix, the dict
// ModelWeights.pointers() gives: {"mode": "int8" | "int4", "group": G, "q": ptr, "scale": ptr, "minv": ptr or 0}
static void matrix_from(py::handle v, const void **w, QuantMat *q, const char *name) {
    if (!py::isinstance<py::dict>(v)) {
        *w = reinterpret_cast<const void *>(v.cast<uintptr_t>());
        return;
    }
    py::dict d = v.cast<py::dict>();
    const std::string mode = d["mode"].cast<std::string>();
    if (mode != "int8" && mode != "int4") throw BadArgument(std::string(name) + ": quant mode must be int8 or int4, got " + mode);
    *w = nullptr;
    q->mode = mode == "int8" ? 8 : 4;
    q->group = d["group"].cast<int>();
    q->q = ptr<const void *>(d, "q");
    q->scale = ptr<const void *>(d, "scale");
    q->minv = d.contains("minv") && !d["minv"].is_none() ? ptr<const void *>(d, "minv") : nullptr;
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
    p.qkv_bias = d.contains("qkv_bias") && d["qkv_bias"].cast<bool>();  // then every layer has "b_qkv" (validate)
    p.embed = ptr<const void *>(d, "embed");
    p.final_norm = ptr<const void *>(d, "final_norm");
    matrix_from(d["lm_head"], &p.lm_head, &p.q_lm_head, "lm_head");
    p.rope_cos = ptr<const float *>(d, "rope_cos");
    p.rope_sin = ptr<const float *>(d, "rope_sin");
    for (auto item : d["layers"].cast<py::list>()) {
        py::dict l = item.cast<py::dict>();
        LayerPtrs lp{};
        lp.attn_norm = ptr<const void *>(l, "attn_norm");
        lp.mlp_norm = ptr<const void *>(l, "mlp_norm");
        matrix_from(l["w_qkv"], &lp.w_qkv, &lp.q_qkv, "w_qkv");
        matrix_from(l["w_o"], &lp.w_o, &lp.q_o, "w_o");
        matrix_from(l["w_gu"], &lp.w_gu, &lp.q_gu, "w_gu");
        matrix_from(l["w_down"], &lp.w_down, &lp.q_down, "w_down");
        lp.b_qkv = l.contains("b_qkv") ? ptr<const void *>(l, "b_qkv") : nullptr;  // 0 or absent: no bias
        p.quant = p.quant || lp.q_qkv.mode || lp.q_o.mode || lp.q_gu.mode || lp.q_down.mode;
        p.layers.push_back(lp);
    }
    p.quant = p.quant || p.q_lm_head.mode;
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
    p.sm_count = device_sm_count();
    return p;
}

// ---- single-kernel entry points for the kernel tests and the timing tool (enqueue on `stream`, no sync); each
// takes its PDL level (PdlLevel, default 1: PDL without a preload) and uses no timeline
static Launch test_launch(uintptr_t stream, int pdl) {
    if (pdl < kPdlOff || pdl > kPdlPreload) throw BadArgument("pdl must be 0, 1, 2 or 3");
    Launch L;
    L.st = (cudaStream_t)stream;
    L.pdl = pdl;
    return L;
}

// bias != 0: the bias gemv (GemvBiasArgs: normed kGemvStore, out = round(W x + bias))
static void k_gemv(uintptr_t W, int N, int K, uintptr_t x, uintptr_t norm_w, float eps, uintptr_t out, int mode,
                   int dtype, uintptr_t stream, int round_logits, int max_blocks, int pdl, uintptr_t bias) {
    GemvBiasArgs a;
    a.W = (const void *)W; a.N = N; a.K = K; a.x = (const void *)x; a.norm_w = (const void *)norm_w;
    a.eps = eps; a.out = (void *)out; a.mode = mode; a.round_logits = round_logits; a.max_blocks = max_blocks;
    a.bias = (const void *)bias;
    gemv_init(dtype);
    if (bias) launch_gemv_bias(a, dtype, test_launch(stream, pdl));
    else launch_gemv(a, dtype, test_launch(stream, pdl));
}

static void k_attention(uintptr_t qkv, uintptr_t k_cache, uintptr_t v_cache, uintptr_t cos, uintptr_t sin, int R,
                        int Hq, int Hkv, int D, int max_seq, int pos, uintptr_t part_acc, uintptr_t part_ml,
                        int max_splits, uintptr_t counters, uintptr_t ctx, int dtype, uintptr_t stream,
                        uintptr_t pos_dev, bool per_kv_head, int pdl) {
    AttnArgs a;
    a.qkv = (const void *)qkv; a.k_cache = (void *)k_cache; a.v_cache = (void *)v_cache;
    a.rope_cos = (const float *)cos; a.rope_sin = (const float *)sin; a.rotary_dim = R;
    a.Hq = Hq; a.Hkv = Hkv; a.D = D; a.max_seq = max_seq; a.pos = pos;
    a.pos_dev = (const int *)pos_dev;
    a.grid_splits = pos_dev ? max_splits : (pos + 1 + kSplitLen - 1) / kSplitLen;
    a.part_acc = (float *)part_acc; a.part_ml = (float *)part_ml; a.max_splits = max_splits;
    a.counters = (int *)counters; a.ctx = (void *)ctx;
    a.sm_count = device_sm_count();
    a.per_kv_head = per_kv_head ? 1 : 0;
    launch_attention(a, dtype, test_launch(stream, pdl));
}

// sdp_single_q (the seed's decode op; hf backend --force-flash, custom_kernels/torch_ops.py): one query over
// a session's K/V rows 0..pos of one layer, q/k already rotated (transformers applied RoPE). qkv = [q (Hq*D),
// K_pos (Hkv*D), V_pos (Hkv*D)]; the caches are [Hkv, max_seq, D] with rows 0..pos-1 filled (the kernel
// rewrites row pos from qkv). The kernel scales by 1/sqrt(D): another scale is refused, not ignored.
static void k_sdp_single_q(uintptr_t qkv, uintptr_t k_cache, uintptr_t v_cache, int Hq, int Hkv, int D, int max_seq,
                           int pos, float scale, uintptr_t part_acc, uintptr_t part_ml, int max_splits,
                           uintptr_t counters, uintptr_t ctx, int dtype, uintptr_t stream) {
    const float want = 1.f / std::sqrt((float)D);
    if (std::fabs(scale - want) > 1e-6f * want)
        throw BadArgument("sdp_single_q: the kernel scales by 1/sqrt(head_dim); another scale is not supported");
    if (pos < 0 || pos >= max_seq || (pos + kSplitLen) / kSplitLen > max_splits)
        throw BadArgument("sdp_single_q: pos must be in [0, max_seq) with max_splits >= ceil((pos + 1) / SPLIT_LEN)");
    AttnArgs a;
    a.qkv = (const void *)qkv; a.k_cache = (void *)k_cache; a.v_cache = (void *)v_cache;
    a.Hq = Hq; a.Hkv = Hkv; a.D = D; a.max_seq = max_seq; a.pos = pos;
    a.grid_splits = (pos + kSplitLen) / kSplitLen;
    a.part_acc = (float *)part_acc; a.part_ml = (float *)part_ml; a.max_splits = max_splits;
    a.counters = (int *)counters; a.ctx = (void *)ctx;
    a.sm_count = device_sm_count();
    a.prerotated = 1;
    launch_attention(a, dtype, test_launch((uintptr_t)stream, kPdlOff));
}

static void k_sample(uintptr_t logits, int V, int pos, float temperature, int top_k, float top_p,
                     unsigned long long seed, uintptr_t params_dev, uintptr_t token_dev, uintptr_t stream, int pdl) {
    // params_dev: scratch for one SampleParams (set here), token_dev: the int output
    SampleParams p;
    p.temperature = temperature; p.top_k = top_k; p.top_p = top_p; p.enabled = 1; p.seed = seed;
    launch_set_params((SampleParams *)params_dev, p, (cudaStream_t)stream);
    FinishArgs f;
    f.logits = (const float *)logits; f.V = V; f.pos = pos; f.params = (const SampleParams *)params_dev;
    f.token_dev = (int *)token_dev; f.force_sample = 1;
    launch_finish(f, test_launch(stream, pdl));
}

// quantized gemv (gemv_quant.cu): W given as (q, scale, minv, qmode 8|4, group); `tok` / `x_out`: the embedding
// gather (x is then the table), `part`: kGemvF32's per-block argmax partials, `bias`: kGemvStore's (QGemvArgs::bias);
// returns the grid size
static int k_qgemv(uintptr_t q, uintptr_t scale, uintptr_t minv, int qmode, int group, int N, int K, uintptr_t x,
                   uintptr_t norm_w, float eps, uintptr_t out, int mode, int dtype, uintptr_t stream, int round_logits,
                   int max_blocks, int pdl, uintptr_t tok, uintptr_t x_out, uintptr_t part, uintptr_t bias) {
    QGemvArgs a;
    a.q = (const void *)q; a.scale = (const void *)scale; a.minv = (const void *)minv; a.qmode = (signed char)qmode;
    a.group = group; a.N = N; a.K = K; a.x = (const void *)x; a.norm_w = (const void *)norm_w; a.eps = eps;
    a.out = (void *)out; a.mode = (signed char)mode; a.round_logits = (signed char)round_logits;
    a.max_blocks = max_blocks; a.tok = (const int *)tok; a.x_out = (void *)x_out; a.amax_part = (int2 *)part;
    a.bias = (const void *)bias;
    qgemv_init(dtype);  // a no-op after the first call per device and dtype
    return launch_qgemv(a, dtype, test_launch(stream, pdl));
}

static void k_dequant(uintptr_t q, uintptr_t scale, uintptr_t minv, int qmode, int group, int N, int K, uintptr_t out,
                      int dtype, uintptr_t stream) {
    QuantMat m;
    m.q = (const void *)q; m.scale = (const void *)scale; m.minv = (const void *)minv; m.mode = qmode; m.group = group;
    launch_dequant(m, N, K, (void *)out, dtype, (cudaStream_t)stream);
}

// lm_head (fp32 logits) with per-block argmax partials in `part`, then greedy sampling from them
// (the custom decode path's last two kernels); returns the number of partials
static int k_greedy_lm(uintptr_t W, int N, int K, uintptr_t x, uintptr_t norm_w, float eps, uintptr_t logits,
                       uintptr_t part, uintptr_t params_dev, uintptr_t token_dev, int dtype, uintptr_t stream,
                       int max_blocks, int pdl) {
    const Launch L = test_launch(stream, pdl);
    GemvArgs a;
    a.W = (const void *)W; a.N = N; a.K = K; a.x = (const void *)x; a.norm_w = (const void *)norm_w;
    a.eps = eps; a.out = (void *)logits; a.mode = kGemvF32; a.max_blocks = max_blocks;
    a.amax_part = (int2 *)part;
    gemv_init(dtype);
    const int n = launch_gemv(a, dtype, L);
    SampleParams p{};
    p.temperature = 0.f; p.top_k = 0; p.top_p = 1.f; p.enabled = 1; p.seed = 0;
    launch_set_params((SampleParams *)params_dev, p, (cudaStream_t)stream);
    FinishArgs f;
    f.logits = (const float *)logits; f.V = N; f.amax_part = (const int2 *)part; f.amax_n = n;
    f.params = (const SampleParams *)params_dev; f.token_dev = (int *)token_dev; f.force_sample = 1;
    launch_finish(f, L);
    return n;
}

PYBIND11_MODULE(_case4_cuda, m) {
    m.doc() = "Case4 custom CUDA decode kernels, decode-step plan and CUDA graph cache";
    m.attr("SPLIT_LEN") = kSplitLen;
    m.attr("SAMPLE_PARAMS_BYTES") = (int)sizeof(SampleParams);
    // the kernel timeline's record layout (ops.h), read by bench/quick_timing.py
    m.attr("KTRACE_BLOCKS") = kKtraceBlocks;
    m.attr("KTRACE_REC") = kKtraceRec;
    m.attr("KTRACE_WARP0") = kKtraceWarp0;
    auto nogil = py::call_guard<py::gil_scoped_release>();
    py::register_exception<PrecaptureTimeout>(m, "PrecaptureTimeout", PyExc_RuntimeError);
    py::register_exception<BadArgument>(m, "BadArgument", PyExc_ValueError);

    using py::arg;
    m.def("gemv", &k_gemv, nogil, arg("W"), arg("N"), arg("K"), arg("x"), arg("norm_w"), arg("eps"), arg("out"),
          arg("mode"), arg("dtype"), arg("stream"), arg("round_logits"), arg("max_blocks"), arg("pdl") = 1,
          arg("bias") = 0);
    m.def("attention", &k_attention, nogil, arg("qkv"), arg("k_cache"), arg("v_cache"), arg("cos"), arg("sin"),
          arg("R"), arg("Hq"), arg("Hkv"), arg("D"), arg("max_seq"), arg("pos"), arg("part_acc"), arg("part_ml"),
          arg("max_splits"), arg("counters"), arg("ctx"), arg("dtype"), arg("stream"), arg("pos_dev"),
          arg("per_kv_head") = false, arg("pdl") = 1);
    m.def("greedy_lm", &k_greedy_lm, nogil, arg("W"), arg("N"), arg("K"), arg("x"), arg("norm_w"), arg("eps"),
          arg("logits"), arg("part"), arg("params_dev"), arg("token_dev"), arg("dtype"), arg("stream"),
          arg("max_blocks"), arg("pdl") = 1);
    m.def("sdp_single_q", &k_sdp_single_q, nogil, arg("qkv"), arg("k_cache"), arg("v_cache"), arg("Hq"), arg("Hkv"),
          arg("D"), arg("max_seq"), arg("pos"), arg("scale"), arg("part_acc"), arg("part_ml"), arg("max_splits"),
          arg("counters"), arg("ctx"), arg("dtype"), arg("stream"));
    m.def("sample", &k_sample, nogil, arg("logits"), arg("V"), arg("pos"), arg("temperature"), arg("top_k"),
          arg("top_p"), arg("seed"), arg("params_dev"), arg("token_dev"), arg("stream"), arg("pdl") = 1);
    m.def("qgemv", &k_qgemv, nogil, arg("q"), arg("scale"), arg("minv"), arg("qmode"), arg("group"), arg("N"), arg("K"),
          arg("x"), arg("norm_w"), arg("eps"), arg("out"), arg("mode"), arg("dtype"), arg("stream"),
          arg("round_logits"), arg("max_blocks"), arg("pdl") = 1, arg("tok") = 0, arg("x_out") = 0, arg("part") = 0,
          arg("bias") = 0);
    m.def("dequant", &k_dequant, nogil, arg("q"), arg("scale"), arg("minv"), arg("qmode"), arg("group"), arg("N"),
          arg("K"), arg("out"), arg("dtype"), arg("stream"));
    m.def("gemv_rope_fits", &gemv_rope_fits);
    m.def("attn_o_parts", &attn_o_parts);

    py::enum_<GraphMode>(m, "GraphMode")
        .value("none", GraphMode::none)
        .value("exact", GraphMode::exact)
        .value("dynamic", GraphMode::dynamic);

    // the Engine's options by name (step.h EngineOptions: defaults, meanings, performance.md entries)
    py::class_<EngineOptions>(m, "EngineOptions")
        .def(py::init([](int pdl, bool rope_in_qkv, bool o_in_attention, bool attn_per_kv_head, bool lm_head_seq_len,
                         bool lm_head_l2_ahead, int step_skip) {
                 EngineOptions o;
                 o.pdl = pdl; o.rope_in_qkv = rope_in_qkv; o.o_in_attention = o_in_attention;
                 o.attn_per_kv_head = attn_per_kv_head; o.lm_head_seq_len = lm_head_seq_len;
                 o.lm_head_l2_ahead = lm_head_l2_ahead; o.step_skip = step_skip;
                 return o;
             }),
             py::kw_only(), arg("pdl") = EngineOptions{}.pdl, arg("rope_in_qkv") = EngineOptions{}.rope_in_qkv,
             arg("o_in_attention") = EngineOptions{}.o_in_attention,
             arg("attn_per_kv_head") = EngineOptions{}.attn_per_kv_head,
             arg("lm_head_seq_len") = EngineOptions{}.lm_head_seq_len,
             arg("lm_head_l2_ahead") = EngineOptions{}.lm_head_l2_ahead, arg("step_skip") = EngineOptions{}.step_skip)
        .def_readwrite("pdl", &EngineOptions::pdl)
        .def_readwrite("rope_in_qkv", &EngineOptions::rope_in_qkv)
        .def_readwrite("o_in_attention", &EngineOptions::o_in_attention)
        .def_readwrite("attn_per_kv_head", &EngineOptions::attn_per_kv_head)
        .def_readwrite("lm_head_seq_len", &EngineOptions::lm_head_seq_len)
        .def_readwrite("lm_head_l2_ahead", &EngineOptions::lm_head_l2_ahead)
        .def_readwrite("step_skip", &EngineOptions::step_skip)
        .def("__repr__", [](const EngineOptions &o) {
            return "EngineOptions(pdl=" + std::to_string(o.pdl) + ", rope_in_qkv=" + (o.rope_in_qkv ? "True" : "False") +
                   ", o_in_attention=" + (o.o_in_attention ? "True" : "False") +
                   ", attn_per_kv_head=" + (o.attn_per_kv_head ? "True" : "False") +
                   ", lm_head_seq_len=" + (o.lm_head_seq_len ? "True" : "False") +
                   ", lm_head_l2_ahead=" + (o.lm_head_l2_ahead ? "True" : "False") +
                   ", step_skip=" + std::to_string(o.step_skip) + ")";
        });

    py::class_<Engine>(m, "Engine")
        .def(py::init([](py::dict plan, GraphMode mode, const EngineOptions &options) {
                 return new Engine(plan_from_dict(plan), mode, options);
             }),
             arg("plan"), arg("mode"), arg("options") = EngineOptions{})
        .def("set_token", &Engine::set_token, nogil)
        .def("set_seq_len", &Engine::set_seq_len, nogil)
        .def("set_params", &Engine::set_params, nogil)
        .def("eager", &Engine::eager, nogil)
        .def("replay", &Engine::replay, nogil)
        .def("generate", &Engine::generate, nogil)
        .def("sample", &Engine::sample, nogil, arg("s"), arg("position"), arg("temperature"), arg("top_k"),
             arg("top_p"), arg("seed"))
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
        .def_property_readonly("options", [](const Engine &e) { return e.options(); })  // a copy
        .def("set_kernel_trace", &Engine::set_kernel_trace, arg("buf"), arg("n"))
        .def("kernel_trace_next", &Engine::kernel_trace_next)
        .def("kernel_trace_names", &Engine::kernel_trace_names, arg("lo"), arg("hi"))
        .def("close", &Engine::close, nogil);
}
