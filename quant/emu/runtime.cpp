// The emulation harness's launcher: a grid runs block after block; a block runs one OS thread per
// CUDA thread (from a pool of threads kept across launches), and those threads take turns: one
// runs at a time, until it reaches __syncthreads, a warp shuffle or vote, or the end of the kernel,
// then hands over to the lowest ready thread (the highest with QLORA_EMU_ORDER=reverse). A warp is
// released as soon as all its lanes reach a warp operation, so it runs ahead of the other warps up
// to the next barrier: an order a GPU may pick too, deterministic, in which a missing barrier shows
// up as a read of poisoned or stale shared memory, every run the same.
//
// A barrier is released when every thread of the block waits at the same __syncthreads; a warp
// operation when every lane its mask names waits at the same operation with the same mask. When no
// thread can run and nothing can be released, the block is deadlocked (a __syncthreads in
// divergent code, a thread that exited before a barrier the others wait at, a shuffle naming an
// exited lane): the launcher prints what each thread waits at, naming the kernel and the block, and
// exits. A thread that runs for QLORA_EMU_TIMEOUT_S seconds (default 20) without reaching one of
// those points (a spin loop) is reported the same way: the barrier timed out.
//
// Before every block, shared memory (the kernels' function-local statics: build.rs lists them, with
// their addresses in this non-PIE executable, in the file <executable>.shared) is filled with 0xFF
// bytes (NaN as f32), unless QLORA_EMU_SHARED=zero.
#include "runtime.h"

#include <pthread.h>
#include <semaphore.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "cuda_emu.h"

namespace emu {

thread_local uint3 t_threadIdx;
thread_local uint3 t_blockIdx;
thread_local dim3 t_blockDim;
thread_local dim3 t_gridDim;

static const char* g_kernel = "(none)";
const char* current_kernel() { return g_kernel; }

void fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "emulated CUDA: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    fflush(stderr);
    _exit(3);
}

const char* kind_name(Arg::Kind k) {
    switch (k) {
        case Arg::Buffer: return "a pointer";
        case Arg::U32: return "a 32-bit integer";
        case Arg::U64: return "a 64-bit integer";
        case Arg::F32: return "an f32";
        case Arg::Bytes: return "a struct by value";
    }
    return "an unknown kind";
}

static std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> r;
    return r;
}
void register_kernel(Kernel k) { registry()[k.name] = k; }
const Kernel* find_kernel(const char* name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}
void list_kernels(FILE* out) {
    for (auto& kv : registry()) fprintf(out, "%s\n", kv.first.c_str());
}

// ---- one launch ----------------------------------------------------------------------------------
namespace {

enum class St { Ready, Barrier, Warp, Exited };

struct ThreadState {
    St st = St::Ready;
    const char* file = nullptr;  // Barrier: call site
    int line = 0;
    const char* op = nullptr;  // Warp: the operation, its mask, what it deposited, whom it reads
    unsigned mask = 0;
    uint64_t value = 0;
    unsigned src = 0;
    bool vote = false;  // a vote: the result is the mask of lanes whose value is non-zero
    uint64_t result = 0;
};

struct Launch;
// A pool thread: CUDA thread `t` of every block of the current launch. Threads outlive launches
// (the pool grows to the largest block), so a launch does not pay for starting them.
struct Slot {
    pthread_t id;
    sem_t go;  // posted when this thread gets the turn
    Launch* launch = nullptr;
    unsigned t = 0;
};
std::vector<Slot*> g_pool;

struct Launch {
    const Kernel* kernel;
    Dims grid, block;
    const Arg* args;
    unsigned n_threads;
    bool reverse;
    double timeout_s;

    // Only the thread holding the turn touches the states (the semaphores order the accesses);
    // the launcher reads `token` and `progress` while it waits, for its timeout message.
    std::vector<ThreadState> th;
    Slot** slots = nullptr;
    sem_t done;                    // posted by the last thread of a block
    std::atomic<long> token{-1};   // the thread that may run
    uint64_t block_no = 0;         // linear index of the running block
    std::atomic<int64_t> progress{0};  // steady-clock ns of the last hand-over

