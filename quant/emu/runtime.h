// The emulation harness's launcher and kernel registry (runtime.cpp), shared by the runner
// (runner.cpp) and the kernel translation units that build.rs generates: each one includes a .cu
// file of quant/kernels and registers its kernels with EMU_KERNEL(name), whose argument list is
// read from the kernel's own signature.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <stdio.h>
#include <string.h>

#include <type_traits>
#include <utility>

namespace emu {

// One kernel argument as the runner received it. (No standard-library containers in this header:
// it is included next to the kernels, whose function-local statics build.rs lists as shared memory.)
struct Arg {
    enum Kind : uint8_t { Buffer = 1, U32 = 2, U64 = 3, F32 = 4, Bytes = 5 } kind;
    void* ptr;           // Buffer: the (offset) device pointer; Bytes: the struct's bytes
    uint64_t scalar;     // U32, U64, F32 (bits); Bytes: the struct's size
};

[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
const char* kind_name(Arg::Kind k);
// The kernel being launched (for messages).
const char* current_kernel();

template <typename T> T get_arg(const Arg* args, size_t i) {
    const Arg& a = args[i];
    auto want = [&](Arg::Kind k, const char* what) {
        if (a.kind != k)
            fail("kernel %s: argument %zu is %s, the kernel takes %s", current_kernel(), i,
                 kind_name(a.kind), what);
    };
    if constexpr (std::is_pointer<T>::value) {
        want(Arg::Buffer, "a pointer");
        return static_cast<T>(a.ptr);
    } else if constexpr (std::is_same<T, uint32_t>::value || std::is_same<T, int32_t>::value) {
        want(Arg::U32, "a 32-bit integer");
        return (T)a.scalar;
    } else if constexpr (std::is_same<T, uint64_t>::value || std::is_same<T, int64_t>::value) {
        want(Arg::U64, "a 64-bit integer");
        return (T)a.scalar;
    } else if constexpr (std::is_same<T, float>::value) {
        want(Arg::F32, "an f32");
        uint32_t b = (uint32_t)a.scalar;
        float f;
        memcpy(&f, &b, 4);
        return f;
    } else {
        static_assert(std::is_trivially_copyable<T>::value, "kernel arguments are plain data");
        want(Arg::Bytes, "a struct by value");
        if (a.scalar != sizeof(T))
            fail("kernel %s: argument %zu is a %zu-byte struct, the kernel's is %zu bytes",
                 current_kernel(), i, (size_t)a.scalar, sizeof(T));
        T v;
        memcpy(&v, a.ptr, sizeof(T));
        return v;
    }
}

typedef void (*Invoker)(const Arg* args);

// Calls kernel F with the arguments its signature names, each checked against what was sent.
template <typename... A, size_t... I>
void call_with(void (*f)(A...), const Arg* args, std::index_sequence<I...>) {
    f(get_arg<typename std::remove_cv<A>::type>(args, I)...);
}
template <auto F> struct Entry;
template <typename... A, void (*F)(A...)> struct Entry<F> {
    static constexpr size_t n_args = sizeof...(A);
    static void invoke(const Arg* args) { call_with(F, args, std::index_sequence_for<A...>{}); }
};

struct Kernel {
    const char* name;
    size_t n_args;
    Invoker invoke;
};
void register_kernel(Kernel k);
struct Registrar {
    explicit Registrar(Kernel k) { register_kernel(k); }
};

struct Dims {
    unsigned x, y, z;
};
// Runs `k` over the grid, one OS thread per CUDA thread of a block, block after block. Exits the
// process with a message on an invalid configuration, a divergent barrier, a deadlock or a timeout.
void launch(const Kernel& k, Dims grid, Dims block, const Arg* args);
const Kernel* find_kernel(const char* name);
// Every registered kernel, one per line, in name order.
void list_kernels(FILE* out);

}  // namespace emu

#define EMU_KERNEL(name)                                                          \
    static ::emu::Registrar emu_registrar_##name(::emu::Kernel{                   \
        #name, ::emu::Entry<&name>::n_args, &::emu::Entry<&name>::invoke});
