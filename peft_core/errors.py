"""The one exception type peft_core raises for bad input."""


class AdapterError(ValueError):
    """Bad adapter input: the message names the module/key at fault and what to do."""
