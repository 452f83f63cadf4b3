# Third-party dependencies, each found through its own CMake config or
# pkg-config (Debian 12 packages; tools/setup.sh installs them).

find_package(Threads REQUIRED)
find_package(TBB REQUIRED CONFIG)                        # libtbb-dev
find_package(dnnl REQUIRED CONFIG)                       # libdnnl-dev (+ ocl-icd-opencl-dev)
find_package(Boost 1.74 REQUIRED CONFIG COMPONENTS program_options)  # libboost-program-options-dev
find_package(doctest REQUIRED CONFIG)                    # doctest-dev
find_package(nlohmann_json 3.10 REQUIRED CONFIG)         # nlohmann-json3-dev
find_package(PkgConfig REQUIRED)
pkg_check_modules(HWLOC REQUIRED IMPORTED_TARGET hwloc)   # libhwloc-dev
pkg_check_modules(URING REQUIRED IMPORTED_TARGET liburing) # liburing-dev

message(STATUS "kvtier: oneTBB ${TBB_VERSION}, oneDNN ${dnnl_VERSION}, hwloc ${HWLOC_VERSION}, "
               "liburing ${URING_VERSION}, Boost ${Boost_VERSION}")
