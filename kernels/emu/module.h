// What every emulated kernel library is made of: the runtime, and a table from instantiation
// names (cuattn/kernels.py's keys) to launchers. cuattn/backends/emulate.py writes the file
// that includes this, the kernel sources and the table; the library's one entry point is
// cuattn_launch, called through ctypes, or by server.cpp in sanitizer mode.
#pragma once

#include <cstring>

#include "fiber.cpp"
#include "runtime.cpp"

namespace cuemu_module {

using Launcher = int (*)(const void* params, const unsigned* dims, const cuemu::LaunchOptions* options,
                         char* error, std::size_t error_size);

// A kernel takes one struct by value (cuattn::AttentionParams for the attention kernels).
// dims: grid x, y, z, block x, y, z, dynamic shared memory bytes.
template <class Params, void (*KERNEL)(Params)>
int launch_kernel(const void* params, const unsigned* dims, const cuemu::LaunchOptions* options, char* error,
                  std::size_t error_size) {
    return cuemu::launch([](const void* p) { KERNEL(*static_cast<const Params*>(p)); }, params,
                         dim3(dims[0], dims[1], dims[2]), dim3(dims[3], dims[4], dims[5]), dims[6], *options, error,
                         error_size);
}

struct Entry {
    const char* name;
    Launcher launcher;
};

}  // namespace cuemu_module

#define CUEMU_MODULE_TABLE(...)                                                                               \
    namespace cuemu_module {                                                                                  \
    const Entry kEntries[] = {__VA_ARGS__};                                                                   \
    Launcher find_launcher(const char* name) {                                                                \
        for (const Entry& entry : kEntries)                                                                   \
            if (std::strcmp(entry.name, name) == 0) return entry.launcher;                                    \
        return nullptr;                                                                                       \
    }                                                                                                         \
    }                                                                                                         \
    extern "C" int cuattn_launch(const char* name, const void* params, const unsigned* dims,                  \
                                 const cuemu::LaunchOptions* options, char* error, std::size_t error_size) { \
        const cuemu_module::Launcher launcher = cuemu_module::find_launcher(name);                            \
        if (launcher == nullptr) {                                                                            \
            std::snprintf(error, error_size, "no kernel named %s in this library", name);                     \
            return 1;                                                                                         \
        }                                                                                                     \
        return launcher(params, dims, options, error, error_size);                                            \
    }
