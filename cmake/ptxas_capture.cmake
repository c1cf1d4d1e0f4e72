# CUDA compiler launcher that keeps ptxas's resource report (-Xptxas=-v) of each .cu in a file.
#
#   cmake -DREPORT_DIR=<dir> -P ptxas_capture.cmake -- <nvcc> <args...> -c <dir>/<stem>.cu -o <obj>
#
# Runs the compile command unchanged and writes everything it printed to <REPORT_DIR>/<stem>.txt: registers,
# shared memory, stack frame and spill bytes per kernel and arch. The ptxas info lines go only to the file, so
# the build log stays readable; anything else (warnings, errors) is printed as the compiler printed it.
# A failed compile removes the report, so ptxas_check.cmake finds it missing instead of reading a stale one.
# Limitation: an argument containing ';' would be split (CMake lists); the kernel build passes none.

set(_cmd "")
set(_after_dashes FALSE)
math(EXPR _last "${CMAKE_ARGC} - 1")
foreach(_i RANGE ${_last})
  if(_after_dashes)
    list(APPEND _cmd "${CMAKE_ARGV${_i}}")
  elseif(CMAKE_ARGV${_i} STREQUAL "--")
    set(_after_dashes TRUE)
  endif()
endforeach()
if(NOT _cmd OR NOT REPORT_DIR)
  message(FATAL_ERROR "usage: cmake -DREPORT_DIR=<dir> -P ptxas_capture.cmake -- <compiler> <args...>")
endif()

# The source is the argument after -c (how CMake writes a CUDA compile rule for the Makefile and Ninja generators).
set(_stem "")
list(FIND _cmd "-c" _c)
if(_c GREATER -1)
  math(EXPR _c "${_c} + 1")
  list(LENGTH _cmd _n)
  if(_c LESS _n)
    list(GET _cmd ${_c} _src)
    get_filename_component(_stem "${_src}" NAME_WE)
  endif()
endif()

execute_process(COMMAND ${_cmd} RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)

string(REGEX REPLACE "ptxas info[^\n]*\n" "" _shown "${_out}")
string(REGEX REPLACE "    [0-9]+ bytes stack frame[^\n]*\n" "" _shown "${_shown}")
string(STRIP "${_shown}" _shown)
if(_shown)
  message("${_shown}")
endif()

if(_stem)
  set(_report "${REPORT_DIR}/${_stem}.txt")
  if(_rc EQUAL 0)
    file(WRITE "${_report}" "${_out}")
  else()
    file(REMOVE "${_report}")
  endif()
endif()
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "CUDA compile of ${_src} failed (${_rc})")
endif()
