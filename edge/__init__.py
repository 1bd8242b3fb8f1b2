"""Standalone LiteRT backdoor screener for edge devices (see edge/README.md).

Imports nothing from tfbackdoor and never imports TensorFlow.
"""
