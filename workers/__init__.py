"""What runs inside each Ray Train worker: the distributed context, the model, the stage loop, checkpoints."""
