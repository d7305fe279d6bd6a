"""autotransfer: AutoML search over how to fine-tune a pretrained backbone."""

__version__ = "0.1.0"
