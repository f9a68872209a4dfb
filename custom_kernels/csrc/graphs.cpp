// graphs.cpp -- graph cache, background capture thread, replay (see graphs.h).
#include "graphs.h"

#include <algorithm>
#include <cstring>

#include <nvtx3/nvtx3.hpp>  // NVTX ranges for Nsight Systems (header-only; ~free without a tool attached)

#include "check.h"

namespace case4 {

static constexpr size_t kBlasWorkspace = 32u << 20;
static constexpr size_t kMaxTrace = 200000;
static constexpr size_t kMaxSamples = 100000;
static constexpr size_t kMaxPool = 8;   // recycled execs kept for cudaGraphExecUpdate
static constexpr int kGenLag = 4;       // generate(): steps the host may run ahead of the GPU

const char *graph_mode_name(GraphMode m) {
    switch (m) {
        case GraphMode::none: return "none";
        case GraphMode::exact: return "exact";
        case GraphMode::dynamic: return "dynamic";
    }
    return "?";
}

Engine::Engine(const Plan &plan, GraphMode mode, const EngineOptions &options)
    : plan_(plan), mode_(mode), opts_(options) {
    if (mode != GraphMode::none && mode != GraphMode::exact && mode != GraphMode::dynamic)
        throw BadArgument("graph mode must be none, exact or dynamic");
    if (opts_.pdl < kPdlOff || opts_.pdl > kPdlPreload)
        throw BadArgument("pdl must be 0 (plain launches), 1 (PDL), 2 (+ L2 prefetch) or 3 (+ register preload)");
    plan_.validate();
    gemv_init(plan_.dtype);
    if (plan_.quant) qgemv_init(plan_.dtype);
    CASE4_CUDA_CHECK(cudaStreamCreateWithFlags(&replay_, cudaStreamNonBlocking));
    CASE4_CUDA_CHECK(cudaStreamCreateWithFlags(&capture_, cudaStreamNonBlocking));
    // spinning wait (no cudaEventBlockingSync): the per-token logits fetch of client sampling
    // waits ~5 ms; a sleeping thread wakes tens of microseconds late in a VM, on every token
    CASE4_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    if (plan_.use_cublas) {  // one handle per stream; workspace set after the stream
        CASE4_CUDA_CHECK(cudaMalloc(&ws_replay_, kBlasWorkspace));
        CASE4_CUDA_CHECK(cudaMalloc(&ws_capture_, kBlasWorkspace));
        CASE4_CUBLAS_CHECK(cublasCreate(&blas_replay_));
        CASE4_CUBLAS_CHECK(cublasSetStream(blas_replay_, replay_));
        CASE4_CUBLAS_CHECK(cublasSetWorkspace(blas_replay_, ws_replay_, kBlasWorkspace));
        CASE4_CUBLAS_CHECK(cublasCreate(&blas_capture_));
        CASE4_CUBLAS_CHECK(cublasSetStream(blas_capture_, capture_));
        CASE4_CUBLAS_CHECK(cublasSetWorkspace(blas_capture_, ws_capture_, kBlasWorkspace));
    }
    lag_events_.resize(2 * kGenLag);
    for (auto &e : lag_events_) CASE4_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    cur_.assign(plan_.sessions, 0);
    window_.assign(plan_.sessions, 0);
    capture_ms_.reserve(4096);
    instantiate_ms_.reserve(4096);
    trace_.reserve(4096);
}

Engine::~Engine() {
    try { close(); } catch (...) {}
}

// Absolute CLOCK_MONOTONIC microseconds (libstdc++'s steady_clock), the clock of Python's
// time.perf_counter() on Linux: capture/replay intervals line up with the orchestrator's trace.
double Engine::now_us() const {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void Engine::trace(const char *name, const char *tid, double t0, double t1) {
    // caller holds mu_
    if (trace_.size() < kMaxTrace) trace_.push_back({name, tid, t0, t1 - t0});
    // the replay stream is busy from its first launch until the host next waits for it
    if (busy_t0_ < 0 && std::string(tid) == "replay") busy_t0_ = t0;
}

// ------------------------------------------------------------------ session state
void Engine::set_token(int s, int token) {
    check_session(s, plan_.sessions, "set_token");
    launch_set_int(plan_.token_dev + s, token, replay_);
}

void Engine::set_seq_len(int s, int n) {
    check_session(s, plan_.sessions, "set_seq_len");
    launch_set_int(plan_.seq_len_dev + s, n, replay_);
    std::vector<cudaGraphExec_t> dead;
    {
        std::lock_guard<std::mutex> lk(mu_);
        cur_[s] = n;
        evict_locked(s, &dead);
    }
    retire(dead);
    cv_.notify_all();
}

void Engine::set_params(int s, float temperature, int top_k, float top_p, unsigned long long seed, int enabled) {
    check_session(s, plan_.sessions, "set_params");
    SampleParams p;
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.enabled = enabled;
    p.seed = seed;
    launch_set_params(plan_.params_dev + s, p, replay_);
}

// ------------------------------------------------------------------ steps
void Engine::eager(int s, int T, int token) {
    const double t0 = now_us();
    if (token >= 0) set_token(s, token);
    step(s, T, replay_, blas_replay_);
    const double t1 = now_us();
    std::vector<cudaGraphExec_t> dead;
    {
        std::lock_guard<std::mutex> lk(mu_);
        cur_[s] = T + 1;
        evict_locked(s, &dead);
        trace("eager", "replay", t0, t1);
    }
    retire(dead);
    cv_.notify_all();
}

void Engine::replay(int s, int T, int token) {
    nvtx3::scoped_range nvtx_range{"case4 replay"};
    check_session(s, plan_.sessions, "replay");
    if (mode_ == GraphMode::none) { eager(s, T, token); return; }
    if (mode_ == GraphMode::dynamic) {
        if (token >= 0) set_token(s, token);
        run_dynamic(s, 1);
        std::lock_guard<std::mutex> lk(mu_);
        cur_[s] = T + 1;
        return;
    }
    const double t0 = now_us();
    std::vector<cudaGraphExec_t> dead;
    bool hit = false;
    {
        std::lock_guard<std::mutex> lk(mu_);
        auto it = graphs_.find({s, T});
        if (it != graphs_.end()) {
            if (token >= 0) launch_set_int(plan_.token_dev + s, token, replay_);
            CASE4_CUDA_CHECK(cudaGraphLaunch(it->second, replay_));
            hit = true;
            ++replays_;
            cur_[s] = T + 1;
            evict_locked(s, &dead);  // includes graph T: freed when its launch completes
            trace("replay", "replay", t0, now_us());
        } else {
            ++misses_;
        }
    }
    retire(dead);
    if (!hit) eager(s, T, token);
    cv_.notify_all();
}

void Engine::generate(int s, int T0, int steps, int k) {
    if (mode_ == GraphMode::dynamic && k > 1) {
        int done = 0;
        while (steps - done >= k) {
            run_dynamic(s, k);
            done += k;
        }
        for (; done < steps; ++done) run_dynamic(s, 1);
        std::lock_guard<std::mutex> lk(mu_);
        cur_[s] = T0 + steps;
        return;
    }
    // keep the host at most kGenLag steps ahead of the GPU, so that the capture thread only
    // has to keep pace with execution (not with enqueueing) and replays find their graphs
    const int ne = (int)lag_events_.size();
    for (int i = 0; i < steps; ++i) {
        if (i >= kGenLag) CASE4_CUDA_CHECK(cudaEventSynchronize(lag_events_[(i - kGenLag) % ne]));
        replay(s, T0 + i, -1);
        CASE4_CUDA_CHECK(cudaEventRecord(lag_events_[i % ne], replay_));
    }
}

void Engine::run_dynamic(int s, int k) {
    nvtx3::scoped_range nvtx_range{"case4 replay_dynamic"};
    cudaGraphExec_t exec = nullptr;
    {
        std::lock_guard<std::mutex> lk(mu_);
        auto it = graphs_.find({s, -k});
        if (it != graphs_.end()) exec = it->second;
    }
    if (!exec) {
        prepare_dynamic(s, k);
        std::lock_guard<std::mutex> lk(mu_);
        exec = graphs_.at({s, -k});
    }
    const double t0 = now_us();
    CASE4_CUDA_CHECK(cudaGraphLaunch(exec, replay_));
    std::lock_guard<std::mutex> lk(mu_);
    ++replays_;
    trace("replay_dynamic", "replay", t0, now_us());
}

int Engine::sample(int s, int position, float temperature, int top_k, float top_p, unsigned long long seed) {
    check_session(s, plan_.sessions, "sample");
    if (position < 0) throw BadArgument("sample: position must be >= 0");
    set_params(s, temperature, top_k, top_p, seed, 0);  // enabled 0: the session's steps do not sample after it
    FinishArgs f;
    f.logits = plan_.logits;
    f.V = plan_.V;
    f.pos = position;
    f.params = plan_.params_dev + s;
    f.token_dev = plan_.token_dev + s;
    f.force_sample = 1;  // no amax partials (greedy reads the V logits), no seq_len, no ring
    launch_finish(f, Launch{replay_, opts_.pdl, &ktrace_});
    int tok = 0;
    CASE4_CUDA_CHECK(cudaMemcpyAsync(&tok, plan_.token_dev + s, sizeof(int), cudaMemcpyDeviceToHost, replay_));
    sync();
    return tok;
}

void Engine::fetch_logits(uintptr_t host_dst) {
    CASE4_CUDA_CHECK(cudaMemcpyAsync((void *)host_dst, plan_.logits, sizeof(float) * plan_.V,
                                     cudaMemcpyDeviceToHost, replay_));
    sync();
}

void Engine::fetch_ring(int s, uintptr_t host_dst) {
    check_session(s, plan_.sessions, "fetch_ring");
    CASE4_CUDA_CHECK(cudaMemcpyAsync((void *)host_dst, plan_.ring + (size_t)s * plan_.ring_len,
                                     sizeof(int) * plan_.ring_len, cudaMemcpyDeviceToHost, replay_));
    sync();
}

void Engine::sync() {
    CASE4_CUDA_CHECK(cudaEventRecord(done_, replay_));
    CASE4_CUDA_CHECK(cudaEventSynchronize(done_));
    CASE4_CUDA_CHECK(cudaGetLastError());
    std::lock_guard<std::mutex> lk(mu_);
    if (busy_t0_ >= 0) {  // launch -> completion seen by the host: an upper bound of the GPU interval
        const double t1 = now_us();
        if (trace_.size() < kMaxTrace) trace_.push_back({"replay (launch to done)", "replay stream", busy_t0_, t1 - busy_t0_});
        busy_t0_ = -1;
    }
}

void Engine::retire(std::vector<cudaGraphExec_t> &dead) {
    if (dead.empty()) return;
    std::vector<cudaGraphExec_t> destroy;
    {
        std::lock_guard<std::mutex> lk(mu_);
        for (auto e : dead) {
            if (pool_.size() < kMaxPool) pool_.push_back(e); else destroy.push_back(e);
        }
    }
    // an exec still in flight is freed (or updated) safely: both only affect later launches
    for (auto e : destroy) cudaGraphExecDestroy(e);
    dead.clear();
}

// ------------------------------------------------------------------ capture
bool Engine::capture(int s, int T, int k, cudaGraphExec_t *out, std::string *err) {
    nvtx3::scoped_range nvtx_range{"case4 capture"};  // capture + instantiate (or update)
    const double t0 = now_us();
    cudaGraph_t g = nullptr;
    cudaError_t e = cudaStreamBeginCapture(capture_, cudaStreamCaptureModeThreadLocal);
    if (e != cudaSuccess) { *err = cudaGetErrorString(e); return false; }
    try {
        for (int i = 0; i < k; ++i) step(s, T, capture_, blas_capture_);
    } catch (const std::exception &ex) {
        *err = ex.what();
        cudaStreamEndCapture(capture_, &g);
        if (g) cudaGraphDestroy(g);
        cudaGetLastError();
        return false;
    }
    e = cudaStreamEndCapture(capture_, &g);
    if (e != cudaSuccess || !g) {
        *err = std::string("end capture: ") + cudaGetErrorString(e);
        if (g) cudaGraphDestroy(g);
        cudaGetLastError();
        return false;
    }
    const double t1 = now_us();
    cudaGraphExec_t reuse = nullptr;
    if (T >= 0) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!pool_.empty()) { reuse = pool_.back(); pool_.pop_back(); }
    }
    bool updated = false;
    if (reuse) {  // same topology, new parameters: much cheaper than instantiating
        cudaGraphExecUpdateResultInfo info;
        if (cudaGraphExecUpdate(reuse, g, &info) == cudaSuccess) {
            *out = reuse;
            updated = true;
        } else {
            cudaGetLastError();
            cudaGraphExecDestroy(reuse);
        }
    }
    e = updated ? cudaSuccess : cudaGraphInstantiateWithFlags(out, g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess) {
        *err = std::string("instantiate: ") + cudaGetErrorString(e);
        cudaGetLastError();
        return false;
    }
    const double t2 = now_us();
    std::lock_guard<std::mutex> lk(mu_);
    ++captured_;
    updated_ += updated;
    if (capture_ms_.size() < kMaxSamples) {
        capture_ms_.push_back((t1 - t0) / 1000.0);
        instantiate_ms_.push_back((t2 - t1) / 1000.0);
    }
    trace(T < 0 ? "capture_dynamic" : "capture", "capture", t0, t2);
    return true;
}

