"""The label of a token that takes no loss: Hugging Face's and `torch.nn.functional.cross_entropy`'s convention.

Its own module so that the data layer (which writes it) and the losses (which skip it) both depend on it, not on
each other; importing it costs nothing.
"""

IGNORE_INDEX = -100
