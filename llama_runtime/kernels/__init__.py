"""The CPU kernels: C++ sources (csrc/), compiled at install once per instruction-set level
(setup.py), one C API loaded with ctypes (library.py), the weight layout they multiply
(layout.py) and calls over numpy arrays (api.py). Every CPU path uses them: the native backend
over numpy, the torch backend through data pointers."""