void Engine::prepare_dynamic(int s, int k) {
    check_session(s, plan_.sessions, "prepare_dynamic");
    if (k < 1) throw BadArgument("prepare_dynamic: k must be >= 1");
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (graphs_.count({s, -k})) return;
    }
    cudaGraphExec_t exec = nullptr;
    std::string err;
    if (!capture(s, -1, k, &exec, &err)) throw std::runtime_error("dynamic graph capture failed: " + err);
    std::lock_guard<std::mutex> lk(mu_);
    graphs_[{s, -k}] = exec;
}

// graphs of session s behind its position, or beyond its window, are dropped (exact keys only)
void Engine::evict_locked(int s, std::vector<cudaGraphExec_t> *dead) {
    const int lo = cur_[s];
    const int hi = window_[s] > 0 ? cur_[s] + window_[s] : plan_.max_seq + 1;
    for (auto it = graphs_.lower_bound({s, 0}); it != graphs_.end() && it->first.first == s;) {
        const int T = it->first.second;
        if (T < lo || T >= hi) {
            dead->push_back(it->second);
            it = graphs_.erase(it);
            ++evicted_;
        } else {
            ++it;
        }
    }
    for (auto it = failed_.begin(); it != failed_.end();) {
        if (it->first == s && it->second < lo) it = failed_.erase(it); else ++it;
    }
}

