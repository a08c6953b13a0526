"""C++ and CUDA sources of snap_fast's extension; compiled on first use by ``snap_fast.ops.swd.cpp``."""
