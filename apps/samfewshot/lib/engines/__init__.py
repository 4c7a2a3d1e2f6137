"""Inference engines behind the resident models: OpenVINO for the image encoders on a CPU (``openvino_engine``)."""
