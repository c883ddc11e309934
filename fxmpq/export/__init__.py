"""Export: lower() to QDQ ONNX, the parity checks and their verdict against the model's noise floor, ONNX Runtime sessions, timing and the latency audit. Imports the stages below it."""
