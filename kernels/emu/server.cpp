// The sanitizer server: emulated kernels in a process of their own, built with
// AddressSanitizer. Python cannot load an ASan-built library into an uninstrumented
// interpreter, so in sanitizer mode each launch is sent here instead: every array the
// kernel may touch is copied into a heap buffer of exactly its size (an access one byte
// past any of them is reported), the kernel runs, the writable buffers are sent back.
//
// Requests on stdin, replies on stdout, all little-endian:
//   request  u32 name length, name, u32 dims[7] (grid xyz, block xyz, shared bytes),
//            LaunchOptions, u32 params length, params, u32 buffer count, then per buffer:
//            u64 size, u8 writable, u32 patch count, patches (u32 params offset,
//            u64 offset into the buffer), and the buffer's bytes
//   reply    u32 status, u32 error length, error, then every writable buffer's bytes
// An AddressSanitizer report ends the process; the client reads it from stderr.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

bool read_exact(void* destination, std::size_t bytes) {
    return std::fread(destination, 1, bytes, stdin) == bytes;
}

template <class T>
T read_value() {
    T value;
    if (!read_exact(&value, sizeof value)) std::exit(0);  // the client went away
    return value;
}

void write_exact(const void* source, std::size_t bytes) {
    if (std::fwrite(source, 1, bytes, stdout) != bytes) std::exit(1);
}

struct Buffer {
    std::uint64_t size;
    bool writable;
    unsigned char* data;
};

}  // namespace

int main() {
    for (;;) {
        const auto name_length = read_value<std::uint32_t>();
        std::string name(name_length, '\0');
        if (!read_exact(name.data(), name_length)) return 0;
        std::uint32_t dims[7];
        if (!read_exact(dims, sizeof dims)) return 0;
        const auto options = read_value<cuemu::LaunchOptions>();
        std::vector<unsigned char> params(read_value<std::uint32_t>());
        if (!read_exact(params.data(), params.size())) return 0;
        std::vector<Buffer> buffers(read_value<std::uint32_t>());
        for (Buffer& buffer : buffers) {
            buffer.size = read_value<std::uint64_t>();
            buffer.writable = read_value<std::uint8_t>() != 0;
            const auto patches = read_value<std::uint32_t>();
            // Exactly `size` bytes: the sanitizer's red zones start right after them.
            buffer.data = static_cast<unsigned char*>(std::malloc(buffer.size ? buffer.size : 1));
            for (std::uint32_t i = 0; i < patches; ++i) {
                const auto field = read_value<std::uint32_t>();
                const auto offset = read_value<std::uint64_t>();
                const auto address = reinterpret_cast<std::uintptr_t>(buffer.data) + offset;
                std::memcpy(params.data() + field, &address, sizeof address);
            }
            if (!read_exact(buffer.data, buffer.size)) return 0;
        }
        char error[8192] = {0};
        std::uint32_t status = 1;
        const cuemu_module::Launcher launcher = cuemu_module::find_launcher(name.c_str());
        if (launcher == nullptr) {
            std::snprintf(error, sizeof error, "no kernel named %s in this server", name.c_str());
        } else {
            status = std::uint32_t(launcher(params.data(), dims, &options, error, sizeof error));
        }
        const auto error_length = std::uint32_t(std::strlen(error));
        write_exact(&status, sizeof status);
        write_exact(&error_length, sizeof error_length);
        write_exact(error, error_length);
        for (const Buffer& buffer : buffers) {
            if (buffer.writable) write_exact(buffer.data, buffer.size);
            std::free(buffer.data);
        }
        std::fflush(stdout);
    }
}
