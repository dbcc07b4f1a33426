"""Data: offline tokenizer, transforms, masking, webdataset pipelines, official-format task datasets, synthetic world."""