bool Engine::pick_locked(int *ps, int *pT) {
    int best_d = 1 << 30;
    for (int s = 0; s < plan_.sessions; ++s) {
        if (window_[s] <= 0) continue;
        const int hi = std::min(cur_[s] + window_[s], plan_.max_seq);
        for (int T = cur_[s]; T < hi && T - cur_[s] < best_d; ++T) {
            const Key key{s, T};
            if (graphs_.count(key) || failed_.count(key) || busy_.count(key)) continue;
            best_d = T - cur_[s];
            *ps = s;
            *pT = T;
            break;
        }
    }
    return best_d < (1 << 30);
}

void Engine::bg_loop() {
    std::unique_lock<std::mutex> lk(mu_);
    while (!stop_.load()) {
        int s = 0, T = 0;
        if (!pick_locked(&s, &T)) {
            cv_.wait_for(lk, std::chrono::milliseconds(5));
            continue;
        }
        busy_.insert({s, T});
        lk.unlock();
        cudaGraphExec_t exec = nullptr;
        std::string err;
        const bool ok = capture(s, T, 1, &exec, &err);
        lk.lock();
        busy_.erase({s, T});
        if (!ok) {
            ++failures_;
            failed_.insert({s, T});
            last_error_ = "capture of (session " + std::to_string(s) + ", T " + std::to_string(T) + ") failed: " + err;
        } else if (T >= cur_[s] && window_[s] > 0 && T < cur_[s] + window_[s]) {
            graphs_[{s, T}] = exec;
            live_max_ = std::max(live_max_, graphs_.size());
        } else {  // the position moved past it meanwhile
            ++evicted_;
            if (pool_.size() < kMaxPool) pool_.push_back(exec);
            else { lk.unlock(); cudaGraphExecDestroy(exec); lk.lock(); }
        }
        cv_.notify_all();
    }
}

