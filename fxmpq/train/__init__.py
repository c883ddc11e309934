"""Training: joint indicator training and LSQ fine-tuning on one DDP-aware loop, resumable state, and rebuilding a fine-tuned model from its checkpoint. Imports the stages below it."""
