// Host memory hints for ops that write large fresh CPU outputs (host C++ only).
#pragma once

#include <cstddef>
#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tersor {

// Asks Linux to back the whole 2 MiB-aligned interior of a freshly allocated, not yet written buffer with
// transparent huge pages (MADV_HUGEPAGE; takes effect where THP is "madvise" or "always"). Why: a decoder
// that writes tens of MiB into a new tensor otherwise takes one page fault per 4 KiB page, and on a VM
// those faults cost as much as the decoding itself (measured: a 32 MiB bf16 codec decode, 71 ms -> 37 ms
// on this project's 2-core x86 VM). It is a hint: the buffer's contents, ownership and lifetime do not
// change, and a refusal (old kernel, THP off) changes nothing but speed. Torch's own allocator does the
// same for every allocation when THP_MEM_ALLOC_ENABLE=1 is set; this applies it to one buffer.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 2 * kHuge) return;  // below two huge pages the interior is at most one: not worth a syscall
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace tersor
