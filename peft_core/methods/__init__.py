"""Built-in methods. Importing a method module registers it (see peft_core.config)."""

from peft_core.methods import compacter, corda, lora, paca, plp, spt  # noqa: F401
