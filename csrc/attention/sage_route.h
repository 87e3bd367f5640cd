// Which CUDA kernel runs a sage_attention_fwd call: a plain host function of (compute capability, qk_bits,
// pv, smooth_q, the `kernel` argument, which cubins this build has), with no torch and no CUDA, so the whole
// table is testable on the CPU (ops _sage_route and, test-only, _sage_route_for) and Python asks it instead
// of mirroring it (tersor.attention.cuda_path_name).
//
// Kernel groups (one translation unit each, compiled only for the architectures whose instructions it uses;
// CMakeLists.txt, the attention part):
//   prologue  sage_quant_cuda.cu       quantization of Q / K / V (plain CUDA)          sm_80, sm_89, sm_90a
//   s8_f16    sage_attn_s8_f16.cu      INT8 Q.K^T (mma s8) + 16-bit P.V (mma f16/bf16) sm_80, sm_89, sm_90a
//   s8_e4m3   sage_attn_s8_e4m3.cu     INT8 Q.K^T + FP8 P.V (mma e4m3)                 sm_89, sm_90a
//   s4_f16    sage_attn_s4_f16.cu      INT4 Q.K^T (mma s4) + 16-bit P.V                sm_80, sm_89
//   s4_e4m3   sage_attn_s4_e4m3.cu     INT4 Q.K^T + FP8 P.V                            sm_89
//   sm90      sage_attn_sm90.cu        INT8 wgmma Q.K^T + FP8 wgmma P.V (after the prologue)  sm_90a
// sm_90 has no INT4 tensor cores and sm_80..sm_88 no FP8 ones, hence the lists. The glue learns which of
// these exist from the compile definitions TERSOR_SAGE_<GROUP>_ARCHS (the CUDA_ARCHITECTURES CMake built
// each group for: the group's list intersected with TORCH_CUDA_ARCH_LIST).
//
// The `kernel` argument: "auto" (default) takes the sm90a wgmma kernel where it applies (cc 9.0, INT8 + FP8,
// no Q smoothing), else the mma.sync kernels; "sm8x" insists on the mma.sync kernels (sm80/sm89 code, which
// also runs on cc 9.0: e.g. to compare both paths on one Hopper GPU); "sm90" insists on the wgmma kernel.
// A combination with no kernel is a NotImplementedError naming what this device supports here, never a
// silent CPU fallback. qk_bits=0 and pv="fp32" have no CUDA kernel: they run on the CPU (the twin) only.
#pragma once

#include <string>
#include <vector>

