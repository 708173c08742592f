"""Federated LoRA fine-tuning simulation: data, partition, client training, strategies, round loop."""