    std::string block_name() const {
        unsigned bx = (unsigned)(block_no % grid.x), by = (unsigned)(block_no / grid.x % grid.y);
        unsigned bz = (unsigned)(block_no / grid.x / grid.y);
        char buf[96];
        snprintf(buf, sizeof buf, "block (%u, %u, %u)", bx, by, bz);
        return buf;
    }
    // Threads grouped by what they wait at, as ranges: "0-31, 64 at fused.cu:40".
    std::string waits() const {
        std::map<std::string, std::vector<unsigned>> by;
        for (unsigned t = 0; t < n_threads; ++t) {
            const ThreadState& s = th[t];
            char buf[160];
            switch (s.st) {
                case St::Ready: snprintf(buf, sizeof buf, "ready"); break;
                case St::Exited: snprintf(buf, sizeof buf, "exited"); break;
                case St::Barrier:
                    snprintf(buf, sizeof buf, "wait at __syncthreads (%s:%d)", s.file, s.line);
                    break;
                case St::Warp:
                    snprintf(buf, sizeof buf, "wait at %s (mask %#x)", s.op, s.mask);
                    break;
            }
            by[buf].push_back(t);
        }
        std::string out;
        for (auto& kv : by) {
            out += "\n    threads ";
            const std::vector<unsigned>& v = kv.second;
            for (size_t i = 0; i < v.size();) {
                size_t j = i;
                while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
                char r[48];
                if (j == i) snprintf(r, sizeof r, "%u", v[i]);
                else snprintf(r, sizeof r, "%u-%u", v[i], v[j]);
                out += (i ? ", " : "") + std::string(r);
                i = j + 1;
            }
            out += " " + kv.first;
        }
        return out;
    }
    [[noreturn]] void deadlock(const char* what) {
        fail("kernel %s, %s of grid (%u, %u, %u) x block (%u, %u, %u): %s%s", kernel->name,
             block_name().c_str(), grid.x, grid.y, grid.z, block.x, block.y, block.z, what,
             waits().c_str());
    }

    long pick() const {
        if (!reverse) {
            for (unsigned t = 0; t < n_threads; ++t)
                if (th[t].st == St::Ready) return t;
        } else {
            for (unsigned t = n_threads; t-- > 0;)
                if (th[t].st == St::Ready) return t;
        }
        return -1;
    }

    // Releases the warps whose named lanes all wait at one operation (at once: the warp then runs
    // ahead of the others, being the lowest ready threads). Called by the thread holding the turn.
    void release_warps() {
        for (unsigned w = 0; w * 32 < n_threads; ++w) {
            unsigned first = w * 32, lanes = n_threads - first < 32 ? n_threads - first : 32;
            long lead = -1;
            for (unsigned l = 0; l < lanes; ++l)
                if (th[first + l].st == St::Warp) {
                    lead = first + l;
                    break;
                }
            if (lead < 0) continue;
            unsigned mask = th[lead].mask;
            const char* op = th[lead].op;
            bool all = true;
            for (unsigned l = 0; l < 32; ++l) {
                if (!(mask >> l & 1u)) continue;
                if (l >= lanes) deadlock("a warp operation's mask names a lane the block lacks");
                const ThreadState& s = th[first + l];
                if (s.st == St::Exited) deadlock("a warp operation's mask names an exited lane");
                if (s.st != St::Warp) {
                    all = false;
                    continue;
                }
                if (strcmp(s.op, op) != 0 || s.mask != mask)
                    deadlock("lanes of one warp wait at different warp operations or masks");
            }
            for (unsigned l = 0; l < lanes; ++l)
                if (th[first + l].st == St::Warp && !(mask >> l & 1u))
                    deadlock("a lane waits at a warp operation its mask leaves out");
            if (!all) continue;
            uint64_t votes = 0;
            for (unsigned l = 0; l < 32; ++l)
                if (mask >> l & 1u && th[first + l].value) votes |= 1u << l;
            for (unsigned l = 0; l < 32; ++l) {
                if (!(mask >> l & 1u)) continue;
                ThreadState& s = th[first + l];
                unsigned src = s.src;
                if (s.vote) {
                    s.result = votes;
                    continue;
                }
                if (src >= 32 || !(mask >> src & 1u)) deadlock("a lane reads a lane outside the mask");
                s.result = th[first + src].value;
            }
            for (unsigned l = 0; l < 32; ++l)
                if (mask >> l & 1u) th[first + l].st = St::Ready;
        }
    }

