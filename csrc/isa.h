// Instruction-set identifiers and run-time selection. Every kernel family has
// one implementation per ISA; the drivers in ops.cpp pick one by Isa value.
#pragma once
#include <string>
#include <vector>

namespace prism {

enum class Isa : int { serial = 0, avx2 = 1, avx512 = 2, neon = 3 };

const char* isa_name(Isa isa);
// Parses "serial", "avx2", "avx512", "neon"; throws std::invalid_argument.
Isa isa_from_name(const std::string& name);

// Compiled into this binary and supported by this CPU (and OS state, on x86).
bool isa_available(Isa isa);
std::vector<Isa> available_isas();
// The best available ISA, unless force_isa() pinned another one.
Isa active_isa();
// Pins the ISA used by the drivers; throws std::invalid_argument if it is not
// available. clear_forced_isa() returns to the best one.
void force_isa(Isa isa);
void clear_forced_isa();
bool isa_is_forced();

// CPU features as detected (independent of what was compiled in).
struct CpuFeatures {
  bool avx2 = false, fma = false, avx512f = false, os_avx = false, os_avx512 = false, neon = false;
};
const CpuFeatures& cpu_features();

}  // namespace prism
