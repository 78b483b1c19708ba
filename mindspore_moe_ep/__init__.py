"""mindspore-moe-ep: expert-parallel Mixture-of-Experts for MindSpore.

Public API::

    cfg = mindspore_moe_ep.load_config("yaml_configs/tiny.yaml", top_k=2)
    cfg = mindspore_moe_ep.config_from_hf(hf_config_dict, expert_parallel=4)
    layer = mindspore_moe_ep.MoELayer(cfg)
    y = layer(x)                     # [batch, seq, hidden] or [tokens, hidden]

The configuration part is pure Python; MindSpore is imported only when a Cell is first used.
"""
import importlib

from .config import ConfigError, MoEConfig, config_from_hf, load_config
from .host_defaults import applied_host_defaults, apply_host_defaults

# CPU host settings (host blocking run, kernel threads per rank) before MindSpore queues any
# work; see host_defaults.py, MOE_EP_HOST_DEFAULTS=0 turns it off.
apply_host_defaults()

__all__ = ["ConfigError", "ExpertParallelGradReducer", "MoEConfig", "MoELayer",
           "applied_host_defaults", "config_from_hf", "load_config", "setup_runtime"]
__version__ = "0.1.0"

_LAZY = {"MoELayer": ".layer", "setup_runtime": ".runtime",
         "ExpertParallelGradReducer": ".grad_sync"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'mindspore_moe_ep' has no attribute '{name}'")
