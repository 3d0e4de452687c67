"""What the scripts build on: adapter files and task switching, PEFT interop, decoding,
metrics, the baselines, the exact merge, run records, shared set-up."""
