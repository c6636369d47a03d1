"""Learned models on an inference engine: model cards, one Engine interface (load once, predict
many times) over TensorRT, ONNX Runtime and torch, and what each model is fed.

- ``card``: the JSON card beside every weight file, validated at load.
- ``engine``: ``load_engine``, ``Engine``, choosing a backend (``auto`` takes the best that runs).
- ``onnxruntime_backend``, ``tensorrt_backend``, ``torch_backend``: one module per backend,
  each importing its library lazily (only ONNX Runtime is in the default install).
- ``ctp_inputs``: what the CT perfusion core/penumbra model takes, made exactly as in training.
- ``ctp_core_penumbra``: ``predict_core_penumbra``, numpy in and out, for the CT analysis.

The service never imports the ``models`` package: it loads model files and checks them against
their cards.
"""