void Engine::bg_capture_start(int s, int window) {
    if (mode_ != GraphMode::exact)
        throw BadArgument(std::string("background capture needs graph mode exact (mode is ") + graph_mode_name(mode_) + ")");
    check_session(s, plan_.sessions, "bg_capture_start");
    if (window < 1) throw BadArgument("window must be >= 1");
    {
        std::lock_guard<std::mutex> lk(mu_);
        window_[s] = window;
    }
    if (!bg_.joinable()) {
        stop_.store(false);
        bg_ = std::thread(&Engine::bg_loop, this);
    }
    cv_.notify_all();
}

void Engine::bg_capture_stop(int s) {
    bool any = false;
    {
        std::lock_guard<std::mutex> lk(mu_);
        for (int i = 0; i < plan_.sessions; ++i) {
            if (s < 0 || i == s) window_[i] = 0;
            any = any || window_[i] > 0;
        }
    }
    if (!any && bg_.joinable()) {
        stop_.store(true);
        cv_.notify_all();
        bg_.join();
    }
}

void Engine::wait_precapture(int s, int count, double timeout_s) {
    if (mode_ != GraphMode::exact) return;  // nothing to wait for
    check_session(s, plan_.sessions, "wait_precapture");
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    std::unique_lock<std::mutex> lk(mu_);
    if (window_[s] <= 0 || !bg_.joinable())
        throw BadArgument("wait_precapture: background capture is not running for session " + std::to_string(s));
    if (count > window_[s])
        throw BadArgument("wait_precapture: count " + std::to_string(count) + " exceeds the window " +
                                 std::to_string(window_[s]));
    for (;;) {
        const int hi = std::min(cur_[s] + count, plan_.max_seq);
        int ready = 0;
        for (int T = cur_[s]; T < hi; ++T)
            if (graphs_.count({s, T}) || failed_.count({s, T})) ++ready;
        if (ready >= hi - cur_[s]) return;
        if (cv_.wait_until(lk, deadline) == std::cv_status::timeout) {
            throw PrecaptureTimeout("wait_precapture: timed out after " + std::to_string(timeout_s) + " s with " +
                                     std::to_string(ready) + " of " + std::to_string(hi - cur_[s]) + " graphs ready");
        }
    }
}

