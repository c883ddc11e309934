"""Capture: trace a model with torch.fx, find its layers with the one matcher, and keep what every pass knows about a layer in its LayerRecord. Imports core and hardware."""
