"""peft_core: parameter-efficient fine-tuning methods behind one small contract (pure PyTorch).

from peft_core import attach, load, LoraConfig, PacaConfig
handle = attach(model, PacaConfig(targets=["all-linear"], r=16))
"""

from peft_core.config import AdapterConfig, available_methods, config_from_dict, get_method, register_method
from peft_core.errors import AdapterError
from peft_core.layer import AdaptedModule, Adapter
from peft_core.methods.compacter import CompacterConfig
from peft_core.methods.corda import CordaConfig
from peft_core.methods.lora import LoraConfig
from peft_core.methods.paca import PacaConfig
from peft_core.methods.plp import PlpConfig, make_joint, precondition_gradients
from peft_core.methods.spt import SptConfig
from peft_core.model import AdapterHandle, attach, get_handle, load, read_adapter_config

__all__ = [
    "Adapter",
    "AdaptedModule",
    "AdapterConfig",
    "AdapterError",
    "AdapterHandle",
    "CompacterConfig",
    "CordaConfig",
    "LoraConfig",
    "PacaConfig",
    "PlpConfig",
    "SptConfig",
    "attach",
    "available_methods",
    "config_from_dict",
    "get_handle",
    "get_method",
    "load",
    "make_joint",
    "precondition_gradients",
    "read_adapter_config",
    "register_method",
]
