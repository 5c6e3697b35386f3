// Small kernels that exercise one emulated primitive each, for tests/test_emulator.py.
// The same file compiles with NVRTC, so the GPU tests hold the real instructions to the
// same expectations.
#include "mma.cuh"

namespace cuattn_test {

using cuattn::uint16;
using cuattn::uint32;

struct TestParams {
    void* input;
    void* output;
    void* extra;
    long long count;
    long long mode;
};

// Each lane: 4 A registers and 2 B registers from input[lane][0..5], C from extra[lane],
// D to output[lane].
template <class Element>
__global__ void mma_lanes(const TestParams p) {
    const unsigned lane = threadIdx.x;
    const uint32* registers = static_cast<const uint32*>(p.input) + 6 * lane;
    const uint32 a[4] = {registers[0], registers[1], registers[2], registers[3]};
    const uint32 b[2] = {registers[4], registers[5]};
    float d[4];
    for (int i = 0; i < 4; ++i) d[i] = static_cast<const float*>(p.extra)[4 * lane + i];
    cuattn::mma_m16n8k16<Element>(d, a, b);
    for (int i = 0; i < 4; ++i) static_cast<float*>(p.output)[4 * lane + i] = d[i];
}

// input: 32 rows of 8 16-bit values, placed in shared memory 32 bytes apart; lane l passes
// the address of row extra[l]; output[l][0..3] are its 4 registers.
template <bool TRANSPOSE>
__global__ void ldmatrix_lanes(const TestParams p) {
    CUATTN_DYNAMIC_SHARED(uint16, shared);
    const unsigned lane = threadIdx.x;
    for (int i = 0; i < 8; ++i) shared[16 * lane + i] = static_cast<const uint16*>(p.input)[8 * lane + i];
    __syncwarp();
    uint32 r[4];
    cuattn::ldmatrix_x4<TRANSPOSE>(r, shared + 16 * static_cast<const int*>(p.extra)[lane]);
    for (int i = 0; i < 4; ++i) static_cast<uint32*>(p.output)[4 * lane + i] = r[i];
}

// Thread t copies 16 bytes input[t] into shared slot t (zeros if extra[t] == 0), waits,
// and after a barrier reads slot (t + 1) % count into output[t].
__global__ void cp_async_threads(const TestParams p) {
    CUATTN_DYNAMIC_SHARED(uint4, shared);
    const int t = int(threadIdx.x);
    const uint4* input = static_cast<const uint4*>(p.input);
    cuattn::cp_async_16(shared + t, input + t, static_cast<const int*>(p.extra)[t] != 0);
    cuattn::cp_async_commit();
    cuattn::cp_async_wait<0>();
    __syncthreads();
    static_cast<uint4*>(p.output)[t] = shared[(t + 1) % int(p.count)];
}

// mode 0: __shfl_xor_sync(count), 1: __shfl_sync(source lane count), 2: __shfl_down_sync(count),
// 3: __any_sync(x > count), as 1 or 0.
__global__ void shuffle_lanes(const TestParams p) {
    const int t = int(threadIdx.x);
    const float x = static_cast<const float*>(p.input)[t];
    float y;
    if (p.mode == 0) {
        y = __shfl_xor_sync(0xffffffffu, x, int(p.count));
    } else if (p.mode == 1) {
        y = __shfl_sync(0xffffffffu, x, int(p.count));
    } else if (p.mode == 2) {
        y = __shfl_down_sync(0xffffffffu, x, unsigned(p.count));
    } else {
        y = __any_sync(0xffffffffu, x > float(p.count)) ? 1.0f : 0.0f;
    }
    static_cast<float*>(p.output)[t] = y;
}

// Bugs the emulator must report, by mode.
__global__ void faulty(const TestParams p) {
    const int t = int(threadIdx.x);
    float* output = static_cast<float*>(p.output);
    if (p.mode == 0) {  // threads of one block at two different barriers
        if (t < 32) {
            __syncthreads();
        } else {
            __syncthreads();
        }
    } else if (p.mode == 1) {  // a shuffle whose mask leaves lanes out
        output[t] = __shfl_xor_sync(0x0000ffffu, float(t), 1);
    } else if (p.mode == 2) {  // a lane of warp 1 goes to the barrier while its warp shuffles
        if (t >= 32 && t < 64 && t != 37) output[t] = __shfl_xor_sync(0xffffffffu, float(t), 1);
        __syncthreads();
    } else if (p.mode == 3) {  // runs past any time limit, one barrier at a time
        for (long long i = 0; i < p.count; ++i) __syncthreads();
    } else if (p.mode == 4) {  // cp.async from a source that is not 16-byte aligned
        CUATTN_DYNAMIC_SHARED(unsigned char, shared);
        cuattn::cp_async_16(shared + 16 * t, static_cast<const unsigned char*>(p.input) + 4, true);
        cuattn::cp_async_commit();
        cuattn::cp_async_wait<0>();
    } else if (p.mode == 5) {  // reads one float past the end of its input
        output[t] = static_cast<const float*>(p.input)[t + 1];
    }
}

}  // namespace cuattn_test
