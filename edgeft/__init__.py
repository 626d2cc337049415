"""edgeft: fine-tune, merge, quantize and measure language models for edge devices."""

__version__ = "0.1.0"
