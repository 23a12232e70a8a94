"""peft_core: parameter-efficient fine-tuning methods behind one small contract (pure PyTorch).

from peft_core import attach, load, LoraConfig, PacaConfig
handle = attach(model, PacaConfig(targets=["all-linear"], r=16))
"""

# Importing the methods package registers every built-in method (peft_core.config's registry), and
# importing any peft_core module runs this file first, so the registry is complete before any use.
import peft_core.methods  # noqa: F401
from peft_core.config import (
    AdapterConfig,
    Capabilities,
    available_methods,
    config_from_dict,
    get_method,
    methods_with,
    register_method,
    trainer_defaults,
)
from peft_core.errors import AdapterError
from peft_core.layer import AdaptedModule, Adapter
from peft_core.methods.compacter import CompacterConfig
from peft_core.methods.corda import CordaConfig
from peft_core.methods.lora import LoraConfig
from peft_core.methods.paca import PacaConfig
from peft_core.methods.plp import PlpConfig, make_joint, precondition_gradients
from peft_core.methods.spt import SptConfig
from peft_core.model import AdapterHandle, attach, check_fits, get_handle, load, read_adapter_config

__all__ = [
    "Adapter",
    "AdaptedModule",
    "AdapterConfig",
    "AdapterError",
    "AdapterHandle",
    "Capabilities",
    "CompacterConfig",
    "CordaConfig",
    "LoraConfig",
    "PacaConfig",
    "PlpConfig",
    "SptConfig",
    "attach",
    "available_methods",
    "check_fits",
    "config_from_dict",
    "get_handle",
    "get_method",
    "load",
    "make_joint",
    "methods_with",
    "precondition_gradients",
    "read_adapter_config",
    "register_method",
    "trainer_defaults",
]
