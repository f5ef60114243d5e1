// CPU feature detection: cpuid + xgetbv on x86 (the OS must save the YMM/ZMM
// state, not only the CPU support the instructions), getauxval HWCAP on ARM.
#include "isa.h"

#include <atomic>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define PRISM_X86 1
#include <cpuid.h>
#elif defined(__aarch64__)
#define PRISM_ARM64 1
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#endif

namespace prism {
namespace {

CpuFeatures detect() {
  CpuFeatures f;
#if PRISM_X86
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = (ecx >> 27) & 1;
  const bool avx = (ecx >> 28) & 1;
  f.fma = (ecx >> 12) & 1;
  if (osxsave && avx) {
    unsigned xcr0_lo = 0, xcr0_hi = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    f.os_avx = (xcr0_lo & 0x6) == 0x6;              // XMM and YMM state
    f.os_avx512 = f.os_avx && (xcr0_lo & 0xe0) == 0xe0;  // opmask, ZMM_Hi256, Hi16_ZMM
  }
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
    f.avx2 = (ebx >> 5) & 1;
    f.avx512f = (ebx >> 16) & 1;
  }
#elif PRISM_ARM64
  // Advanced SIMD is mandatory in AArch64; HWCAP_ASIMD confirms it on Linux.
#if defined(__linux__) && defined(HWCAP_ASIMD)
  f.neon = (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
#else
  f.neon = true;
#endif
#endif
  return f;
}

bool compiled_in(Isa isa) {
  switch (isa) {
    case Isa::serial: return true;
#if PRISM_HAVE_AVX2
    case Isa::avx2: return true;
#endif
#if PRISM_HAVE_AVX512
    case Isa::avx512: return true;
#endif
#if PRISM_HAVE_NEON
    case Isa::neon: return true;
#endif
    default: return false;
  }
}

std::atomic<int> forced{-1};

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::serial: return "serial";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::neon: return "neon";
  }
  return "unknown";
}

Isa isa_from_name(const std::string& name) {
  for (Isa isa : {Isa::serial, Isa::avx2, Isa::avx512, Isa::neon})
    if (name == isa_name(isa)) return isa;
  throw std::invalid_argument("isa: unknown ISA '" + name + "' (expected serial, avx2, avx512 or neon)");
}

bool isa_available(Isa isa) {
  if (!compiled_in(isa)) return false;
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::serial: return true;
    case Isa::avx2: return f.avx2 && f.fma && f.os_avx;
    case Isa::avx512: return f.avx512f && f.fma && f.os_avx512;
    case Isa::neon: return f.neon;
  }
  return false;
}

std::vector<Isa> available_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::serial, Isa::avx2, Isa::avx512, Isa::neon})
    if (isa_available(isa)) out.push_back(isa);
  return out;
}

Isa active_isa() {
  const int f = forced.load(std::memory_order_relaxed);
  if (f >= 0) return static_cast<Isa>(f);
  static const Isa best = available_isas().back();
  return best;
}

void force_isa(Isa isa) {
  if (!isa_available(isa))
    throw std::invalid_argument(std::string("isa: '") + isa_name(isa) +
                                "' is not available on this CPU or not compiled into this build");
  forced.store(static_cast<int>(isa));
}

void clear_forced_isa() { forced.store(-1); }

bool isa_is_forced() { return forced.load() >= 0; }

}  // namespace prism
