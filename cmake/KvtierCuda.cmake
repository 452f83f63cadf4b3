# CUDA is built whenever nvcc is found: on PATH, through CUDACXX, or at
# /usr/local/cuda/bin. Without it the build is CPU-only and says so.
# CMAKE_CUDA_ARCHITECTURES defaults to 90 (H100/H200); a release build for
# workstation cards passes e.g. -DCMAKE_CUDA_ARCHITECTURES="89;90;120".

option(KVTIER_ENABLE_CUDA "Build the CUDA backend when nvcc is found" ON)
set(KVTIER_WITH_CUDA OFF)
set(KVTIER_CUDA_SUMMARY "off (KVTIER_ENABLE_CUDA=OFF)")

if(KVTIER_ENABLE_CUDA)
  if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
    find_program(KVTIER_NVCC nvcc HINTS /usr/local/cuda/bin)
    if(KVTIER_NVCC)
      set(CMAKE_CUDA_COMPILER ${KVTIER_NVCC} CACHE FILEPATH "CUDA compiler")
    endif()
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
      set(CMAKE_CUDA_ARCHITECTURES 90 CACHE STRING "CUDA architectures" FORCE)
    endif()
    enable_language(CUDA)
    # CMake 3.25 knows nvcc dialects only up to C++17; nvcc >= 12 speaks C++20.
    if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
      set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
      set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
      set(CMAKE_CUDA20_COMPILE_FEATURES cuda_std_20)
      list(APPEND CMAKE_CUDA_COMPILE_FEATURES cuda_std_20)
    endif()
    set(CMAKE_CUDA_STANDARD 20)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    find_package(CUDAToolkit REQUIRED)
    set(KVTIER_WITH_CUDA ON)
    set(KVTIER_CUDA_SUMMARY
        "on (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES})")
  else()
    set(KVTIER_CUDA_SUMMARY "off: nvcc not found (PATH, CUDACXX, /usr/local/cuda/bin); CPU-only build")
    message(STATUS "kvtier: nvcc not found; building CPU-only")
  endif()
endif()