// ------------------------------------------------------------------ reporting
static double pct(std::vector<double> v, double q) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    return v[std::min(v.size() - 1, (size_t)(q * (v.size() - 1) + 0.5))];
}

std::map<std::string, double> Engine::stats() {
    std::lock_guard<std::mutex> lk(mu_);
    std::map<std::string, double> m;
    size_t live = 0;
    for (auto &kv : graphs_) live += kv.first.second >= 0;
    m["captured"] = (double)captured_;
    m["live"] = (double)live;
    m["live_max"] = (double)std::max(live_max_, live);
    m["misses"] = (double)misses_;
    m["failures"] = (double)failures_;
    m["replays"] = (double)replays_;
    m["evicted"] = (double)evicted_;
    m["exec_updates"] = (double)updated_;
    m["pool"] = (double)pool_.size();
    m["capture_ms_p50"] = pct(capture_ms_, 0.5);
    m["capture_ms_p99"] = pct(capture_ms_, 0.99);
    m["instantiate_ms_p50"] = pct(instantiate_ms_, 0.5);
    m["instantiate_ms_p99"] = pct(instantiate_ms_, 0.99);
    int w = 0;
    for (int x : window_) w = std::max(w, x);
    m["window"] = (double)w;
    m["bg_running"] = bg_.joinable() && !stop_.load() ? 1.0 : 0.0;
    for (int s = 0; s < plan_.sessions; ++s) m["position_" + std::to_string(s)] = cur_[s];
    return m;
}

std::vector<std::tuple<std::string, std::string, double, double>> Engine::trace_events() {
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<std::tuple<std::string, std::string, double, double>> out;
    out.reserve(trace_.size());
    for (auto &e : trace_) out.emplace_back(e.name, e.tid, e.ts_us, e.dur_us);
    return out;
}

std::vector<std::string> Engine::kernel_trace_names(int lo, int hi) const {
    std::vector<std::string> v;
    for (int i = lo; i < hi; ++i) v.emplace_back(i >= 0 && i < (int)ktrace_.names.size() ? ktrace_.names[i] : "");
    return v;
}

std::string Engine::last_error() {
    std::lock_guard<std::mutex> lk(mu_);
    return last_error_;
}

void Engine::close() {
    if (closed_) return;
    bg_capture_stop(-1);
    if (bg_.joinable()) { stop_.store(true); cv_.notify_all(); bg_.join(); }
    if (replay_) cudaStreamSynchronize(replay_);
    {
        std::lock_guard<std::mutex> lk(mu_);
        for (auto &kv : graphs_) cudaGraphExecDestroy(kv.second);
        graphs_.clear();
        for (auto e : pool_) cudaGraphExecDestroy(e);
        pool_.clear();
    }
    if (blas_replay_) cublasDestroy(blas_replay_);
    if (blas_capture_) cublasDestroy(blas_capture_);
    if (ws_replay_) cudaFree(ws_replay_);
    if (ws_capture_) cudaFree(ws_capture_);
    if (done_) cudaEventDestroy(done_);
    for (auto e : lag_events_) cudaEventDestroy(e);
    lag_events_.clear();
    if (capture_) cudaStreamDestroy(capture_);
    if (replay_) cudaStreamDestroy(replay_);
    blas_replay_ = blas_capture_ = nullptr;
    ws_replay_ = ws_capture_ = nullptr;
    done_ = nullptr;
    capture_ = replay_ = nullptr;
    closed_ = true;
}

}  // namespace case4
