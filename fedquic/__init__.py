"""fedquic: federated LoRA fine-tuning of 4-bit transformers over QUIC."""

__version__ = "0.1.0"
