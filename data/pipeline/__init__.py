"""Data-generation pipeline of MEMENTO (arXiv 2604.09852, §3).

Raw chain-of-thought traces -> sentences -> LLM boundary scores -> exact segmentation
into blocks -> LLM mementos graded and refined by an LLM judge -> OpenMementos JSONL.
Run it with `python -m data.pipeline --help`; see data/pipeline/README.md.

Modules: seed (filtering, §9.1), split (sentences, §9.2), llm (chat-completions client),
prompts, score (§9.3), segment (§9.4), memento (§9.5), format (response layout),
tokens (token counts), run (the resumable driver and CLI), bench_segment.
"""
from .segment import objective, segment, segment_one_candidate
from .split import split_sentences

__all__ = ["segment", "segment_one_candidate", "objective", "split_sentences"]
