"""Typed, validated MoE configuration: frozen dataclasses, YAML loading and Hugging Face import.

Pure Python (PyYAML only), so it imports quickly and without mindspore.

    config = load_config("yaml_configs/tiny.yaml", expert_parallel=2)
    config.router.top_k, config.num_local_experts
"""
from .errors import ConfigError
from .hf import config_from_hf
from .loader import load_config
from .schema import (DispatchConfig, LanguageModelConfig, ModelConfig, MoEConfig, ParallelConfig,
                     RouterConfig, RuntimeConfig, TrainConfig, WorkloadConfig)

__all__ = [
    "ConfigError", "DispatchConfig", "LanguageModelConfig", "ModelConfig", "MoEConfig",
    "ParallelConfig", "RouterConfig", "RuntimeConfig", "TrainConfig", "WorkloadConfig",
    "config_from_hf", "load_config",
]
