"""Data sets, stratified splits, batches and batch augmentation."""