namespace tersor::attention {

enum class PVMode { kFp8, kFp16, kFp32 };
enum class SageKernel { kAuto, kSm8x, kSm90 };
enum class SagePath { kNone, kSm8xMma, kSm90aWgmma };

inline constexpr const char* kSageKernelChoices = "\"auto\", \"sm8x\" or \"sm90\"";

inline bool parse_pv_mode(const std::string& pv, PVMode* out) {
  if (pv == "fp8") return *out = PVMode::kFp8, true;
  if (pv == "fp16") return *out = PVMode::kFp16, true;
  if (pv == "fp32") return *out = PVMode::kFp32, true;
  return false;
}

inline const char* pv_name(PVMode pv) {
  return pv == PVMode::kFp8 ? "fp8" : pv == PVMode::kFp16 ? "fp16" : "fp32";
}

inline bool parse_sage_kernel(const std::string& k, SageKernel* out) {
  if (k == "auto") return *out = SageKernel::kAuto, true;
  if (k == "sm8x") return *out = SageKernel::kSm8x, true;
  if (k == "sm90") return *out = SageKernel::kSm90, true;
  return false;
}

// The names Python, the benchmarks and the tests see.
inline const char* sage_path_name(SagePath p) {
  return p == SagePath::kSm8xMma ? "sm8x-mma" : p == SagePath::kSm90aWgmma ? "sm90a-wgmma" : "none";
}

// The cubins of each kernel group: comma-separated CMake CUDA_ARCHITECTURES entries ("80-real,89-real,90a-real";
// a bare "80" counts as real). "-virtual" (PTX) entries are not used for routing: a JIT-compiled sm8x kernel on
// a newer architecture is not a configuration tersor tests.
struct SageCubins {
  std::string prologue, s8_f16, s8_e4m3, s4_f16, s4_e4m3, sm90;
};

inline constexpr const char* kSageCubinGroups[] = {"prologue", "s8_f16", "s8_e4m3", "s4_f16", "s4_e4m3", "sm90"};

inline std::string* sage_cubin_group(SageCubins& c, const std::string& name) {
  if (name == "prologue") return &c.prologue;
  if (name == "s8_f16") return &c.s8_f16;
  if (name == "s8_e4m3") return &c.s8_e4m3;
  if (name == "s4_f16") return &c.s4_f16;
  if (name == "s4_e4m3") return &c.s4_e4m3;
  if (name == "sm90") return &c.sm90;
  return nullptr;
}

// What this build of tersor._C has (empty in a CPU-only build, or for a group CMake skipped).
inline SageCubins built_sage_cubins() {
  SageCubins c;
#ifdef TERSOR_SAGE_PROLOGUE_ARCHS
  c.prologue = TERSOR_SAGE_PROLOGUE_ARCHS;
#endif
#ifdef TERSOR_SAGE_S8_F16_ARCHS
  c.s8_f16 = TERSOR_SAGE_S8_F16_ARCHS;
#endif
#ifdef TERSOR_SAGE_S8_E4M3_ARCHS
  c.s8_e4m3 = TERSOR_SAGE_S8_E4M3_ARCHS;
#endif
#ifdef TERSOR_SAGE_S4_F16_ARCHS
  c.s4_f16 = TERSOR_SAGE_S4_F16_ARCHS;
#endif
#ifdef TERSOR_SAGE_S4_E4M3_ARCHS
  c.s4_e4m3 = TERSOR_SAGE_S4_E4M3_ARCHS;
#endif
#ifdef TERSOR_SAGE_SM90_ARCHS
  c.sm90 = TERSOR_SAGE_SM90_ARCHS;
#endif
  return c;
}

// "prologue=80-real,89-real;s8_f16=80-real;..." (groups in any order, missing groups empty) -> cubins. False
// (and *err) for an unknown group or a malformed item.
inline bool parse_sage_cubins(const std::string& spec, SageCubins* out, std::string* err) {
  SageCubins c;
  size_t pos = 0;
  while (pos < spec.size()) {
    size_t end = spec.find(';', pos);
    if (end == std::string::npos) end = spec.size();
    const std::string item = spec.substr(pos, end - pos);
    pos = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    std::string* slot = eq == std::string::npos ? nullptr : sage_cubin_group(c, item.substr(0, eq));
    if (slot == nullptr) {
      *err = "bad item \"" + item + "\" (expected <group>=<archs> with group one of prologue, s8_f16, s8_e4m3, "
             "s4_f16, s4_e4m3, sm90)";
      return false;
    }
    *slot = item.substr(eq + 1);
  }
  *out = c;
  return true;
}

inline std::string sage_cubins_str(const SageCubins& c) {
  SageCubins copy = c;
  std::string s;
  for (const char* g : kSageCubinGroups) {
    if (!s.empty()) s += ';';
    s += std::string(g) + "=" + *sage_cubin_group(copy, g);
  }
  return s;
}

// Whether a cubin of `archs` runs on a device of compute capability cc (10 * major + minor): a real cubin
// "XY" runs on major X with minor >= Y, an arch-specific "XYa" on exactly X.Y.
inline bool cubins_run_on(const std::string& archs, int cc) {
  size_t pos = 0;
  while (pos < archs.size()) {
    size_t end = archs.find(',', pos);
    if (end == std::string::npos) end = archs.size();
    std::string item = archs.substr(pos, end - pos);
    pos = end + 1;
    const size_t dash = item.find('-');
    if (dash != std::string::npos) {
      if (item.substr(dash + 1) != "real") continue;  // PTX: not routed to (see SageCubins)
      item = item.substr(0, dash);
    }
    bool arch_specific = false;
    if (!item.empty() && (item.back() == 'a' || item.back() == 'f')) {
      arch_specific = item.back() == 'a';
      item.pop_back();
    }
    if (item.size() < 2 || item.find_first_not_of("0123456789") != std::string::npos) continue;
    const int num = std::stoi(item), major = num / 10, minor = num % 10;
    if (arch_specific ? cc == num : (cc / 10 == major && cc % 10 >= minor)) return true;
  }
  return false;
}

struct SageRoute {
  SagePath path = SagePath::kNone;
  std::string why;  // for kNone: the NotImplementedError message (after "op: ")
};

// The cubin list of the mma.sync attention kernel of (qk_bits, pv); null where there is none (fp32, qk_bits 0).
inline const std::string* sm8x_group(const SageCubins& c, int qk_bits, PVMode pv) {
  if (pv == PVMode::kFp32) return nullptr;
  if (qk_bits == 8) return pv == PVMode::kFp8 ? &c.s8_e4m3 : &c.s8_f16;
  if (qk_bits == 4) return pv == PVMode::kFp8 ? &c.s4_e4m3 : &c.s4_f16;
  return nullptr;
}

inline bool sm8x_applies(int cc, int qk_bits, PVMode pv, const SageCubins& c) {
  const std::string* g = sm8x_group(c, qk_bits, pv);
  return g != nullptr && cubins_run_on(c.prologue, cc) && cubins_run_on(*g, cc);
}

inline bool sm90_applies(int cc, int qk_bits, PVMode pv, bool smooth_q, const SageCubins& c) {
  return qk_bits == 8 && pv == PVMode::kFp8 && !smooth_q && cc == 90 && cubins_run_on(c.prologue, cc) &&
         cubins_run_on(c.sm90, cc);
}

inline std::string cc_str(int cc) { return std::to_string(cc / 10) + "." + std::to_string(cc % 10); }

// "supported on compute capability X.Y in this build: ..." -- every mode a CUDA call can run there.
inline std::string sage_supported_modes(int cc, const SageCubins& c) {
  std::string modes;
  for (int bits : {8, 4})
    for (PVMode pv : {PVMode::kFp8, PVMode::kFp16})
      if (sm8x_applies(cc, bits, pv, c))
        modes += std::string(modes.empty() ? "" : ", ") + "qk_bits=" + std::to_string(bits) + " pv=\"" + pv_name(pv) +
                 "\"";
  std::string s = "supported on compute capability " + cc_str(cc) + " in this build: ";
  if (modes.empty() && !sm90_applies(cc, 8, PVMode::kFp8, false, c))
    return s + "none (no quantized-attention cubin for this architecture; built: " + sage_cubins_str(c) +
           "); qk_bits=0 and pv=\"fp32\" run on the CPU only";
  if (!modes.empty()) s += "kernel=\"sm8x\" (mma.sync): " + modes + " (smooth_q either way)";
  if (sm90_applies(cc, 8, PVMode::kFp8, false, c))
    s += std::string(modes.empty() ? "" : "; ") + "kernel=\"sm90\" (wgmma): qk_bits=8 pv=\"fp8\" smooth_q=False";
  return s + "; qk_bits=0 and pv=\"fp32\" run on the CPU only";
}

// Why the hardware has no kernel for the mode, where that is the reason (a hint after the message).
inline std::string sage_hardware_hint(int cc, int qk_bits, PVMode pv) {
  if (qk_bits == 4 && cc >= 90) return " (no INT4 tensor cores from sm_90 on)";
  if (pv == PVMode::kFp8 && cc < 89) return " (FP8 tensor cores need sm_89)";
  return "";
}

inline SageRoute sage_route(int cc, int qk_bits, PVMode pv, bool smooth_q, SageKernel kernel, const SageCubins& c) {
  SageRoute r;
  const std::string mode = "qk_bits=" + std::to_string(qk_bits) + ", pv=\"" + pv_name(pv) +
                           "\", smooth_q=" + (smooth_q ? "True" : "False");
  const std::string supported = sage_supported_modes(cc, c);
  if (qk_bits == 0 || pv == PVMode::kFp32) {
    r.why = "no CUDA kernel for " + mode + ": qk_bits=0 and pv=\"fp32\" run on the CPU only (pass CPU tensors); " +
            supported;
    return r;
  }
  const bool sm90 = sm90_applies(cc, qk_bits, pv, smooth_q, c);
  const bool sm8x = sm8x_applies(cc, qk_bits, pv, c);
  switch (kernel) {
    case SageKernel::kSm90:
      if (sm90) r.path = SagePath::kSm90aWgmma;
      else
        r.why = "kernel=\"sm90\" (the sm90a wgmma kernel) runs qk_bits=8, pv=\"fp8\", smooth_q=False on compute "
                "capability 9.0 in a build with its sm_90a cubin; got " + mode + " on compute capability " +
                cc_str(cc) + "; " + supported;
      break;
    case SageKernel::kSm8x:
      if (sm8x) r.path = SagePath::kSm8xMma;
      else
        r.why = "kernel=\"sm8x\" (the mma.sync kernels) has no cubin for " + mode + " on compute capability " +
                cc_str(cc) + " in this build" + sage_hardware_hint(cc, qk_bits, pv) + "; " + supported;
      break;
    case SageKernel::kAuto:
      if (sm90) r.path = SagePath::kSm90aWgmma;
      else if (sm8x) r.path = SagePath::kSm8xMma;
      else
        r.why = "no CUDA kernel for " + mode + " on compute capability " + cc_str(cc) + " in this build" +
                sage_hardware_hint(cc, qk_bits, pv) + "; " + supported;
      break;
  }
  return r;
}

}  // namespace tersor::attention
