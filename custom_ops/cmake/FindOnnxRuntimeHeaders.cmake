# Finds the onnxruntime C/C++ API headers (the onnxruntime wheel ships none).
#
# Looks in, in order: ORT_INCLUDE_DIR (CMake or environment variable), a system
# install (/usr/include/onnxruntime, /usr/local/include/onnxruntime), then fetches
# Debian trixie's libonnxruntime-dev with `apt-get download` into the build tree
# (temporary source list and package lists, no root needed) and unpacks it with
# `dpkg -x`.  Never fails: sets
#   OnnxRuntimeHeaders_FOUND        TRUE when onnxruntime_cxx_api.h was found
#   OnnxRuntimeHeaders_INCLUDE_DIR  the directory holding it
#   OnnxRuntimeHeaders_REASON       why not, when not found

set(OnnxRuntimeHeaders_FOUND FALSE)
set(OnnxRuntimeHeaders_REASON "")

if(NOT ORT_INCLUDE_DIR AND DEFINED ENV{ORT_INCLUDE_DIR})
  set(ORT_INCLUDE_DIR "$ENV{ORT_INCLUDE_DIR}")
endif()

set(_ort_fetch_dir "${CMAKE_BINARY_DIR}/onnxruntime-headers")
find_path(OnnxRuntimeHeaders_INCLUDE_DIR onnxruntime_cxx_api.h
  HINTS ${ORT_INCLUDE_DIR}
  PATHS /usr/include/onnxruntime /usr/local/include/onnxruntime "${_ort_fetch_dir}/usr/include/onnxruntime"
  NO_DEFAULT_PATH)

function(_ort_fetch_debian_headers dest reason_var)
  find_program(_apt_get apt-get)
  find_program(_dpkg dpkg)
  if(NOT _apt_get OR NOT _dpkg)
    set(${reason_var} "onnxruntime headers not found and apt-get/dpkg are unavailable to fetch them; set ORT_INCLUDE_DIR" PARENT_SCOPE)
    return()
  endif()
  set(work "${dest}/apt")
  file(MAKE_DIRECTORY "${work}/lists/partial" "${work}/cache/archives/partial" "${work}/parts")
  set(keyring /usr/share/keyrings/debian-archive-keyring.gpg)
  if(EXISTS "${keyring}")
    set(signed "[signed-by=${keyring}] ")
  else()
    set(signed "[trusted=yes] ")
  endif()
  file(WRITE "${work}/sources.list" "deb ${signed}http://deb.debian.org/debian trixie main\n")
  set(apt_opts
    -o "Dir::Etc::SourceList=${work}/sources.list"
    -o "Dir::Etc::SourceParts=${work}/parts"
    -o "Dir::State::Lists=${work}/lists"
    -o "Dir::Cache=${work}/cache"
    -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=")
  message(STATUS "onnx_codebook: fetching Debian trixie libonnxruntime-dev for the onnxruntime headers")
  execute_process(COMMAND "${_apt_get}" ${apt_opts} -qq update
    RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err TIMEOUT 300)
  if(NOT rc EQUAL 0)
    string(STRIP "${err}" err)
    set(${reason_var} "apt-get update for Debian trixie failed (${rc}): ${err}" PARENT_SCOPE)
    return()
  endif()
  execute_process(COMMAND "${_apt_get}" ${apt_opts} -qq download libonnxruntime-dev
    WORKING_DIRECTORY "${work}" RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err TIMEOUT 300)
  file(GLOB debs "${work}/libonnxruntime-dev_*.deb")
  if(NOT rc EQUAL 0 OR NOT debs)
    string(STRIP "${err}" err)
    set(${reason_var} "apt-get download libonnxruntime-dev failed (${rc}): ${err}" PARENT_SCOPE)
    return()
  endif()
  list(GET debs 0 deb)
  execute_process(COMMAND "${_dpkg}" -x "${deb}" "${dest}" RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    set(${reason_var} "dpkg -x ${deb} failed: ${err}" PARENT_SCOPE)
  endif()
endfunction()

if(NOT OnnxRuntimeHeaders_INCLUDE_DIR)
  unset(OnnxRuntimeHeaders_INCLUDE_DIR CACHE)
  _ort_fetch_debian_headers("${_ort_fetch_dir}" _reason)
  find_path(OnnxRuntimeHeaders_INCLUDE_DIR onnxruntime_cxx_api.h
    PATHS "${_ort_fetch_dir}/usr/include/onnxruntime" NO_DEFAULT_PATH)
  if(NOT OnnxRuntimeHeaders_INCLUDE_DIR AND NOT _reason)
    set(_reason "libonnxruntime-dev was fetched but holds no onnxruntime_cxx_api.h")
  endif()
  set(OnnxRuntimeHeaders_REASON "${_reason}")
endif()

if(OnnxRuntimeHeaders_INCLUDE_DIR)
  set(OnnxRuntimeHeaders_FOUND TRUE)
  set(OnnxRuntimeHeaders_REASON "")
  message(STATUS "onnx_codebook: onnxruntime headers in ${OnnxRuntimeHeaders_INCLUDE_DIR}")
endif()
