"""Fake quantization: LSQ quantizers, the integer-kernel simulation, the switchable QuantModel and the weight storage of each format. Imports core, hardware, capture, cost."""
