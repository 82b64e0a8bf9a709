"""The Triton kernels: block-masked flash attention for training (memento_flash, paper §4) and
paged attention for decode steps and short chunks (paged_attention, §6.1).

Named memento_kernels, not kernels: Hugging Face's `kernels` distribution installs a top-level
`kernels` that transformers imports, and a folder of ours with that name, first on sys.path,
would shadow it (tests/test_structure.py checks every top-level name)."""
