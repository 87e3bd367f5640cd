// Keeps tersor's extensions within the manylinux_2_28 symbol policy (glibc >= 2.28) when they are built on
// a newer glibc. Symbol versions are bound at link time, so a reference to a function glibc moved or added
// after 2.28 would make the module fail to load on older systems; tests/test_wheel.py lists them.
#include <dlfcn.h>

#include <cstddef>
#include <new>
#include <sstream>
#include <string>

extern "C" {

// libstdc++'s headers (gcc >= 11 on glibc >= 2.32) read __libc_single_threaded to skip atomic reference
// counting in single-threaded processes (GLIBC_2.32). A hidden definition satisfies those references inside
// this module only (it does not interpose on the process's glibc). 0 means "assume other threads exist":
// reference counts always use atomics, which is always correct.
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;

// glibc 2.34 moved dlsym from libdl into libc under a new version (GLIBC_2.34); torch's stable headers call
// it (torch/csrc/stable/macros.h) to find optional shim functions. Every reference in this module binds to
// this hidden forwarder, which calls the GLIBC_2.2.5 version that every glibc since 2.2.5 provides (libdl
// before 2.34, libc's compat symbol after; the module links libdl.so.2 for the former).
void* tersor_dlsym_2_2_5(void* handle, const char* name);
__asm__(".symver tersor_dlsym_2_2_5, dlsym@GLIBC_2.2.5");
__attribute__((visibility("hidden"))) void* dlsym(void* handle, const char* name) {
  return tersor_dlsym_2_2_5(handle, name);
}

// GCC 9 gave the string streams separate default constructors (GLIBCXX_3.4.26); torch's headers and ours
// construct streams that way. These hidden definitions are those constructors, spelled as the C++98 ones
// with the default open mode they are defined to use (in|out for stringstream, out for ostringstream), so
// the module needs only GLIBCXX <= 3.4.24 (the manylinux_2_28 policy). The names are the complete-object
// constructors' mangled names; references bind to these at link time.
__attribute__((visibility("hidden"))) void _ZNSt7__cxx1118basic_stringstreamIcSt11char_traitsIcESaIcEEC1Ev(
    std::stringstream* self) {
  new (self) std::stringstream(std::ios_base::in | std::ios_base::out);
}
__attribute__((visibility("hidden"))) void _ZNSt7__cxx1119basic_ostringstreamIcSt11char_traitsIcESaIcEEC1Ev(
    std::ostringstream* self) {
  new (self) std::ostringstream(std::ios_base::out);
}

}  // extern "C"

// C++20 made basic_stringbuf::str() ref-qualified: `str() const&` and `str() &&` are new symbols
// (GLIBCXX_3.4.29). Both are hidden aliases of a forwarder to the C++11 `str() const` (GLIBCXX_3.4.21),
// declared here by its mangled name (the C++20 header no longer declares it). The rvalue overload returns a
// copy and leaves the buffer as it was: a valid moved-from state.
extern "C" std::string _ZNKSt7__cxx1115basic_stringbufIcSt11char_traitsIcESaIcEE3strEv(const void* self);
extern "C" __attribute__((visibility("hidden"), used)) std::string tersor_stringbuf_str(const void* self) {
  return _ZNKSt7__cxx1115basic_stringbufIcSt11char_traitsIcESaIcEE3strEv(self);
}
__asm__(
    ".globl _ZNKRSt7__cxx1115basic_stringbufIcSt11char_traitsIcESaIcEE3strEv\n"
    ".hidden _ZNKRSt7__cxx1115basic_stringbufIcSt11char_traitsIcESaIcEE3strEv\n"
    ".set _ZNKRSt7__cxx1115basic_stringbufIcSt11char_traitsIcESaIcEE3strEv, tersor_stringbuf_str\n"
    ".globl _ZNOSt7__cxx1115basic_stringbufIcSt11char_traitsIcESaIcEE3strEv\n"
    ".hidden _ZNOSt7__cxx1115basic_stringbufIcSt11char_traitsIcESaIcEE3strEv\n"
    ".set _ZNOSt7__cxx1115basic_stringbufIcSt11char_traitsIcESaIcEE3strEv, tersor_stringbuf_str\n");

// gcc >= 11's std::allocator throws through std::__throw_bad_array_new_length (GLIBCXX_3.4.29) when an
// allocation size overflows. libstdc++ declares it with default visibility, so the definition is an
// assembler alias marked hidden: it throws the same exception, and no reference leaves the module.
extern "C" [[noreturn]] __attribute__((visibility("hidden"), used)) void tersor_throw_bad_array_new_length() {
  throw std::bad_array_new_length();
}
__asm__(
    ".globl _ZSt28__throw_bad_array_new_lengthv\n"
    ".hidden _ZSt28__throw_bad_array_new_lengthv\n"
    ".set _ZSt28__throw_bad_array_new_lengthv, tersor_throw_bad_array_new_length\n");

// glibc 2.29 gave exp, exp2, log, log2 and pow new, faster implementations under new symbol versions
// (GLIBC_2.29); the GLIBC_2.2.5 versions remain in every glibc (from 2.29 on, wrappers around the same code
// that add the old SVID error handling: same results, ~25 % slower in the exact attention twin). Each name
// below is a hidden alias of a forwarder that calls the GLIBC_2.29 version when the running glibc has it
// (looked up once with dlvsym) and the GLIBC_2.2.5 one otherwise, so the module loads on glibc 2.28.
// dlvsym itself moved like dlsym did (GLIBC_2.34); its GLIBC_2.2.5 version is in every glibc.
extern "C" void* tersor_dlvsym_2_2_5(void* handle, const char* name, const char* version);
__asm__(".symver tersor_dlvsym_2_2_5, dlvsym@GLIBC_2.2.5");

template <class Fn>
static Fn newest_libm(const char* name, Fn glibc_2_2_5) {
  void* f = tersor_dlvsym_2_2_5(RTLD_DEFAULT, name, "GLIBC_2.29");
  return f ? reinterpret_cast<Fn>(f) : glibc_2_2_5;
}

#define TERSOR_LIBM(name, sig, args)                                                               \
  extern "C" double tersor_glibc_2_2_5_##name sig;                                                 \
  __asm__(".symver tersor_glibc_2_2_5_" #name ", " #name "@GLIBC_2.2.5");                          \
  extern "C" __attribute__((visibility("hidden"), used)) double tersor_forward_##name sig {          \
    using Fn = double(*) sig;                                                                      \
    static const Fn fn = newest_libm<Fn>(#name, &tersor_glibc_2_2_5_##name);                       \
    return fn args;                                                                                \
  }                                                                                                \
  __asm__(".globl " #name "\n.hidden " #name "\n.set " #name ", tersor_forward_" #name "\n");
TERSOR_LIBM(exp, (double x), (x))
TERSOR_LIBM(exp2, (double x), (x))
TERSOR_LIBM(log, (double x), (x))
TERSOR_LIBM(log2, (double x), (x))
TERSOR_LIBM(pow, (double x, double y), (x, y))
#undef TERSOR_LIBM
