// What this CPU can run *and the OS has enabled*, for picking a build of the kernels at run time
// (kernels/library.py asks the plain C++ build, which runs everywhere). CPUID says what the CPU
// implements; XGETBV (XCR0) says which register states the OS saves on a context switch. An
// instruction set whose state the OS does not enable faults (SIGILL) though CPUID lists it: these
// VMs list AMX, whose tile state is off.
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#elif defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

#define LE_API __attribute__((visibility("default")))

namespace {

// le_cpu_features' bits (library.py's FEATURE_BITS)
enum : uint64_t {
  kAvx2 = 1u << 0,
  kFma = 1u << 1,
  kF16c = 1u << 2,
  kAvx512f = 1u << 3,
  kAvx512bw = 1u << 4,
  kAvx512vl = 1u << 5,
  kAvx512vnni = 1u << 6,
  kAmxTile = 1u << 7,
  kNeon = 1u << 8,
  kDotprod = 1u << 9,
};

#if defined(__x86_64__) || defined(__i386__)
uint64_t xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

uint64_t x86_features() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const bool osxsave = c & (1u << 27);
  if (!osxsave) return 0;  // no XGETBV: the OS saves no AVX state
  const uint64_t xcr = xcr0();
  const bool ymm = (c & (1u << 28)) && (xcr & 0x6) == 0x6;  // AVX, and SSE + AVX state
  const bool zmm = ymm && (xcr & 0xE0) == 0xE0;    // opmask, ZMM0-15 upper halves, ZMM16-31
  const bool tiles = (xcr & 0x60000) == 0x60000;   // XTILECFG and XTILEDATA
  uint64_t f = 0;
  if (ymm && (c & (1u << 12))) f |= kFma;
  if (ymm && (c & (1u << 29))) f |= kF16c;
  unsigned a7 = 0, b7 = 0, c7 = 0, d7 = 0;
  if (__get_cpuid_count(7, 0, &a7, &b7, &c7, &d7)) {
    if (ymm && (b7 & (1u << 5))) f |= kAvx2;
    if (zmm && (b7 & (1u << 16))) f |= kAvx512f;
    if (zmm && (b7 & (1u << 30))) f |= kAvx512bw;
    if (zmm && (b7 & (1u << 31))) f |= kAvx512vl;
    if (zmm && (c7 & (1u << 11))) f |= kAvx512vnni;
    if (tiles && (d7 & (1u << 24))) f |= kAmxTile;
  }
  return f;
}
#endif

}  // namespace

extern "C" {

// The features above that this CPU has and the OS enables (a bit mask).
LE_API uint64_t le_cpu_features() {
#if defined(__x86_64__) || defined(__i386__)
  return x86_features();
#elif defined(__aarch64__)
  uint64_t f = kNeon;  // every AArch64 CPU has Advanced SIMD
#if defined(__linux__)
  if (getauxval(AT_HWCAP) & (1ul << 20)) f |= kDotprod;  // HWCAP_ASIMDDP
#elif defined(__APPLE__)
  int dot = 0;
  size_t size = sizeof(dot);
  if (sysctlbyname("hw.optional.arm.FEAT_DotProd", &dot, &size, nullptr, 0) == 0 && dot)
    f |= kDotprod;
#endif
  return f;
#else
  return 0;
#endif
}

}  // extern "C"
