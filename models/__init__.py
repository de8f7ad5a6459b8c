"""ciar.models: the LlamaGen-compatible model core (PyTorch). Imports no other ciar package."""
from .config import GPT_CONFIG_NAMES, GPTConfig, gpt_config
from .device import DeviceModel, DeviceOutput, build_device_model, device_config
from .gpt import GPT, GPTOutput, KVCache
from .interval import InterHead, Interval, interfuse, interval_stats, process_interval, u_score
from .sampling import SamplingConfig, cfg_combine, entropy, model_probs, process_logits, processed_probs, sample

__all__ = [
    "GPT", "GPTConfig", "GPTOutput", "GPT_CONFIG_NAMES", "DeviceModel", "DeviceOutput", "InterHead", "Interval",
    "KVCache", "SamplingConfig", "build_device_model", "cfg_combine", "device_config", "entropy", "gpt_config",
    "interfuse", "interval_stats", "model_probs", "process_interval", "process_logits", "processed_probs", "sample",
    "u_score",
]
