// graphs.h -- the Engine: streams, cuBLAS handles, the graph cache and its capture thread.
//
// Modes (GraphMode): none (eager launches), exact (one graph per (session, T), captured ahead by a
// background thread in thread-local capture mode on the capture stream, replayed on the
// replay stream; a T not ready runs eagerly and counts a miss) and dynamic (one graph per
// (session, K steps) whose kernels read T from seq_len_dev). Every public method is called
// from Python with the GIL released. Each Engine holds its own EngineOptions (step.h) and kernel
// timeline; nothing it launches reads a process-global setting.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "step.h"

namespace case4 {

enum class GraphMode : int { none = 0, exact = 1, dynamic = 2 };
const char *graph_mode_name(GraphMode m);

struct TraceEvent {
    std::string name, tid;
    double ts_us, dur_us;
};

class Engine {
public:
    Engine(const Plan &plan, GraphMode mode, const EngineOptions &options);
    ~Engine();

    // session state (enqueued on the replay stream)
    void set_token(int s, int token);
    void set_seq_len(int s, int n);
    void set_params(int s, float temperature, int top_k, float top_p, unsigned long long seed, int enabled);

    void eager(int s, int T, int token);              // one eager step (token < 0: keep token_dev[s])
    void replay(int s, int T, int token);             // the step of the engine's mode
    void generate(int s, int T0, int steps, int k);   // steps on the device, device sampling on
    // device sampling of the logits in the scratch (the last prefill's, step's or replay's) at RNG position
    // `position`, whatever the session's params: token_dev[s] := the token (the next step's input), returned
    int sample(int s, int position, float temperature, int top_k, float top_p, unsigned long long seed);
    void fetch_logits(uintptr_t host_dst);            // D2H of the fp32 logits, then wait
    void fetch_ring(int s, uintptr_t host_dst);       // D2H of session s's token ring, then wait
    void sync();                                      // wait for the replay stream

    // exact mode
    void bg_capture_start(int s, int window);
    void bg_capture_stop(int s);                      // s < 0: all sessions, and the thread
    void wait_precapture(int s, int count, double timeout_s);
    // dynamic mode
    void prepare_dynamic(int s, int k);

    std::map<std::string, double> stats();
    std::vector<std::tuple<std::string, std::string, double, double>> trace_events();
    std::string last_error();
    void close();

    const EngineOptions &options() const { return opts_; }
    // kernel timeline (timing tool; ops.h KernelTrace): launches enqueued or captured from now on take slots
    void set_kernel_trace(uintptr_t buf, int n) { ktrace_.reset(buf, n); }
    int kernel_trace_next() const { return ktrace_.next; }
    std::vector<std::string> kernel_trace_names(int lo, int hi) const;

private:
    using Key = std::pair<int, int>;
    double now_us() const;
    void trace(const char *name, const char *tid, double t0, double t1);
    bool capture(int s, int T, int k, cudaGraphExec_t *out, std::string *err);  // T < 0: dynamic
    void bg_loop();
    bool pick_locked(int *s, int *T);
    void evict_locked(int s, std::vector<cudaGraphExec_t> *dead);
    void retire(std::vector<cudaGraphExec_t> &dead);  // to the pool, or destroyed when it is full
    void run_dynamic(int s, int k);

    void step(int s, int T, cudaStream_t st, cublasHandle_t blas) {
        enqueue_step(plan_, opts_, s, T, st, blas, &ktrace_);
    }

    Plan plan_;
    GraphMode mode_;
    EngineOptions opts_;
    KernelTrace ktrace_;
    cudaStream_t replay_ = nullptr, capture_ = nullptr;
    cublasHandle_t blas_replay_ = nullptr, blas_capture_ = nullptr;
    void *ws_replay_ = nullptr, *ws_capture_ = nullptr;
    cudaEvent_t done_ = nullptr;

    std::mutex mu_;
    std::condition_variable cv_;
    std::map<Key, cudaGraphExec_t> graphs_;      // exact: (s, T); dynamic: (s, -k)
    std::set<Key> failed_, busy_;
    std::vector<cudaGraphExec_t> pool_;          // evicted exact-mode execs, recycled by cudaGraphExecUpdate
    std::vector<cudaEvent_t> lag_events_;        // generate(): keep the host <= kGenLag steps ahead
    std::vector<int> cur_;                       // next position per session (host view)
    std::vector<int> window_;                    // bg capture window per session (0: off)
    std::thread bg_;
    std::atomic<bool> stop_{false};
    bool closed_ = false;

    // stats
    long long captured_ = 0, misses_ = 0, failures_ = 0, replays_ = 0, evicted_ = 0, updated_ = 0;
    size_t live_max_ = 0;
    std::vector<double> capture_ms_, instantiate_ms_;
    std::string last_error_;
    std::vector<TraceEvent> trace_;
    double busy_t0_ = -1;  // start of the replay stream's current busy interval (trace only)
};

}  // namespace case4
