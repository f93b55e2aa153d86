"""dpo-train: Direct Preference Optimization fine-tuning from one YAML file."""

__version__ = "0.1.0"
