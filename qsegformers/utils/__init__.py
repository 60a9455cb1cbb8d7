"""Helpers of the command-line tools: image reading, demo prediction and visualisation, FLOP counting,
export wrappers."""
