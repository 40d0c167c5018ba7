"""Using a trained model: one engine (engine.py) behind chat, the OpenAI-compatible API, Ray Serve, predict, eval
and export. Driver commands in orchestrator/cli.py call in here; Serve replicas and predict actors load the same
engine on the cluster."""