    // Releases the block barrier if every thread waits at it (when no thread is ready).
    void release_barrier() {
        long lead = -1;
        for (unsigned t = 0; t < n_threads; ++t)
            if (th[t].st == St::Barrier) {
                lead = t;
                break;
            }
        if (lead < 0) return;
        for (unsigned t = 0; t < n_threads; ++t) {
            const ThreadState& s = th[t];
            if (s.st == St::Exited)
                deadlock("divergent __syncthreads: some threads exited, the others wait at a barrier");
            if (s.st != St::Barrier) return;  // waits at a warp operation: a deadlock, below
            if (strcmp(s.file, th[lead].file) != 0 || s.line != th[lead].line)
                deadlock("divergent __syncthreads: threads wait at different barriers");
        }
        for (unsigned t = 0; t < n_threads; ++t) th[t].st = St::Ready;
    }

    // The calling thread `t` has set its state; hands the turn over, then (unless it exited)
    // waits until it comes back.
    void yield(unsigned t) {
        if (th[t].st == St::Warp) release_warps();
        long next = pick();
        if (next < 0) {
            release_warps();  // a lane's exit can complete nothing, but can make a mask invalid
            release_barrier();
            next = pick();
        }
        progress.store(now_ns());
        if (next < 0) {
            for (unsigned u = 0; u < n_threads; ++u)
                if (th[u].st != St::Exited) deadlock("deadlock: no thread can run");
            token.store(-1);
            sem_post(&done);
            return;
        }
        token.store(next);
        if ((unsigned)next == t) return;
        bool exited = th[t].st == St::Exited;
        sem_post(&slots[next]->go);
        if (!exited) wait_turn(t);
    }
    void wait_turn(unsigned t) {
        while (sem_wait(&slots[t]->go) != 0) {
        }
    }
    static int64_t now_ns() {
        return std::chrono::duration_cast<std::chrono::nanoseconds>(
                   std::chrono::steady_clock::now().time_since_epoch())
            .count();
    }
};

Launch* g_launch = nullptr;
thread_local unsigned t_linear = 0;  // this OS thread's index in the block
void* worker(void* p);

// A pool thread's loop: each turn it is given outside a kernel starts its part of a block.
void* worker(void* p) {
    Slot& slot = *static_cast<Slot*>(p);
    for (;;) {
        while (sem_wait(&slot.go) != 0) {
        }
        Launch* lp = slot.launch;
        if (!lp) return nullptr;
        Launch& l = *lp;
        unsigned t = slot.t;
        uint64_t b = l.block_no;
        t_linear = t;
        t_threadIdx = {t % l.block.x, t / l.block.x % l.block.y, t / l.block.x / l.block.y};
        t_blockDim = {l.block.x, l.block.y, l.block.z};
        t_gridDim = {l.grid.x, l.grid.y, l.grid.z};
        t_blockIdx = {(unsigned)(b % l.grid.x), (unsigned)(b / l.grid.x % l.grid.y),
                      (unsigned)(b / l.grid.x / l.grid.y)};
        l.kernel->invoke(l.args);
        l.th[t].st = St::Exited;
        l.yield(t);
    }
}

struct SharedVar {
    void* addr;
    size_t n_bytes;
};

// The kernels' shared variables, from <executable>.shared: "address size name" per line (hex).
const std::vector<SharedVar>& shared_vars() {
    static std::vector<SharedVar> vars = [] {
        std::vector<SharedVar> v;
        char exe[4096];
        ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 16);
        if (n <= 0) fail("cannot find this executable (/proc/self/exe)");
        strcpy(exe + n, ".shared");
        FILE* f = fopen(exe, "r");
        if (!f) fail("cannot open %s, the list of the kernels' shared variables (build.rs writes it)", exe);
        unsigned long long addr, size;
        char name[1024];
        while (fscanf(f, "%llx %llx %1023s", &addr, &size, name) == 3)
            v.push_back({reinterpret_cast<void*>(addr), (size_t)size});
        fclose(f);
        return v;
    }();
    return vars;
}

void poison_shared(bool zero) {
    for (const SharedVar& s : shared_vars()) memset(s.addr, zero ? 0 : 0xFF, s.n_bytes);
}

double env_f64(const char* name, double dflt) {
    const char* v = getenv(name);
    return v && *v ? atof(v) : dflt;
}

}  // namespace

