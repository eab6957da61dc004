"""Offline re-distillation: dataset -> LoRA training -> evaluation -> gated promotion."""
