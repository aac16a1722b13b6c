"""persqa_ray: personalized visual-QA datasets from image collections, on Ray Data + vLLM.

Notebook API::

    import persqa_ray
    cfg = persqa_ray.load_config("configs/demo.yaml", ["prompt.seed=7"])
    ds = persqa_ray.build_dataset(cfg)     # lazy ray.data.Dataset of output rows
    ds.take(3)
    summary = persqa_ray.run(cfg)          # writes Parquet + _summary.json
"""
from persqa_ray.config import ConfigError, PersQAConfig, load_config

__all__ = ["ConfigError", "PersQAConfig", "load_config", "build_dataset", "run", "read_output"]
__version__ = "0.1.0"


def build_dataset(config):
    from persqa_ray.pipeline import build_dataset as _build
    return _build(config)


def run(config, overrides=()):
    from persqa_ray.pipeline import run as _run
    return _run(config, overrides)


def read_output(path, columns=None, storage_options=None):
    from persqa_ray.io.dataset import read_output as _read
    return _read(path, columns, storage_options)