void syncthreads(const char* file, int line) {
    Launch& l = *g_launch;
    ThreadState& s = l.th[t_linear];
    s.st = St::Barrier;
    s.file = file;
    s.line = line;
    l.yield(t_linear);
}

uint64_t warp_exchange(unsigned mask, uint64_t v, unsigned src, const char* op) {
    Launch& l = *g_launch;
    ThreadState& s = l.th[t_linear];
    s.st = St::Warp;
    s.op = op;
    s.mask = mask;
    s.value = v;
    s.src = src;
    s.vote = false;
    l.yield(t_linear);
    return s.result;
}

unsigned warp_ballot(unsigned mask, int pred, const char* op) {
    // Each lane deposits its predicate; the release hands every lane of the mask the vote.
    Launch& l = *g_launch;
    ThreadState& s = l.th[t_linear];
    s.st = St::Warp;
    s.op = op;
    s.mask = mask;
    s.value = pred != 0;
    s.src = t_linear & 31u;
    s.vote = true;
    l.yield(t_linear);
    return (unsigned)s.result;
}

void launch(const Kernel& k, Dims grid, Dims block, const Arg* args) {
    g_kernel = k.name;
    uint64_t threads = (uint64_t)block.x * block.y * block.z;
    if (!grid.x || !grid.y || !grid.z || !block.x || !block.y || !block.z || threads > 1024 ||
        block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x > 2147483647u ||
        grid.y > 65535 || grid.z > 65535)
        fail("kernel %s: invalid launch configuration (cudaErrorInvalidConfiguration): grid "
             "(%u, %u, %u), block (%u, %u, %u)",
             k.name, grid.x, grid.y, grid.z, block.x, block.y, block.z);
    Launch l;
    l.kernel = &k;
    l.grid = grid;
    l.block = block;
    l.args = args;
    l.n_threads = (unsigned)threads;
    const char* order = getenv("QLORA_EMU_ORDER");
    l.reverse = order && !strcmp(order, "reverse");
    l.timeout_s = env_f64("QLORA_EMU_TIMEOUT_S", 20.0);
    const char* shared = getenv("QLORA_EMU_SHARED");
    bool zero = shared && !strcmp(shared, "zero");
    l.th = std::vector<ThreadState>(l.n_threads);
    sem_init(&l.done, 0, 0);
    g_launch = &l;

    while (g_pool.size() < l.n_threads) {
        Slot* slot = new Slot;
        sem_init(&slot->go, 0, 0);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 1 << 20);
        if (pthread_create(&slot->id, &attr, worker, slot) != 0)
            fail("kernel %s: cannot start thread %zu of %u", k.name, g_pool.size(), l.n_threads);
        pthread_attr_destroy(&attr);
        g_pool.push_back(slot);
    }
    for (unsigned t = 0; t < l.n_threads; ++t) {
        g_pool[t]->launch = &l;
        g_pool[t]->t = t;
    }
    l.slots = g_pool.data();

    uint64_t n_blocks = (uint64_t)grid.x * grid.y * grid.z;
    for (uint64_t b = 0; b < n_blocks; ++b) {
        poison_shared(zero);
        for (auto& s : l.th) s.st = St::Ready;
        l.block_no = b;
        long first = l.pick();
        l.token.store(first);
        l.progress.store(Launch::now_ns());
        sem_post(&l.slots[first]->go);
        for (;;) {
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_nsec += 200 * 1000 * 1000;
            if (until.tv_nsec >= 1000000000L) {
                until.tv_sec += 1;
                until.tv_nsec -= 1000000000L;
            }
            if (sem_timedwait(&l.done, &until) == 0) break;
            double idle = (Launch::now_ns() - l.progress.load()) * 1e-9;
            if (idle > l.timeout_s) {
                char what[192];
                snprintf(what, sizeof what,
                         "barrier timeout: thread %ld ran %.0f s without reaching __syncthreads, "
                         "a warp operation or the end of the kernel",
                         l.token.load(), idle);
                l.deadlock(what);
            }
        }
    }
    // Every thread of the last block has exited its kernel and waits for a next turn.
    for (unsigned t = 0; t < l.n_threads; ++t) g_pool[t]->launch = nullptr;
    sem_destroy(&l.done);
    g_launch = nullptr;
}

}  // namespace emu
