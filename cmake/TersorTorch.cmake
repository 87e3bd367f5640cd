# Locate torch through the Python interpreter; compile against its stable-ABI headers only.

function(tersor_find_torch)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import os, torch; print(os.path.dirname(torch.__file__)); print(torch.version.cuda or ''); print(torch.__version__)"
    OUTPUT_VARIABLE _out RESULT_VARIABLE _rc ERROR_VARIABLE _err OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "tersor: cannot import torch with ${Python_EXECUTABLE} (build with --no-build-isolation "
                        "in an environment that has torch >= 2.11):\n${_err}")
  endif()
  string(REPLACE "\n" ";" _lines "${_out}")
  list(GET _lines 0 _dir)
  list(GET _lines 1 _cuda)
  list(GET _lines 2 _ver)
  if(_ver VERSION_LESS 2.11)
    message(FATAL_ERROR "tersor: torch ${_ver} is older than the stable-ABI floor 2.11")
  endif()
  set(TERSOR_TORCH_DIR "${_dir}" PARENT_SCOPE)
  set(TERSOR_TORCH_CUDA "${_cuda}" PARENT_SCOPE)
  message(STATUS "tersor: torch ${_ver} at ${_dir} (its headers; the binary targets the 2.11 stable ABI)")
endfunction()

# Compile options and link line of a tersor extension module (tersor._C, tersor._C_testing).
#  * TORCH_TARGET_VERSION = 2.11: the headers hide everything newer than the 2.11 stable ABI, so the one
#    binary loads in torch 2.11 and every later release.
#  * Only torch/csrc/stable and torch/headeronly are used (tests/test_wheel.py checks the undefined
#    symbols); the C shim they call lives in libtorch_cpu, the only torch library linked. No RPATH:
#    `import torch` has loaded it before tersor loads (tersor/__init__.py).
#  * Python_add_library(... USE_SABI 3.10) sets Py_LIMITED_API: the module's one Python entry point uses the
#    limited API (abi3, CPython >= 3.10).
function(tersor_configure_extension target)
  target_include_directories(${target} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/csrc)
  target_include_directories(${target} SYSTEM PRIVATE "${TERSOR_TORCH_DIR}/include")
  target_compile_definitions(${target} PRIVATE
    TORCH_TARGET_VERSION=0x020b000000000000)
  # -ffile-prefix-map: no checkout path in the binary (error messages carry __FILE__), so a wheel built
  # twice from one commit is byte-identical wherever it is built.
  target_compile_options(${target} PRIVATE -Wall -Wno-unused-parameter -Wno-sign-compare
    "-ffile-prefix-map=${CMAKE_SOURCE_DIR}/=")
  # manylinux_2_28 (scripts/build_wheel.sh, tests/test_wheel.py): the module may need no GLIBC newer than
  # 2.28 and no GLIBCXX newer than 3.4.24, though it is built on a newer system with gcc 12 in C++20 (C++17
  # would avoid two of the symbols, but measured 10 % slower in the attention CPU twin's inner loop).
  # common/manylinux_compat.cpp binds each newer symbol the headers reference to an old equivalent.
  target_sources(${target} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/csrc/common/manylinux_compat.cpp)
  target_link_options(${target} PRIVATE -Wl,--no-as-needed,-l:libdl.so.2,--as-needed)
  find_library(_torch_cpu NAMES torch_cpu PATHS "${TERSOR_TORCH_DIR}/lib" NO_DEFAULT_PATH REQUIRED)
  target_link_libraries(${target} PRIVATE "${_torch_cpu}")
  # TERSOR_SANITIZE (CMakeLists.txt): -g1 gives the reports file:line frames; frame pointers give ASan's fast
  # unwinder whole stacks; -fno-sanitize-recover=all turns every UBSan report into a failure.
  if(TERSOR_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=${TERSOR_SANITIZE} -fno-sanitize-recover=all
      -fno-omit-frame-pointer -g1)
    target_link_options(${target} PRIVATE -fsanitize=${TERSOR_SANITIZE} -fno-sanitize-recover=all)
  endif()
endfunction()
