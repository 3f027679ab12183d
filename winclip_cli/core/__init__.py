"""The WinCLIP math and the model: tensors in, tensors out; no files, no CLI."""
