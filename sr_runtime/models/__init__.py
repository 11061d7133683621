"""Models shipped with the runtime: one directory per model (manifest.json + ONNX files)."""
