// The emulation harness's process: reads kernel launches from stdin, runs each (runtime.cpp),
// writes the output buffers to stdout. qlora-quant's `emulate` feature (quant/src/emu) starts it
// and speaks this protocol (little-endian):
//
//   request  "EMU1", u16 name length, name, u32 grid[3], u32 block[3], u32 dynamic shared bytes
//            (must be 0), u32 argument count, then per argument a u8 kind and
//              1 buffer:  u64 bytes, u32 offset from a 256-byte-aligned allocation, u8 flags
//                         (1: the bytes follow, else 0xFF-filled; 2: sent back), [bytes]
//              2 u32, 3 u64, 4 f32: 4, 8 or 4 bytes
//              5 struct:  u32 size, bytes
//   response "EMUR", then for each buffer flagged 2, in order: u64 bytes, bytes.
//
// Each buffer is its own heap allocation of exactly its size (plus the offset), so
// AddressSanitizer reports any access past either end. Any error (an unknown kernel, an argument
// the kernel's signature does not take, a sanitizer report, a deadlock) ends the process with a
// message on stderr; `--list` prints the kernels.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include "runtime.h"

namespace {

void read_exact(void* p, size_t n) {
    if (n && fread(p, 1, n, stdin) != n) {
        if (feof(stdin)) emu::fail("the request ended early (the client went away)");
        emu::fail("cannot read the request");
    }
}
template <typename T> T read_le() {
    T v;
    read_exact(&v, sizeof v);
    return v;
}
void write_exact(const void* p, size_t n) {
    if (n && fwrite(p, 1, n, stdout) != n) emu::fail("cannot write the response");
}

struct Buffer {
    void* base;
    uint64_t n_bytes;
    uint32_t offset;
    bool send_back;
};

bool serve_one() {
    char magic[4];
    size_t got = fread(magic, 1, 4, stdin);
    if (got == 0 && feof(stdin)) return false;
    if (got != 4 || memcmp(magic, "EMU1", 4)) emu::fail("not a launch request");
    std::string name(read_le<uint16_t>(), '\0');
    read_exact(&name[0], name.size());
    uint32_t g[3], b[3];
    for (auto& v : g) v = read_le<uint32_t>();
    for (auto& v : b) v = read_le<uint32_t>();
    uint32_t dyn_shared = read_le<uint32_t>();
    const emu::Kernel* k = emu::find_kernel(name.c_str());
    if (!k) emu::fail("no kernel named %s (see --list)", name.c_str());
    if (dyn_shared) emu::fail("kernel %s: dynamic shared memory is not emulated", k->name);
    uint32_t n_args = read_le<uint32_t>();
    if (n_args != k->n_args)
        emu::fail("kernel %s takes %zu arguments, the launch passes %u", k->name, k->n_args, n_args);
    std::vector<emu::Arg> args(n_args);
    std::vector<Buffer> bufs;
    std::vector<std::vector<uint8_t>> structs;
    structs.reserve(n_args);
    for (auto& a : args) {
        a.kind = (emu::Arg::Kind)read_le<uint8_t>();
        a.ptr = nullptr;
        a.scalar = 0;
        switch (a.kind) {
            case emu::Arg::Buffer: {
                Buffer buf;
                buf.n_bytes = read_le<uint64_t>();
                buf.offset = read_le<uint32_t>();
                uint8_t flags = read_le<uint8_t>();
                buf.send_back = flags & 2;
                if (buf.offset >= 256) emu::fail("kernel %s: buffer offset %u", k->name, buf.offset);
                if (posix_memalign(&buf.base, 256, buf.offset + buf.n_bytes + !buf.n_bytes))
                    emu::fail("kernel %s: cannot allocate %llu bytes", k->name,
                              (unsigned long long)buf.n_bytes);
                uint8_t* p = static_cast<uint8_t*>(buf.base) + buf.offset;
                if (flags & 1) read_exact(p, buf.n_bytes);
                else memset(p, 0xFF, buf.n_bytes);
                a.ptr = p;
                bufs.push_back(buf);
                break;
            }
            case emu::Arg::U32: a.scalar = read_le<uint32_t>(); break;
            case emu::Arg::U64: a.scalar = read_le<uint64_t>(); break;
            case emu::Arg::F32: a.scalar = read_le<uint32_t>(); break;
            case emu::Arg::Bytes: {
                a.scalar = read_le<uint32_t>();
                structs.emplace_back(a.scalar);
                read_exact(structs.back().data(), a.scalar);
                a.ptr = structs.back().data();
                break;
            }
            default: emu::fail("kernel %s: unknown argument kind %u", k->name, (unsigned)a.kind);
        }
    }
    emu::launch(*k, {g[0], g[1], g[2]}, {b[0], b[1], b[2]}, args.data());
    write_exact("EMUR", 4);
    for (const Buffer& buf : bufs) {
        if (!buf.send_back) continue;
        write_exact(&buf.n_bytes, 8);
        write_exact(static_cast<uint8_t*>(buf.base) + buf.offset, buf.n_bytes);
    }
    fflush(stdout);
    for (const Buffer& buf : bufs) free(buf.base);
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc > 1 && !strcmp(argv[1], "--list")) {
        emu::list_kernels(stdout);
        return 0;
    }
    if (argc > 1) {
        fprintf(stderr, "usage: %s [--list]  (launch requests on stdin; see runner.cpp)\n", argv[0]);
        return 2;
    }
    while (serve_one()) {
    }
    return 0;
}
