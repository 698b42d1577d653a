"""A user project that customizes lightning-peft by subclassing `PeftCausalLM`."""
