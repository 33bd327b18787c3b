"""Conversion of Llama-family weights into ONNX model directories."""
