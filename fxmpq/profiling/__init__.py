"""Profiling: measured hardware files from one-layer and pair models timed in ONNX Runtime. Imports the stages below it, export included."""
