"""StrokeGate's learned models: networks, training on synthetic cohorts, export to ONNX."""
