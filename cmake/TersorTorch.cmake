# Locate torch through the Python interpreter and link against its libraries directly.

function(tersor_find_torch)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import os, torch; print(os.path.dirname(torch.__file__)); print(torch.version.cuda or ''); print(int(torch.compiled_with_cxx11_abi())); print(torch.__version__); print(int('ATen parallel backend: OpenMP' in torch.__config__.parallel_info()))"
    OUTPUT_VARIABLE _out RESULT_VARIABLE _rc ERROR_VARIABLE _err OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "tersor: cannot import torch with ${Python_EXECUTABLE} (build with --no-build-isolation "
                        "in an environment that has torch):\n${_err}")
  endif()
  string(REPLACE "\n" ";" _lines "${_out}")
  list(GET _lines 0 _dir)
  list(GET _lines 1 _cuda)
  list(GET _lines 2 _abi)
  list(GET _lines 3 _ver)
  list(GET _lines 4 _omp)
  set(TERSOR_TORCH_DIR "${_dir}" PARENT_SCOPE)
  set(TERSOR_TORCH_CUDA "${_cuda}" PARENT_SCOPE)
  set(TERSOR_TORCH_CXX11_ABI "${_abi}" PARENT_SCOPE)
  set(TERSOR_TORCH_OPENMP "${_omp}" PARENT_SCOPE)
  message(STATUS "tersor: torch ${_ver} at ${_dir} (CUDA '${_cuda}', cxx11 abi ${_abi}, OpenMP parallel backend ${_omp})")
endfunction()

function(tersor_link_torch target)
  target_include_directories(${target} SYSTEM PRIVATE
    "${TERSOR_TORCH_DIR}/include"
    "${TERSOR_TORCH_DIR}/include/torch/csrc/api/include")
  target_compile_definitions(${target} PRIVATE _GLIBCXX_USE_CXX11_ABI=${TERSOR_TORCH_CXX11_ABI})
  foreach(_lib c10 torch_cpu torch)
    find_library(_path_${_lib} NAMES ${_lib} PATHS "${TERSOR_TORCH_DIR}/lib" NO_DEFAULT_PATH REQUIRED)
    target_link_libraries(${target} PRIVATE "${_path_${_lib}}")
  endforeach()
  # at::parallel_for is a header template: with torch's OpenMP backend it only runs in parallel when *our*
  # translation units are compiled with -fopenmp (ATen/ParallelOpenMP.h is guarded by _OPENMP); without it
  # every CPU kernel silently runs on one thread. Linking -fopenmp records libgomp.so.1, the same soname as
  # the copy torch bundles and has already loaded (torch is imported first), so one OpenMP runtime is used.
  if(TERSOR_TORCH_OPENMP)
    find_package(OpenMP REQUIRED COMPONENTS CXX)
    target_link_libraries(${target} PRIVATE OpenMP::OpenMP_CXX)
  endif()
endfunction()

function(tersor_link_torch_cuda target)
  foreach(_lib c10_cuda torch_cuda)
    find_library(_path_${_lib} NAMES ${_lib} PATHS "${TERSOR_TORCH_DIR}/lib" NO_DEFAULT_PATH REQUIRED)
    target_link_libraries(${target} PRIVATE "${_path_${_lib}}")
  endforeach()
endfunction()
