"""Model side of minidu: HF configs and presets, the Llama/Qwen2/Qwen3 decoder on Triton kernels, and its loader."""
from minidu.models.attention import AttentionMetadata
from minidu.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from minidu.models.llama import CausalLM
from minidu.models.loader import load_model
from minidu.models.presets import MODEL_PRESETS

__all__ = ["AttentionMetadata", "CausalLM", "ModelConfig", "MODEL_PRESETS", "SUPPORTED_ARCHITECTURES", "load_model"]
