"""Serving SGLang on the CPU default with the project's reference models."""
